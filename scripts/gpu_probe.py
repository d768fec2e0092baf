# ruff: noqa: B023  (benchmark closures are called inside the loop iteration that made them)
"""Quick GPU probe: superpose and the fused linear against their baselines, one table.

Run on a GPU machine after building (scripts/gpu_lane.sh runs it):
    python scripts/gpu_probe.py [--json out.json]
Times are medians of triton.testing.do_bench (CUDA events), side by side in one run.
The full suites are benchmarks/run.py; this probe exists to check kernels quickly.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

import tangle_kernels as tk
from tangle_kernels.backends.reference import superpose_reference
from tangle_kernels.ops.entangled_linear import entangled_linear


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e-3


def op_cases():
    gpt = tk.Layout.grid((3072, 768), {"embed": [384, 576, 768], "ratio": [2, 3, 4]},
                         lambda embed, ratio: [(0, embed * ratio), (0, embed)])
    conv = tk.Layout.conv((256, 256, 7, 7), [64, 128, 256], [64, 128, 256], [3, 5, 7])
    big = tk.Layout.grid((8192, 8192), {"a": [2048, 4096, 8192], "b": [2048, 4096, 8192]},
                         lambda a, b: [(0, a), (0, b)])
    return [("gpt_mlp_3072x768_K9", gpt), ("conv_256x256x7x7_K27", conv),
            ("big_8192x8192_K9", big)]


def kernel_rows(dev):
    """The backend kernels alone (no autograd, no Python op layer, T precomputed):
    their bandwidth against copy_, to tell the kernels' speed from the per-call host
    cost in the op rows above. bwd = dW and P (atomic and deterministic)."""
    from tangle_kernels import backends

    rows = []
    for name, lay in op_cases():
        for dtype in (torch.float32, torch.bfloat16):
            W = torch.randn(lay.rows, lay.cols, device=dev, dtype=dtype)
            G = torch.randn_like(W)
            t = lay.cell_values(torch.rand(lay.K, device=dev)).contiguous()
            tabs = lay.tables(dev)
            nbytes = W.numel() * W.element_size()
            dst = torch.empty_like(W)
            t_copy = bench(lambda: dst.copy_(W))
            for bname in ("cuda", "triton"):
                try:
                    impl = backends.get("superpose", bname)
                    cases = [("fwd", lambda: impl.forward(W, t, tabs), 2)]
                    if bname == "cuda":
                        for mode in ("atomic", "deterministic"):
                            cases.append((f"bwd {mode}", lambda mode=mode: impl.backward(G, W, t, tabs, mode), 3))
                    else:
                        cases.append(("bwd", lambda: impl.backward(G, W, t, tabs), 3))
                    for what, f, n in cases:
                        f()
                        ts = bench(f)
                        rows.append(dict(case=name, dtype=str(dtype), provider=f"kernel {bname} {what}",
                                         fwd_s=ts, fwdbwd_s=float("nan"), copy_s=t_copy,
                                         GBps=n * nbytes / ts / 1e9,
                                         frac_of_copy_bw=(n * nbytes / ts) / (2 * nbytes / t_copy)))
                except Exception as e:
                    rows.append(dict(case=name, dtype=str(dtype), provider=f"kernel {bname}",
                                     error=f"{type(e).__name__}: {e}"[:200]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    for name, lay in op_cases():
        for dtype in (torch.float32, torch.bfloat16):
            W = torch.randn(lay.shape, device=dev, dtype=dtype, requires_grad=True)
            mix = torch.softmax(torch.randn(lay.K, device=dev), 0).requires_grad_()
            G = torch.randn_like(W)
            nbytes = W.numel() * W.element_size()
            dst = torch.empty_like(W)
            t_copy = bench(lambda: dst.copy_(W))
            ref_c = torch.compile(superpose_reference)
            provs = {
                "cuda": lambda: tk.superpose(W, mix, lay, backend="cuda"),
                "triton": lambda: tk.superpose(W, mix, lay, backend="triton"),
                "torch": lambda: tk.superpose(W, mix, lay, backend="torch"),
                "reference": lambda: superpose_reference(W, mix, lay),
                "compiled_ref": lambda: ref_c(W, mix, lay),
            }
            for pname, f in provs.items():
                try:
                    f()
                    t_f = bench(f)

                    def fb(f=f):
                        out = f()
                        torch.autograd.grad(out, (W, mix), G)

                    fb()
                    t_fb = bench(fb)
                except Exception as e:  # report, never hide
                    rows.append(dict(case=name, dtype=str(dtype), provider=pname,
                                     error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(dict(case=name, dtype=str(dtype), provider=pname, fwd_s=t_f,
                                 fwdbwd_s=t_fb, copy_s=t_copy,
                                 fwd_bw_frac_of_copy=t_copy / t_f,
                                 fwd_GBps=2 * nbytes / t_f / 1e9,
                                 fwdbwd_GBps=5 * nbytes / t_fb / 1e9))
    try:
        rows += kernel_rows(dev)
    except Exception as e:  # report, never lose the rows above
        rows.append(dict(case="kernels", dtype="", provider="kernel rows",
                         error=f"{type(e).__name__}: {e}"[:200]))
    # fused linear vs F.linear (GPT-2 MLP, tokens = 8 x 1024); float32 with TF32 on,
    # as in training runs and the benchmark suites (cuBLAS and the Triton dots alike)
    torch.backends.cuda.matmul.allow_tf32 = True
    lay = tk.Layout.grid((3072, 768), {"embed": [384, 576, 768], "ratio": [2, 3, 4]},
                         lambda embed, ratio: [(0, embed * ratio), (0, embed)])
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(8192, 768, device=dev, dtype=dtype, requires_grad=True)
        W = (torch.randn(3072, 768, device=dev, dtype=dtype) * 0.02).requires_grad_()
        b = torch.zeros(3072, device=dev, dtype=dtype, requires_grad=True)
        mix = torch.softmax(torch.randn(9, device=dev), 0).requires_grad_()
        dy = torch.randn(8192, 3072, device=dev, dtype=dtype)
        provs = {
            "plain_F.linear": lambda: F.linear(x, W, b),
            "fused_triton": lambda: entangled_linear(x, W, b, mix, lay, backend="triton"),
            "superpose_cuda+F.linear": lambda: entangled_linear(x, W, b, mix, lay, backend="cuda"),
        }
        for pname, f in provs.items():
            try:
                f()
                t_f = bench(f)

                def fb(f=f):
                    out = f()
                    ins = (x, W, b) + ((mix,) if "plain" not in pname else ())
                    torch.autograd.grad(out, ins, dy)

                fb()
                t_fb = bench(fb)
            except Exception as e:
                rows.append(dict(case="linear_8192x768->3072", dtype=str(dtype), provider=pname,
                                 error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(case="linear_8192x768->3072", dtype=str(dtype), provider=pname,
                             fwd_s=t_f, fwdbwd_s=t_fb))
    # copy/fwd: copy_ bandwidth fraction reached (op rows: the fwd; kernel rows: that kernel)
    print(f"{'case':28s} {'dtype':15s} {'provider':24s} {'fwd ms':>8s} {'f+b ms':>8s} {'copy/fwd':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:28s} {r['dtype']:15s} {r['provider']:24s} ERROR {r['error']}")
            continue
        frac = r.get("fwd_bw_frac_of_copy", r.get("frac_of_copy_bw"))
        print(f"{r['case']:28s} {r['dtype']:15s} {r['provider']:24s} {r['fwd_s']*1e3:8.3f} "
              f"{r['fwdbwd_s']*1e3:8.3f} {'' if frac is None else f'{frac:8.2f}'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
