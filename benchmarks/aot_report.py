"""Triton kernels compiled ahead of time for every GPU target, no GPU: registers, spills, shared memory, matrix
instructions, float32 dot precision, occupancy; ``problems``: what fails (docs/RESULTS.md, "Compiled ahead of time")."""

import argparse
import concurrent.futures as cf
import os
import re
import subprocess
import sys
import tempfile
import time

from . import harness
from . import kernels as K

WIDTHS = ((768, 512), (1024, 512), (1280, 512))     # ViT-L, ViT-H, ViT-bigG against a ViT-B reference
_EMBEDDINGS = {"p_x", "p_t", "p_X", "p_T", "p_xr", "p_tr", "p_Xr", "p_Tr", "p_out_img", "p_out_txt"}
_INTS = {"B", "N", "offset", "n_groups", "n_splits", "panel_cols", "part_cols", "part_inner"}


def jobs(archs, variants=tuple(K.VARIANTS), dtypes=("bf16", "fp16", "fp32"), widths=WIDTHS, default_tiles=False):
    """``(variant, dtype, arch, tiles, d, dr)`` to compile (d = dr = None: a kernel without widths)."""
    return [(v.name, dt, arch, t, d, dr) for v in map(K.VARIANTS.get, variants)
            for d, dr in (widths if "D" in v.fn.arg_names else ((None, None),)) for dt in dtypes for arch in archs
            for t in v.candidates(d or 0, dr or 0, K.DTYPES[dt], arch)[:1 if default_tiles else None]]


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def dot_precisions(ttir: str) -> list[str]:
    """The ``inputPrecision`` of every ``tt.dot`` (unprinted: ieee), sorted, deduplicated."""
    return sorted({(re.search(r"inputPrecision = (\w+)", line) or [None, "ieee"])[1]
                   for line in ttir.splitlines() if re.search(r"\btt\.dot\b", line)})


def compile_one(job) -> dict:
    """One job's row; a compile failure is a row with ``error``, never an exception."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, dt, arch, t, d, dr = job
    v, hw, dtype = K.VARIANTS[name], K.HW[arch], K.DTYPES[dt]
    row = {"kernel": name, "config": t.name, "dtype": dt, "arch": K.label(arch), "D": d, "DR": dr,
           "num_warps": t.num_warps, "num_stages": t.num_stages, "has_dot": v.has_dot}
    constexprs = v.constexprs(t, d, dr, dtype, arch)
    unset = [n for i, n in enumerate(v.fn.arg_names) if v.fn.params[i].is_constexpr and n not in constexprs]
    if unset:           # a flag the kernel gained and the registry does not state: never compile it as None
        return {**row, "error": f"constexprs {unset} are not set by kernels.VARIANTS[{name!r}]"}
    signature = {n: "constexpr" if v.fn.params[i].is_constexpr else f"*{dt}" if n in _EMBEDDINGS else "*fp32"
                 if n.startswith("p_") else "i32" if n in _INTS else "fp32" for i, n in enumerate(v.fn.arg_names)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(v.fn.arg_names) if n.startswith("p_")}
    try:
        k = triton.compile(ASTSource(fn=v.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("hip" if hw.amd else "cuda", arch, hw.lanes), options=dict(
                               num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=K.launch.FP_FUSION))
    except Exception as exc:   # noqa: BLE001 (a configuration that does not compile is a finding)
        return {**row, "error": harness.first_line(exc)[:300]}
    shared = int(k.metadata.shared)
    if hw.amd:
        asm = k.asm["amdgcn"]
        block = asm[asm.index(".amdgpu_metadata"):asm.index(".end_amdgpu_metadata")]
        block = block[block.index(".kernels:"):]
        meta = {a: int(b) for a, b in re.findall(r"^\s*-?\s*\.(\w+):\s+(\d+)\s*$", block, re.M)}
        instrs = re.findall(r"^\s*(v_mfma\w*)", asm, re.M)
        regs, spill = meta["vgpr_count"], meta.get("private_segment_fixed_size", 0)
        shared = max(shared, meta.get("group_segment_fixed_size", 0))
        row.update(agprs=meta.get("agpr_count", 0), sgprs=meta["sgpr_count"], wavefront_size=meta.get("wavefront_size"),
                   vgpr_spill_count=meta.get("vgpr_spill_count", 0), sgpr_spill_count=meta.get("sgpr_spill_count", 0))
    else:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        usage = {a: int(b) for a, b in re.findall(r"(REG|STACK|LOCAL):(\d+)", next(x for x in usage.splitlines()
                                                                                  if "REG:" in x))}
        instrs = re.findall(rf"{re.escape(hw.matrix_instr)}[\w.:]*", k.asm["ptx"])     # issued under a predicate too
        regs, spill = usage["REG"], usage["LOCAL"] + usage["STACK"]
        row.update(local_bytes=usage["LOCAL"], stack_bytes=usage["STACK"])
    return {**row, "registers": regs, "spill_bytes": spill, "shared_bytes": shared, "shared_limit_bytes":
            hw.smem_per_block, "mma_count": len(instrs), "mma_instrs": sorted(set(instrs)), "fp32_dot_precision":
            dot_precisions(k.asm["ttir"]) if dt == "fp32" else None, **K.occupancy(arch, regs, t.num_warps, shared)}


def problems(row: dict) -> list[str]:
    """What fails in a row: no compile, spills, too much shared memory, no matrix instruction, another precision."""
    if "error" in row:
        return [row["error"]]
    arch = K.parse_arch(row["arch"])
    hw, want = K.HW[arch], K.launch.fp32_precision(arch)
    bad = [f"spills to memory: {row['spill_bytes']} B per thread"] if row["spill_bytes"] else []
    if row.get("vgpr_spill_count", 0) > row.get("agprs", 0):
        bad.append(f"{row['vgpr_spill_count']} VGPRs spilled with {row['agprs']} AGPRs to hold them")
    if row["shared_bytes"] > hw.smem_per_block:
        bad.append(f"shared memory {row['shared_bytes']} B > {hw.smem_per_block} B")
    if hw.amd and (row["registers"] > hw.regs or not row["fits_one_workgroup"] or row["wavefront_size"] != 64):
        bad.append(f"{row['registers']} VGPRs do not fit {row['num_warps']} waves of {row['wavefront_size']}")
    if row["has_dot"] and not row["mma_count"]:
        bad.append(f"no {hw.matrix_instr} instruction")
    if row["has_dot"] and row["dtype"] == "fp32" and row["fp32_dot_precision"] != [want]:
        bad.append(f"float32 dots at {row['fp32_dot_precision']}, not {want}")
    return bad


def unavailable(arch) -> str | None:
    """Why this Triton cannot compile for ``arch`` and read the binary; None when it can."""
    from triton.backends import backends
    vendor = "amd" if K.HW[arch].amd else "nvidia"
    if vendor not in backends:
        return f"triton was built without the {vendor} backend"
    return None if vendor == "amd" or os.path.exists(_cuobjdump()) else f"no cuobjdump at {_cuobjdump()}"


def run(todo: list, workers: int = 2) -> dict:
    import triton
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(workers) if workers > 1 else cf.ThreadPoolExecutor(1) as pool:
        rows = [dict(r, problems=problems(r)) for r in pool.map(compile_one, todo)]
    archs = list(dict.fromkeys(j[2] for j in todo))
    return {"provenance": {**harness.machine_info(None), "gpu": None, "widths": sorted({j[4:] for j in todo if j[4]}),
                           "generated": "triton.compile for GPUTargets on a CPU machine; no kernel ran"},
            "triton": triton.__version__, "archs": [K.label(a) for a in archs], "compiles": len(rows), "rows": rows,
            "fp32_precision": {K.label(a): K.launch.fp32_precision(a) for a in archs}, "workers": workers,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=("nvidia", "amd", "all"), default="nvidia")
    p.add_argument("--archs", nargs="*", help="targets instead of the family's: 80 90 100 gfx90a gfx942 gfx950")
    p.add_argument("--dtypes", nargs="*", default=["bf16", "fp16", "fp32"])
    p.add_argument("--widths", nargs="*", metavar="D:DR", help=f"default {' '.join(f'{d}:{r}' for d, r in WIDTHS)}")
    p.add_argument("--default-tiles", action="store_true", help="the first candidate only (what runs untuned)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="one JSON for every target (default: one per family in benchmarks/results/)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    widths = tuple(tuple(int(v) for v in w.split(":")) for w in args.widths) if args.widths else WIDTHS
    archs = [K.parse_arch(a) for a in args.archs] if args.archs else [
        a for f, fam in K.FAMILIES.items() if args.family in (f, "all") for a in fam]
    if missing := {a: why for a in archs if (why := unavailable(a))}:
        print("\n".join(f"aot_report: skipping {K.label(a)}: {why}" for a, why in missing.items()), file=sys.stderr)
    import triton
    groups = {args.out: archs} if args.out else {harness.RESULTS_DIR / f"triton_aot{'_amd' * (f == 'amd')}_"
                                                 f"{triton.__version__}.json": fam for f, fam in K.FAMILIES.items()}
    bad = bool(missing)
    for out, group in groups.items():
        if group := [a for a in group if a in archs and a not in missing]:
            report = run(jobs(group, K.VARIANTS, args.dtypes, widths, args.default_tiles), args.workers)
            for r in (r for r in report["rows"] if r["problems"]):
                print(f"{r['kernel']} {r['dtype']} {r['arch']} D={r['D']} {r['config']}: {'; '.join(r['problems'])}")
            bad |= (n := sum(bool(r["problems"]) for r in report["rows"])) > 0
            print(f"triton {report['triton']}: {report['compiles']} compiles in {report['wall_s']} s, {n} with "
                  f"problems, written {harness.write_json(out, report)}")
    return int(bad)


if __name__ == "__main__":
    sys.exit(main())
