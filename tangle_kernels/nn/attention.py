"""EntangledAttention: multi-head self-attention with embedding-width and head-count
choices, in the two forms the search spaces use."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import plain
from ..ops.attention import attention as _routed_attention
from ..ops.head_partition import PartitionPlan, partition_attention
from .arch import HardArch
from .base import EntangledModule
from .linear import EntangledLinear
from .spec import Spec, WidthSpec, ordered_union

__all__ = ["EntangledAttention"]


class EntangledAttention(EntangledModule):
    """Self-attention ``proj(attend(split(qkv(x))))`` over ``x [B, T, E_max]``.

    Args:
        embed_dim: width spec of the block's input and output (``E``).
        num_heads: width spec of the number of heads (``H``).
        choices: ``{name: values}`` for the names used by the specs.
        head_dim: ``int`` -> **AutoFormer mode**: every head has this fixed width, the
            inner width is ``H * head_dim`` and a head-count candidate is a prefix of the
            heads. ``None`` -> **nanoGPT mode**: the inner width is ``E`` and the heads
            partition it, so the head width ``E / H`` changes with both choices.
        bias: bias of the q|k|v projection; ``proj_bias`` (default: ``bias``) of the
            output projection.
        causal: causal mask (``is_causal`` of ``scaled_dot_product_attention``).
        dropout: attention dropout probability in training.
        soft_heads: nanoGPT mode, soft arch: ``"partition"`` (default) = the TangleNAS
            relaxation at the cost of ONE attention call per head-count candidate (q, k,
            v mixed over the embedding candidates inside each head count's partition,
            :mod:`tangle_kernels.ops.head_partition`); ``"exact"`` = the exact output
            mixture over every (embedding, heads) candidate (one call per candidate, or
            per width group with ``grouped_heads``). Both equal the extracted
            sub-network under a one-hot arch.
        head_bucket: ``soft_heads="exact"``: candidate heads whose widths round up to
            the same multiple of this share one attention call (see below).
        grouped_heads: ``soft_heads="exact"``: ``True`` = the grouped calls, ``False`` =
            one call per candidate, ``None`` (default) = grouped on CUDA (where the
            per-candidate calls are launch-bound), per candidate elsewhere (on CPU the
            gather/scatter along the last dimension costs more than the calls it saves).

    Submodules: ``qkv = EntangledLinear(E, inner, out_segments=3)`` (q | k | v stacked,
    each prefix-sliced) and ``proj = EntangledLinear(inner, E)``.

    Soft arch:

    - AutoFormer mode: the weights are superposed (heads beyond the candidate's get
      zero q/k/v columns), and ONE attention call runs over ``H_max`` heads of width
      ``head_dim``: the cost of the max-size attention.
    - nanoGPT mode, ``soft_heads="partition"`` (default): a head count cannot be
      expressed as a weight mask (it re-partitions the width). With ``a`` the weights
      of the embedding candidates ``e_i``, ``b`` those of the head counts ``h_j``,
      ``D_j = E_max / h_j``, ``d_ij = e_i / h_j`` and ``G_ij`` the zero-padding gather
      of head ``r``'s columns ``[r d_ij, (r+1) d_ij)`` into slot ``r`` of width
      ``D_j``::

          q, k, v = split(qkv(x, arch))                   (superposed weights, E_max)
          Q_j = sum_i a_i d_ij^(-1/2) G_ij(q),  K_j = sum_i a_i G_ij(k),
          V_j = sum_i a_i G_ij(v)
          y = sum_j b_j sum_i a_i G_ij^T(attend(Q_j, K_j, V_j, h_j heads, scale 1))
          out = proj(y, arch)

      one attention call per head count at the max width (the cost floor of any soft
      relaxation of the heads choice). Under a one-hot arch ``y`` is exactly the
      sub-network's attention output, zero-padded. The TangleNAS code does not keep
      that invariant for a non-max embedding width: it splits the max-width q into
      slots of width ``E_max / h`` (head ``r`` at ``r E_max / h``, where the extracted
      network's projection reads ``r e / h``) and scales by ``1/sqrt(E_max / h)``;
      here the gather, the per-candidate scale and the scatter back to ``r e / h``
      fix both. On CPU the whole block is one autograd node that keeps only ``qkv``
      and each call's output (the gathers are recomputed in backward).
    - nanoGPT mode, ``soft_heads="exact"``: the outputs of the candidate partitions are
      mixed::

          q, k, v = split(qkv(x, arch))                    (superposed weights, E_max)
          y = sum_{(e, h)} mix_(e,h) * pad(attend(q[..., :e], k[..., :e], v[..., :e], h))
          out = proj(y, arch)

      over every (embedding width, head count) candidate ``c = (e, h)``, ``mix`` the
      outer product of the two arch vectors. The heads of all candidates are stacked
      (candidate ``c`` contributes ``h`` heads of width ``d_c = e / h``, head ``j``
      reading columns ``[j d_c, (j+1) d_c)``) and gathered from q|k|v by one
      ``index_select``; heads whose widths round up to the same multiple of
      ``head_bucket`` (default 16) share ONE attention call, zero-padded to that
      width. Zero q columns leave the dot products unchanged; q is pre-scaled per head
      by ``1 / sqrt(d_c)`` (the calls use ``scale=1``); v is pre-scaled by ``mix_c``
      with zero padding, so each head's output is already weighted and zero outside
      its ``d_c`` columns, and one ``index_add`` sums the head outputs into
      ``y [B, T, E_max]``. Cost: one attention call per width bucket (nanoGPT
      ``paper`` preset, embed 384/576/768 x heads 6/8/12: 6 calls instead of 9, padded
      width 5248 vs the candidates' 5184; flash kernels pad head widths to multiples
      of 32 themselves, so ``head_bucket=32`` gives 4 calls at no extra tensor-core
      work), plus one gather and one scatter-add of the stacked heads; the
      projections stay single superposed GEMMs. ``head_bucket >= max_c d_c`` gives a
      single call. This grouped form runs on CUDA; elsewhere (``grouped_heads``)
      ``_forward_partitions_loop`` makes the ``K_E * K_H`` per-candidate calls, which
      are cheaper on CPU.

    HardArch: the sub-network (sliced q|k|v GEMM, attention over ``h`` heads of the
    chosen width, sliced output GEMM), output zero-padded to ``E_max``. No arch: the
    plain max-size attention. Validation: in nanoGPT mode every head count must divide
    every embedding width it can be combined with.
    """

    def __init__(
        self,
        embed_dim: Spec,
        num_heads: Spec,
        choices: Mapping[str, Sequence] | None = None,
        *,
        head_dim: int | None = None,
        bias: bool = True,
        proj_bias: bool | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        soft_heads: str = "partition",
        head_bucket: int = 16,
        grouped_heads: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(head_bucket, bool) or not isinstance(head_bucket, int) or head_bucket < 1:
            raise ValueError(f"head_bucket={head_bucket!r} must be a positive int")
        self.head_bucket = head_bucket
        if grouped_heads not in (None, True, False):
            raise ValueError(f"grouped_heads={grouped_heads!r} must be None, True or False")
        self.grouped_heads = grouped_heads
        if soft_heads not in ("partition", "exact"):
            raise ValueError(f"soft_heads={soft_heads!r} must be 'partition' or 'exact'")
        self.soft_heads = soft_heads
        self.embed_spec = WidthSpec(embed_dim, choices, "embed_dim")
        self.heads_spec = WidthSpec(num_heads, choices, "num_heads")
        self.causal, self.dropout = bool(causal), float(dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.names = ordered_union(self.embed_spec.names, self.heads_spec.names)
        allc = {**self.embed_spec.choices, **self.heads_spec.choices}
        self.choices = {n: allc[n] for n in self.names}
        pb = bias if proj_bias is None else proj_bias
        fk = dict(device=device, dtype=dtype)
        if head_dim is None:
            self.mode = "nanogpt"
            for combo in itertools.product(*(self.choices[n] for n in self.names)):
                v = dict(zip(self.names, combo))
                e, h = self.embed_spec.size(v), self.heads_spec.size(v)
                if e % h:
                    raise ValueError(
                        f"num_heads={num_heads!r}: {h} heads do not divide embed_dim={e} "
                        f"(candidate {v}); with head_dim=None the heads partition the width"
                    )
            inner: Spec = embed_dim
            self.head_dim = None
        else:
            if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
                raise ValueError(f"head_dim={head_dim!r} must be a positive int or None")
            self.mode = "autoformer"
            self.head_dim = head_dim
            hs = num_heads if isinstance(num_heads, tuple) else (num_heads,)
            inner = (*hs, head_dim)
        self.qkv = EntangledLinear(embed_dim, inner, choices, bias=bias, out_segments=3, **fk)
        self.proj = EntangledLinear(inner, embed_dim, choices, bias=pb, **fk)
        self.embed_dim = self.embed_spec.max
        self.num_heads = self.heads_spec.max
        self.inner = self.qkv.out_spec.max
        # The names whose weights mix attention OUTPUTS (nanoGPT mode).
        self.act_names = self.names if self.mode == "nanogpt" else ()
        if self.mode == "nanogpt" and self.act_names:
            self._cands = [
                (
                    self.embed_spec.size(dict(zip(self.names, c))),
                    self.heads_spec.size(dict(zip(self.names, c))),
                )
                for c in itertools.product(*(self.choices[n] for n in self.names))
            ]
            self._build_head_tables(device)
            self._plan = None
            if not set(self.embed_spec.names) & set(self.heads_spec.names):
                self._plan = PartitionPlan(
                    self.embed_dim, self.embed_spec.sizes(), self.heads_spec.sizes()
                )

    @classmethod
    def from_module(
        cls,
        module,
        choices: Mapping[str, Sequence] | None = None,
        *,
        embed_dim: Spec | None = None,
        num_heads: Spec | None = None,
    ) -> EntangledAttention:
        """The entangled version of a stock attention module, sharing its weights where
        the layouts agree: nanoGPT ``CausalSelfAttention``, ``nn.MultiheadAttention``
        (self-attention), transformers ``GPT2Attention``, timm ``Attention`` (the
        converters of :func:`~tangle_kernels.nn.entangle`, whose ``dims`` keys
        ``<path>.embed_dim`` / ``<path>.num_heads`` do the same inside a model).
        Unspecified arguments stay at the module's; the max of each spec must be the
        module's. Its ``extract`` returns the module's own class with the head
        attributes (``num_heads``, ``head_dim``, ``split_size``, ...) updated."""
        from .convert.registry import Origin, find_converter

        conv, why = find_converter(module)
        if conv is None or "num_heads" not in conv.args:
            raise TypeError(
                why
                or f"module: {type(module).__name__} has no attention converter (supported: "
                "nanoGPT CausalSelfAttention, nn.MultiheadAttention, GPT2Attention, timm Attention)"
            )
        specs = {k: v for k, v in (("embed_dim", embed_dim), ("num_heads", num_heads)) if v is not None}
        new = conv.entangle(module, specs, choices or {}, {})
        new.__dict__["_tk_origin"] = Origin.of(module)
        new.__dict__["_tk_converter"] = conv
        new.train(module.training)
        return new

    def _build_head_tables(self, device) -> None:
        """Index tables of the batched nanoGPT-mode attention (non-persistent buffers).

        The stacked heads are grouped by padded width ``D_g`` (``d_c`` rounded up to a
        multiple of ``head_bucket``, at most ``max_c d_c``); group ``g`` holds ``H_g``
        heads and owns the flat positions ``[off_g, off_g + H_g D_g)``, position
        ``off_g + i D_g + t`` being column ``t`` of its ``i``-th head (head ``j`` of
        candidate ``c``), real where ``t < d_c``. ``self.head_groups`` lists
        ``(off_g, H_g, D_g)``; over all ``P = sum_g H_g D_g`` positions:

        - ``_hd_src [3 P]``: the q|k|v column each position reads (q part, then k,
          then v). Padding reads a real column of its head; it is zeroed by the q and
          v multipliers (k's padding meets zero q columns).
        - ``_hd_qscale [P]``: the q multiplier, ``1/sqrt(d_c)`` where real, 0 at padding.
        - ``_hd_real [P]``: 1 where real, 0 at padding (the v mask).
        - ``_hd_cand [P]``: the candidate of each position (index into mix).
        - ``_hd_dst [P]``: the output column of each position (``j d_c + t``; 0 at
          padding, whose output is exactly zero).
        """
        E = self.inner  # = E_max: q | k | v each E_max wide
        dmax = max(e // h for e, h in self._cands)
        bucket = self.head_bucket
        groups: dict[int, list] = {}
        for ci, (e, h) in enumerate(self._cands):
            d = e // h
            width = min(dmax, -(-d // bucket) * bucket)
            groups.setdefault(width, []).extend((ci, d, j) for j in range(h))
        src, qscale, real, cand, dst, self.head_groups = [], [], [], [], [], []
        for D in sorted(groups):
            self.head_groups.append((len(src), len(groups[D]), D))
            for ci, d, j in groups[D]:
                for t in range(D):
                    ok = t < d
                    src.append(j * d + t if ok else j * d)
                    qscale.append(float(d) ** -0.5 if ok else 0.0)
                    real.append(1.0 if ok else 0.0)
                    cand.append(ci)
                    dst.append(j * d + t if ok else 0)
        self.heads_total = sum(H for _, H, _ in self.head_groups)
        self.head_pad = dmax
        s = torch.tensor(src, dtype=torch.long, device=device)
        self.register_buffer("_hd_src", torch.cat([s, s + E, s + 2 * E]), persistent=False)
        self.register_buffer(
            "_hd_qscale", torch.tensor(qscale, dtype=torch.float64, device=device), persistent=False
        )
        self.register_buffer("_hd_real", torch.tensor(real, device=device), persistent=False)
        self.register_buffer("_hd_cand", torch.tensor(cand, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("_hd_dst", torch.tensor(dst, dtype=torch.long, device=device), persistent=False)

    def _forward_partitions(self, qkv: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """nanoGPT mode, soft arch: ``sum_c mix_c * pad(attend(q[:e_c], k[:e_c], v[:e_c],
        h_c))`` with one attention call per head-width group over the stacked heads of
        all candidates (see the class docstring). ``qkv [B, T, 3 E_max]``, ``mix [K]``
        -> ``y [B, T, E_max]``."""
        B, T, _ = qkv.shape
        dt = qkv.dtype
        P = self._hd_dst.numel()
        g = qkv.index_select(-1, self._hd_src).view(B, T, 3, P)
        q = g[:, :, 0] * self._hd_qscale.to(dt)
        k = g[:, :, 1]
        v = g[:, :, 2] * (mix.to(dt).index_select(0, self._hd_cand) * self._hd_real.to(dt))
        p = self.dropout if self.training else 0.0
        outs = []
        for off, H, D in self.head_groups:
            qg, kg, vg = (t[..., off:off + H * D].view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=p, is_causal=self.causal, scale=1.0)
            outs.append(o.transpose(1, 2).reshape(B, T, H * D))
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        # In place on a fresh zero tensor (no clone); the gradient flows to ``o``.
        return qkv.new_zeros(B, T, self.embed_dim).index_add_(-1, self._hd_dst, o)

    def _forward_partition_heads(self, qkv: torch.Tensor, arch) -> torch.Tensor:
        """nanoGPT mode, ``soft_heads="partition"``: one attention call per head count
        (see the class docstring). ``qkv [B, T, 3 E_max]`` -> ``y [B, T, E_max]``."""
        one = qkv.new_ones(1)
        es, hs = self.embed_spec.names, self.heads_spec.names
        a = self._mix(arch, es) if es else one
        b = self._mix(arch, hs) if hs else one
        p = self.dropout if self.training else 0.0
        return partition_attention(qkv, a, b, self._plan, causal=self.causal, dropout_p=p)

    def _forward_partitions_loop(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor
    ) -> torch.Tensor:
        """One attention call per ``(e, h)`` candidate, outputs zero-padded to
        ``E_max`` and mixed (the CPU path, and the reference of
        :meth:`_forward_partitions`)."""
        y = None
        for j, (e, h) in enumerate(self._cands):
            t = self._attend(q[..., :e], k[..., :e], v[..., :e], h) * mix[j].to(q.dtype)
            if e < self.embed_dim:
                t = F.pad(t, (0, self.embed_dim - e))
            y = t if y is None else y + t
        return y

    def _attend(self, q, k, v, h):
        """Attention of the sliced sub-network, the max-size model and AutoFormer mode:
        with dropout on CPU the fused kernel (:func:`tangle_kernels.ops.attention.attention`;
        the extracted plain module runs torch's, the same function up to the dropout
        mask's random stream)."""
        p = self.dropout if self.training else 0.0
        return plain.attend(q, k, v, h, causal=self.causal, dropout_p=p, kernel=_routed_attention)

    def forward(
        self, x: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x [B, T, E_max] -> [B, T, E_max]`` (see the class docstring)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected [B, T, {self.embed_dim}], got shape {tuple(x.shape)}")
        arch = self._resolve(arch)
        if arch is None or not self.names:
            q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).split(self.inner, dim=-1)
            y = self._attend(q, k, v, self.num_heads)
            return F.linear(y, self.proj.weight, self.proj.bias)
        if isinstance(arch, HardArch):
            return self.forward_hard(x, arch)
        qkv = self.qkv(x, arch)
        if self.mode == "autoformer":
            q, k, v = qkv.split(self.inner, dim=-1)
            y = self._attend(q, k, v, self.num_heads)
        else:
            if self.soft_heads == "partition" and self._plan is not None:
                return self.proj(self._forward_partition_heads(qkv, arch), arch)
            mix = self._mix(arch, self.names)
            grouped = self.grouped_heads
            if grouped is None:
                grouped = qkv.device.type == "cuda"
            if grouped:
                y = self._forward_partitions(qkv, mix)
            else:
                y = self._forward_partitions_loop(*qkv.split(self.inner, dim=-1), mix)
        return self.proj(y, arch)

    def forward_hard(self, x: torch.Tensor, arch: HardArch) -> torch.Tensor:
        """The one-hot fast path: the sub-network, output zero-padded to ``E_max``."""
        vals = self._selection(arch, self.names)
        h = self.heads_spec.size(vals)
        qkv = self.qkv.forward_hard(x, arch, pad_output=False)
        inner = qkv.shape[-1] // 3
        q, k, v = qkv.split(inner, dim=-1)
        if self.act_names and self.soft_heads == "partition" and self._plan is not None:
            # The straight-through gradient of the head-partition relaxation at this
            # one-hot point: the embedding entry scales q, k, v and the output, the
            # heads entry the output (values 1: the forward is the sub-network's).
            se = self._scale(arch, self.embed_spec.names, q.dtype) if self.embed_spec.names else None
            sh = self._scale(arch, self.heads_spec.names, q.dtype) if self.heads_spec.names else None
            if se is not None:
                q, k, v = q * se, k * se, v * se
            y = self._attend(q, k, v, h)
            s = se if sh is None else (sh if se is None else se * sh)
            if s is not None:
                y = y * s
            return self.proj.forward_hard(y, arch, sliced_input=True)
        y = self._attend(q, k, v, h)
        if self.act_names:
            s = self._scale(arch, self.act_names, y.dtype)
            if s is not None:
                y = y * s
        return self.proj.forward_hard(y, arch, sliced_input=True)

    def extract(self, selection: Mapping[str, Any]) -> plain.SelfAttention:
        """The plain :class:`~tangle_kernels.nn.plain.SelfAttention` of the chosen
        sub-network with the sliced q|k|v and output projections copied."""
        vals = self._values(selection, self.names)
        e, h = self.embed_spec.size(vals), self.heads_spec.size(vals)
        d = self.head_dim if self.head_dim is not None else e // h
        qkv = self.qkv.extract(vals)
        proj = self.proj.extract(vals)
        att = plain.SelfAttention(
            e,
            h,
            d,
            bias=qkv.bias is not None,
            proj_bias=proj.bias is not None,
            causal=self.causal,
            dropout=self.dropout,
            device=qkv.weight.device,
            dtype=qkv.weight.dtype,
        )
        att.qkv, att.proj = qkv, proj
        att.train(self.training)
        return att

    def extra_repr(self) -> str:
        hd = f"head_dim={self.head_dim}" if self.head_dim is not None else "head_dim=E/H"
        return (
            f"embed_dim={self.embed_spec.spec!r} (max {self.embed_dim}), "
            f"num_heads={self.heads_spec.spec!r} (max {self.num_heads}), {hd}, "
            f"mode={self.mode}, causal={self.causal}"
            + (f", soft_heads={self.soft_heads}" if self.mode == "nanogpt" else "")
        )
