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

AMD (``--family amd``): the same variants, candidates (``tiles.candidates`` of the cdna2/3/4 tables) and
dtypes for gfx90a (MI250X), gfx942 (MI300X) and gfx950 (MI355X), wavefront 64, compiled to ``amdgcn``
assembly and an ``hsaco`` by Triton's AMD backend (no GPU, no ROCm install needed). From the assembly's
kernel metadata (``.amdgpu_metadata``): VGPRs (``.vgpr_count``, AGPRs included: one unified file of 512
per lane on CDNA2-4), AGPRs, SGPRs, spills (``.vgpr_spill_count``: into AGPRs when there is no scratch;
``.sgpr_spill_count``: SGPRs spilled to VGPR lanes, no memory) and scratch
(``.private_segment_fixed_size``: bytes per lane of spills to memory or stack, which fail a row); LDS is
Triton's ``metadata.shared`` (allocated at launch; the static ``.group_segment_fixed_size`` is 0)
against 64 KiB per workgroup (160 KiB on gfx950, as Triton's AMD TargetInfo states); matrix-core
instructions (``v_mfma_*``); the float32 dot precision in the TTIR (``launch.fp32_precision`` of the
target); occupancy (waves per SIMD, from VGPRs and LDS).

``python -m benchmarks.aot_report`` writes ``benchmarks/results/triton_aot_<triton version>.json``
(NVIDIA) and prints a summary; ``--family amd`` writes ``triton_aot_amd_<triton version>.json``;
``--family all`` both (the one command to regenerate the reports after a kernel change; add
``--seeds`` to compile ``tiles.wave64_seeds``, the pool the AMD tables were pruned from, instead of
the tables). ``tests/test_triton_aot.py`` runs it in a subprocess (the test session interprets the
kernels, this needs them compiled) and asserts on the table. Compiled kernels are cached by Triton
(``~/.triton/cache``), so a rerun without kernel changes takes seconds.

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
# AMD CDNA2-4: wavefront 64; per lane 512 VGPRs (ArchVGPRs + AGPRs, one unified file), allocated in
# granules of 8; 4 SIMDs per CU, up to 8 waves per SIMD; LDS per workgroup (Triton's AMD TargetInfo
# getSharedMemorySize: 160 KiB on CDNA4, 64 KiB otherwise) and per CU (the same on these parts).
AMD_ARCHS = ("gfx90a", "gfx942", "gfx950")
AMD_WAVE = 64
AMD_VGPRS = 512
AMD_VGPR_GRANULE = 8
AMD_SIMDS_PER_CU = 4
AMD_MAX_WAVES_PER_SIMD = 8
LDS_PER_WORKGROUP = {"gfx90a": 64 * 1024, "gfx942": 64 * 1024, "gfx950": 160 * 1024}
LDS_PER_CU = LDS_PER_WORKGROUP
FAMILIES = {"nvidia": ARCHS, "amd": AMD_ARCHS}

# Kernel variants: (module of drrho_kernels.backends.triton, jit function, tile table, flag constexprs).
# D = 768 (not a power of two, two BD slices at BD = 512), dr = 512 != d: the largest tiles every
# candidate uses for CLIP widths. Each kernel with a distillation / per-sample path (EXTRA, DISTILL:
# the target's and the reference's tiles kept apart, more statistics) is compiled with and without it.
VARIANTS = {
    "fwd": ("forward", "_fwd_kernel", "fwd", dict(HAS_REF=True, EXTRA=False)),
    "fwd_extra": ("forward", "_fwd_kernel", "fwd", dict(HAS_REF=True, EXTRA=True)),
    # one process: margins, the transposed forward (each tile once, both reductions), the merge
    "fwd_t_margin": ("forward_transposed", "_margin_kernel", "margin", dict(HAS_REF=True)),
    "fwd_t": ("forward_transposed", "_fwd_t_kernel", "fwdt", dict(HAS_REF=True, EXTRA=False)),
    "fwd_t_extra": ("forward_transposed", "_fwd_t_kernel", "fwdt", dict(HAS_REF=True, EXTRA=True)),
    "fwd_t_merge": ("forward_transposed", "_fwd_t_merge_kernel", "merge", dict(NGROUPS=1)),
    "fwd_t_merge_extra": ("forward_transposed", "_fwd_t_merge_kernel", "merge", dict(NGROUPS=4)),
    "bwd_row_fold": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=True, FOLD=True, DISTILL=False)),
    "bwd_row": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=True, FOLD=False, DISTILL=False)),
    "bwd_col": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=False, FOLD=False, DISTILL=False)),
    "bwd_row_fold_distill": ("backward", "_bwd_kernel", "bwd",
                             dict(HAS_REF=True, IS_ROW=True, FOLD=True, DISTILL=True)),
    "bwd_row_distill": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=True, FOLD=False, DISTILL=True)),
    "bwd_col_distill": ("backward", "_bwd_kernel", "bwd", dict(HAS_REF=True, IS_ROW=False, FOLD=False, DISTILL=True)),
}
NO_DOT = {"fwd_t_margin", "fwd_t_merge", "fwd_t_merge_extra"}   # memory-bound [B] passes, no tensor-core product
# Embedding widths (d, dr): the widest common CLIP towers, ViT-L (768), ViT-H (1024) and ViT-bigG (1280),
# each against a ViT-B reference (dr = 512). d = 768 is the first (and the shape of the reports before
# these widths); 768 and 1280 are not powers of two (masked last K chunk and BD slice; BD = 512 gives
# two and three slices). Kernels without d, dr (the merge) compile once, with D = DR = None in their rows.
WIDTHS = ((768, 512), (1024, 512), (1280, 512))
D, DR = WIDTHS[0]
_EMBEDDING_ARGS = {"p_x", "p_t", "p_X", "p_T", "p_xr", "p_tr", "p_Xr", "p_Tr", "p_out_img", "p_out_txt"}
_INT_ARGS = {"B", "N", "offset", "n_groups", "n_splits", "panel_cols"}


def arch_label(arch) -> str:
    """"sm_90" for the int 90, the gfx name itself for AMD."""
    return arch if isinstance(arch, str) else f"sm_{arch}"


def parse_arch(text: str):
    """"90" or "sm_90" -> 90; "gfx942" -> "gfx942"."""
    text = str(text)
    return text if text.startswith("gfx") else int(text.removeprefix("sm_"))


def takes_widths(variant: str) -> bool:
    """Whether the variant's kernel has the D, DR constexprs (all but the merge kernels)."""
    import importlib
    module, fn_name = VARIANTS[variant][:2]
    fn = getattr(importlib.import_module(f"drrho_kernels.backends.triton.{module}"), fn_name)
    return "D" in fn.arg_names


def jobs(archs=ARCHS, variants=tuple(VARIANTS), dtypes=tuple(DTYPES), seeds: bool = False, widths=WIDTHS):
    """Every (variant, dtype, arch, tiles, D, DR) to compile: at each width (``widths``: (d, dr) pairs;
    once, with D = DR = None, for a kernel without them), the candidates of each arch for the variant's
    path (``tiles.candidates`` with the variant's flags: EXTRA, DISTILL), or (``seeds``) the pool
    ``tiles.wave64_seeds`` the AMD tables were pruned from (clamped to the width)."""
    import torch
    from drrho_kernels.backends.triton import tiles as tables
    out = []
    for variant in variants:
        kind, flags = VARIANTS[variant][2:]
        for d, dr in (widths if takes_widths(variant) else ((None, None),)):
            for dt in dtypes:
                for cc in archs:
                    if seeds and kind in tables.TABLES:
                        cands = list(dict.fromkeys(tables.clamp(t, d, dr) for t in tables.wave64_seeds(kind)))
                    else:
                        cands = tables.candidates(kind, d or 0, dr or 0, getattr(torch, DTYPES[dt]), cc, flags)
                    for tiles in cands:
                        out.append((variant, dt, cc, tiles, d, dr))
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


def _compile(job):
    """``(row, compiled kernel or None)`` of one job; a compile failure is a row with ``error``."""
    variant, dt, cc, tiles, d, dr = job
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    from drrho_kernels.backends.triton import launch
    module, fn_name, kind, flags = VARIANTS[variant]
    fn = getattr(importlib.import_module(f"drrho_kernels.backends.triton.{module}"), fn_name)
    row = {"kernel": variant, "config": tiles.name, "dtype": dt, "arch": arch_label(cc), "D": d, "DR": dr,
           "num_warps": tiles.num_warps, "num_stages": tiles.num_stages, "has_dot": variant not in NO_DOT}
    constexprs = dict(D=d, DR=dr, **flags, **tiles.meta(), **launch.dot_flags(getattr(torch, DTYPES[dt]), cc))
    if kind == "bwd":
        constexprs["SCALE_P"] = dt == "fp16"
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    unset = [n for i, n in enumerate(fn.arg_names) if fn.params[i].is_constexpr and n not in constexprs]
    if unset:       # a flag the kernel gained and VARIANTS does not state: never compile it as None
        row["error"] = f"constexprs {unset} of {fn_name} are not set by aot_report.VARIANTS"
        return row, None
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.startswith("p_")}
    target = GPUTarget("hip", cc, AMD_WAVE) if isinstance(cc, str) else GPUTarget("cuda", cc, 32)
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, dt), constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=target, options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                                                            enable_fp_fusion=launch.FP_FUSION))
    except Exception as exc:  # a config that does not compile is a finding, not a crash of the report
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return row, None
    return row, k


def compile_one(job) -> dict:
    """Compile one job; returns its table row (never raises: a failure is a row with ``error``)."""
    row, k = _compile(job)
    if k is None:
        return row
    if isinstance(job[2], str):
        return _amd_row(row, k, job[2], job[3])
    cc, tiles, dt = job[2], job[3], job[1]
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


def amdgpu_metadata(asm: str) -> dict:
    """The kernel's entry of the ``.amdgpu_metadata`` block (``.vgpr_count``, ``.sgpr_count``, ...) as ints."""
    block = asm[asm.index(".amdgpu_metadata"):asm.index(".end_amdgpu_metadata")]
    kernel = block[block.index(".kernels:"):]
    return {k: int(v) for k, v in re.findall(r"^\s*-?\s*\.(\w+):\s+(\d+)\s*$", kernel, re.M)}


def amd_occupancy(arch: str, vgprs: int, num_warps: int, lds: int) -> dict:
    """Waves per SIMD: by VGPRs (512 per lane in granules of 8), by LDS (workgroups per CU) and the
    hardware's 8; a workgroup of ``num_warps`` waves spreads over the CU's 4 SIMDs, and its VGPRs fit
    when each SIMD can hold its share of the waves (``fits_one_workgroup``; LDS is checked apart)."""
    alloc = -(-max(vgprs, 1) // AMD_VGPR_GRANULE) * AMD_VGPR_GRANULE
    by_vgprs = AMD_VGPRS // alloc
    waves_per_simd_per_wg = -(-num_warps // AMD_SIMDS_PER_CU)
    wgs_by_lds = LDS_PER_CU[arch] // lds if lds else 64
    by_lds = -(-wgs_by_lds * num_warps // AMD_SIMDS_PER_CU)
    waves = max(0, min(by_vgprs, by_lds, AMD_MAX_WAVES_PER_SIMD))
    return {"waves_per_simd": waves, "fits_one_workgroup": by_vgprs >= waves_per_simd_per_wg,
            "limited_by": min((by_vgprs, "vgprs"), (by_lds, "lds"), (AMD_MAX_WAVES_PER_SIMD, "waves"))[1]}


def dot_precisions(ttir: str) -> list[str]:
    """The ``inputPrecision`` of every ``tt.dot`` in the TTIR, sorted and deduplicated; a dot without the
    attribute has the default, ieee (MLIR does not print a default value)."""
    found = set()
    for line in ttir.splitlines():
        if re.search(r"\btt\.dot\b", line):
            m = re.search(r"inputPrecision = (\w+)", line)
            found.add(m.group(1) if m else "ieee")
    return sorted(found)


def _amd_row(row: dict, k, arch: str, tiles) -> dict:
    asm, ttir = k.asm["amdgcn"], k.asm["ttir"]
    meta = amdgpu_metadata(asm)
    lds = max(int(k.metadata.shared), meta.get("group_segment_fixed_size", 0))
    mfma = re.findall(r"^\s*(v_mfma\w*)", asm, re.M)
    precisions = dot_precisions(ttir)
    row.update(
        vgprs=meta["vgpr_count"], agprs=meta.get("agpr_count", 0), sgprs=meta["sgpr_count"],
        vgpr_spill_count=meta.get("vgpr_spill_count", 0), sgpr_spill_count=meta.get("sgpr_spill_count", 0),
        scratch_bytes=meta.get("private_segment_fixed_size", 0), lds_bytes=lds, lds_limit_bytes=LDS_PER_WORKGROUP[arch],
        wavefront_size=meta.get("wavefront_size"), mfma_count=len(mfma), mfma_instrs=sorted(set(mfma)),
        fp32_dot_precision=precisions if row["dtype"] == "fp32" else None,
        **amd_occupancy(arch, meta["vgpr_count"], tiles.num_warps, lds))
    return row


def amd_problems(row: dict) -> list[str]:
    """What is wrong with one compiled AMD row: spills to memory (scratch), LDS over the limit, VGPRs
    that do not fit the workgroup's waves, no MFMA in a kernel with a dot, float32 dots at another
    precision than ``launch.fp32_precision`` of the target. VGPRs spilled into AGPRs without scratch
    are allowed: on CDNA2-4 an instruction addresses 256 arch VGPRs, the other half of the 512 per lane
    are AGPRs, and LLVM parks the excess there (``v_accvgpr_write`` / ``read``, "Reload Reuse"), a
    register move, no memory traffic; ``vgpr_spill_count`` records them."""
    from drrho_kernels.backends.triton import launch
    bad = []
    if row["scratch_bytes"]:
        bad.append(f"spills to memory: scratch {row['scratch_bytes']} B per lane, "
                   f"{row['vgpr_spill_count']} VGPRs spilled")
    elif row["vgpr_spill_count"] > row["agprs"]:
        bad.append(f"{row['vgpr_spill_count']} VGPRs spilled with {row['agprs']} AGPRs to hold them")
    if row["lds_bytes"] > row["lds_limit_bytes"]:
        bad.append(f"LDS {row['lds_bytes']} B > {row['lds_limit_bytes']} B")
    if row["vgprs"] > AMD_VGPRS or not row["fits_one_workgroup"]:
        bad.append(f"{row['vgprs']} VGPRs per lane do not fit {row['num_warps']} waves")
    if row["wavefront_size"] != AMD_WAVE:
        bad.append(f"wavefront {row['wavefront_size']}")
    if row["has_dot"] and row["mfma_count"] == 0:
        bad.append("no v_mfma (matrix-core) instruction")
    if row["has_dot"] and row["dtype"] == "fp32":
        want = launch.fp32_precision(row["arch"])
        if row["fp32_dot_precision"] != [want]:
            bad.append(f"float32 dots with precision {row['fp32_dot_precision']} (want {want})")
    return bad


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled row (empty when it meets every requirement)."""
    if "error" in row:
        return [row["error"]]
    if row["arch"].startswith("gfx"):
        return amd_problems(row)
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


# What the report's rows depend on: the kernels and their jit helpers (forward, forward_transposed,
# backward, helpers), the dot flags and FMA contraction (launch), the tables (tiles) and this script (the
# jobs, the signature, the problems). A change to one without a new report makes the report stale
# (tests/test_triton_aot.py::test_committed_report). Not the backend's __init__.py (it registers ops).
SOURCES = tuple(f"drrho_kernels/backends/triton/{m}.py" for m in
                ("backward", "forward", "forward_transposed", "helpers", "launch", "tiles")) + ("benchmarks/aot_report.py",)
REPO_ROOT = Path(__file__).resolve().parent.parent


def provenance() -> dict:
    """Where and from what the report was made: UTC date, the commit (``-dirty`` when the files the
    rows depend on, ``SOURCES``, differ from it: ``dirty_sources`` names them) and a SHA-256 of those
    files as compiled, the Triton / torch / Python versions, the machine (CPU, cores, load), and that no
    GPU took part (compiled ahead of time for ``GPUTarget``s; no kernel ran)."""
    import datetime
    import hashlib

    import torch
    import triton

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  check=True).stdout.rstrip("\n")   # porcelain lines start with a space
        except (OSError, subprocess.CalledProcessError):
            return None
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = (git("status", "--porcelain", "--", *SOURCES) or "").splitlines()
    dirty = sorted(line[3:] for line in dirty if line.strip() and not line[3:].endswith((".pyc", "/")))
    digest = hashlib.sha256()
    for path in sorted(p for src in SOURCES for p in ([REPO_ROOT / src] if (REPO_ROOT / src).is_file()
                                                        else (REPO_ROOT / src).rglob("*.py"))):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit + ("-dirty" if dirty else ""), "dirty_sources": dirty,
            "sources_sha256": digest.hexdigest(), "triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "machine": {"cpu": cpu, "cpu_count": os.cpu_count(),
                                                              "load_average": [round(v, 2) for v in os.getloadavg()]},
            "gpu": None, "generated": "ahead of time on a CPU machine without a GPU: triton.compile for a GPUTarget, "
                                      "binaries read with the tools Triton ships; no kernel ran"}


def run(workers: int = 2, archs=ARCHS, variants=tuple(VARIANTS), dtypes=tuple(DTYPES), seeds: bool = False,
        widths=WIDTHS) -> dict:
    import triton
    todo = jobs(archs, variants, dtypes, seeds, widths)
    t0 = time.perf_counter()
    if workers > 1:
        with cf.ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(compile_one, todo))
    else:
        rows = [compile_one(j) for j in todo]
    for r in rows:
        r["problems"] = problems(r)
    report = {"triton": triton.__version__, "python": platform.python_version(),
              "widths": [list(w) for w in widths], "variants_at_every_width": sorted(variants),
              "compiles": len(rows), "wall_s": round(time.perf_counter() - t0, 1), "workers": workers,
              "provenance": provenance(),
              "note": "wall_s includes Triton cache hits (~/.triton/cache); a cold cache takes about 30 minutes on "
                      "2 cores (about 600 compiles)",
              "rows": rows}
    if any(isinstance(a, str) for a in archs):
        from drrho_kernels.backends.triton import launch
        report.update(targets=[a for a in archs if isinstance(a, str)], wavefront=AMD_WAVE, seeds=seeds,
                      lds_limit_bytes={a: LDS_PER_WORKGROUP[a] for a in archs if isinstance(a, str)},
                      vgprs_per_lane=AMD_VGPRS,
                      fp32_precision={a: launch.fp32_precision(a) for a in archs if isinstance(a, str)},
                      note="wall_s includes Triton cache hits (~/.triton/cache); a cold cache takes about 20 minutes "
                           "on 2 cores (about 300 compiles)")
        unavailable = amd_unavailable()
        if unavailable:
            report["amd_backend_unavailable"] = unavailable
    return report


def _backend_unavailable(name: str, label: str) -> str | None:
    try:
        from triton.backends import backends
    except ImportError:
        return "triton has no backends registry"
    if name not in backends:
        return f"triton was built without the {label} backend"
    return None


def amd_unavailable() -> str | None:
    """Why this Triton cannot compile for the AMD targets (None when it can)."""
    return _backend_unavailable("amd", "AMD")


def nvidia_unavailable() -> str | None:
    """Why this Triton cannot compile for NVIDIA targets and read the cubins (None when it can)."""
    missing = _backend_unavailable("nvidia", "NVIDIA")
    if missing is None and not os.path.exists(_cuobjdump()):
        return f"no cuobjdump at {_cuobjdump()}"
    return missing


# (heading, row format, fields) of the summary table per family; ``D`` prints "-" for the merge kernels
_SUMMARY = {
    "amd": (f"{'kernel':<21}{'D':>5} {'dtype':<6}{'arch':<8}{'config':<38}{'vgpr':>5}{'agpr':>5}{'sgpr':>5}{'scr':>5}"
            f"{'LDS KiB':>8}{'mfma':>6}{'w/SIMD':>7}  problems",
            lambda r: f"{r['vgprs']:>5}{r['agprs']:>5}{r['sgprs']:>5}{r['scratch_bytes']:>5}"
                      f"{r['lds_bytes'] / 1024:>8.1f}{r['mfma_count']:>6}{r['waves_per_simd']:>7}", 8, "AMD compiles"),
    "nvidia": (f"{'kernel':<21}{'D':>5} {'dtype':<6}{'arch':<7}{'config':<38}{'regs':>5}{'spill':>6}{'smem KiB':>9}"
               f"{'mma':>5}{'prog/SM':>8}  problems",
               lambda r: f"{r['registers']:>5}{r['spill_local_bytes'] + r['stack_bytes']:>6}"
                         f"{r['shared_bytes'] / 1024:>9.1f}{r['mma_count']:>5}{r['programs_per_sm']:>8}", 7, "compiles"),
}


def summary(report: dict) -> str:
    """The report as a fixed-width table, one line per compile."""
    heading, fields, arch_width, what = _SUMMARY["amd" if "targets" in report else "nvidia"]
    lines = [f"triton {report['triton']}: {len(report['rows'])} {what} in {report['wall_s']} s "
             f"(d, dr: {', '.join(f'{d}:{dr}' for d, dr in report['widths'])})", heading]
    for r in report["rows"]:
        head = f"{r['kernel']:<21}{r['D'] or '-':>5} {r['dtype']:<6}{r['arch']:<{arch_width}}{r['config']:<38}"
        lines.append(head + (f" ERROR {r['error']}" if "error" in r else f"{fields(r)}  {'; '.join(r['problems'])}"))
    return "\n".join(lines)


def default_out(family: str, seeds: bool = False) -> Path:
    import triton
    name = {"nvidia": "triton_aot", "amd": "triton_aot_amd"}[family] + ("_seeds" if seeds else "")
    return Path(__file__).resolve().parent / "results" / f"{name}_{triton.__version__}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--family", choices=("nvidia", "amd", "all"), default="nvidia",
                        help="NVIDIA sm_80/90/100 (default), AMD gfx90a/942/950, or both (two reports)")
    parser.add_argument("--archs", nargs="*", default=None,
                        help="a subset of the family's targets (80 90 100, gfx90a gfx942 gfx950)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--seeds", action="store_true",
                        help="compile tiles.wave64_seeds (the pool of the AMD tables) instead of the candidates")
    parser.add_argument("--widths", nargs="*", default=None, metavar="D:DR",
                        help="embedding widths d:dr to compile at (default: every one of WIDTHS, "
                             + " ".join(f"{d}:{dr}" for d, dr in WIDTHS) + ")")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/...; one family only)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_report: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    widths = tuple(tuple(int(v) for v in w.split(":")) for w in args.widths) if args.widths else WIDTHS
    if any(len(w) != 2 for w in widths):
        parser.error(f"--widths {args.widths}: each d:dr, e.g. 768:512")
    families = ("nvidia", "amd") if args.family == "all" else (args.family,)
    if args.out is not None and len(families) > 1:
        parser.error("--out names one report: give --family nvidia or amd")
    status = 0
    for family in families:
        if family == "amd" and amd_unavailable():
            print(f"aot_report: {amd_unavailable()}", file=sys.stderr)
            status = 1
            continue
        archs = tuple(parse_arch(a) for a in args.archs) if args.archs else FAMILIES[family]
        if any(isinstance(a, str) != (family == "amd") for a in archs):
            parser.error(f"--archs {args.archs} are not {family} targets")
        report = run(args.workers, archs, tuple(args.variants), tuple(args.dtypes), args.seeds, widths)
        out = args.out or default_out(family, args.seeds)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(summary(report))
        print(f"written {out}")
        status |= 1 if any(r["problems"] for r in report["rows"]) else 0
    return status


if __name__ == "__main__":
    sys.exit(main())
