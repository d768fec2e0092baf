"""Converters and guards of attention modules and transformer layers (the
transformers GPT-2 and BERT converters: :mod:`.attention_hf`).

- timm ``Attention`` -> :class:`EntangledTimmAttention` (AutoFormer mode: fixed head
  width, ``num_heads`` and ``embed_dim`` choices); extract writes back a timm
  ``Attention`` with ``num_heads`` / ``attn_dim`` updated.
- nanoGPT ``CausalSelfAttention`` (matched by its attributes and forward source) ->
  :class:`EntangledNanoGPTAttention` (the heads partition the embedding width);
  extract writes back the class with ``n_embd`` / ``n_head`` updated.
- Guards: ``nn.TransformerEncoderLayer`` (its eval + no_grad fast path reads
  ``linear1``/``linear2`` weights whole: disabled in the supernet, restored on
  extract); ``nn.MultiheadAttention`` (uses its projections' weights directly:
  refused); timm ``Attention``, transformers GPT-2 and BERT attention, nanoGPT
  attention: a change of the inner (head) width through their projections is
  refused (their forward splits by fixed sizes), the embedding width is allowed where
  the forward reads it from the input.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import EntangledAttention
from ..linear import EntangledLinear
from .registry import (
    Converter,
    Guard,
    Origin,
    copy_state,
    register_converter,
    register_guard,
    retype,
)

__all__ = [
    "EntangledTimmAttention",
    "EntangledNanoGPTAttention",
    "EntangledMultiheadAttention",
]


def _copy_linear(ent_lin: EntangledLinear, src: nn.Linear) -> None:
    ent_lin.weight, ent_lin.bias = src.weight, src.bias


def _stock_linear(ent: EntangledLinear, selection, origin: Origin) -> nn.Linear:
    out = retype(ent.extract(selection), origin)
    out.train(ent.training)
    return out


def _spec(specs: Mapping, name: str, default):
    return specs.get(name, default)


def _check_largest(new: EntangledAttention, E: int, H: int, e_name: str, h_name: str,
                   extra_ok: bool = True) -> None:
    """The largest candidate must be the converted layer itself (its weights are kept)."""
    if new.embed_dim != E or new.num_heads != H or not extra_ok:
        raise ValueError(
            f"the largest candidate (embed_dim {new.embed_dim}, num_heads {new.num_heads}) must "
            f"be the layer's ({e_name} {E}, {h_name} {H})"
        )


def _on(new: EntangledAttention, like: torch.Tensor) -> EntangledAttention:
    """Rebuild the index tables of an attention built on the meta device on the device
    of ``like`` (the weights are assigned by the caller)."""
    if getattr(new, "_cands", None) is not None and hasattr(new, "_hd_src"):
        new._build_head_tables(like.device)
    return new


# ---------------------------------------------------------------- timm Attention
class EntangledTimmAttention(EntangledAttention):
    """timm's ``Attention`` (qkv -> heads of fixed width -> proj -> proj_drop) with
    ``embed_dim`` and ``num_heads`` choices. ``forward(x, attn_mask=None,
    is_causal=False, arch=None)``: the keywords timm's blocks pass; an ``attn_mask``
    or ``is_causal=True`` raises (not supported by the entangled attention)."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, arch=None):
        if attn_mask is not None or is_causal:
            raise ValueError(
                f"{type(self).__name__}: attn_mask / is_causal are not supported by the "
                "entangled attention (only the unmasked self-attention)"
            )
        return self.proj_drop(super().forward(x, arch))

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        vals = self._values(selection, self.names)
        h = self.heads_spec.size(vals)
        o: Origin = self.__dict__["_tk_origin"]
        out = o.cls.__new__(o.cls)
        nn.Module.__init__(out)
        out.__dict__.update(copy_state(o.state))
        co = self.__dict__["_tk_children"]
        for name, mod in co["plain"].items():
            out._modules[name] = copy_state(mod)
        out._modules["qkv"] = _stock_linear(self.qkv, vals, co["qkv"])
        out._modules["proj"] = _stock_linear(self.proj, vals, co["proj"])
        out._modules["proj_drop"] = copy_state(self.proj_drop)
        out.num_heads = h
        out.attn_dim = h * self.head_dim
        out.train(self.training)
        return out


def _timm_attention(m, specs, choices, options):
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(m, name, nn.Identity()), nn.Identity):
            raise ValueError(f"timm Attention with {name} (qk_norm / scale_norm) has no converter")
    if getattr(m, "gate", None) is not None:
        raise ValueError("timm Attention with gated=True has no converter")
    E = m.qkv.in_features
    if m.proj.out_features != E:
        raise ValueError(
            f"timm Attention with dim_out={m.proj.out_features} != dim={E} has no converter"
        )
    if m.qkv.out_features != 3 * m.num_heads * m.head_dim:
        raise ValueError("timm Attention: qkv width is not 3 * num_heads * head_dim")
    embed = _spec(specs, "embed_dim", E)
    heads = _spec(specs, "num_heads", m.num_heads)
    new = EntangledTimmAttention(
        embed,
        heads,
        choices,
        head_dim=m.head_dim,
        bias=m.qkv.bias is not None,
        proj_bias=m.proj.bias is not None,
        dropout=float(m.attn_drop.p),
        device="meta",
    )
    _check_largest(new, E, m.num_heads, "embed_dim", "num_heads")
    _copy_linear(new.qkv, m.qkv)
    _copy_linear(new.proj, m.proj)
    new.proj_drop = m.proj_drop
    new.__dict__["_tk_children"] = {
        "qkv": Origin.of(m.qkv),
        "proj": Origin.of(m.proj),
        "plain": {n: c for n, c in m._modules.items() if n not in ("qkv", "proj", "proj_drop")},
    }
    return _on(new, m.qkv.weight)


register_converter(
    "timm.layers.attention.Attention",
    Converter(
        ("embed_dim", "num_heads"), _timm_attention, lambda e, s, o: e.extract(s), "timm Attention"
    ),
)


# ---------------------------------------------------------------- nanoGPT CausalSelfAttention
class EntangledNanoGPTAttention(EntangledAttention):
    """nanoGPT's ``CausalSelfAttention`` (``c_attn`` -> causal heads partitioning the
    width -> ``c_proj`` -> ``resid_dropout``) with ``embed_dim`` and ``num_heads``
    choices; in the supernet its projections are ``qkv`` / ``proj``."""

    def forward(self, x: torch.Tensor, arch=None):
        return self.resid_dropout(super().forward(x, arch))

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        vals = self._values(selection, self.names)
        o: Origin = self.__dict__["_tk_origin"]
        out = o.cls.__new__(o.cls)
        nn.Module.__init__(out)
        out.__dict__.update(copy_state(o.state))
        co = self.__dict__["_tk_children"]
        for name, t in co["buffers"].items():
            out._buffers[name] = None if t is None else t.detach().clone()
        out._non_persistent_buffers_set = set(co["nonpersistent"])
        out._modules["c_attn"] = _stock_linear(self.qkv, vals, co["c_attn"])
        out._modules["c_proj"] = _stock_linear(self.proj, vals, co["c_proj"])
        out._modules["attn_dropout"] = copy_state(co["attn_dropout"])
        out._modules["resid_dropout"] = copy_state(self.resid_dropout)
        out.n_embd = self.embed_spec.size(vals)
        out.n_head = self.heads_spec.size(vals)
        out.train(self.training)
        return out


def _is_nanogpt_attention(m: nn.Module) -> bool:
    t = type(m)
    if t.__name__ != "CausalSelfAttention":
        return False
    if not all(
        hasattr(m, a) for a in ("n_head", "n_embd", "dropout", "resid_dropout", "attn_dropout")
    ):
        return False
    if (
        type(getattr(m, "c_attn", None)) is not nn.Linear
        or type(getattr(m, "c_proj", None)) is not nn.Linear
    ):
        return False
    try:
        src = inspect.getsource(t.forward)
    except (OSError, TypeError):
        return False
    need = (
        "self.c_attn(x).split(self.n_embd, dim=2)",
        "k.view(B, T, self.n_head, C // self.n_head)",
        "is_causal=True",
        "self.resid_dropout(self.c_proj(y))",
    )
    return all(s in src for s in need) and set(m._modules) == {
        "c_attn",
        "c_proj",
        "attn_dropout",
        "resid_dropout",
    }


def _nanogpt_attention(m, specs, choices, options):
    E, H = m.n_embd, m.n_head
    embed = _spec(specs, "embed_dim", E)
    heads = _spec(specs, "num_heads", H)
    new = EntangledNanoGPTAttention(
        embed,
        heads,
        choices,
        head_dim=None,
        bias=m.c_attn.bias is not None,
        proj_bias=m.c_proj.bias is not None,
        causal=True,
        dropout=float(m.dropout),
        device="meta",
    )
    _check_largest(new, E, H, "n_embd", "n_head")
    _copy_linear(new.qkv, m.c_attn)
    _copy_linear(new.proj, m.c_proj)
    new.resid_dropout = m.resid_dropout
    new.__dict__["_tk_children"] = {
        "c_attn": Origin.of(m.c_attn),
        "c_proj": Origin.of(m.c_proj),
        "attn_dropout": m.attn_dropout,
        "buffers": dict(m._buffers),
        "nonpersistent": set(m._non_persistent_buffers_set),
    }
    return _on(new, m.c_attn.weight)


register_converter(
    None,
    Converter(
        ("embed_dim", "num_heads"),
        _nanogpt_attention,
        lambda e, s, o: e.extract(s),
        "nanoGPT CausalSelfAttention",
        match=_is_nanogpt_attention,
    ),
)


# ---------------------------------------------------------------- nn.MultiheadAttention
class EntangledMultiheadAttention(EntangledAttention):
    """``nn.MultiheadAttention`` used as self-attention (``query is key is value``), the
    heads partitioning the embedding width (``head_dim = E / H``), with ``embed_dim``
    and ``num_heads`` choices. ``forward`` takes the stock signature and returns
    ``(output, None)``; masks, ``is_causal`` and ``need_weights=True`` raise (the
    entangled attention computes no weights and no masks)."""

    _qkv_same_embed_dim = True  # read by nn.TransformerEncoderLayer's fast-path checks

    @property
    def in_proj_weight(self):
        return self.qkv.weight

    @property
    def in_proj_bias(self):
        return self.qkv.bias

    @property
    def out_proj(self):
        return self.proj

    def forward(
        self,
        query,
        key=None,
        value=None,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
        arch=None,
    ):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError(f"{type(self).__name__}: only self-attention (query is key is value)")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(
                f"{type(self).__name__}: key_padding_mask / attn_mask / is_causal are not supported"
            )
        if need_weights:
            raise ValueError(
                f"{type(self).__name__}: pass need_weights=False (no attention weights)"
            )
        x = query if self.batch_first else query.transpose(0, 1)
        y = super().forward(x, arch)
        return (y if self.batch_first else y.transpose(0, 1)), None

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        vals = self._values(selection, self.names)
        e, h = self.embed_spec.size(vals), self.heads_spec.size(vals)
        o: Origin = self.__dict__["_tk_origin"]
        out = o.cls.__new__(o.cls)
        nn.Module.__init__(out)
        out.__dict__.update(copy_state(o.state))
        qkv = self.qkv.extract(vals)
        out.embed_dim = out.kdim = out.vdim = e
        out.num_heads, out.head_dim = h, e // h
        out._parameters.update(
            in_proj_weight=qkv.weight,
            in_proj_bias=qkv.bias,
            q_proj_weight=None,
            k_proj_weight=None,
            v_proj_weight=None,
        )
        out._modules["out_proj"] = _stock_linear(
            self.proj, vals, self.__dict__["_tk_children"]["out_proj"]
        )
        out.train(self.training)
        return out


def _mha(m, specs, choices, options):
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise ValueError(
            "nn.MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn has no converter"
        )
    E, H = m.embed_dim, m.num_heads
    new = EntangledMultiheadAttention(
        _spec(specs, "embed_dim", E),
        _spec(specs, "num_heads", H),
        choices,
        head_dim=None,
        bias=m.in_proj_bias is not None,
        proj_bias=m.out_proj.bias is not None,
        dropout=float(m.dropout),
        device="meta",
    )
    _check_largest(new, E, H, "embed_dim", "num_heads")
    new.qkv.weight, new.qkv.bias = m.in_proj_weight, m.in_proj_bias
    _copy_linear(new.proj, m.out_proj)
    new.batch_first = m.batch_first
    new.__dict__["_tk_children"] = {"out_proj": Origin.of(m.out_proj)}
    return _on(new, m.in_proj_weight)


register_converter(
    nn.MultiheadAttention,
    Converter(
        ("embed_dim", "num_heads"), _mha, lambda e, s, o: e.extract(s), "nn.MultiheadAttention"
    ),
)


# ---------------------------------------------------------------- guards
def _encoder_layer(m, path, targeted):
    # The fast path (eval, no grad) calls torch._transformer_encoder_layer_fwd with
    # linear1/linear2's whole weights; it is taken only when activation_relu_or_gelu is
    # truthy (TransformerEncoder checks its first layer's too), so False disables it.
    return {"activation_relu_or_gelu": False} if targeted else None


register_guard(nn.TransformerEncoderLayer, Guard(_encoder_layer, "nn.TransformerEncoderLayer"))


def _mha(m, path, targeted):
    if targeted:
        raise ValueError(
            f"dims match {sorted(targeted)} inside the nn.MultiheadAttention {path or 'model'!r}, "
            "which uses its projections' weights directly; entangle the attention itself: "
            f"dims '{path}.embed_dim' / '{path}.num_heads'"
        )
    return None


register_guard(nn.MultiheadAttention, Guard(_mha, "nn.MultiheadAttention"))


def _inner_guard(kind: str, refused: tuple[str, ...], fix: str):
    def check(m, path, targeted):
        for rel, args in targeted.items():
            for a in args:
                if any(fnmatch.fnmatchcase(f"{rel}.{a}", r) for r in refused):
                    raise ValueError(
                        f"dims set {rel}.{a} inside the {kind} {path or 'model'!r} "
                        f"({type(m).__name__}): its forward splits the projections into heads "
                        f"by fixed sizes, so the extracted model would not run; {fix.replace('<path>', path)}"
                    )
        return None

    return Guard(check, kind)


register_guard(
    "timm.layers.attention.Attention",
    _inner_guard(
        "timm Attention",
        ("qkv.out_features", "qkv.out_segments", "proj.in_features"),
        "entangle the attention itself: dims '<path>.num_heads' / '<path>.embed_dim'",
    ),
)
_GPT2_FIX = "entangle the attention itself: dims '<path>.embed_dim' / '<path>.num_heads'"
register_guard(
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention",
    _inner_guard(
        "GPT-2 attention",
        ("c_attn.out_features", "c_attn.out_segments", "c_proj.in_features"),
        _GPT2_FIX,
    ),
)
register_guard(
    "transformers.models.bert.modeling_bert.BertAttention",
    _inner_guard(
        "BERT attention",
        (
            "self.query.out_features",
            "self.key.out_features",
            "self.value.out_features",
            "output.dense.in_features",
        ),
        "entangle the attention itself: dims '<path>.embed_dim' / '<path>.num_heads'",
    ),
)
register_guard(
    "transformers.models.bert.modeling_bert.BertSelfAttention",
    _inner_guard(
        "BERT self-attention",
        ("query.out_features", "key.out_features", "value.out_features"),
        "entangle the BertAttention around it: dims '<parent>.embed_dim' / '<parent>.num_heads'",
    ),
)


def _looks_like_nanogpt_attention(m: nn.Module) -> bool:
    """nanoGPT-style attention (its forward splits by ``n_embd`` / ``n_head``), also
    the variants the converter does not take."""
    return (
        type(m).__name__ == "CausalSelfAttention" and hasattr(m, "c_attn") and hasattr(m, "n_head")
    )


def _nanogpt_guard(m, path, targeted):
    if targeted:
        raise ValueError(
            f"dims set {sorted(f'{r}.{a}' for r, args in targeted.items() for a in args)} inside "
            f"the nanoGPT attention {path or 'model'!r}: its forward splits by n_embd and "
            f"n_head; entangle the attention itself: dims '{path}.embed_dim' / '{path}.num_heads'"
        )
    return None


register_guard(
    None, Guard(_nanogpt_guard, "nanoGPT attention", match=_looks_like_nanogpt_attention)
)
