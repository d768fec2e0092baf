"""entangle() on Hugging Face transformers models built from small configs (random
weights, no download): GPT-2 (Conv1D projections, tied wte / lm_head) and BERT; the
embedding and MLP widths are exact, head changes through the projections are refused."""

from __future__ import annotations

import pytest
import torch
from nn_util import check_entangled_model

import tangle_kernels.nn as tnn

transformers = pytest.importorskip(
    "transformers", reason="transformers is pinned in requirements/cpu.txt"
)

GPT2_DIMS = {
    "transformer.w[tp]e.embedding_dim": "embed",
    "transformer.h.*.ln_[12].normalized_shape": "embed",
    "transformer.ln_f.normalized_shape": "embed",
    "transformer.h.*.attn.c_attn.in_features": "embed",
    "transformer.h.*.attn.c_proj.out_features": "embed",
    "transformer.h.*.mlp.c_fc.in_features": "embed",
    "transformer.h.*.mlp.c_fc.out_features": "hidden",
    "transformer.h.*.mlp.c_proj.in_features": "hidden",
    "transformer.h.*.mlp.c_proj.out_features": "embed",
    "lm_head.in_features": "embed",
}


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=23,
        n_positions=16,
        n_embd=12,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_embedding_and_mlp_widths_exact():
    model = _gpt2()
    idx = torch.randint(0, 23, (2, 7))
    sup = check_entangled_model(
        model,
        {"embed": (8, 12), "hidden": (16, 48)},
        GPT2_DIMS,
        idx,
        [{"embed": 8, "hidden": 16}, {"embed": 12, "hidden": 16}],
    )
    assert isinstance(sup.transformer.h[0].mlp.c_fc, tnn.EntangledLinear)
    child = tnn.extract(sup, {"embed": 8, "hidden": 16})
    Conv1D = transformers.pytorch_utils.Conv1D
    fc = child.transformer.h[1].mlp.c_fc
    assert type(fc) is Conv1D and (fc.nx, fc.nf) == (8, 16) and fc.weight.shape == (8, 16)
    assert child.transformer.wte.weight is child.lm_head.weight
    assert child.transformer.h[0].attn.config is child.config  # shared objects stay shared


def test_gpt2_heads_through_projections_are_refused():
    with pytest.raises(
        ValueError,
        match=r"c_attn.out_features inside the GPT-2 attention 'transformer.h.0.attn' \(GPT2Attention\).*'transformer.h.0.attn.num_heads'",
    ):
        tnn.entangle(
            _gpt2(), {"inner": (8, 12)}, {"transformer.h.0.attn.c_attn.out_features": "inner"}
        )


def test_gpt2_heads_and_embedding_exact():
    model = _gpt2()
    dims = {k: v for k, v in GPT2_DIMS.items() if ".attn.c_" not in k}
    dims |= {"transformer.h.*.attn.embed_dim": "embed", "transformer.h.*.attn.num_heads": "heads"}
    choices = {"embed": (8, 12), "heads": (1, 2), "hidden": (16, 48)}
    inputs = {"input_ids": torch.randint(0, 23, (2, 7)), "use_cache": False}
    sup = check_entangled_model(
        model,
        choices,
        dims,
        inputs,
        [
            {"embed": 8, "heads": 1, "hidden": 16},
            {"embed": 8, "heads": 2, "hidden": 48},
            {"embed": 12, "heads": 1, "hidden": 16},
        ],
    )
    child = tnn.extract(sup, {"embed": 8, "heads": 2, "hidden": 16})
    att = child.transformer.h[0].attn
    GPT2Attention = transformers.models.gpt2.modeling_gpt2.GPT2Attention
    assert type(att) is GPT2Attention
    assert (att.embed_dim, att.num_heads, att.head_dim, att.split_size) == (8, 2, 4, 8)
    assert att.config is child.config  # the converted attention shares the model's config again
    assert type(att.c_attn) is transformers.pytorch_utils.Conv1D and att.c_attn.weight.shape == (
        8,
        24,
    )
    with pytest.raises(ValueError, match="use_cache=False"):
        sup(torch.randint(0, 23, (1, 4)))


BERT_DIMS = {
    "embeddings.*_embeddings.embedding_dim": "embed",
    "*LayerNorm.normalized_shape": "embed",
    "encoder.layer.*.attention.self.*.in_features": "embed",
    "encoder.layer.*.attention.output.dense.out_features": "embed",
    "encoder.layer.*.intermediate.dense.in_features": "embed",
    "encoder.layer.*.intermediate.dense.out_features": "hidden",
    "encoder.layer.?.output.dense.in_features": "hidden",
    "encoder.layer.?.output.dense.out_features": "embed",
    "pooler.dense.in_features": "embed",
}


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=29,
        hidden_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_bert_embedding_and_mlp_widths_exact():
    idx = torch.randint(0, 29, (2, 6))
    check_entangled_model(
        _bert(),
        {"embed": (8, 12), "hidden": (12, 24)},
        BERT_DIMS,
        idx,
        [{"embed": 8, "hidden": 12}, {"embed": 12, "hidden": 12}],
    )


def test_bert_heads_through_projections_are_refused():
    with pytest.raises(
        ValueError,
        match=r"query.out_features inside the BERT attention 'encoder.layer.0.attention' \(BertAttention\)",
    ):
        tnn.entangle(
            _bert(),
            {"inner": (8, 12)},
            {"encoder.layer.0.attention.self.query.out_features": "inner"},
        )


def test_bert_heads_and_embedding_exact():
    dims = {k: v for k, v in BERT_DIMS.items() if "attention" not in k}
    dims |= {
        "encoder.layer.*.attention.embed_dim": "embed",
        "encoder.layer.*.attention.num_heads": "heads",
        "embeddings.LayerNorm.normalized_shape": "embed",
        "encoder.layer.?.output.LayerNorm.normalized_shape": "embed",
    }
    dims = {k: v for k, v in dims.items() if k != "*LayerNorm.normalized_shape"}
    choices = {"embed": (8, 12), "heads": (1, 2), "hidden": (12, 24)}
    idx = torch.randint(0, 29, (2, 6))
    sup = check_entangled_model(
        _bert(),
        choices,
        dims,
        idx,
        [
            {"embed": 8, "heads": 1, "hidden": 12},
            {"embed": 12, "heads": 1, "hidden": 24},
            {"embed": 8, "heads": 2, "hidden": 24},
        ],
    )
    child = tnn.extract(sup, {"embed": 8, "heads": 1, "hidden": 12})
    att = child.encoder.layer[0].attention
    bert = transformers.models.bert.modeling_bert
    assert type(att) is bert.BertAttention and type(att.self) is bert.BertSelfAttention
    assert (att.self.num_attention_heads, att.self.attention_head_size, att.self.all_head_size) == (
        1,
        6,
        6,
    )
    assert att.self.query.weight.shape == (6, 8) and att.output.dense.weight.shape == (8, 6)
    with pytest.raises(ValueError, match="attention_mask"):
        sup(idx, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]] * 2))


def test_tied_conv1d_weight_is_refused():
    model = _gpt2()
    mlp = model.transformer.h[0].mlp
    model.transformer.h[1].mlp.c_fc.weight = mlp.c_fc.weight  # a tie across blocks
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp.c_fc \(Conv1D\).*tied"):
        tnn.entangle(
            model, {"hidden": (16, 48)}, {"transformer.h.*.mlp.c_fc.out_features": "hidden"}
        )
