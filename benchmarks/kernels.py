"""The Triton kernels and their GPUs for the static tools: ``VARIANTS``, each kernel variant as the launchers run
it; ``PATHS``, the variants of each path of a step; ``HW``, the targets' facts."""

from collections import namedtuple

import torch

from drrho_kernels.backends.triton import backward, forward, forward_transposed, launch, tiles

KiB, MiB = 1 << 10, 1 << 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# float32 dot precision -> (input format of its matrix products, products per dot)
PRODUCTS = {"ieee": ("fp32", 1), "tf32": ("tf32", 1), "tf32x3": ("tf32", 3), "bf16x3": ("bf16", 3),
            "bf16x6": ("bf16", 6)}


class Hardware(namedtuple("Hardware", "name units lanes smem_per_block smem_per_unit regs max_warps fp32 tf32 bf16 "
                                      "hbm_bytes_per_s l2_bytes clock_hz matrix_instr")):
    exp_per_clk = 16                                   # exponentials per clock and SM / CU
    amd = property(lambda self: self.lanes == 64)
    peak_flops = property(lambda self: dict(fp32=self.fp32, tf32=self.tf32, bf16=self.bf16))   # None: no such unit


# Vendors' data sheets, dense peaks: SMs / CUs, lanes per warp / wavefront, shared memory / LDS (KiB) per program
# (Triton's limit) and per SM / CU, registers (NVIDIA: 32-bit per SM; AMD: VGPRs per lane, ArchVGPRs + AGPRs), warps
# per SM (AMD: waves per SIMD, 4 SIMDs per CU), peak FLOP/s of fp32 (NVIDIA: CUDA cores), tf32 and bf16 products,
# HBM bytes/s, L2 MiB, clock, the matrix instruction in the compiled code. MI250X: both GCDs (a ROCm device: one).
HW = {arch: Hardware(name, units, lanes, smem * KiB, unit_smem * KiB, regs, warps, *peaks, hbm, l2 * MiB, clock, instr)
      for arch, (name, units, lanes, smem, unit_smem, regs, warps, peaks, hbm, l2, clock, instr) in {
    80: ("A100 SXM", 108, 32, 163, 164, 65536, 64, (19.5e12, 156e12, 312e12), 2.039e12, 40, 1.41e9, "mma.sync"),
    90: ("H100 SXM", 132, 32, 227, 228, 65536, 64, (66.9e12, 494.7e12, 989.4e12), 3.35e12, 50, 1.83e9,
         "wgmma.mma_async"),
    100: ("B200 HGX", 148, 32, 227, 228, 65536, 64, (80e12, 1100e12, 2250e12), 8e12, 126, 1.965e9, "tcgen05.mma"),
    "gfx90a": ("MI250X", 220, 64, 64, 64, 512, 8, (95.7e12, None, 383.0e12), 3.2768e12, 16, 1.7e9, "v_mfma"),
    "gfx942": ("MI300X", 304, 64, 64, 64, 512, 8, (163.4e12, 653.7e12, 1307.4e12), 5.3e12, 32, 2.1e9, "v_mfma"),
    "gfx950": ("MI355X", 256, 64, 160, 160, 512, 8, (157.3e12, None, 2516.6e12), 8e12, 32, 2.4e9, "v_mfma")}.items()}
FAMILIES = {"nvidia": (80, 90, 100), "amd": ("gfx90a", "gfx942", "gfx950")}


def label(arch) -> str:
    return arch if isinstance(arch, str) else f"sm_{arch}"


def parse_arch(text):
    """"90" or "sm_90" -> 90; "gfx942" -> "gfx942"."""
    return str(text) if str(text).startswith("gfx") else int(str(text).removeprefix("sm_"))


def fp32_dot_flops(arch, precision: str | None = None) -> float | None:
    """Peak FLOP/s of float32 dots at ``precision`` (default: the launcher's on ``arch``)."""
    fmt, products = PRODUCTS[precision or launch.fp32_precision(arch)]
    return None if (peak := HW[arch].peak_flops[fmt]) is None else peak / products


def occupancy(arch, registers: int, num_warps: int, shared: int) -> dict:
    """Resident programs per SM / CU (``programs_per_unit``) from registers, shared memory and warp slots."""
    hw = HW[arch]
    if hw.amd:      # VGPRs in granules of 8; a workgroup's waves spread over the CU's 4 SIMDs
        by = {"lds": -(-(hw.smem_per_unit // shared if shared else 64) * num_warps // 4),
              "vgprs": hw.regs // (-(-max(registers, 1) // 8) * 8), "waves": hw.max_warps}
        waves = max(0, min(by.values()))
        return {"waves_per_simd": waves, "programs_per_unit": 4 * waves // num_warps,
                "fits_one_workgroup": by["vgprs"] >= -(-num_warps // 4), "limited_by": min(by, key=by.get)}
    by = {"registers": hw.regs // (-(-max(registers, 1) * 32 // 256) * 256 * num_warps),   # 256 per warp
          "shared": hw.smem_per_unit // (shared + 1024) if shared else 32,               # 1 KiB per block for CUDA
          "warps": hw.max_warps // num_warps}
    blocks = max(0, min(*by.values(), 32))
    return {"programs_per_unit": blocks, "warp_occupancy": blocks * num_warps / hw.max_warps,
            "limited_by": min(by, key=by.get)}


# One step: B rows against N columns, widths d, dr (0: no reference); split False: tiles.column_splits forced to 1
Shape = namedtuple("Shape", "B N d dr dtype arch split", defaults=(0, torch.bfloat16, 90, True))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Variant(namedtuple("Variant", "name fn kernel flags grid_of tiles_of weighted parts_of",
                         defaults=(None, False, None))):
    """A kernel as a launcher runs it: ``fn``, the @triton.jit function; ``kernel``, its tiles ("fwd", "fwdt", "bwd":
    autotuned tables; "margin", "merge": one); ``flags``, the path constexprs; ``grid_of(shape, tiles, variant)``, the
    launcher's grid; ``tiles_of`` (same arguments), its [BM, BN] score tiles (None: no dot); ``weighted``: each score
    tile also feeds a [BM, BN] x [BN, BD] product; ``parts_of(grid)``, its column parts (None: not split)."""

    @property
    def has_dot(self) -> bool:
        return self.tiles_of is not None

    def candidates(self, d: int, dr: int, dtype: torch.dtype, arch) -> list:
        return tiles.candidates(self.kernel, d, dr, dtype, arch, self.flags)

    def constexprs(self, t, d, dr, dtype: torch.dtype, arch) -> dict:
        c = dict(D=d, DR=dr, **self.flags, **t.meta(), **launch.dot_flags(dtype, arch), SCALE_P=dtype == torch.float16)
        return {k: v for k, v in c.items() if k in self.fn.arg_names}

    def grid(self, s: Shape, t) -> tuple:
        return self.grid_of(s, t, self)

    def parts(self, s: Shape, t) -> int:
        return self.parts_of(self.grid(s, t)) if self.parts_of else 1

    def tile_flops(self, t, d: int, dr: int) -> tuple[int, int]:
        """(score, weighted) tensor-core FLOPs of one score tile as executed (K padded to the chunks)."""
        score = 2 * t.BM * t.BN * (_cdiv(d, t.BK) * t.BK + (_cdiv(dr, t.BKR) * t.BKR if dr else 0))
        return score, 2 * t.BM * t.BN * t.BD if self.weighted else 0


def plan(s: Shape, v: Variant | None = None) -> tiles.Plan:
    """The one-process forward's plan on ``s.arch`` for its largest candidate tiles."""
    cands, hw = (v or VARIANTS["fwd_t"]).candidates(s.d, s.dr, s.dtype, s.arch), HW[s.arch]
    return tiles.transposed_plan(s.B, max(c.BM for c in cands), max(c.BN for c in cands),
                                 (s.d + s.dr) * s.dtype.itemsize, hw.units, hw.l2_bytes)


def split_parts(s: Shape, is_row: bool, distill: bool) -> int:
    """The backward's inner parts (1: the unsplit variant runs)."""
    n_out, n_in = (s.B, s.N) if is_row else (s.N, s.B)
    return s.split and backward.backward_splits(n_out, n_in, s.d, s.dr, s.dtype, distill, s.arch, HW[s.arch].units)[0] or 1


def _forward(s, t, v):                            # (row blocks, 2 directions, column parts)
    parts = forward.forward_splits(s.B, s.N, s.d, s.dr, s.dtype, v.flags["EXTRA"], s.arch, HW[s.arch].units)[0]
    return (_cdiv(s.B, t.BM), 2, parts if s.split else 1)


def _backward(s, t, v):                           # (outer blocks, 2 directions x inner parts, output slices)
    parts = split_parts(s, v.flags["IS_ROW"], v.flags["DISTILL"]) if v.flags["SPLIT"] else 1
    return (_cdiv(s.B if v.flags["IS_ROW"] else s.N, t.BM), 2 * parts, _cdiv(s.d, t.BD))


def _every_inner_block(s, t, v):                  # score tiles: outer x inner blocks, per direction and slice
    (n_out, n_in), slices = (s.B, s.N) if v.flags.get("IS_ROW", True) else (s.N, s.B), _cdiv(s.d, t.BD) if t.BD else 1
    return _cdiv(n_out, t.BM) * 2 * slices * _cdiv(n_in, t.BN)


_rows = lambda s, t, v: (_cdiv(s.B, t.BM),)                                  # noqa: E731
_directions = lambda s, t, v: (_cdiv(s.B, t.BM), 2)                           # noqa: E731


_FT = forward_transposed
VARIANTS = {v.name: v for v in (
    *(Variant("fwd" + "_extra" * x, forward._fwd_kernel, "fwd", dict(HAS_REF=True, EXTRA=x), _forward,
              _every_inner_block, parts_of=lambda g: g[2]) for x in (False, True)),
    Variant("fwd_merge", forward._merge_splits_kernel, "merge", dict(NSTAT=3, NGROUPS=1), _directions),
    Variant("fwd_merge_extra", forward._merge_splits_kernel, "merge", dict(NSTAT=12, NGROUPS=4), _directions),
    Variant("fwd_t_margin", _FT._margin_kernel, "margin", dict(HAS_REF=True), _rows),
    *(Variant("fwd_t" + "_extra" * x, _FT._fwd_t_kernel, "fwdt", dict(HAS_REF=True, EXTRA=x),     # each tile once
              lambda s, t, v: plan(s, v).grid, lambda s, t, v: _cdiv(s.B, t.BM) * _cdiv(s.B, t.BN))
      for x in (False, True)),
    *(Variant("fwd_t_merge" + "_extra" * x, _FT._fwd_t_merge_kernel, "merge", dict(NGROUPS=4 if x else 1), _rows)
      for x in (False, True)),
    *(Variant(f"bwd_{side}{'_fold' * fold}{'_distill' * distill}{'_split' * split}", backward._bwd_kernel, "bwd",
              dict(HAS_REF=True, IS_ROW=side == "row", FOLD=fold, DISTILL=distill, SPLIT=split), _backward,
              _every_inner_block, weighted=True, parts_of=lambda g: g[1] // 2)
      for split in (False, True) for distill in (False, True)
      for side, fold in (("row", True), ("row", False), ("col", False))))}
# Each kernel role's variant on each path: plain, per-sample outputs (EXTRA forward), distillation (+ DISTILL backward)
ROLES = ("fwd", "fwd_t_margin", "fwd_t", "fwd_t_merge", "bwd_row_fold", "bwd_row", "bwd_col")
_EXTRA = ("fwd_extra", "fwd_t_margin", "fwd_t_extra", "fwd_t_merge_extra")
PATHS = {"plain": dict(zip(ROLES, ROLES)), "per_sample": dict(zip(ROLES, _EXTRA + ROLES[4:])),
         "distill": dict(zip(ROLES, _EXTRA + tuple(r + "_distill" for r in ROLES[4:])))}
