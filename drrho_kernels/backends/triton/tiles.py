"""Tile sizes of the Triton kernels: the candidate tables per kernel, dtype family and GPU
generation, and the one-process forward's launch plan. Pure configuration: no kernel here.

Every candidate is compiled ahead of time for sm_80/sm_90/sm_100 and for AMD gfx90a/gfx942/gfx950 by
``benchmarks/aot_report.py`` (``tests/test_triton_aot.py``) with Triton 3.6 and the newest: no
register spills (no scratch on AMD), shared memory (LDS) within the limit; docs/DESIGN.md ("Tile
tables") says why each shape is in its list. The first candidate of each list is the default; the
others are what autotuning tries on a GPU.

Generations: NVIDIA by compute capability (an int, 90 = sm_90): ampere, hopper, blackwell. AMD by
gfx name (a str, ``launch.device_arch`` on ROCm): cdna2 (gfx90a, MI200), cdna3 (gfx94x, MI300),
cdna4 (gfx950, MI350). On AMD ``num_warps`` counts 64-lane wavefronts, so the AMD tables start from
the NVIDIA shapes at half the warps (the same threads per program, ``wave64_seeds``); a vector
register file of 512 per lane (VGPRs and AGPRs, unified on CDNA2-4, halved per wave when a program
puts two waves on a SIMD) and 64 KiB of LDS per workgroup (160 KiB on gfx950) decide what fits.

    BM  outer block (anchors per program)      BN  inner block (columns per step)
    BK, BKR  chunks of d and dr in the score K-loops
    BD  output columns of d per backward program (the grid splits d into cdiv(d, BD) slices so
        that the [BM, BD] float32 accumulator fits in registers); None for kernels without one
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton


@dataclass(frozen=True, kw_only=True)
class Tiles:
    """One launch configuration; a block size the kernel does not have is None."""

    BM: int
    BN: int | None = None
    BK: int | None = None
    BKR: int | None = None
    BD: int | None = None
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        """The block-size constexprs of the kernel."""
        return {k: getattr(self, k) for k in ("BM", "BN", "BK", "BKR", "BD") if getattr(self, k) is not None}

    def config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def name(self) -> str:
        return "_".join(f"{k}{v}" for k, v in self.meta().items()) + f"_w{self.num_warps}_s{self.num_stages}"


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# Forward, distributed shape (``_fwd_kernel``): a [BM, BN] float32 score tile per program.
_FWD_HALF_SMALL = (Tiles(BM=128, BN=64, BK=32, BKR=32, num_warps=8, num_stages=3),
                   Tiles(BM=64, BN=128, BK=32, BKR=32, num_warps=4, num_stages=3))
_FWD_FP32_SMALL = (Tiles(BM=128, BN=64, BK=16, BKR=16, num_warps=8, num_stages=3),
                   Tiles(BM=64, BN=64, BK=16, BKR=16, num_warps=4, num_stages=3))
_FWD = {
    ("half", "hopper"): (Tiles(BM=128, BN=128, BK=64, BKR=64, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=128, BK=64, BKR=64, num_warps=4, num_stages=3)),
    ("half", "ampere"): _FWD_HALF_SMALL,
    ("half", "blackwell"): _FWD_HALF_SMALL,
    ("fp32", "hopper"): (Tiles(BM=128, BN=64, BK=32, BKR=32, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=64, BK=32, BKR=32, num_warps=4, num_stages=3)),
    ("fp32", "ampere"): _FWD_FP32_SMALL,
    ("fp32", "blackwell"): (Tiles(BM=64, BN=64, BK=16, BKR=16, num_warps=4, num_stages=3),
                            Tiles(BM=128, BN=32, BK=16, BKR=16, num_warps=8, num_stages=3)),
}
# Backward (``_bwd_kernel``): the score tile plus a [BM, BD] float32 accumulator.
_BWD_FP32 = (Tiles(BM=64, BN=64, BK=16, BKR=16, BD=128, num_warps=8, num_stages=2),
             Tiles(BM=64, BN=32, BK=32, BKR=32, BD=128, num_warps=8, num_stages=2))
_BWD = {
    ("half", "hopper"): (Tiles(BM=64, BN=32, BK=64, BKR=64, BD=512, num_warps=8, num_stages=2),
                         Tiles(BM=64, BN=64, BK=64, BKR=64, BD=256, num_warps=8, num_stages=3)),
    ("half", "ampere"): (Tiles(BM=64, BN=64, BK=32, BKR=32, BD=256, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=32, BK=32, BKR=32, BD=256, num_warps=8, num_stages=3)),
    ("half", "blackwell"): (Tiles(BM=64, BN=32, BK=32, BKR=32, BD=256, num_warps=8, num_stages=3),
                            Tiles(BM=64, BN=32, BK=16, BKR=16, BD=256, num_warps=8, num_stages=3),
                            Tiles(BM=64, BN=32, BK=32, BKR=32, BD=256, num_warps=8, num_stages=2)),
    ("fp32", "hopper"): _BWD_FP32 + (Tiles(BM=64, BN=16, BK=16, BKR=16, BD=256, num_warps=8, num_stages=2),),
    ("fp32", "ampere"): _BWD_FP32,
    ("fp32", "blackwell"): (_BWD_FP32[0], Tiles(BM=64, BN=16, BK=16, BKR=16, BD=128, num_warps=8, num_stages=2)),
}
# Forward, one process (``_fwd_t_kernel``): each score tile feeds the row and the column statistics.
_FWDT_FP32 = (Tiles(BM=128, BN=32, BK=16, BKR=16, num_warps=8, num_stages=3),
              Tiles(BM=64, BN=32, BK=32, BKR=32, num_warps=4, num_stages=3))
_FWDT = {
    ("half", "hopper"): (Tiles(BM=64, BN=64, BK=64, BKR=64, num_warps=4, num_stages=2),
                         Tiles(BM=64, BN=64, BK=32, BKR=32, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=32, BK=64, BKR=64, num_warps=4, num_stages=3)),
    ("half", "ampere"): (Tiles(BM=128, BN=32, BK=16, BKR=16, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=16, BK=16, BKR=16, num_warps=8, num_stages=3)),
    ("half", "blackwell"): (Tiles(BM=128, BN=32, BK=32, BKR=32, num_warps=8, num_stages=3),
                            Tiles(BM=64, BN=32, BK=64, BKR=64, num_warps=4, num_stages=3)),
    ("fp32", "hopper"): (Tiles(BM=64, BN=64, BK=16, BKR=16, num_warps=8, num_stages=3),) + _FWDT_FP32,
    ("fp32", "ampere"): _FWDT_FP32,
    ("fp32", "blackwell"): _FWDT_FP32,
}
# AMD (wavefront 64; num_warps counts 64-lane waves). Pruned from ``wave64_seeds`` (the NVIDIA shapes at
# half the warps, two stages) by compiling every seed, every kernel variant (with and without the EXTRA
# / DISTILL paths) and dtype for gfx90a, gfx942 and gfx950 with Triton 3.9 (``benchmarks/aot_report.py
# --family amd --seeds``, an option since retired: ``git show d9a341d:benchmarks/aot_report.py``; the tables then
# with 3.6 too), float32 at launch.FP32_PRECISION_AMD (ieee on
# gfx90a, bf16x6 on gfx942/gfx950: the six-product split keeps three bfloat16 parts of both operands in
# registers). Dropped, every one for spills to memory (scratch; VGPRs parked in AGPRs, a register move
# on CDNA, are allowed: Triton 3.6 does that on the EXTRA forwards): in float32, every seed with BK =
# 64 and a 64 x 64 or larger score tile (forward 128 x 128 w4, 128 x 64 w2, 64 x 128 w2: 20-1568 B of
# scratch per lane; one-process forward 64 x 64 w2 on all three, 64 x 32 / 128 x 32 at BK = 64 with
# EXTRA on gfx942; backward BM128_BN64_BK64_BD128 on gfx942/gfx950 and BD512 with DISTILL on gfx942),
# and 64 x 128 w2 at BK = 32 with EXTRA on gfx942; in half precision none. Backward BD = 512 at BN = 32
# (d = 512 in one slice) fills the 64 KiB of LDS of gfx90a/gfx942 exactly (a [32, 512] half operand, two
# stages): listed, not first there.
_AMD_FWD_HALF = (Tiles(BM=128, BN=128, BK=64, BKR=64, num_warps=4, num_stages=2),
                 Tiles(BM=128, BN=64, BK=32, BKR=32, num_warps=4, num_stages=2),
                 Tiles(BM=64, BN=128, BK=32, BKR=32, num_warps=2, num_stages=2))
_AMD_FWD_FP32 = (Tiles(BM=128, BN=64, BK=32, BKR=32, num_warps=4, num_stages=2),
                 Tiles(BM=128, BN=64, BK=16, BKR=16, num_warps=4, num_stages=2),
                 Tiles(BM=64, BN=64, BK=32, BKR=32, num_warps=2, num_stages=2))
_AMD_FWD = {
    ("half", "cdna2"): _AMD_FWD_HALF, ("half", "cdna3"): _AMD_FWD_HALF,
    ("half", "cdna4"): _AMD_FWD_HALF,
    ("fp32", "cdna2"): _AMD_FWD_FP32, ("fp32", "cdna3"): _AMD_FWD_FP32, ("fp32", "cdna4"): _AMD_FWD_FP32,
}
_AMD_BWD_HALF = (Tiles(BM=64, BN=64, BK=32, BKR=32, BD=256, num_warps=4, num_stages=2),
                 Tiles(BM=64, BN=32, BK=64, BKR=64, BD=512, num_warps=4, num_stages=2),
                 Tiles(BM=64, BN=64, BK=64, BKR=64, BD=256, num_warps=4, num_stages=2))
_AMD_BWD_FP32 = (Tiles(BM=64, BN=64, BK=16, BKR=16, BD=128, num_warps=4, num_stages=2),
                 Tiles(BM=64, BN=32, BK=32, BKR=32, BD=128, num_warps=4, num_stages=2),
                 Tiles(BM=64, BN=32, BK=32, BKR=32, BD=256, num_warps=4, num_stages=2))
_AMD_BWD = {
    ("half", "cdna2"): _AMD_BWD_HALF, ("half", "cdna3"): _AMD_BWD_HALF,
    ("half", "cdna4"): (_AMD_BWD_HALF[1], _AMD_BWD_HALF[0], _AMD_BWD_HALF[2]),
    ("fp32", "cdna2"): _AMD_BWD_FP32, ("fp32", "cdna3"): _AMD_BWD_FP32, ("fp32", "cdna4"): _AMD_BWD_FP32,
}
_AMD_FWDT_HALF = (Tiles(BM=64, BN=64, BK=32, BKR=32, num_warps=4, num_stages=2),
                  Tiles(BM=128, BN=32, BK=32, BKR=32, num_warps=4, num_stages=2),
                  Tiles(BM=64, BN=64, BK=64, BKR=64, num_warps=2, num_stages=2))
_AMD_FWDT_FP32 = (Tiles(BM=64, BN=64, BK=16, BKR=16, num_warps=4, num_stages=2),
                  Tiles(BM=128, BN=32, BK=16, BKR=16, num_warps=4, num_stages=2),
                  Tiles(BM=64, BN=32, BK=32, BKR=32, num_warps=2, num_stages=2))
_AMD_FWDT = {
    ("half", "cdna2"): _AMD_FWDT_HALF, ("half", "cdna3"): _AMD_FWDT_HALF, ("half", "cdna4"): _AMD_FWDT_HALF,
    ("fp32", "cdna2"): _AMD_FWDT_FP32, ("fp32", "cdna3"): _AMD_FWDT_FP32, ("fp32", "cdna4"): _AMD_FWDT_FP32,
}
# The margin and merge kernels are memory-bound one-shots over [B] (no dot): one configuration each.
MARGIN_TILES = Tiles(BM=32, BK=64, BKR=64, num_warps=4, num_stages=1)
MERGE_TILES = Tiles(BM=256, num_warps=4, num_stages=1)
# NVIDIA, the EXTRA / DISTILL paths (distillation, per-sample outputs): the teacher's and the reference's
# score tiles kept apart and more statistics need more registers than the plain kernels at the same tile
# (up to 1.2 KiB of stack per thread at the plain tables' tiles), so these paths have their own, smaller
# tiles. Every table (plain and path) was pruned at d = 1280 and then compiled at d = 768, 1024, 1280
# (dr = 512) with Triton 3.6 and 3.9 (benchmarks/aot_report.py); what spilled anywhere was dropped, the
# first of each list is the largest tile left.
_FWD_EXTRA = {
    ("half", "hopper"): (Tiles(BM=64, BN=128, BK=64, BKR=64, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=64, BK=64, BKR=64, num_warps=8, num_stages=3),
                         Tiles(BM=128, BN=32, BK=64, BKR=64, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=64, BK=32, BKR=32, num_warps=8, num_stages=3)),
    ("half", "ampere"): (Tiles(BM=128, BN=64, BK=16, BKR=16, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=128, BK=16, BKR=16, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=64, BK=32, BKR=32, num_warps=8, num_stages=3)),
    ("half", "blackwell"): (Tiles(BM=64, BN=128, BK=16, BKR=16, num_warps=8, num_stages=3),
                            Tiles(BM=128, BN=32, BK=32, BKR=32, num_warps=8, num_stages=3)),
    ("fp32", "hopper"): (Tiles(BM=64, BN=64, BK=32, BKR=32, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=64, BK=16, BKR=16, num_warps=8, num_stages=3),
                         Tiles(BM=128, BN=32, BK=16, BKR=16, num_warps=8, num_stages=3)),
    ("fp32", "ampere"): (Tiles(BM=128, BN=64, BK=16, BKR=16, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=64, BK=16, BKR=16, num_warps=4, num_stages=3)),
    ("fp32", "blackwell"): (Tiles(BM=128, BN=64, BK=16, BKR=16, num_warps=8, num_stages=3),
                            Tiles(BM=64, BN=64, BK=16, BKR=16, num_warps=8, num_stages=3)),
}
_FWDT_EXTRA = {
    ("half", "hopper"): (Tiles(BM=64, BN=32, BK=32, BKR=32, num_warps=8, num_stages=3),),
    ("half", "ampere"): (Tiles(BM=64, BN=16, BK=16, BKR=16, num_warps=8, num_stages=3),),
    ("half", "blackwell"): (Tiles(BM=64, BN=32, BK=32, BKR=32, num_warps=8, num_stages=3),
                            Tiles(BM=64, BN=32, BK=64, BKR=64, num_warps=8, num_stages=3),
                            Tiles(BM=64, BN=32, BK=32, BKR=32, num_warps=8, num_stages=2)),
    # fp32 on sm_80 and sm_90: no tile is spill-free (sm_80: 16-264 B of stack at the 15 tiles tried, both
    # Triton versions; sm_90: 8 B on 3.6 or 24 B on 3.9 for every tile): the EXTRA statistics and tf32x3's
    # split operands exceed 255 registers per thread. Empty groups: there the one-process EXTRA forward
    # runs the general forward kernel instead (``transposed_forward_runs``; each score tile twice).
    ("fp32", "hopper"): (),
    ("fp32", "ampere"): (),
    ("fp32", "blackwell"): (Tiles(BM=64, BN=32, BK=32, BKR=32, num_warps=8, num_stages=3),
                            Tiles(BM=64, BN=32, BK=16, BKR=16, num_warps=8, num_stages=3)),
}
_BWD_DISTILL = {
    ("half", "hopper"): (Tiles(BM=64, BN=32, BK=64, BKR=64, BD=512, num_warps=8, num_stages=2),
                         Tiles(BM=64, BN=32, BK=64, BKR=64, BD=256, num_warps=8, num_stages=3)),
    ("half", "ampere"): (Tiles(BM=64, BN=64, BK=32, BKR=32, BD=256, num_warps=8, num_stages=3),
                         Tiles(BM=64, BN=32, BK=32, BKR=32, BD=256, num_warps=8, num_stages=3)),
    ("half", "blackwell"): (Tiles(BM=64, BN=32, BK=32, BKR=32, BD=128, num_warps=8, num_stages=3),),
    ("fp32", "hopper"): (Tiles(BM=64, BN=64, BK=16, BKR=16, BD=128, num_warps=8, num_stages=2),
                         Tiles(BM=64, BN=32, BK=32, BKR=32, BD=128, num_warps=8, num_stages=2)),
    ("fp32", "ampere"): (Tiles(BM=64, BN=32, BK=32, BKR=32, BD=128, num_warps=8, num_stages=2),
                         Tiles(BM=64, BN=32, BK=16, BKR=16, BD=128, num_warps=8, num_stages=2)),
    ("fp32", "blackwell"): (Tiles(BM=64, BN=32, BK=32, BKR=32, BD=128, num_warps=8, num_stages=2),
                            Tiles(BM=64, BN=32, BK=16, BKR=16, BD=128, num_warps=8, num_stages=2)),
}
# The tables per kernel and path: the plain kernels' ("fwd", "fwdt", "bwd") and their EXTRA / DISTILL
# paths' ("fwd_extra", "fwdt_extra", "bwd_distill"; :func:`table_name` picks). The AMD tables were
# pruned with every path compiled, so each AMD path table is its kernel's.
TABLES = {"fwd": {**_FWD, **_AMD_FWD}, "fwdt": {**_FWDT, **_AMD_FWDT}, "bwd": {**_BWD, **_AMD_BWD},
          "fwd_extra": {**_FWD_EXTRA, **_AMD_FWD}, "fwdt_extra": {**_FWDT_EXTRA, **_AMD_FWDT},
          "bwd_distill": {**_BWD_DISTILL, **_AMD_BWD}}
# The constexpr flag of each kernel whose path has its own table (all in TUNE_KEYS: the autotuner keeps
# one choice per path).
PATH_FLAGS = {"fwd": "EXTRA", "fwdt": "EXTRA", "bwd": "DISTILL"}
NVIDIA_GENERATIONS = ("ampere", "hopper", "blackwell")
AMD_GENERATIONS = {"gfx90a": "cdna2", "gfx940": "cdna3", "gfx941": "cdna3", "gfx942": "cdna3", "gfx950": "cdna4"}
TUNE_KEYS = {"fwd": ["D", "DR", "HAS_REF", "EXTRA"], "fwdt": ["D", "DR", "HAS_REF", "EXTRA"],
             "bwd": ["D", "DR", "HAS_REF", "IS_ROW", "FOLD", "DISTILL", "SCALE_P", "SPLIT"]}
# The backward split into inner parts (SPLIT: small per-rank batches) keeps the part's offset live; its
# table's first tiles sit at the register limit (255 on sm_90: bf16 at BD = 512, the fp32 fold with
# distillation at BN = 64) and would spill, so a split launch clamps its table's tiles to at most SPLIT_BD
# output columns and SPLIT_BN inner vectors per step (a smaller accumulator and score tile; more programs,
# which a small batch wants anyway). Found with benchmarks/aot_report.py: every split variant's default tile
# spill-free on sm_80/90/100 and gfx942 at d = 768, dr = 512.
SPLIT_BD = {"half": 256, "fp32": 128}
SPLIT_BN = {"half": 64, "fp32": 32}
# Under TRITON_INTERPRET=1: small fixed tiles (the interpreter checks logic, not speed), so that tiny
# test shapes still span several programs and K chunks.
INTERPRETER_TILES = {"fwd": Tiles(BM=16, BN=16, BK=16, BKR=16, num_warps=1, num_stages=1),
                     "fwdt": Tiles(BM=16, BN=16, BK=16, BKR=16, num_warps=1, num_stages=1),
                     "bwd": Tiles(BM=16, BN=16, BK=16, BKR=16, BD=16, num_warps=1, num_stages=1),
                     "margin": Tiles(BM=16, BK=16, BKR=16, num_warps=1, num_stages=1),
                     "merge": Tiles(BM=16, num_warps=1, num_stages=1)}
HOPPER = 90


def family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def generation(arch: int | str) -> str:
    """NVIDIA (an int compute capability): hopper: sm_90; blackwell: sm_100 and later; ampere: the
    rest (sm_80, sm_86, sm_89). AMD (a "gfx..." name, target features after ":" ignored): cdna2
    (gfx90a), cdna3 (gfx940-942), cdna4 (gfx950); any other AMD architecture gets cdna2's tables,
    the smallest tiles (fewest registers, least LDS)."""
    if isinstance(arch, str):
        if not arch.startswith("gfx"):
            raise ValueError(f"arch {arch!r}: an int compute capability (90) or an AMD gfx name ('gfx942')")
        return AMD_GENERATIONS.get(arch.split(":")[0], "cdna2")
    return "hopper" if arch // 10 == 9 else "blackwell" if arch >= 100 else "ampere"


def clamp(t: Tiles, D: int, DR: int) -> Tiles:
    """``t`` with its K chunks and output slice no wider than the (power-of-two rounded) widths."""
    return replace(t, BK=t.BK and min(t.BK, _pow2_at_least_16(D)),
                   BKR=t.BKR and min(t.BKR, _pow2_at_least_16(max(DR, 1))),
                   BD=t.BD and min(t.BD, _pow2_at_least_16(D)))


def table_name(kernel: str, flags: dict | None = None) -> str:
    """The table of ``kernel`` ("fwd", "fwdt" or "bwd") for a launch with constexpr ``flags`` (any
    mapping; only ``PATH_FLAGS[kernel]`` is read): "fwd_extra" / "fwdt_extra" with EXTRA, "bwd_distill"
    with DISTILL, else ``kernel``. The one place that maps a launch to its table."""
    flag = PATH_FLAGS.get(kernel)
    if flag is not None and flags and flags.get(flag):
        return f"{kernel}_{flag.lower()}"
    return kernel


def candidates(kernel: str, D: int, DR: int, dtype: torch.dtype, arch: int | str = HOPPER,
               flags: dict | None = None) -> list[Tiles]:
    """The configurations autotuning tries for ``kernel`` ("fwd", "fwdt" or "bwd") on ``arch`` (a
    compute capability, 90 = sm_90, or an AMD gfx name, "gfx942") with constexpr ``flags`` (EXTRA,
    DISTILL: :func:`table_name`), clamped to ``D``, ``DR`` and deduplicated; the first is the default.
    "margin" and "merge" (no autotuning) have their one configuration."""
    if kernel == "margin":
        return [clamp(MARGIN_TILES, D, DR)]
    if kernel == "merge":
        return [MERGE_TILES]
    return list(_candidates(kernel, D, DR, dtype, arch, table_name(kernel, flags), bool(flags and flags.get("SPLIT"))))


@functools.lru_cache(maxsize=None)
def _candidates(kernel: str, D: int, DR: int, dtype: torch.dtype, arch: int | str, table: str, split: bool) -> tuple:
    """:func:`candidates`, once per launch class (every launch asks: no table work in a step's host time)."""
    tiles = TABLES[table][family(dtype), generation(arch)]
    if split:
        fam = family(dtype)
        tiles = [replace(t, BD=min(t.BD, SPLIT_BD[fam]), BN=min(t.BN, SPLIT_BN[fam])) for t in tiles]
    return tuple(dict.fromkeys(clamp(t, D, DR) for t in tiles))


def transposed_forward_runs(dtype: torch.dtype, arch: int | str, extra: bool) -> bool:
    """Whether the one-process (transposed) forward has a configuration for ``dtype`` on ``arch`` on its
    path (``extra``: EXTRA). Where not (an empty group of ``_FWDT_EXTRA``: every tile spills), the
    one-process forward runs ``_fwd_kernel`` once per direction with the rows as the columns."""
    return bool(TABLES[table_name("fwdt", dict(EXTRA=extra))][family(dtype), generation(arch)])


def every_candidate(kernel: str) -> list[Tiles]:
    """The union of the tables of ``kernel``, its EXTRA / DISTILL path's included (what the autotuner
    is built with before pruning)."""
    names = (kernel, table_name(kernel, {PATH_FLAGS[kernel]: True})) if kernel in PATH_FLAGS else (kernel,)
    return list(dict.fromkeys(t for name in names for table in TABLES[name].values() for t in table))


def wave64_seeds(kernel: str) -> list[Tiles]:
    """The NVIDIA candidates of ``kernel`` moved to 64-lane wavefronts: half the warps (the same
    threads per program) and two stages (AMD's software pipeliner), where the AMD tables started (the
    retired ``benchmarks/aot_report.py --seeds``, ``git show d9a341d:benchmarks/aot_report.py``, compiled them)."""
    nvidia = [t for (fam, gen), table in TABLES[kernel].items() if gen in NVIDIA_GENERATIONS for t in table]
    return list(dict.fromkeys(replace(t, num_warps=max(1, t.num_warps // 2), num_stages=2) for t in nvidia))


# ----------------------------------------------------------------------------------------------
# Filling the GPU: the column splits of the forward and backward kernels, and the one-process forward's
# plan (grid (groups, splits), columns per panel).

PROGRAMS_PER_SM = 2      # programs the plan aims at per SM (264 on an H100 / H200)
MAX_PARTS = 32           # groups, splits <= 32: partial buffers 12 (groups + splits) B bytes <= 768 B bytes
L2_SHARE = 0.5           # share of L2 for the column panels the concurrent programs re-read per row block
INTERPRETER_SMS = 2      # interpreter: a pretend GPU (4 programs), panels of one column block
INTERPRETER_L2_BYTES = 0


def column_splits(row_programs: int, n_columns: int, bn: int, sms: int) -> int:
    """Into how many parts a kernel whose grid has ``row_programs`` programs over its rows (times directions
    and output slices) also cuts its ``n_columns`` columns, so that every one of ``sms`` SMs gets
    ``PROGRAMS_PER_SM`` programs: 1 when the rows already do (large per-rank batches), else enough parts,
    but never more than column blocks of ``bn`` (each part gets at least one) nor ``MAX_PARTS``.

    The one place that decides it, for the forward (``_fwd_kernel``) and the backward (``_bwd_kernel``):
    partial results, then a merge in a fixed order (deterministic, no atomics). ``bn`` is the largest
    column block among the kernel's candidates, so the parts hold for every autotuned configuration.
    """
    target = PROGRAMS_PER_SM * max(1, sms)
    if row_programs >= target:
        return 1
    blocks = triton.cdiv(n_columns, bn)
    parts = max(1, min(triton.cdiv(target, row_programs), blocks, MAX_PARTS))
    return triton.cdiv(blocks, triton.cdiv(blocks, parts))      # parts of whole blocks, none of them empty


def part_length(n_columns: int, bn: int, parts: int) -> int:
    """The columns of each of ``parts`` parts (whole blocks of ``bn``; the last part may be shorter)."""
    return triton.cdiv(triton.cdiv(n_columns, bn), parts) * bn


@dataclass(frozen=True)
class Plan:
    """Launch plan of ``_fwd_t_kernel``: ``groups`` split the column blocks (text anchors, BN wide),
    ``splits`` the row blocks (image anchors, BM tall). Partial buffers, float32: rows
    [groups, 3, B] and columns [splits, 3, B], 12 (groups + splits) B bytes in all."""

    groups: int
    splits: int
    panel_cols: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.groups, self.splits)

    def partial_bytes(self, B: int) -> int:
        return 4 * 3 * (self.groups + self.splits) * B


@functools.lru_cache(maxsize=None)
def transposed_plan(B: int, bm: int, bn: int, vec_bytes: int, sms: int, l2_bytes: int) -> Plan:
    """Groups G of the ``cdiv(B, bn)`` column blocks, splits C of the ``cdiv(B, bm)`` row blocks, and the
    panel width, for a GPU with ``sms`` SMs and ``l2_bytes`` of L2; ``vec_bytes`` = (d + dr) * elem.

    Among G, C <= MAX_PARTS with G C <= PROGRAMS_PER_SM * sms programs (all in flight at once), the
    plan minimises the tiles of the busiest program, cdiv(n_bn, G) cdiv(n_bm, C), then G + C (the
    partial buffers), then G. The G column panels (``panel_cols`` columns each, together L2_SHARE
    of L2) are re-read from L2 for every row block.
    """
    target = max(1, PROGRAMS_PER_SM * sms)
    n_bm, n_bn = triton.cdiv(B, bm), triton.cdiv(B, bn)
    best = None
    for g in range(1, min(n_bn, MAX_PARTS, target) + 1):
        c = min(n_bm, MAX_PARTS, target // g)
        key = (triton.cdiv(n_bn, g) * triton.cdiv(n_bm, c), g + c, g)
        if best is None or key < best[0]:
            best = (key, g, c)
    _, g, c = best
    panel_cols = max(bn, int(l2_bytes * L2_SHARE) // max(1, g * vec_bytes))
    return Plan(g, c, panel_cols)
