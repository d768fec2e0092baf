"""Compile the Triton kernels for a real GPU target on a machine WITHOUT a GPU.

    python scripts/triton_aot_check.py [--arch 90] [--json out.json]

Triton lowers a kernel to PTX and a cubin (through its bundled ptxas) for any target
given explicitly, so the GPU code paths can be checked here before a GPU session:

- it compiles at all for sm_90 / sm_80 (no interpreter-only constructs);
- the GEMM main loops are software-pipelined (``async_copy_global_to_local`` or TMA
  in the TTGIR) and use the tensor cores (``warp_group_dot`` = wgmma on sm_90,
  ``ttg.dot``/mma on sm_80);
- registers, spills and shared memory per kernel (``ptxas -v``).

The arguments are specialised the way Triton's launcher does for the real shapes
(pointers and sizes divisible by 16 get ``tt.divisibility = 16``, unit strides
become the constant 1), with the tile configs the library really launches
(``backends/triton/linear.py fixed_config``, ``backends/triton/superpose.py tile_config``).
Exit status 1 if a kernel fails to compile or a GEMM main loop is not pipelined.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tangle_kernels.backends.triton import linear as TL  # noqa: E402
from tangle_kernels.backends.triton import superpose as TS  # noqa: E402

TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def ptr(dt):
    return ("ptr", dt)


def compile_kernel(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """``args``: name -> ("ptr", "fp16") | ("i32", value) in the kernel's order."""
    sig, attrs, consts = {}, {}, dict(constexprs)
    names = fn.arg_names
    dns = {names[d] if isinstance(d, int) else d for d in (getattr(fn, "do_not_specialize", None) or ())}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        kind, v = args[name]
        if kind == "ptr":
            sig[name] = "*" + v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in dns:  # the launcher passes these as plain i32, whatever the value
            sig[name] = "i32"
        elif v == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def _ptxas_candidates(arch: int) -> list[str]:
    """Triton's own choice for ``arch`` first, then its bundled binaries, then the system's."""
    out = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        out.append(get_ptxas(arch).path)
    except Exception:
        pass
    nb = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out += [os.path.join(nb, "ptxas-blackwell"), os.path.join(nb, "ptxas"), "ptxas"]
    return out


def ptxas_info(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (None where no ptxas accepts the PTX)."""
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        for exe in _ptxas_candidates(arch):
            try:
                r = subprocess.run([exe, "-v", f"--gpu-name={sm}", p, "-o", os.path.join(d, "k.o")],
                                   capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if r.returncode != 0:
                continue
            txt = r.stdout + r.stderr
            regs = re.search(r"Used (\d+) registers", txt)
            spill = re.search(r"(\d+) bytes spill stores", txt)
            return {"registers": int(regs.group(1)) if regs else None,
                    "spill_bytes": int(spill.group(1)) if spill else None}
    return {"registers": None, "spill_bytes": None}


def _dot_loop_depth(ttgir: str) -> int | None:
    """How many ``scf.for`` loops enclose the (first) tensor-core op: 1 = one main loop
    (the pipeline never refills), 2 = a loop nested in another (refills per outer step)."""
    stack = []
    for line in ttgir.splitlines():
        t = line.strip()
        if re.search(r"warp_group_dot |ttg?\.dot ", t):
            return stack.count("for")
        if t.startswith("}") and not t.endswith("{"):
            if stack:
                stack.pop()
        elif t.endswith("{"):
            if t.startswith("}"):  # "} else {": same region depth
                continue
            stack.append("for" if "scf.for" in t else "other")
    return None


def loop_report(ttgir: str) -> dict:
    return {
        "tensor_core_ops": ttgir.count("warp_group_dot ") + len(re.findall(r"ttg?\.dot ", ttgir)),
        "wgmma": ttgir.count("warp_group_dot "),
        "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
        "dot_loop_depth": _dot_loop_depth(ttgir),
    }


def linear_cases(M=16384, N=3072, K=768):
    """(name, kernel, args, constexprs, config) of the fused linear at GPT-2 MLP size."""
    out = []
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        ty, eb = TY[dt], torch.tensor([], dtype=dt).element_size()
        prec = "tf32"
        meta, w, st = TL.fixed_config(M, N, eb)
        fwd_args = {
            "a_ptr": ptr(ty), "b_ptr": ptr(ty), "t_ptr": ptr("fp32"), "tab_ptr": ptr("i32"),
            "tab_scale": ("i32", 3), "t_stride": ("i32", 1), "runs_ptr": ptr("i32"), "n_runs": ("i32", 3),
            "kgrp_ptr": ptr("i32"), "Kred": ("i32", K), "bias_ptr": ptr(ty), "out_ptr": ptr(ty), "M": ("i32", M), "N": ("i32", N),
            "s_am": ("i32", K), "s_ak": ("i32", 1), "s_bk": ("i32", 1), "s_bn": ("i32", K),
        }
        # FLAT: one main loop over all K tiles (the GPT-2 layouts' run starts are
        # multiples of 64); "runs": the per-run loop of layouts that are not aligned
        for flat in (True, False):
            name = f"linear_fwd {ty}" if flat else f"linear_fwd_runs {ty}"
            out.append((name, TL._masked_linear_kernel, fwd_args,
                        {"HAS_BIAS": True, "PREC": prec, "ALIGNED": True, "FLAT": flat, **meta}, (w, st)))
        meta, w, st = TL.fixed_config(M, K, eb)
        out.append((f"linear_dx {ty}", TL._masked_linear_kernel, {
            "a_ptr": ptr(ty), "b_ptr": ptr(ty), "t_ptr": ptr("fp32"), "tab_ptr": ptr("i32"),
            "tab_scale": ("i32", 1), "t_stride": ("i32", 3), "runs_ptr": ptr("i32"), "n_runs": ("i32", 3),
            "kgrp_ptr": ptr("i32"), "Kred": ("i32", N), "bias_ptr": ptr(ty), "out_ptr": ptr(ty), "M": ("i32", M), "N": ("i32", K),
            "s_am": ("i32", N), "s_ak": ("i32", 1), "s_bk": ("i32", K), "s_bn": ("i32", 1),
        }, {"HAS_BIAS": False, "PREC": prec, "ALIGNED": True, "FLAT": True, **meta}, (w, st)))
        meta, w, st = TL.fixed_config(N, K, eb)
        out.append((f"linear_dw {ty}", TL._linear_dw_kernel, {
            "dy_ptr": ptr(ty), "x_ptr": ptr(ty), "w_ptr": ptr(ty), "t_ptr": ptr("fp32"),
            "rowgrp_ptr": ptr("i32"), "colgrp_ptr": ptr("i32"), "dw_ptr": ptr(ty), "p_ptr": ptr("fp32"),
            "M": ("i32", N), "N": ("i32", K), "K": ("i32", M), "ncg": ("i32", 3), "ncells": ("i32", 9),
            "s_dk": ("i32", N), "s_dm": ("i32", 1), "s_xk": ("i32", K), "s_xn": ("i32", 1),
            "s_wm": ("i32", K), "s_wn": ("i32", 1),
        }, {"ATOMIC": True, "PREC": prec, "GCH": TL.GCHUNK, **meta}, (w, st)))
    return out


def superpose_cases(R=16384, C=4096):
    out = []
    dev = torch.device("cuda", 0)
    TS._SM_COUNT[0] = 132
    for dt in (torch.float32, torch.bfloat16):
        ty, eb = TY[dt], torch.tensor([], dtype=dt).element_size()
        BR, BC, nw = TS.tile_config(R, C, eb, dev)
        ntc = triton.cdiv(C, BC)
        common = {"t_ptr": ptr("fp32"), "rowgrp_ptr": ptr("i32"), "colgrp_ptr": ptr("i32"),
                  "R": ("i32", R), "C": ("i32", C), "ncg": ("i32", 3), "n_tiles_c": ("i32", ntc)}
        out.append((f"superpose_fwd {ty}", TS._superpose_fwd_kernel, {
            "w_ptr": ptr(ty), "out_ptr": ptr(ty), **common, "s_wr": ("i32", C), "s_wc": ("i32", 1),
        }, {"BLOCK_R": BR, "BLOCK_C": BC}, (nw, 1)))
        out.append((f"superpose_bwd {ty}", TS._superpose_bwd_kernel, {
            "g_ptr": ptr(ty), "w_ptr": ptr(ty), "dw_ptr": ptr(ty), "p_ptr": ptr("fp32"), **common,
            "ncells": ("i32", 9), "s_gr": ("i32", C), "s_gc": ("i32", 1), "s_wr": ("i32", C), "s_wc": ("i32", 1),
        }, {"ATOMIC": True, "BLOCK_R": BR, "BLOCK_C": BC, "GCH": TS.GCHUNK}, (nw, 1)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="SM version(s), default 90")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--only", help="compile only the kernels whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles for a GPU target", file=sys.stderr)
        return 2
    archs = args.arch or [90]
    rows, bad = [], 0
    for arch in archs:
        for name, fn, a, c, (nw, ns) in linear_cases() + superpose_cases():
            if args.only and args.only not in name:
                continue
            rec = {"arch": arch, "kernel": name, "num_warps": nw, "num_stages": ns,
                   "tile": {k: v for k, v in c.items() if k.startswith("B")}}
            try:
                cc = compile_kernel(fn, a, c, arch, nw, ns)
                rec.update(loop_report(cc.asm["ttgir"]))
                rec["shared_bytes"] = cc.metadata.shared
                rec.update(ptxas_info(cc.asm["ptx"], arch))
                gemm = name.startswith("linear")
                rec["ok"] = (not gemm) or (rec["tensor_core_ops"] > 0 and rec["async_copies"] > 0)
                if name.startswith(("linear_fwd ", "linear_dx ")):  # FLAT: one main loop
                    rec["ok"] = rec["ok"] and rec["dot_loop_depth"] == 1
            except Exception as e:  # report every kernel, then fail
                rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
            bad += not rec["ok"]
            rows.append(rec)
            extra = rec.get("error") or (
                f"tensor-core ops {rec['tensor_core_ops']} (wgmma {rec['wgmma']}), async copies "
                f"{rec['async_copies']}, dot loop depth {rec['dot_loop_depth']}, regs {rec['registers']}, "
                f"spills {rec['spill_bytes']} B, "
                f"smem {rec['shared_bytes']} B")
            print(f"sm_{arch} {name:20s} {'ok ' if rec['ok'] else 'BAD'} tile {rec['tile']} "
                  f"w{nw}/s{ns}: {extra}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "kernels": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
