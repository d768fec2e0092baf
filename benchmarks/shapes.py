"""The one registry of benchmark shapes: real model shapes, plus small and tiny ones.

Every suite draws its cases from here (never literal shapes in the suites). A case
names a weight shape and the layout of its K candidates; layer cases add the
input sizes. :func:`op_cases`, :func:`layer_cases`, :func:`supernet_cases` and
:func:`sweep_case` pick the cases of a run by device and profile:

- ``full``  the real shapes (CPU: sized to finish the whole run in ~12 min on 2 cores);
- ``quick`` a subset (the K = 9 GPT-2 target case plus small shapes), ~2 minutes;
- ``smoke`` tiny shapes for the CI smoke test (seconds).

Real shapes:

- GPT-2-small MLP up-projection ``(3072, 768)``: embed {384, 576, 768} x MLP ratio
  {2, 3, 4} (rows ``embed * ratio``, cols ``embed``), K = 9.
- AutoFormer-T (embed {192, 216, 240}, heads {3, 4} of dim 64, MLP ratio {3.5, 4}):
  qkv ``(3 * 256, 240)`` as q | k | v blocks each prefix-sliced by heads * 64 and the
  input by embed (K = 6); MLP fc1 ``(960, 240)`` (K = 6).
- Conv ``(256, 256, 7, 7)``: out {128, 192, 256} x in {128, 192, 256} x kernel
  {3, 5, 7} (centred), K = 27.
- MobileNetV3 depthwise 7x7 ``(960, 1, 7, 7)``: channels {480, 720, 960} (expansion
  3 / 4.5 / 6 of 160) x kernel {3, 5, 7}, K = 9.
- GPU only: ``big_mlp (16384, 4096)``, K = 9 (268 MB in float32), where the kernels
  must reach the copy bandwidth.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from tangle_kernels import Layout

PROFILES = ("full", "quick", "smoke")


# ----------------------------------------------------------------- layouts
def mlp_layout(out_max: int, in_max: int, embeds, ratios) -> Layout:
    """Linear ``(out_max, in_max)``: rows ``int(embed * ratio)``, cols ``embed``."""
    return Layout.grid(
        (out_max, in_max),
        {"embed": list(embeds), "ratio": list(ratios)},
        lambda embed, ratio: [(0, int(embed * ratio)), (0, embed)],
    )


def qkv_layout(embeds, heads, head_dim: int) -> Layout:
    """q | k | v projection ``(3 * H * d, E)``: each block keeps ``heads * d`` rows."""
    hmax, emax = max(heads), max(embeds)
    seg = hmax * head_dim

    def boxes(embed, heads):
        return [[(s * seg, s * seg + heads * head_dim), (0, embed)] for s in range(3)]

    return Layout.grid((3 * seg, emax), {"embed": list(embeds), "heads": list(heads)}, boxes)


def proj_layout(embeds, heads, head_dim: int) -> Layout:
    """Attention output projection ``(E, H * d)``: rows ``embed``, cols ``heads * d``."""
    return Layout.grid(
        (max(embeds), max(heads) * head_dim),
        {"embed": list(embeds), "heads": list(heads)},
        lambda embed, heads: [(0, embed), (0, heads * head_dim)],
    )


def conv_layout(out_max: int, in_max: int, kmax: int, outs, ins, kernels) -> Layout:
    return Layout.conv((out_max, in_max, kmax, kmax), list(outs), list(ins), list(kernels))


def depthwise_layout(channels, kernels) -> Layout:
    """Depthwise ``(C, 1, k, k)``: channel prefixes x centred kernels."""
    cmax, kmax = max(channels), max(kernels)

    def box(channels, kernel):
        lo = (kmax - kernel) // 2
        return [(0, channels), (0, 1), (lo, lo + kernel), (lo, lo + kernel)]

    return Layout.grid((cmax, 1, kmax, kmax), {"channels": list(channels), "kernel": list(kernels)}, box)


def sweep_layout(shape: tuple[int, int], K: int) -> Layout:
    """K prefix candidates of a 2-D weight: a ``r x c`` grid of row x column widths
    with ``r * c = K`` (1 = 1x1, 3 = 3x1, 9 = 3x3, 27 = 9x3, 64 = 8x8, else K x 1)."""
    grids = {1: (1, 1), 3: (3, 1), 9: (3, 3), 27: (9, 3), 64: (8, 8)}
    r, c = grids.get(K, (K, 1))
    R, C = shape
    if r > R or c > C:
        raise ValueError(f"K={K}: a {r}x{c} grid does not fit the weight {shape}")
    rows = sorted({max(1, (R * (i + 1)) // r) for i in range(r)})
    cols = sorted({max(1, (C * (j + 1)) // c) for j in range(c)})
    lay = Layout.prefix(shape, [rows, cols])
    if lay.K != K:
        raise ValueError(f"K={K}: the weight {shape} is too small for {K} distinct prefixes")
    return lay


# ------------------------------------------------------------------- cases
@dataclass(frozen=True)
class OpCase:
    """A weight of ``shape`` and its candidate layout (built lazily, cached)."""

    name: str
    shape: tuple[int, ...]
    build: object = field(repr=False, compare=False)  # () -> Layout
    note: str = ""

    @property
    def layout(self) -> Layout:
        return _layout(self.name)

    @property
    def K(self) -> int:
        return self.layout.K

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerCase:
    """A layer: ``kind`` in linear / conv / attention, the op case of its weight, and
    the input: ``tokens`` rows (linear), ``batch x hw x hw`` images (conv) or ``batch``
    sequences of ``seq`` tokens (attention)."""

    name: str
    kind: str
    op: str
    tokens: int = 0
    batch: int = 0
    hw: int = 0
    seq: int = 0
    groups: int = 1
    attn: tuple = ()  # (embeds, heads, head_dim) for attention

    @property
    def op_case(self) -> OpCase:
        return OPS[self.op]


@dataclass(frozen=True)
class SupernetCase:
    """One supernet training step of the space ``space`` at ``batch`` examples;
    ``unit`` is what ``items / s`` counts (tokens or images)."""

    name: str
    space: str
    batch: int
    unit: str
    hparams: tuple = ()  # ((name, value), ...) overrides, applied when the space has them
    preset_candidates: tuple = ()


OPS: dict[str, OpCase] = {}


def _op(name, shape, build, note=""):
    OPS[name] = OpCase(name, tuple(shape), build, note)


_op("gpt2_mlp_up", (3072, 768), lambda: mlp_layout(3072, 768, [384, 576, 768], [2, 3, 4]),
    "GPT-2-small MLP up-projection, embed {384,576,768} x ratio {2,3,4}")
_op("autoformer_t_qkv", (768, 240), lambda: qkv_layout([192, 216, 240], [3, 4], 64),
    "AutoFormer-T qkv, embed {192,216,240} x heads {3,4} (dim 64), q|k|v blocks")
_op("autoformer_t_proj", (240, 256), lambda: proj_layout([192, 216, 240], [3, 4], 64),
    "AutoFormer-T attention output projection")
_op("autoformer_t_mlp", (960, 240), lambda: mlp_layout(960, 240, [192, 216, 240], [3.5, 4.0]),
    "AutoFormer-T MLP fc1, embed {192,216,240} x ratio {3.5,4}")
_op("conv_256_k27", (256, 256, 7, 7),
    lambda: conv_layout(256, 256, 7, [128, 192, 256], [128, 192, 256], [3, 5, 7]),
    "conv out {128,192,256} x in {128,192,256} x kernel {3,5,7}")
_op("mbv3_dw7", (960, 1, 7, 7), lambda: depthwise_layout([480, 720, 960], [3, 5, 7]),
    "MobileNetV3 depthwise 7x7, channels {480,720,960} x kernel {3,5,7}")
_op("big_mlp", (16384, 4096), lambda: mlp_layout(16384, 4096, [2048, 3072, 4096], [2, 3, 4]),
    "large MLP (GPU bandwidth), embed {2048,3072,4096} x ratio {2,3,4}")
# small shapes (quick CPU runs) and tiny ones (smoke test)
_op("small_mlp", (768, 192), lambda: mlp_layout(768, 192, [64, 128, 192], [2, 3, 4]),
    "small MLP, embed {64,128,192} x ratio {2,3,4}")
_op("small_conv", (64, 64, 7, 7), lambda: conv_layout(64, 64, 7, [32, 48, 64], [32, 48, 64], [3, 5, 7]),
    "small conv, out x in {32,48,64} x kernel {3,5,7}")
_op("tiny_mlp", (48, 12), lambda: mlp_layout(48, 12, [4, 8, 12], [2, 3, 4]), "tiny MLP (smoke)")
_op("tiny_conv", (8, 8, 5, 5), lambda: conv_layout(8, 8, 5, [4, 8], [4, 8], [3, 5]), "tiny conv (smoke)")
_op("tiny_qkv", (48, 16), lambda: qkv_layout([8, 16], [1, 2], 8), "tiny qkv (smoke)")
_op("tiny_proj", (16, 16), lambda: proj_layout([8, 16], [1, 2], 8), "tiny proj (smoke)")


@functools.cache
def _layout(name: str) -> Layout:
    case = OPS[name]
    lay = case.build()
    if tuple(lay.shape) != case.shape:
        raise AssertionError(f"shapes.{name}: layout shape {lay.shape} != {case.shape}")
    return lay


_AF = ((192, 216, 240), (3, 4), 64)
_TINY_AF = ((8, 16), (1, 2), 8)

LAYERS: dict[str, dict[str, LayerCase]] = {
    # per device class: "cpu" sizes fit 2 cores, "cuda" sizes fill an H100
    "cpu": {
        "linear_gpt2_mlp_up": LayerCase("linear_gpt2_mlp_up", "linear", "gpt2_mlp_up", tokens=512),
        "linear_autoformer_t_qkv": LayerCase("linear_autoformer_t_qkv", "linear", "autoformer_t_qkv", tokens=394),
        "linear_autoformer_t_mlp": LayerCase("linear_autoformer_t_mlp", "linear", "autoformer_t_mlp", tokens=394),
        "conv2d_256_k27": LayerCase("conv2d_256_k27", "conv", "conv_256_k27", batch=2, hw=14),
        "conv_mbv3_dw7": LayerCase("conv_mbv3_dw7", "conv", "mbv3_dw7", batch=4, hw=14, groups=960),
        "attn_autoformer_t": LayerCase("attn_autoformer_t", "attention", "autoformer_t_qkv", batch=2, seq=197, attn=_AF),
        "linear_small_mlp": LayerCase("linear_small_mlp", "linear", "small_mlp", tokens=256),
        "conv_small": LayerCase("conv_small", "conv", "small_conv", batch=2, hw=14),
        "linear_tiny": LayerCase("linear_tiny", "linear", "tiny_mlp", tokens=6),
        "conv_tiny": LayerCase("conv_tiny", "conv", "tiny_conv", batch=1, hw=6),
        "attn_tiny": LayerCase("attn_tiny", "attention", "tiny_qkv", batch=1, seq=5, attn=_TINY_AF),
    },
    "cuda": {
        "linear_gpt2_mlp_up": LayerCase("linear_gpt2_mlp_up", "linear", "gpt2_mlp_up", tokens=16384),
        "linear_autoformer_t_qkv": LayerCase("linear_autoformer_t_qkv", "linear", "autoformer_t_qkv", tokens=197 * 128),
        "linear_autoformer_t_mlp": LayerCase("linear_autoformer_t_mlp", "linear", "autoformer_t_mlp", tokens=197 * 128),
        "conv2d_256_k27": LayerCase("conv2d_256_k27", "conv", "conv_256_k27", batch=32, hw=28),
        "conv_mbv3_dw7": LayerCase("conv_mbv3_dw7", "conv", "mbv3_dw7", batch=64, hw=14, groups=960),
        "attn_autoformer_t": LayerCase("attn_autoformer_t", "attention", "autoformer_t_qkv", batch=128, seq=197, attn=_AF),
        "linear_tiny": LayerCase("linear_tiny", "linear", "tiny_mlp", tokens=6),
        "conv_tiny": LayerCase("conv_tiny", "conv", "tiny_conv", batch=1, hw=6),
        "attn_tiny": LayerCase("attn_tiny", "attention", "tiny_qkv", batch=1, seq=5, attn=_TINY_AF),
    },
}

_OP_SETS = {
    ("cpu", "full"): ["gpt2_mlp_up", "conv_256_k27", "autoformer_t_qkv", "autoformer_t_mlp", "mbv3_dw7"],
    ("cpu", "quick"): ["gpt2_mlp_up", "small_conv"],
    ("cuda", "full"): ["big_mlp", "gpt2_mlp_up", "conv_256_k27", "autoformer_t_qkv", "autoformer_t_mlp", "mbv3_dw7"],
    ("cuda", "quick"): ["big_mlp", "gpt2_mlp_up", "conv_256_k27"],
    ("any", "smoke"): ["tiny_mlp", "tiny_conv"],
}
_LAYER_SETS = {
    ("cpu", "full"): ["linear_gpt2_mlp_up", "conv2d_256_k27", "attn_autoformer_t", "linear_autoformer_t_qkv",
                      "linear_autoformer_t_mlp", "conv_mbv3_dw7"],
    ("cpu", "quick"): ["linear_gpt2_mlp_up", "conv_small"],
    ("cuda", "full"): ["linear_gpt2_mlp_up", "conv2d_256_k27", "attn_autoformer_t", "linear_autoformer_t_qkv",
                       "linear_autoformer_t_mlp", "conv_mbv3_dw7"],
    ("cuda", "quick"): ["linear_gpt2_mlp_up", "conv2d_256_k27", "attn_autoformer_t"],
    ("any", "smoke"): ["linear_tiny", "conv_tiny", "attn_tiny"],
}
_SUPERNETS = {
    # batch sizes: CPU keeps a step under ~1 s; presets are used when the space has one
    ("cpu", "full"): [SupernetCase("nanogpt", "nanogpt", 8, "tokens"),
                      # the paper's Tiny Shakespeare space (per-layer heads / MLP ratio,
                      # context 256, dropout 0.2), batch 8, vocab 65 (issue 15)
                      SupernetCase("nanogpt-tinyshakespeare", "nanogpt", 8, "tokens",
                                   hparams=(("synthetic_vocab", 65),),
                                   preset_candidates=("tinyshakespeare",)),
                      SupernetCase("conv-macro", "conv-macro", 16, "images")],
    ("cpu", "quick"): [SupernetCase("nanogpt", "nanogpt", 4, "tokens"),
                       SupernetCase("conv-macro", "conv-macro", 8, "images")],
    ("cuda", "full"): [SupernetCase("nanogpt", "nanogpt", 32, "tokens", preset_candidates=("paper",)),
                       SupernetCase("conv-macro", "conv-macro", 128, "images")],
    ("cuda", "quick"): [SupernetCase("nanogpt", "nanogpt", 32, "tokens", preset_candidates=("paper",)),
                        SupernetCase("conv-macro", "conv-macro", 128, "images")],
    ("any", "smoke"): [SupernetCase("nanogpt", "nanogpt", 2, "tokens", preset_candidates=("tiny",)),
                       SupernetCase("conv-macro", "conv-macro", 2, "images", preset_candidates=("tiny",))],
}
SWEEP_KS = (1, 3, 9, 27, 64)
_SWEEP = {
    ("cpu", "full"): ((3072, 768), SWEEP_KS),
    ("cpu", "quick"): ((1536, 384), (1, 9, 27)),
    ("cuda", "full"): ((8192, 4096), SWEEP_KS),
    ("cuda", "quick"): ((3072, 768), (1, 9, 64)),
    ("any", "smoke"): ((16, 8), (1, 3, 9)),
}


# torch.compile(reference) costs 10-30 s per case (forward and backward graphs); it runs
# on these cases, and is recorded as "skipped (compile budget)" on the others. The
# compiled supernet providers (compiled-ours, compiled-plain) follow the same table:
# a nanoGPT supernet graph compiles in about a minute on CPU.
_COMPILE = {
    ("cpu", "full"): {"gpt2_mlp_up", "conv_256_k27", "autoformer_t_qkv", "mbv3_dw7",
                      "linear_gpt2_mlp_up", "conv2d_256_k27", "attn_autoformer_t", "sweep",
                      "nanogpt"},
    ("cpu", "quick"): {"gpt2_mlp_up", "linear_gpt2_mlp_up", "sweep_K9"},
    ("cuda", "full"): {"big_mlp", "gpt2_mlp_up", "conv_256_k27", "linear_gpt2_mlp_up",
                       "conv2d_256_k27", "sweep", "nanogpt"},
    ("cuda", "quick"): {"big_mlp", "gpt2_mlp_up", "linear_gpt2_mlp_up", "nanogpt"},
    ("any", "smoke"): {"tiny_mlp", "tiny_conv", "linear_tiny", "conv_tiny", "attn_tiny", "sweep",
                       "nanogpt"},
}


def compiles(case: str, device: str, profile: str) -> bool:
    """Whether ``compiled-reference`` runs on ``case`` (``"sweep"``: every K of the
    sweep, ``"sweep_K<k>"``: that K only)."""
    names = _pick(_COMPILE, device, profile)
    return case in names or (case.startswith("sweep_K") and "sweep" in names)


# providers measured at op level only, to keep the GPU lane under its 5 minutes
_OP_LEVEL_ONLY = {("cuda", "layers"): {"ours[torch]"}, ("cuda", "supernet"): {"ours[torch]"}}


def skip_reason(suite: str, provider: str, device: str) -> str | None:
    if provider in _OP_LEVEL_ONLY.get((device, suite), ()):
        return f"skipped (measured at op level only on {device}: time budget)"
    return None


def _pick(table: dict, device: str, profile: str):
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    key = ("any", profile) if profile == "smoke" else ("cuda" if device == "cuda" else "cpu", profile)
    return table[key]


def op_cases(device: str, profile: str) -> list[OpCase]:
    return [OPS[n] for n in _pick(_OP_SETS, device, profile)]


def layer_cases(device: str, profile: str) -> list[LayerCase]:
    table = LAYERS["cuda" if device == "cuda" and profile != "smoke" else "cpu"]
    return [table[n] for n in _pick(_LAYER_SETS, device, profile)]


def supernet_cases(device: str, profile: str) -> list[SupernetCase]:
    return list(_pick(_SUPERNETS, device, profile))


def sweep_case(device: str, profile: str) -> tuple[tuple[int, int], tuple[int, ...]]:
    """``(weight shape, Ks)`` of the K sweep."""
    return _pick(_SWEEP, device, profile)
