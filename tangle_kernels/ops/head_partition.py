"""Head-partition attention: the nanoGPT space's attention under a soft architecture at
the cost of one attention call per head-count candidate.

In the nanoGPT space the heads partition the embedding width: a sub-network of width
``e`` with ``h`` heads has head width ``d = e / h``, head ``r`` reading the columns
``[r d, (r + 1) d)`` of q, k and v. A head count re-partitions the width, so it cannot
be expressed as a weight mask; TangleNAS mixes q, k and v over the embedding candidates
inside each head count's partition and runs ONE attention call per head count. With
``E`` the max width, ``a_i`` the weights of the embedding candidates ``e_i`` and
``b_j`` those of the head counts ``h_j`` (``D_j = E / h_j``, ``d_ij = e_i / h_j``), and
``G_ij`` the zero-padding gather that puts column ``r d_ij + t`` (``t < d_ij``) of a
``[.., E]`` tensor at slot ``(r, t)`` of an ``[.., h_j, D_j]`` tensor::

    Q_j = sum_i a_i d_ij^(-1/2) G_ij(q)        K_j = sum_i a_i G_ij(k)
    V_j = sum_i a_i G_ij(v)
    O_j = softmax(Q_j K_j^T + causal mask) V_j        (one call, h_j heads of width D_j,
                                                       scale 1: q is pre-scaled)
    y   = sum_j b_j sum_i a_i G_ij^T(O_j)              (G^T: scatter back to r d_ij + t)

Under a one-hot choice ``(e, h)`` this is exactly the sub-network's attention, its
output zero-padded to ``E``: the zero q/k columns leave the dot products unchanged, the
zero v columns give zero output columns, the pre-scale is the sub-network's
``1/sqrt(e/h)``, and the scatter puts head ``r``'s output where the sub-network's
output projection reads it (``r e/h``).

The paper's code differs for a non-max embedding width: its padded head slots put head
``r``'s output at ``r E / h`` (where the extracted network's projection reads ``r e /
h``) and it scales by ``1/sqrt(E/h)``, so its one-hot soft forward is not the extracted
sub-network. This op keeps that invariant.

:func:`partition_attention` is one autograd node on CPU (float32/float64): the forward
saves only ``qkv``, each call's output and log-sum-exp; the backward recomputes the
gathers (activation-sized copies, no attention recompute) and runs the attention
backward of each call. The attention calls are torch's CPU flash kernel without
dropout, and with attention dropout the fused kernel of :mod:`tangle_kernels.ops.attention`
(its masks drawn from one seed per call, regenerated in backward; torch has no CPU
flash kernel with dropout, and its math path keeps every call's attention matrices).
Where that kernel is unavailable (no BLAS symbol found, ``TANGLE_FUSED_ATTENTION=0``)
the dropout path is a gather node and a scatter node (the same C++ kernels) around
torch's own attention calls with dropout, one per head count. Elsewhere (CUDA, half
precision, torch.compile) the same math runs as a plain autograd composition
(:func:`~tangle_kernels.backends.reference.partition_attention_reference`, also the
oracle of the tests). A new device is a wrapper ``backends/<device>/head_partition.py``
and a line of the registry (backends/__init__.py).

Files: this one holds the plan, the routing and the torch.compile custom ops; the
autograd nodes are in ops/head_partition_nodes.py. Second order: when a graph is
requested every node differentiates its reference composition (under the same dropout
masks), so the op is twice differentiable with the reference's second derivatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backends
from ..backends.reference import partition_attention_reference
from ._autograd import refuse_functorch
from .attention import fused_attention_available

__all__ = ["partition_attention", "partition_attention_reference", "PartitionPlan"]


class PartitionPlan:
    """The static shape of one head-partition attention: max width ``E``, embedding
    candidate widths ``embeds`` (any order, repeats allowed) and head counts ``heads``.
    Every head count must divide every embedding width."""

    def __init__(self, E: int, embeds: Sequence[int], heads: Sequence[int]):
        self.E = int(E)
        self.embeds = tuple(int(e) for e in embeds)
        self.heads = tuple(int(h) for h in heads)
        if not self.embeds or not self.heads:
            raise ValueError("PartitionPlan: needs at least one embedding width and head count")
        if max(self.embeds) > self.E:
            raise ValueError(f"PartitionPlan: embedding width {max(self.embeds)} > E={self.E}")
        for h in self.heads:
            if h < 1 or self.E % h:
                raise ValueError(f"PartitionPlan: {h} heads do not divide E={self.E}")
            for e in self.embeds:
                if e % h:
                    raise ValueError(f"PartitionPlan: {h} heads do not divide embed {e}")

    def head_width(self, j: int) -> int:
        return self.E // self.heads[j]


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _kernels_available(device: torch.device) -> bool:
    return backends.resolve("head_partition", None, device) == "cpu"


from . import head_partition_nodes as _nodes  # noqa: E402  (the nodes read _FLASH above)

# The node's forward and backward (module attributes: the custom ops call them by name).
_node_forward = _nodes.node_forward
_node_backward = _nodes.node_backward

# --- the torch.compile route: the same node as custom ops -------------------------------

_PLANS: dict = {}


def _plan_of(E: int, embeds, heads) -> PartitionPlan:
    key = (int(E), tuple(embeds), tuple(heads))
    if key not in _PLANS:
        _PLANS[key] = PartitionPlan(*key)
    return _PLANS[key]


@torch.library.custom_op("tangle::partition_attention_fwd", mutates_args=())
def _pa_fwd_op(qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seeds: torch.Tensor, E: int,
               embeds: list[int], heads: list[int], causal: bool,
               dropout_p: float) -> list[torch.Tensor]:
    """``[y, O_1.., L_1..]`` of :func:`_node_forward` (CPU; ``seeds``: int64 ``[n]``)."""
    y, outs, lses = _node_forward(qkv.contiguous(), a, b, _plan_of(E, embeds, heads), causal,
                                  dropout_p, seeds.tolist())
    return [y, *outs, *lses]


@_pa_fwd_op.register_fake
def _(qkv, a, b, seeds, E, embeds, heads, causal, dropout_p):
    B, T, _ = qkv.shape
    return ([qkv.new_empty(B, T, E)] + [qkv.new_empty(B, T, h, E // h) for h in heads]
            + [qkv.new_empty(B, h, T) for h in heads])


@torch.library.custom_op("tangle::partition_attention_bwd", mutates_args=())
def _pa_bwd_op(dy: torch.Tensor, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               seeds: torch.Tensor, saved: list[torch.Tensor], E: int, embeds: list[int],
               heads: list[int], causal: bool, dropout_p: float) -> list[torch.Tensor]:
    """``[dqkv, d a, d b]`` of :func:`_node_backward`."""
    nh = len(heads)
    dX, da, db = _node_backward(dy, qkv.contiguous(), a, b, _plan_of(E, embeds, heads), causal,
                                dropout_p, seeds.tolist(), saved[:nh], saved[nh:], True, True)
    return [dX, torch.tensor(da, dtype=a.dtype), torch.tensor(db, dtype=b.dtype)]


@_pa_bwd_op.register_fake
def _(dy, qkv, a, b, seeds, saved, E, embeds, heads, causal, dropout_p):
    return [torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(a),
            torch.empty_like(b)]


def _pa_setup_context(ctx, inputs, output):
    qkv, a, b, seeds, E, embeds, heads, causal, dropout_p = inputs
    ctx.cfg = (E, list(embeds), list(heads), causal, dropout_p)
    ctx.save_for_backward(qkv, a, b, seeds, *output[1:])


def _pa_backward(ctx, grads):
    qkv, a, b, seeds, *saved = ctx.saved_tensors
    E, embeds, heads, causal, dropout_p = ctx.cfg
    if torch.is_grad_enabled():  # a graph is requested: differentiate the reference
        dX, da, db = _nodes.graph_grads(qkv, a, b, _plan_of(E, embeds, heads), causal, dropout_p,
                                        seeds.tolist(), grads[0], (True, True, True))
        return dX, da, db, None, None, None, None, None, None
    dX, da, db = _pa_bwd_op(grads[0], qkv, a, b, seeds, list(saved), E, embeds, heads, causal,
                            dropout_p)
    return dX, da, db, None, None, None, None, None, None


_pa_fwd_op.register_autograd(_pa_backward, setup_context=_pa_setup_context)


@torch.compiler.assume_constant_result
def _fused_ok() -> bool:
    """The fused attention can run (a constant for torch.compile: probed outside the graph)."""
    return fused_attention_available() is None


def _partition_attention_op(qkv, a, b, plan: PartitionPlan, causal: bool, dropout_p: float):
    """The compile route on CPU: the custom ops, the seeds drawn in the graph."""
    nh = len(plan.heads)
    if dropout_p > 0.0:
        seeds = torch.randint(0, 2**62, (nh,), dtype=torch.int64, device=qkv.device)
    else:
        seeds = torch.zeros(nh, dtype=torch.int64, device=qkv.device)
    return _pa_fwd_op(qkv, a, b, seeds, plan.E, list(plan.embeds), list(plan.heads), causal,
                      dropout_p)[0]


def partition_attention(qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        plan: PartitionPlan, *, causal: bool = True,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """``qkv [B, T, 3 E]`` (q | k | v), ``a [m]`` embedding weights, ``b [n]`` head-count
    weights -> ``y [B, T, E]`` (see the module docstring for the math)."""
    if qkv.dim() != 3 or qkv.shape[-1] != 3 * plan.E:
        raise ValueError(f"qkv: expected [B, T, {3 * plan.E}], got {tuple(qkv.shape)}")
    if a.shape != (len(plan.embeds),) or b.shape != (len(plan.heads),):
        raise ValueError(
            f"a, b: expected shapes ({len(plan.embeds)},) and ({len(plan.heads)},), got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    cpu_kernels = (
        _kernels_available(qkv.device)
        and qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )
    attention_ok = _FLASH is not None if dropout_p == 0.0 else _fused_ok()
    if torch.compiler.is_compiling():
        # With dropout the compiled reference would run torch's CPU math attention (its
        # matrices and masks kept): the custom ops of the node instead, faster and
        # smaller. Without dropout inductor fuses the reference around torch's flash
        # kernel, which was the faster of the two (benchmarks/results/).
        if cpu_kernels and attention_ok and dropout_p > 0.0:
            return _partition_attention_op(qkv, a, b, plan, bool(causal), float(dropout_p))
        return partition_attention_reference(qkv, a, b, plan, causal=causal, dropout_p=dropout_p)
    if not cpu_kernels or (dropout_p == 0.0 and _FLASH is None):
        return partition_attention_reference(qkv, a, b, plan, causal=causal, dropout_p=dropout_p)
    refuse_functorch("partition_attention", "cpu", qkv, a, b)
    if not qkv.is_contiguous():
        qkv = qkv.contiguous()
    if dropout_p > 0.0 and not _fused_ok():
        return _nodes.partition_attention_dropout(qkv, a, b, plan, bool(causal), float(dropout_p))
    return _nodes._PartitionAttention.apply(qkv, a, b, plan, bool(causal), float(dropout_p))
