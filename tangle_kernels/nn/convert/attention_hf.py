"""Converters of the transformers (Hugging Face) attention modules.

- ``GPT2Attention`` -> :class:`EntangledGPT2Attention` (the heads partition the
  embedding width; ``c_attn`` / ``c_proj`` are ``Conv1D``, stored transposed here);
  extract writes back a ``GPT2Attention`` with ``num_heads`` / ``split_size`` /
  ``head_dim`` / ``embed_dim`` updated.
- ``BertAttention`` -> :class:`EntangledBertAttention` (fixed head width, AutoFormer
  mode; q / k / v stacked into one tensor); extract writes back a ``BertAttention``
  with ``num_attention_heads`` / ``all_head_size`` updated.

Matched by class-name string (:mod:`.registry`): transformers is never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import EntangledAttention
from ..base import EntangledModule
from ..norm import EntangledLayerNorm
from .attention import _check_largest, _copy_linear, _on, _spec, _stock_linear
from .registry import Converter, Origin, copy_state, refuse_tied, register_converter, retype

__all__ = ["EntangledGPT2Attention", "EntangledBertAttention"]


# ---------------------------------------------------------------- transformers GPT-2 attention
class EntangledGPT2Attention(EntangledAttention):
    """transformers' ``GPT2Attention`` (causal self-attention, heads partitioning the
    width, ``c_attn`` / ``c_proj`` Conv1D) with ``embed_dim`` and ``num_heads``
    choices; the projections are stored as ``qkv`` / ``proj`` ``[out, in]`` (new
    parameters: the Conv1D weights transposed). ``forward`` takes GPT2Block's keywords
    and returns ``(output, None)``; a KV cache (call the model with
    ``use_cache=False``), an ``attention_mask`` (padding) and cross-attention raise."""

    def forward(
        self,
        hidden_states,
        past_key_values=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        arch=None,
        **kwargs,
    ):
        if past_key_values is not None:
            raise ValueError(
                f"{type(self).__name__}: no KV cache in a supernet; call the model with use_cache=False"
            )
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError(
                f"{type(self).__name__}: attention_mask / cross-attention are not supported"
            )
        return self.resid_dropout(super().forward(hidden_states, arch)), None

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        vals = self._values(selection, self.names)
        e, h = self.embed_spec.size(vals), self.heads_spec.size(vals)
        o: Origin = self.__dict__["_tk_origin"]
        out = o.cls.__new__(o.cls)
        nn.Module.__init__(out)
        out.__dict__.update(copy_state(o.state))
        co = self.__dict__["_tk_children"]
        for name, mod in co["plain"].items():
            out._modules[name] = copy_state(mod)
        out._modules["c_attn"] = _conv1d_of(self.qkv.extract(vals), co["c_attn"])
        out._modules["c_proj"] = _conv1d_of(self.proj.extract(vals), co["c_proj"])
        out._modules["resid_dropout"] = copy_state(self.resid_dropout)
        out.embed_dim = out.split_size = e
        out.num_heads, out.head_dim = h, e // h
        out.scaling = out.head_dim**-0.5
        out.train(self.training)
        return out


def _conv1d_of(lin: nn.Linear, origin: Origin) -> nn.Module:
    out = origin.cls.__new__(origin.cls)
    nn.Module.__init__(out)
    out.__dict__.update(copy_state(origin.state))
    out.nf, out.nx = lin.out_features, lin.in_features
    out.weight = nn.Parameter(
        lin.weight.detach().t().contiguous(), requires_grad=lin.weight.requires_grad
    )
    out.bias = lin.bias
    return out


def _gpt2_attention(m, specs, choices, options):
    bad = [
        a
        for a, ok in (
            ("is_cross_attention", not m.is_cross_attention),
            ("scale_attn_weights", m.scale_attn_weights),
            ("scale_attn_by_inverse_layer_idx", not m.scale_attn_by_inverse_layer_idx),
            ("reorder_and_upcast_attn", not m.reorder_and_upcast_attn),
        )
        if not ok
    ]
    if bad:
        raise ValueError(f"GPT2Attention with non-default {bad} has no converter")
    refuse_tied(options, m.c_attn.weight, m.c_proj.weight)
    E, H = m.embed_dim, m.num_heads
    new = EntangledGPT2Attention(
        _spec(specs, "embed_dim", E),
        _spec(specs, "num_heads", H),
        choices,
        head_dim=None,
        bias=True,
        causal=True,
        dropout=float(m.attn_dropout.p),
        device="meta",
    )
    _check_largest(new, E, H, "embed_dim", "num_heads")
    for ent, conv in ((new.qkv, m.c_attn), (new.proj, m.c_proj)):
        ent.weight = nn.Parameter(
            conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad
        )
        ent.bias = conv.bias
    new.resid_dropout = m.resid_dropout
    new.__dict__["_tk_children"] = {
        "c_attn": Origin.of(m.c_attn),
        "c_proj": Origin.of(m.c_proj),
        "plain": {
            n: c for n, c in m._modules.items() if n not in ("c_attn", "c_proj", "resid_dropout")
        },
    }
    return _on(new, m.c_attn.weight)


register_converter(
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention",
    Converter(
        ("embed_dim", "num_heads"), _gpt2_attention, lambda e, s, o: e.extract(s), "GPT-2 attention"
    ),
)


# ---------------------------------------------------------------- transformers BERT attention
class EntangledBertAttention(EntangledAttention):
    """transformers' ``BertAttention`` (``self``: query / key / value, heads of fixed
    width ``attention_head_size``; ``output``: dense -> dropout -> LayerNorm(+ input))
    with ``embed_dim`` and ``num_heads`` choices (AutoFormer mode). In the supernet the
    projections are ``qkv`` (query | key | value stacked: a new parameter), ``proj``
    (``output.dense``'s parameters) and ``ln`` (``output.LayerNorm``'s). ``forward``
    takes BertLayer's arguments and returns ``(output, None)``; an attention mask
    (padding), a KV cache and cross-attention raise."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        arch=None,
        **kwargs,
    ):
        if (
            attention_mask is not None
            or past_key_values is not None
            or encoder_hidden_states is not None
        ):
            raise ValueError(
                f"{type(self).__name__}: attention_mask (padding), KV caches and cross-attention "
                "are not supported"
            )
        arch = self._resolve(arch)
        y = self.out_dropout(super().forward(hidden_states, arch))
        z = y + hidden_states
        return (self.ln(z, arch) if isinstance(self.ln, EntangledModule) else self.ln(z)), None

    def extract(self, selection: Mapping[str, Any]) -> nn.Module:
        vals = self._values(selection, self.names)
        h = self.heads_spec.size(vals)
        co = self.__dict__["_tk_children"]

        def build(origin: Origin) -> nn.Module:
            out = origin.cls.__new__(origin.cls)
            nn.Module.__init__(out)
            out.__dict__.update(copy_state(origin.state))
            return out

        att, sa, so = build(self.__dict__["_tk_origin"]), build(co["self"]), build(co["output"])
        qkv = self.qkv.extract(vals)
        inner = qkv.out_features // 3
        for i, name in enumerate(("query", "key", "value")):
            lin = nn.Linear(qkv.in_features, inner, bias=qkv.bias is not None, device="meta")
            lin = retype(lin, co[name])
            lin.weight = nn.Parameter(qkv.weight.detach()[i * inner : (i + 1) * inner].clone())
            if qkv.bias is not None:
                lin.bias = nn.Parameter(qkv.bias.detach()[i * inner : (i + 1) * inner].clone())
            sa._modules[name] = lin
        sa._modules["dropout"] = copy_state(co["self_dropout"])
        sa.num_attention_heads, sa.all_head_size = h, inner
        so._modules["dense"] = _stock_linear(self.proj, vals, co["dense"])
        so._modules["LayerNorm"] = (
            retype(self.ln.extract(vals), co["LayerNorm"])
            if isinstance(self.ln, EntangledModule)
            else copy_state(self.ln)
        )
        so._modules["dropout"] = copy_state(self.out_dropout)
        att._modules["self"], att._modules["output"] = sa, so
        for m in (att, sa, so):
            m.train(self.training)
        return att


def _bert_attention(m, specs, choices, options):
    sa, so = m.self, m.output
    if m.is_cross_attention or type(sa).__name__ != "BertSelfAttention":
        raise ValueError("BertAttention with cross-attention has no converter")
    if getattr(sa, "is_causal", False) or getattr(sa, "is_decoder", False):
        raise ValueError("BertAttention of a decoder (causal, KV cache) has no converter")
    refuse_tied(options, sa.query.weight, sa.key.weight, sa.value.weight, sa.query.bias)
    E, H, d = sa.query.in_features, sa.num_attention_heads, sa.attention_head_size
    embed, heads = _spec(specs, "embed_dim", E), _spec(specs, "num_heads", H)
    new = EntangledBertAttention(
        embed,
        heads,
        choices,
        head_dim=d,
        bias=sa.query.bias is not None,
        proj_bias=so.dense.bias is not None,
        dropout=float(sa.dropout.p),
        device="meta",
    )
    _check_largest(new, E, H, "hidden_size", "num_attention_heads",
                   extra_ok=so.dense.out_features == E)
    w = torch.cat([sa.query.weight.detach(), sa.key.weight.detach(), sa.value.weight.detach()])
    new.qkv.weight = nn.Parameter(w, requires_grad=sa.query.weight.requires_grad)
    if sa.query.bias is not None:
        new.qkv.bias = nn.Parameter(
            torch.cat([sa.query.bias.detach(), sa.key.bias.detach(), sa.value.bias.detach()])
        )
    _copy_linear(new.proj, so.dense)
    new.out_dropout = so.dropout
    new.ln = (
        EntangledLayerNorm.from_module(so.LayerNorm, choices, normalized_shape=embed)
        if not isinstance(embed, int)
        else so.LayerNorm
    )
    new.__dict__["_tk_children"] = {
        "self": Origin.of(sa),
        "output": Origin.of(so),
        "query": Origin.of(sa.query),
        "key": Origin.of(sa.key),
        "value": Origin.of(sa.value),
        "dense": Origin.of(so.dense),
        "LayerNorm": Origin.of(so.LayerNorm),
        "self_dropout": sa.dropout,
    }
    return _on(new, sa.query.weight)


register_converter(
    "transformers.models.bert.modeling_bert.BertAttention",
    Converter(
        ("embed_dim", "num_heads"), _bert_attention, lambda e, s, o: e.extract(s), "BERT attention"
    ),
)
