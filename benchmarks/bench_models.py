"""Soft-arch supernet step against the original model (issue 25's timing target).

For each model (torchvision resnet18, timm vit_tiny, Hugging Face GPT-2 small) the
original model and its ``entangle()``-d supernet under a soft arch (softmax of
random alphas, every choice mixed) run forward + backward side by side, interleaved
round by round in one process; the table gives the median times and their ratio
(target: <= 1.3x at batch 32, images 32x32, sequences 128). Models whose library does
not import are listed as skipped with the reason.

    python benchmarks/bench_models.py [--device cuda] [--batch 32] [--seq 128]
        [--rounds 20] [--models resnet18,vit_tiny,gpt2] [--tiny] [--out FILE.md]

``--tiny``: small configurations and 2 rounds, to check the script runs (no timing
value). Results belong in benchmarks/results/ with the date and the device.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tangle_kernels.nn as tnn  # noqa: E402


def _resnet18(tiny: bool):
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    choices, dims = {}, {}
    for layer, c in ((1, 64), (2, 128), (3, 256), (4, 512)):
        name = f"mid{layer}"
        choices[name] = (c // 2, 3 * c // 4, c)
        dims |= {
            f"layer{layer}.*.conv1.out_channels": name,
            f"layer{layer}.*.bn1.num_features": name,
            f"layer{layer}.*.conv2.in_channels": name,
        }
    choices["k"] = (1, 3)
    dims["layer*.*.conv2.kernel_size"] = "k"
    return model, choices, dims, "image"


def _vit_tiny(tiny: bool):
    import timm

    kw = dict(img_size=32, patch_size=4, num_classes=10)
    if tiny:
        kw |= dict(embed_dim=24, depth=2, num_heads=3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    e = model.embed_dim
    choices = {"heads": (1, 2, 3), "hidden": (2 * e, 3 * e, 4 * e)}
    dims = {
        "blocks.*.attn.num_heads": "heads",
        "blocks.*.mlp.fc1.out_features": "hidden",
        "blocks.*.mlp.fc2.in_features": "hidden",
    }
    return model, choices, dims, "image"


def _gpt2(tiny: bool):
    import transformers

    cfg = (
        transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=101)
        if tiny
        else transformers.GPT2Config()  # GPT-2 small: 768 wide, 12 layers, 12 heads
    )
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    model = transformers.GPT2LMHeadModel(cfg)
    e, h = cfg.n_embd, cfg.n_head
    choices = {
        "embed": (e // 2, 3 * e // 4, e),
        "heads": (h // 2, h),
        "hidden": (2 * e, 3 * e, 4 * e),
    }
    dims = {
        "transformer.w[tp]e.embedding_dim": "embed",
        "transformer.h.*.ln_[12].normalized_shape": "embed",
        "transformer.ln_f.normalized_shape": "embed",
        "transformer.h.*.attn.embed_dim": "embed",
        "transformer.h.*.attn.num_heads": "heads",
        "transformer.h.*.mlp.c_fc.in_features": "embed",
        "transformer.h.*.mlp.c_fc.out_features": "hidden",
        "transformer.h.*.mlp.c_proj.in_features": "hidden",
        "transformer.h.*.mlp.c_proj.out_features": "embed",
        "lm_head.in_features": "embed",
    }
    return model, choices, dims, "tokens"


MODELS = {"resnet18": _resnet18, "vit_tiny": _vit_tiny, "gpt2": _gpt2}


def _inputs(kind, model, batch, seq, device):
    if kind == "image":
        return (torch.randn(batch, 3, 32, 32, device=device),), {}
    vocab = model.config.vocab_size
    return (), {
        "input_ids": torch.randint(0, vocab, (batch, seq), device=device),
        "use_cache": False,
    }


def _out(y):
    return y if isinstance(y, torch.Tensor) else y.logits if hasattr(y, "logits") else y[0]


def _step(model, args, kwargs, arch_fn=None):
    def run():
        if arch_fn is not None:
            tnn.set_arch(model, arch_fn())
        y = _out(model(*args, **kwargs))
        y.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def _time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(name, device, batch, seq, rounds, tiny):
    model, choices, dims, kind = MODELS[name](tiny)
    model = model.to(device).train()
    args, kwargs = _inputs(kind, model, batch, seq, device)
    sup = tnn.entangle(model, choices, dims).to(device).train()
    alpha = {n: torch.randn(len(v), device=device, requires_grad=True) for n, v in choices.items()}
    base = _step(model, args, kwargs)
    soft = _step(sup, args, kwargs, lambda: {n: a.softmax(0) for n, a in alpha.items()})
    for fn in (base, soft):  # warm-up
        fn()
    tb, ts = [], []
    for _ in range(rounds):
        tb.append(_time(base, device))
        ts.append(_time(soft, device))
    mb, ms = statistics.median(tb), statistics.median(ts)
    return mb, ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tiny", action="store_true", help="small configs, 2 rounds: a smoke run")
    ap.add_argument("--out", default=None, help="write the Markdown table to this file")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    batch, seq, rounds = (2, 16, 2) if a.tiny else (a.batch, a.seq, a.rounds)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"Soft-arch fwd+bwd vs the original model: {datetime.date.today()}, {dev}, torch "
        f"{torch.__version__}, batch {batch}, images 32x32, sequences {seq}, median of {rounds} "
        "interleaved rounds" + (" (--tiny smoke run: not a measurement)" if a.tiny else ""),
        "",
        "| model | original (ms) | supernet, soft arch (ms) | ratio |",
        "|---|---|---|---|",
    ]
    for name in a.models.split(","):
        try:
            mb, ms = bench(name, device, batch, seq, rounds, a.tiny)
        except ImportError as e:
            lines.append(f"| {name} | skipped: {e} | | |")
            continue
        lines.append(f"| {name} | {mb * 1e3:.2f} | {ms * 1e3:.2f} | {ms / mb:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
