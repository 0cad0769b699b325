"""Ahead-of-time compilation report of the Triton kernels: no GPU needed.

Compiles every kernel variant at every autotuning candidate (``drrho_kernels.backends.triton.tiles``)
and input dtype for sm_80 (A100), sm_90 (H100/H200) and sm_100 (B200) with ``triton.compile`` on an
``ASTSource``, then reads from each binary:

- registers per thread, spill stores/loads (LOCAL and STACK bytes of ``cuobjdump --dump-resource-usage``,
  the cuobjdump that Triton ships),
- shared memory per block (Triton's ``metadata.shared``) against the architecture's per-block limit,
- tensor-core instructions in the PTX (``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90,
  ``tcgen05.mma`` on sm_100) and the float32 dot precision in the TTIR (tf32x3 or ieee, never tf32),
  for every kernel with a dot (``has_dot``: all but ``NO_DOT``, the one-process forward's margin and
  merge kernels, memory-bound [B] passes with one fixed configuration),
- an occupancy estimate (resident programs per SM from registers and shared memory).

``python -m benchmarks.aot_report`` writes ``benchmarks/results/triton_aot_<triton version>.json`` and
prints a summary. ``tests/test_triton_aot.py`` runs it in a subprocess (the test session interprets
the kernels, this needs them compiled) and asserts on the table. Compiled kernels are cached by
Triton (``~/.triton/cache``), so a rerun without kernel changes takes seconds.

Must run without ``TRITON_INTERPRET`` (the kernels would be interpreter objects).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90, 100)
# Per-block shared memory limits (opt-in maximum, bytes) and per-SM shared memory / registers.
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024, 100: 228 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 90: 64, 100: 64}
MMA_MARKER = {80: "mma.sync", 90: "wgmma.mma_async", 100: "tcgen05.mma"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Kernel variants: (module of drrho_kernels.backends.triton, jit function, tile table, flag constexprs).
# D = 768 (not a power of two, two BD slices at BD = 512), dr = 512 != d: the largest tiles every
# candidate uses for CLIP widths.
VARIANTS = {
    "fwd": ("forward", "_fwd_kernel", "fwd", dict(HAS_REF=True)),
    # one process: margins, the transposed forward (each tile once, both reductions), the merge
    "fwd_t_margin": ("forward_transposed", "_margin_kernel", "margin", dict(HAS_REF=True)),
    "fwd_t": ("forward_transposed", "_fwd_t_kernel", "fwdt", dict(HAS_REF=True)),
    "fwd_t_merge": ("forward_transposed", "_fwd_t_merge_kernel", "merge", {}),
    "bwd_row_fold": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=True, FOLD=True)),
    "bwd_row": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=True, FOLD=False)),
    "bwd_col": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=False, FOLD=False)),
}
NO_DOT = {"fwd_t_margin", "fwd_t_merge"}     # no tensor-core product in these (memory-bound [B] passes)
D, DR = 768, 512
_EMBEDDING_ARGS = {"p_x", "p_t", "p_X", "p_T", "p_xr", "p_tr", "p_Xr", "p_Tr", "p_out_img", "p_out_txt"}
_INT_ARGS = {"B", "N", "offset", "n_groups", "n_splits", "panel_cols"}


def jobs(archs=ARCHS, variants=tuple(VARIANTS), dtypes=tuple(DTYPES)):
    """Every (variant, dtype, arch, tiles) to compile."""
    import torch
    from drrho_kernels.backends.triton import tiles as tables
    out = []
    for variant in variants:
        kind = VARIANTS[variant][2]
        for dt in dtypes:
            for cc in archs:
                for tiles in tables.candidates(kind, D, DR, getattr(torch, DTYPES[dt]), cc):
                    out.append((variant, dt, cc, tiles))
    return out


def _signature(fn, dt):
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        elif name in _EMBEDDING_ARGS:
            sig[name] = "*" + dt
        elif name.startswith("p_"):
            sig[name] = "*fp32"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, LOCAL, SHARED (static) of the single function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(l for l in text.splitlines() if "REG:" in l)
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}


def occupancy(cc: int, regs: int, num_warps: int, shared: int) -> dict:
    """Resident programs per SM: registers (allocated per warp in units of 256) and shared memory."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM[cc] // (shared + 1024) if shared else 32   # 1 KiB per block reserved by CUDA
    by_warps = MAX_WARPS_PER_SM[cc] // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, 32))
    return {"programs_per_sm": blocks, "warp_occupancy": blocks * num_warps / MAX_WARPS_PER_SM[cc],
            "limited_by": min((by_regs, "registers"), (by_smem, "shared"), (by_warps, "warps"))[1]}


def compile_one(job) -> dict:
    """Compile one job; returns its table row (never raises: a failure is a row with ``error``)."""
    variant, dt, cc, tiles = job
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    from drrho_kernels.backends.triton import launch
    module, fn_name, kind, flags = VARIANTS[variant]
    fn = getattr(importlib.import_module(f"drrho_kernels.backends.triton.{module}"), fn_name)
    row = {"kernel": variant, "config": tiles.name, "dtype": dt, "arch": f"sm_{cc}", "D": D, "DR": DR,
           "num_warps": tiles.num_warps, "num_stages": tiles.num_stages, "has_dot": variant not in NO_DOT}
    constexprs = dict(D=D, DR=DR, **flags, **tiles.meta(), **launch.dot_flags(getattr(torch, DTYPES[dt])))
    if kind == "bwd":
        constexprs["SCALE_P"] = dt == "fp16"
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.startswith("p_")}
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, dt), constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                                        enable_fp_fusion=launch.FP_FUSION))
    except Exception as exc:  # a config that does not compile is a finding, not a crash of the report
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return row
    usage = resource_usage(k.asm["cubin"])
    shared = int(k.metadata.shared)
    ptx, ttir = k.asm["ptx"], k.asm["ttir"]
    precisions = sorted(set(re.findall(r"inputPrecision = (\w+)", ttir)))
    row.update(
        registers=usage["reg"], spill_local_bytes=usage["local"], stack_bytes=usage["stack"],
        shared_bytes=shared, shared_limit_bytes=SMEM_PER_BLOCK[cc],
        mma_instr=MMA_MARKER[cc], mma_count=ptx.count(MMA_MARKER[cc]),
        mma_sync_count=ptx.count("mma.sync"), wgmma_count=ptx.count("wgmma.mma_async"),
        tcgen05_count=ptx.count("tcgen05.mma"),
        fp32_dot_precision=precisions if dt == "fp32" else None,
        **occupancy(cc, usage["reg"], tiles.num_warps, shared))
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled row (empty when it meets every requirement)."""
    if "error" in row:
        return [row["error"]]
    bad = []
    if row["spill_local_bytes"] or row["stack_bytes"]:
        bad.append(f"spills: LOCAL {row['spill_local_bytes']} B, STACK {row['stack_bytes']} B")
    if row["shared_bytes"] > row["shared_limit_bytes"]:
        bad.append(f"shared memory {row['shared_bytes']} B > {row['shared_limit_bytes']} B")
    if row["has_dot"] and row["mma_count"] == 0:
        bad.append(f"no {row['mma_instr']} (tensor-core) instruction")
    if row["has_dot"] and row["dtype"] == "fp32" and (not row["fp32_dot_precision"]
                                   or set(row["fp32_dot_precision"]) - {"tf32x3", "ieee"}):
        bad.append(f"float32 dots with precision {row['fp32_dot_precision']} (want tf32x3 or ieee)")
    return bad


def run(workers: int = 2, archs=ARCHS, variants=tuple(VARIANTS), dtypes=tuple(DTYPES)) -> dict:
    import triton
    todo = jobs(archs, variants, dtypes)
    t0 = time.perf_counter()
    if workers > 1:
        with cf.ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(compile_one, todo))
    else:
        rows = [compile_one(j) for j in todo]
    for r in rows:
        r["problems"] = problems(r)
    return {"triton": triton.__version__, "python": platform.python_version(), "D": D, "DR": DR,
            "wall_s": round(time.perf_counter() - t0, 1),
            "note": "wall_s includes Triton cache hits (~/.triton/cache); a cold cache takes about 2 minutes",
            "rows": rows}


def summary(report: dict) -> str:
    lines = [f"triton {report['triton']}: {len(report['rows'])} compiles in {report['wall_s']} s (d={D}, dr={DR})",
             f"{'kernel':<13}{'dtype':<6}{'arch':<7}{'config':<38}{'regs':>5}{'spill':>6}{'smem KiB':>9}"
             f"{'mma':>5}{'prog/SM':>8}  problems"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['kernel']:<13}{r['dtype']:<6}{r['arch']:<7}{r['config']:<38} ERROR {r['error']}")
            continue
        lines.append(f"{r['kernel']:<13}{r['dtype']:<6}{r['arch']:<7}{r['config']:<38}{r['registers']:>5}"
                     f"{r['spill_local_bytes'] + r['stack_bytes']:>6}{r['shared_bytes'] / 1024:>9.1f}"
                     f"{r['mma_count']:>5}{r['programs_per_sm']:>8}  {'; '.join(r['problems'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--archs", type=int, nargs="*", default=list(ARCHS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_report: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    report = run(args.workers, tuple(args.archs), tuple(args.variants), tuple(args.dtypes))
    import triton
    out = args.out or Path(__file__).resolve().parent / "results" / f"triton_aot_{triton.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"written {out}")
    return 1 if any(r["problems"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
