"""EntangledAttention: multi-head self-attention with embedding-width and head-count
choices, in the two forms the search spaces use."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import plain
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

    Submodules: ``qkv = EntangledLinear(E, inner, out_segments=3)`` (q | k | v stacked,
    each prefix-sliced) and ``proj = EntangledLinear(inner, E)``.

    Soft arch:

    - AutoFormer mode: the weights are superposed (heads beyond the candidate's get
      zero q/k/v columns), and ONE attention call runs over ``H_max`` heads of width
      ``head_dim``: the cost of the max-size attention.
    - nanoGPT mode: a head count cannot be expressed as a mask (it re-partitions the
      width), so the outputs of the candidate partitions are mixed::

          q, k, v = split(qkv(x, arch))                    (superposed weights, E_max)
          y = sum_{(e, h)} mix_(e,h) * pad(attend(q[..., :e], k[..., :e], v[..., :e], h))
          out = proj(y, arch)

      over every (embedding width, head count) candidate, ``mix`` the outer product of
      the two arch vectors. Cost: ``K_E * K_H`` attention calls (each on its own
      width) instead of one; the projections stay single superposed GEMMs.

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
        device=None,
        dtype=None,
    ):
        super().__init__()
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

    def _attend(self, q, k, v, h):
        p = self.dropout if self.training else 0.0
        return plain.attend(q, k, v, h, causal=self.causal, dropout_p=p)

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
        q, k, v = self.qkv(x, arch).split(self.inner, dim=-1)
        if self.mode == "autoformer":
            y = self._attend(q, k, v, self.num_heads)
        else:
            mix = self._mix(arch, self.names)
            y = None
            for j, (e, h) in enumerate(self._cands):
                t = self._attend(q[..., :e], k[..., :e], v[..., :e], h) * mix[j].to(x.dtype)
                if e < self.embed_dim:
                    t = F.pad(t, (0, self.embed_dim - e))
                y = t if y is None else y + t
        return self.proj(y, arch)

    def forward_hard(self, x: torch.Tensor, arch: HardArch) -> torch.Tensor:
        """The one-hot fast path: the sub-network, output zero-padded to ``E_max``."""
        vals = self._selection(arch, self.names)
        h = self.heads_spec.size(vals)
        qkv = self.qkv.forward_hard(x, arch, pad_output=False)
        inner = qkv.shape[-1] // 3
        q, k, v = qkv.split(inner, dim=-1)
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
        )
