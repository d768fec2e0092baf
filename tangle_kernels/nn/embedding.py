"""EntangledEmbedding: an embedding table whose width is a choice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import Layout
from . import plain
from .arch import HardArch
from .base import EntangledModule
from .spec import Spec, WidthSpec

__all__ = ["EntangledEmbedding"]


class EntangledEmbedding(EntangledModule):
    """``nn.Embedding(num_embeddings, embedding_dim)`` with ``embedding_dim`` a width spec.

    Soft arch: ``y = embedding(idx, W_mix)`` with ``W_mix = sum_k mix_k pad(W[:, :d_k])``.
    Every candidate keeps all rows, so ``W_mix = W * m`` with a mask ``m`` over the
    columns only; the module gathers the rows first and masks the gathered
    ``[..., D]`` rows (``m = layout.mask(mix)``): the cost is that of the tokens, not
    of the whole table (a GPT-2 table is 38M entries). Same values and gradients as
    superposing the table.

    HardArch: ``pad(s * embedding(idx, W[:, :d]))``. No arch: the plain max embedding.
    ``padding_idx`` is supported as in ``nn.Embedding``; ``max_norm`` is not.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: Spec,
        choices: Mapping[str, Sequence] | None = None,
        padding_idx: int | None = None,
        *,
        scale_grad_by_freq: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if (
            isinstance(num_embeddings, bool)
            or not isinstance(num_embeddings, int)
            or num_embeddings < 1
        ):
            raise ValueError(
                f"num_embeddings={num_embeddings!r} must be a positive int (the "
                "vocabulary is not a choice)"
            )
        self.spec = WidthSpec(embedding_dim, choices, "embedding_dim")
        self.names = self.spec.names
        self.choices = dict(self.spec.choices)
        self.num_embeddings = num_embeddings
        self.embedding_dim = D = self.spec.max
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx={padding_idx} must be within num_embeddings")
            padding_idx = padding_idx % num_embeddings
        self.padding_idx = padding_idx
        self.scale_grad_by_freq = scale_grad_by_freq
        self.weight = nn.Parameter(torch.empty(num_embeddings, D, device=device, dtype=dtype))
        self.reset_parameters()
        self.layout = (
            Layout.grid((D,), self.choices, lambda **v: [(0, self.spec.size(v))])
            if self.names
            else None
        )

    def reset_parameters(self) -> None:
        """nn.Embedding's initialisation (N(0, 1), zero row at ``padding_idx``)."""
        nn.init.normal_(self.weight)
        if self.padding_idx is not None and self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    @classmethod
    def from_module(
        cls,
        layer: nn.Embedding,
        choices: Mapping[str, Sequence] | None = None,
        *,
        embedding_dim: Spec | None = None,
    ) -> EntangledEmbedding:
        """The entangled version of ``layer`` sharing its weight."""
        if not isinstance(layer, nn.Embedding):
            raise TypeError(f"layer: expected an nn.Embedding, got {type(layer).__name__}")
        if layer.max_norm is not None or layer.sparse:
            raise ValueError("layer: max_norm and sparse embeddings are not supported")
        ed = layer.embedding_dim if embedding_dim is None else embedding_dim
        from .linear import _check_max

        _check_max(WidthSpec(ed, choices, "embedding_dim"), layer.embedding_dim, "embedding_dim")
        new = cls(
            layer.num_embeddings,
            ed,
            choices,
            layer.padding_idx,
            scale_grad_by_freq=layer.scale_grad_by_freq,
            device="meta",
        )
        new.weight = layer.weight
        return new

    def _embed(self, idx, w):
        return F.embedding(idx, w, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)

    def forward(
        self, idx: torch.Tensor, arch: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``idx [...] (int) -> [..., D_max]`` (see the class docstring)."""
        arch = self._resolve(arch)
        if arch is None or not self.names:
            return self._embed(idx, self.weight)
        if isinstance(arch, HardArch):
            d = self.spec.size(self._selection(arch, self.names))
            y = self._embed(idx, self.weight[:, :d])
            s = self._scale(arch, self.names, y.dtype)
            if s is not None:
                y = y * s
            return F.pad(y, (0, self.embedding_dim - d)) if d < self.embedding_dim else y
        mix = self._mix(arch, self.names)
        cdt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        m = self.layout.mask(mix, cdt).to(self.weight.dtype)
        return self._embed(idx, self.weight) * m

    def extract(self, selection: Mapping[str, Any]) -> plain.Embedding:
        """``nn.Embedding(V, d)`` with the first ``d`` columns copied."""
        d = self.spec.size(self._values(selection, self.names))
        emb = plain.Embedding(
            self.num_embeddings,
            d,
            self.padding_idx,
            scale_grad_by_freq=self.scale_grad_by_freq,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            emb.weight.copy_(self.weight[:, :d])
        return emb

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, embedding_dim={self.spec.spec!r} (max {self.embedding_dim})"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
