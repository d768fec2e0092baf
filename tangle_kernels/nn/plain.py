"""Plain modules that :meth:`extract` returns.

``Linear``, ``Conv2d``, ``BatchNorm2d``, ``LayerNorm`` and ``Embedding`` are the torch classes (their
state dicts, ``isinstance`` checks and computations are those of torch); the only
addition is that ``forward`` accepts and ignores an ``arch`` argument, so a block
written for the supernet (``self.fc(x, arch)``) runs unchanged on the extracted
network. ``SelfAttention`` and ``Depth`` are the small plain counterparts of
:class:`EntangledAttention` and :class:`DepthMixer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import accepts_arch

__all__ = ["Linear", "Conv2d", "BatchNorm2d", "LayerNorm", "Embedding", "SelfAttention", "Depth"]


class Linear(nn.Linear):
    """``nn.Linear`` whose forward ignores ``arch``."""

    def forward(self, input: torch.Tensor, arch=None) -> torch.Tensor:
        return super().forward(input)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward ignores ``arch``."""

    def forward(self, input: torch.Tensor, arch=None) -> torch.Tensor:
        return super().forward(input)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose forward ignores ``arch``."""

    def forward(self, input: torch.Tensor, arch=None) -> torch.Tensor:
        return super().forward(input)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward ignores ``arch``."""

    def forward(self, input: torch.Tensor, arch=None) -> torch.Tensor:
        return super().forward(input)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose forward ignores ``arch``."""

    def forward(self, input: torch.Tensor, arch=None) -> torch.Tensor:
        return super().forward(input)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    *,
    causal: bool,
    dropout_p: float,
    kernel=None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of ``[B, T, H*d]`` q/k/v with ``num_heads``
    heads of width ``d`` (scale ``1/sqrt(d)``); returns ``[B, T, H*d]``. ``kernel(q, k,
    v, causal=, dropout_p=)`` on ``[B, H, T, d]`` replaces torch's
    ``scaled_dot_product_attention``."""
    B, T, C = q.shape
    d = C // num_heads
    q = q.reshape(B, T, num_heads, d).transpose(1, 2)
    k = k.reshape(B, T, num_heads, d).transpose(1, 2)
    v = v.reshape(B, T, num_heads, d).transpose(1, 2)
    if kernel is not None:
        y = kernel(q, k, v, causal=causal, dropout_p=dropout_p)
    else:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    return y.transpose(1, 2).reshape(B, T, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``proj(attend(split(qkv(x))))``.

    ``qkv``: ``Linear(embed_dim, 3 * num_heads * head_dim)`` (q | k | v stacked),
    ``proj``: ``Linear(num_heads * head_dim, embed_dim)``. Input ``[B, T, embed_dim]``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        proj_bias: bool | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.causal, self.dropout = causal, dropout
        inner = num_heads * head_dim
        pb = bias if proj_bias is None else proj_bias
        self.qkv = Linear(embed_dim, 3 * inner, bias=bias, device=device, dtype=dtype)
        self.proj = Linear(inner, embed_dim, bias=pb, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, arch=None) -> torch.Tensor:
        inner = self.num_heads * self.head_dim
        q, k, v = self.qkv(x).split(inner, dim=-1)
        p = self.dropout if self.training else 0.0
        return self.proj(attend(q, k, v, self.num_heads, causal=self.causal, dropout_p=p))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}"
        )


class Depth(nn.Sequential):
    """``nn.Sequential`` of blocks that passes ``arch`` on to blocks whose forward
    takes it (the extract of a :class:`DepthMixer`)."""

    def forward(self, input: torch.Tensor, arch=None) -> torch.Tensor:
        for block in self:
            input = block(input, arch=arch) if accepts_arch(block) else block(input)
        return input
