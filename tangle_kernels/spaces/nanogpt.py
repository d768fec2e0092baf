"""The nanoGPT search space of TangleNAS: a character-level GPT whose embedding width,
number of heads, MLP ratio and number of layers are choices.

Supernet (all widths at their max, sub-widths zero-padded; built from
``tangle_kernels.nn`` modules only)::

    x = wte(idx, embed) + wpe(pos, embed)                  EntangledEmbedding x 2
    x = DepthMixer([Block] * max(layers), "layers")(x)     depth mixing
    Block: x = x + attn(ln1(x))                            EntangledLayerNorm, EntangledAttention
           x = x + proj(gelu(fc(ln2(x))))                  (nanoGPT mode: heads partition
                                                            the width, head dim = embed/heads)
           fc: embed -> embed * mlp_ratio                  EntangledLinear, K = 3 x 3 for
           proj: embed * mlp_ratio -> embed                the default choices
    logits = lm_head(ln_f(x))                              vocab = the corpus' characters

The embedding width and the depth are global. The head count and the MLP ratio are
per layer as in the paper (hparam ``per_layer=true``: choices ``heads_0 .. heads_{L-1}``
and ``mlp_ratio_0 ..``, one architecture vector per layer, the paper's ``[max_layers,
K]`` architecture tensors) or shared by every layer (``per_layer=false``: one ``heads``
and one ``mlp_ratio``). Presets:

- default (no preset): embed 32/48/64, heads 2/4, MLP ratio 2/3/4, layers 1/2/3, context
  64, SHARED choices. Small so that the main command's CPU search (``scripts/search.sh``) stays short;
  shared so the space has 54 architectures, few enough to train every one of them from
  scratch and rank what a search derives against all of them
  (``benchmarks/search_quality.py``); per layer it would have 2,106.
- ``tinyshakespeare``: the paper's Tiny Shakespeare space (embed 96/192/384, heads 2/4/6,
  MLP ratio 2/3/4, layers 4/5/6, context 256, dropout 0.2), per layer.
- ``paper`` (alias ``gpt2``): the TangleNAS GPT-2 space (embed 384/576/768, heads
  6/8/12, MLP ratio 2/3/4, layers 10/11/12, context 256, dropout 0.2), per layer (GPU).

Attention under a soft arch (hparam ``soft_heads``): ``partition`` (default), one
attention call per head count per layer (the paper's relaxation, with its one-hot
inconsistency fixed; :class:`~tangle_kernels.nn.EntangledAttention`), or ``exact``, the
output mixture over every (embedding, heads) candidate.

Data (``--data``): nothing (the embedded Sonnets corpus, :mod:`tangle_kernels.data`), a
path to any text file (char-level; first 90% train, the rest validation), or
``synthetic`` (a Markov-chain token stream).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as tnn
from ..data import CharCorpus, DataError, MarkovText
from .base import SearchSpace, SpaceError

__all__ = ["NanoGPTSpace", "TextSource", "GPTBlock", "GPTSupernet"]


class TextSource:
    """A :class:`~tangle_kernels.spaces.base.DataSource` over a character corpus: batches
    of ``block_size`` windows (inputs) and the next characters (targets)."""

    def __init__(self, corpus: CharCorpus, block_size: int):
        corpus.check_block_size(block_size)
        self.corpus = corpus
        self.block_size = block_size
        self.name = corpus.name

    @property
    def vocab_size(self) -> int:
        return self.corpus.vocab_size

    def batch(self, split, batch_size, generator=None, device="cpu"):
        if split not in self.corpus.splits:
            raise ValueError(f"split {split!r}: expected 'train' or 'val'")
        return self.corpus.batch(split, batch_size, self.block_size, generator, device)

    def split_size(self, split: str) -> int:
        """Non-overlapping windows in ``split`` (an epoch = this many sequences)."""
        return max(1, len(self.corpus.splits[split]) // self.block_size)


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block with entangled widths (see the module docstring)."""

    def __init__(
        self,
        choices: Mapping[str, list],
        *,
        dropout: float = 0.0,
        bias: bool = True,
        heads: str = "heads",
        mlp_ratio: str = "mlp_ratio",
        soft_heads: str = "partition",
    ):
        super().__init__()
        self.ln1 = tnn.EntangledLayerNorm("embed", choices, bias=bias)
        self.attn = tnn.EntangledAttention(
            "embed", heads, choices, causal=True, dropout=dropout, bias=bias,
            soft_heads=soft_heads,
        )
        self.ln2 = tnn.EntangledLayerNorm("embed", choices, bias=bias)
        self.fc = tnn.EntangledLinear("embed", ("embed", mlp_ratio), choices, bias=bias)
        self.proj = tnn.EntangledLinear(("embed", mlp_ratio), "embed", choices, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, arch=None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x, arch), arch)
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln2(x, arch), arch)), arch))


class GPTSupernet(nn.Module):
    """``idx [B, T] (int64) -> logits [B, T, vocab]`` (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        choices: Mapping[str, list],
        *,
        dropout: float = 0.0,
        bias: bool = True,
        per_layer: bool = False,
        soft_heads: str = "partition",
    ):
        super().__init__()
        self.block_size = block_size
        self.wte = tnn.EntangledEmbedding(vocab_size, "embed", choices)
        self.wpe = tnn.EntangledEmbedding(block_size, "embed", choices)
        self.drop = nn.Dropout(dropout)
        n = max(choices["layers"])
        blocks = [
            GPTBlock(
                choices, dropout=dropout, bias=bias, soft_heads=soft_heads,
                heads=f"heads_{i}" if per_layer else "heads",
                mlp_ratio=f"mlp_ratio_{i}" if per_layer else "mlp_ratio",
            )
            for i in range(n)
        ]
        self.blocks = tnn.DepthMixer(blocks, "layers", choices)
        self.ln_f = tnn.EntangledLayerNorm("embed", choices, bias=bias)
        self.lm_head = tnn.EntangledLinear("embed", vocab_size, choices, bias=False)
        self.apply(self._init)
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * n) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (tnn.EntangledLinear, nn.Linear)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (tnn.EntangledEmbedding, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, arch=None) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx, arch) + self.wpe(pos, arch))
        x = self.blocks(x, arch)
        return self.lm_head(self.ln_f(x, arch), arch)


class NanoGPTSpace(SearchSpace):
    """Char-level GPT: choices ``embed``, ``heads``, ``mlp_ratio``, ``layers``."""

    name = "nanogpt"
    description = "character-level GPT (embedding width, heads, MLP ratio, layers)"
    layer_choices = ("heads", "mlp_ratio")
    depth_choice = "layers"
    default_choices = {
        "embed": [32, 48, 64],
        "heads": [2, 4],
        "mlp_ratio": [2, 3, 4],
        "layers": [1, 2, 3],
    }
    default_hparams = {
        "block_size": 64,
        "dropout": 0.0,
        "bias": True,
        "train_fraction": 0.9,
        "synthetic_vocab": 32,
        "per_layer": False,
        "soft_heads": "partition",
    }
    presets = {
        "tiny": {  # unit tests
            "choices": {"embed": [16, 24], "heads": [2, 4], "mlp_ratio": [2, 4], "layers": [1, 2]},
            "hparams": {"block_size": 32},
        },
        "tinyshakespeare": {  # TangleNAS Tiny Shakespeare space (per layer)
            "choices": {
                "embed": [96, 192, 384],
                "heads": [2, 4, 6],
                "mlp_ratio": [2, 3, 4],
                "layers": [4, 5, 6],
            },
            "hparams": {"block_size": 256, "dropout": 0.2, "per_layer": True},
        },
        "paper": {  # TangleNAS GPT-2 space (GPU, per layer)
            "choices": {
                "embed": [384, 576, 768],
                "heads": [6, 8, 12],
                "mlp_ratio": [2, 3, 4],
                "layers": [10, 11, 12],
            },
            "hparams": {"block_size": 256, "dropout": 0.2, "per_layer": True},
        },
    }
    presets["gpt2"] = presets["paper"]
    metric = "loss"
    minimize = True
    search_defaults = {
        # 250 supernet steps, then a race (search/race.py): the 4 most probable
        # architectures of the final distribution (race_pick "top", SearchConfig's
        # default), each trained from scratch for the retraining's 400 steps (the
        # winner's training is the retraining), the best on the validation batches kept.
        # Chosen on the tuning corpora only (benchmarks/quality/corpora.py;
        # docs/search-quality.md): with contenders drawn, mean percentile 10.3% (9/9
        # seeds in the top 25%) against 16.3% (7/9) for 400 steps and the argmax, 14.0%
        # for 150 steps and a 6-arch race; the most probable instead of drawn: 8.1%
        # against 11.5% replayed on the same searches (benchmarks/quality/simulate.py).
        # --retrain-steps N races at N steps; --retrain-steps 0 derives the argmax
        "steps": 250,
        "select": "race",
        "race_archs": 4,
        "retrain_steps": 400,
        # sd of the val-loss difference between two 400-step trainings of one architecture
        # with different seeds, 90 pairs on the tuning corpora (race contenders against the
        # seed-0 reference; docs/search-quality.md): closer races are coin tosses
        "race_noise": 0.023,
        "batch_size": 32,
        "w_optimizer": "adamw",
        "lr": 3e-3,
        "lr_min": 3e-4,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        # 400 steps leave no time for the DrNAS concentrations to grow: with the paper's
        # Dirichlet(elu(a) + 1) noise and arch lr 3e-3 the alphas barely moved and the
        # derived arch was a coin toss (benchmarks/search_quality.py; docs/search-quality.md):
        # 10x the concentration and 10x the arch lr decide within the budget
        "arch_lr": 3e-2,
        "drnas_concentration": 10.0,
        "arch_weight_decay": 1e-3,
        "eval_batches": 16,
        "checkpoint_every": 100,
    }

    def check(self) -> None:
        ch, hp = self.choices, self.hparams
        for n in ch:
            bad = [v for v in ch[n] if v < 1]
            if bad:
                raise SpaceError(f"choice {n}: values must be positive integers, got {bad}")
        heads = [n for n in ch if n == "heads" or n.startswith("heads_")]
        for e in ch["embed"]:
            for n in heads:
                bad = [h for h in ch[n] if e % h]
                if bad:
                    raise SpaceError(
                        f"choice {n}={bad[0]} does not divide embed={e}: in the nanoGPT "
                        f"space the heads partition the embedding width (head dim = embed / "
                        f"heads); use head counts that divide every embed value {ch['embed']}"
                    )
        if hp["soft_heads"] not in ("partition", "exact"):
            raise SpaceError(f"hparam soft_heads={hp['soft_heads']!r}: 'partition' or 'exact'")
        if hp["block_size"] < 1:
            raise SpaceError(f"hparam block_size={hp['block_size']}: must be >= 1")
        if not 0.0 <= hp["dropout"] < 1.0:
            raise SpaceError(f"hparam dropout={hp['dropout']}: must be in [0, 1)")
        if not 0.0 < hp["train_fraction"] < 1.0:
            raise SpaceError(f"hparam train_fraction={hp['train_fraction']}: must be in (0, 1)")

    # ---------------------------------------------------------------- data
    def make_data(self, source: str | None) -> TextSource:
        hp = self.hparams
        try:
            if source == "synthetic":
                corpus: CharCorpus = MarkovText(
                    hp["synthetic_vocab"], train_fraction=hp["train_fraction"]
                )
            else:
                corpus = CharCorpus.from_source(source, train_fraction=hp["train_fraction"])
            return TextSource(corpus, hp["block_size"])
        except DataError as e:
            raise DataError(f"--data: {e}") from None

    # --------------------------------------------------------------- model
    def build_supernet(self, data: TextSource) -> GPTSupernet:
        hp = self.hparams
        return GPTSupernet(
            data.vocab_size, hp["block_size"], self.choices, dropout=hp["dropout"],
            bias=hp["bias"], per_layer=self.per_layer, soft_heads=hp["soft_heads"],
        )

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

