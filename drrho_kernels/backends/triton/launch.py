"""Block sizes, grids, autotuning and the launch wrappers of the Triton kernels (kernels.py).

Grids (one program per output block, no atomics, deterministic):

    forward          (cdiv(B, BM), 2)              row block x direction; loop over N in BN steps
    forward, one process (``forward_transposed``: each score tile once, both directions' statistics)
        margins      (cdiv(B, 32),)
        tiles        (G, C) = ``transposed_plan``: G groups of column blocks x C splits of row blocks,
                     ~2 programs per SM; partial statistics [G, 3, B] + [C, 3, B] float32
        merge        (cdiv(B, 256),)               merge the partials, epilogue of both directions
    backward rows    (cdiv(B, BM), 2, cdiv(d, BD)) row block x direction x slice of d; loop over N
    backward columns (cdiv(N, BM), 2, cdiv(d, BD)) column block x direction x slice of d; loop over B

Block sizes. The forward holds a [BM, BN] float32 score tile; the backward also holds a [BM, BD]
float32 accumulator for its slice of the gradient. A whole d = 1024 row block does not fit in
registers (64 x 1024 float32 over 256 threads = 256 registers per thread, the hardware maximum), so
the backward grid splits d into BD-wide slices and each slice recomputes its score tiles. The
candidate configurations keep the accumulator at or below 128 registers per thread
(BM * BD / (32 * num_warps) <= 128); ``tests/test_triton_aot.py`` compiles every candidate for
sm_80/sm_90/sm_100 and checks that none spills and that shared memory fits. Recomputing the scores
costs 2 BM BN (d + dr) per slice against 2 BM BN BD for the slice's weighted product, so wide
slices (BD = 256 or 512 at BM = 64) beat tall blocks for d >= 512; ``benchmarks/cost_model.py``
derives the FLOPs and bytes of every choice from the functions below.

Autotuning (GPU only): ``triton.autotune`` over a short list per kernel, dtype family and GPU
generation (``candidates``: Hopper-sized lists for sm_90, the H100/H200 tuning target; smaller tiles
that fit sm_80 and sm_100), keyed on d, dr, the flags and (implicitly) the dtype. Under
``TRITON_INTERPRET=1`` one small fixed configuration runs (the interpreter is slow, and it checks
logic, not speed).

Float32 dots use ``FP32_PRECISION = "tf32x3"`` (three TF32 tensor-core products, about float32
accuracy): SPEC's 1e-4 against float64 rules out plain TF32, and "ieee" (CUDA-core FMAs, 67 TFLOP/s on an
H100) is about 2.5x slower than tf32x3 (495 / 3 TFLOP/s). Half-precision dots take the tensor
cores directly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton

from . import kernels

FP32_PRECISION = "tf32x3"   # float32 dots: three TF32 tensor-core products, about float32 accuracy


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter. Triton decides when the kernels are defined
    (``TRITON_INTERPRET`` at the import of kernels.py), so this asks the kernel objects themselves."""
    return not isinstance(kernels._fwd_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration. ``BD = 0`` for the forward (no output slice)."""

    BM: int
    BN: int
    BK: int
    BKR: int
    BD: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        """The block-size constexprs of the kernel (zero fields are ones the kernel does not have)."""
        return {k: v for k, v in (("BM", self.BM), ("BN", self.BN), ("BK", self.BK), ("BKR", self.BKR),
                                  ("BD", self.BD)) if v}

    def config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def name(self) -> str:
        return "_".join(f"{k}{v}" for k, v in self.meta().items()) + f"_w{self.num_warps}_s{self.num_stages}"


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# Candidates before clamping to the problem (BK <= d, BKR <= dr, BD <= d, rounded up to powers of two),
# per dtype family and GPU generation; the first of each list is the default. Every one is compiled
# ahead of time for its architectures by tests/test_triton_aot.py with Triton 3.6 and 3.9 (no spills,
# shared memory within the limit); configurations that spilled under either version were dropped.
#
# Hopper (sm_90, the tuning target): wgmma keeps the [BM, BD] accumulator in registers; BM = 64 with
# 8 warps gives each warpgroup m64 x n(BD/2). BD = 512 covers d = 512 in one slice (no recomputed
# scores) but only fits with BN = 32, because the [BN, BD] operand of the weighted product passes
# through registers on its way to shared memory; BD = 256 allows BN = 64; BM = 128, BD = 128 is the
# small-d shape. sm_80 (mma.sync fed from registers) spills with the BD = 512 shape and with BK = 64
# score tiles, so it uses BK = 32 and BD = 256; on sm_100 (tcgen05, accumulators in tensor memory)
# Triton 3.6's ptxas caps the column kernel at 128 registers, and only BN = 32 fits. Float32 runs
# tf32x3, which splits both operands into high and low TF32 parts in registers (and, on sm_100, keeps
# three accumulators in tensor memory): BK = 16 or 32 and BD = 128.
_FWD_HALF_SMALL = (Tiles(128, 64, 32, 32, 0, 8, 3), Tiles(64, 128, 32, 32, 0, 4, 3))
_FWD_FP32_SMALL = (Tiles(128, 64, 16, 16, 0, 8, 3), Tiles(64, 64, 16, 16, 0, 4, 3))
_BWD_FP32 = (Tiles(64, 64, 16, 16, 128, 8, 2), Tiles(64, 32, 32, 32, 128, 8, 2))
_FWD = {
    ("half", "hopper"): (Tiles(128, 128, 64, 64, 0, 8, 3), Tiles(128, 64, 64, 64, 0, 4, 3),
                         Tiles(64, 128, 64, 64, 0, 4, 3)),
    ("half", "ampere"): _FWD_HALF_SMALL,
    ("half", "blackwell"): _FWD_HALF_SMALL,
    ("fp32", "hopper"): (Tiles(128, 64, 32, 32, 0, 8, 3), Tiles(64, 64, 32, 32, 0, 4, 3)),
    ("fp32", "ampere"): _FWD_FP32_SMALL,
    ("fp32", "blackwell"): _FWD_FP32_SMALL,
}
_BWD = {
    ("half", "hopper"): (Tiles(64, 32, 64, 64, 512, 8, 2), Tiles(64, 64, 64, 64, 256, 8, 3),
                         Tiles(128, 64, 64, 64, 128, 8, 3)),
    ("half", "ampere"): (Tiles(64, 64, 32, 32, 256, 8, 3), Tiles(64, 32, 32, 32, 256, 8, 3)),
    ("half", "blackwell"): (Tiles(64, 32, 32, 32, 256, 8, 3),),
    ("fp32", "hopper"): _BWD_FP32 + (Tiles(64, 16, 16, 16, 256, 8, 2),),   # half the d-slices, tiny score tiles
    ("fp32", "ampere"): _BWD_FP32,
    ("fp32", "blackwell"): _BWD_FP32,
}
# The one-process forward (``fwdt``: each score tile feeds the row and the column statistics). Its
# column statistics are [BN] vectors along the N dimension of the MMA layout, replicated over the
# threads that share a column: BN / 4 registers each with mma.sync and wgmma, up to BN with tcgen05
# (one row per thread), and the online update holds about six of them, next to the [BM, BN] score,
# exponent and exponential tiles. So BN is small (32 or 64) and the tile tall (BM = 64 or 128):
# 64 x 64 with one warpgroup is wgmma's shared-memory / tensor-core balance point (m64n64k16: 4 KiB of
# operands per 32 clocks of MMA on an H100, against 6 KiB per 32 clocks when two warpgroups run
# m64n32); 128 x 32 fits every architecture. Triton 3.6 (the GPU machines' version) needs ~50 more
# registers than 3.9 for the same tile: 64 x 64 at 4 warps only fits there with BK = 64 and two
# stages (250 registers), at 8 warps with BK = 32. Every candidate was compiled for sm_80/90/100 with
# Triton 3.6 and 3.9 (benchmarks/aot_report.py): no spills.
_FWDT_FP32 = (Tiles(128, 32, 16, 16, 0, 8, 3), Tiles(64, 32, 32, 32, 0, 4, 3))
_FWDT = {
    ("half", "hopper"): (Tiles(64, 64, 64, 64, 0, 4, 2), Tiles(128, 32, 64, 64, 0, 8, 3),
                         Tiles(64, 64, 32, 32, 0, 8, 3), Tiles(64, 32, 64, 64, 0, 4, 3)),
    ("half", "ampere"): (Tiles(64, 64, 32, 32, 0, 8, 3), Tiles(128, 32, 16, 16, 0, 8, 3)),
    ("half", "blackwell"): (Tiles(128, 32, 32, 32, 0, 8, 3), Tiles(64, 32, 64, 64, 0, 4, 3)),
    ("fp32", "hopper"): (Tiles(64, 64, 16, 16, 0, 8, 3),) + _FWDT_FP32,
    ("fp32", "ampere"): _FWDT_FP32,
    ("fp32", "blackwell"): _FWDT_FP32,
}
# The margin and merge kernels are memory-bound one-shots over [B] (no dot): one fixed configuration.
MARGIN_TILES = Tiles(32, 0, 64, 64, 0, 4, 1)
MERGE_TILES = Tiles(256, 0, 0, 0, 0, 4, 1)
_TABLES = {"fwd": _FWD, "fwdt": _FWDT, "bwd": _BWD}
_KERNEL_FNS = {"fwd": "_fwd_kernel", "fwdt": "_fwd_t_kernel", "bwd": "_bwd_kernel"}
_TUNE_KEYS = {"fwd": ["D", "DR", "HAS_REF"], "fwdt": ["D", "DR", "HAS_REF"],
              "bwd": ["D", "DR", "HAS_REF", "IS_ROW", "FOLD", "SCALE_P"]}
INTERPRETER_TILES = Tiles(16, 16, 16, 16, 16, 1, 1)
INTERPRETER_FWD_TILES = replace(INTERPRETER_TILES, BD=0)
HOPPER = 90


def _family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _generation(arch: int) -> str:
    """hopper: sm_90; blackwell: sm_100 and later; ampere: the rest (sm_80, sm_86, sm_89)."""
    return "hopper" if arch // 10 == 9 else "blackwell" if arch >= 100 else "ampere"


def device_arch(device: torch.device | None = None) -> int:
    """Compute capability as an int (90 for sm_90) of ``device`` (default: the current CUDA device)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _clamp(t: Tiles, D: int, DR: int) -> Tiles:
    return replace(t, BK=min(t.BK, _pow2_at_least_16(D)), BKR=min(t.BKR, _pow2_at_least_16(max(DR, 1))),
                   BD=min(t.BD, _pow2_at_least_16(D)) if t.BD else 0)


def candidates(kernel: str, D: int, DR: int, dtype: torch.dtype, arch: int = HOPPER) -> list[Tiles]:
    """The configurations autotuning tries for ``kernel`` ("fwd", "fwdt" or "bwd") on compute capability
    ``arch`` (90 = sm_90), clamped to ``D``, ``DR`` and deduplicated; the first is the default.
    "margin" and "merge" (no autotuning) have their one configuration."""
    if kernel in ("margin", "merge"):
        return [_clamp(MARGIN_TILES, D, DR) if kernel == "margin" else MERGE_TILES]
    out = []
    for t in _TABLES[kernel][_family(dtype), _generation(arch)]:
        c = _clamp(t, D, DR)
        if c not in out:
            out.append(c)
    return out


def default_tiles(kernel: str, D: int, DR: int, dtype: torch.dtype, arch: int = HOPPER) -> Tiles:
    """What runs without autotuning: the first candidate (the fixed small tiles in the interpreter)."""
    if interpreting():
        return INTERPRETER_TILES if kernel == "bwd" else INTERPRETER_FWD_TILES
    return candidates(kernel, D, DR, dtype, arch)[0]


def fwd_grid(B: int, t: Tiles) -> tuple[int, int]:
    return (triton.cdiv(B, t.BM), 2)


def bwd_grid(n_outer: int, D: int, t: Tiles) -> tuple[int, int, int]:
    return (triton.cdiv(n_outer, t.BM), 2, triton.cdiv(D, t.BD))


# ----------------------------------------------------------------------------------------------
# the one-process forward: grid (groups, splits), partial statistics, merge
# ----------------------------------------------------------------------------------------------

PROGRAMS_PER_SM = 2      # programs the plan aims at per SM (264 on an H100 / H200)
MAX_PARTS = 32           # groups, splits <= 32: partial buffers 12 (groups + splits) B bytes <= 768 B bytes
L2_SHARE = 0.5           # share of L2 for the column panels the concurrent programs re-read per row block
INTERPRETER_SMS = 2      # interpreter: a pretend GPU (4 programs), panels of one column block
INTERPRETER_L2_BYTES = 0


@dataclass(frozen=True)
class Plan:
    """Launch plan of ``_fwd_t_kernel``: grid (groups, splits), columns per panel.

    ``groups`` split the column blocks (text anchors, BN wide), ``splits`` the row blocks (image
    anchors, BM tall). Partial buffers, float32: rows [groups, 3, B] and columns [splits, 3, B],
    12 (groups + splits) B bytes in all (<= 24 MAX_PARTS B).
    """

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
    partial buffers), then G. The G programs of one split read the same row block at the same time;
    the G column panels (``panel_cols`` columns each, together L2_SHARE of L2) are re-read from L2 for
    every row block, and each row block is read from HBM once per panel.
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


def _largest_fwdt_blocks(D: int, DR: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BM, BN) maxima over the configurations ``_fwd_t_kernel`` may run with on ``device``."""
    if interpreting():
        return INTERPRETER_FWD_TILES.BM, INTERPRETER_FWD_TILES.BN
    tiles = candidates("fwdt", D, DR, dtype, device_arch(device))
    return max(t.BM for t in tiles), max(t.BN for t in tiles)


def plan_for(B: int, D: int, DR: int, dtype: torch.dtype, device: torch.device) -> Plan:
    """The plan of this call: from the device's SM count and L2 size, and the largest tiles among the
    candidates (so that every autotuned configuration has at least one block per group and split)."""
    vec_bytes = (D + DR) * torch.empty((), dtype=dtype).element_size()
    bm, bn = _largest_fwdt_blocks(D, DR, dtype, device)
    if interpreting():
        return transposed_plan(B, bm, bn, vec_bytes, INTERPRETER_SMS, INTERPRETER_L2_BYTES)
    props = torch.cuda.get_device_properties(device)
    return transposed_plan(B, bm, bn, vec_bytes, props.multi_processor_count,
                           int(getattr(props, "L2_cache_size", 0)))


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        x = args["p_x"]
        return [c.config() for c in candidates(kernel, args["D"], args["DR"], x.dtype, device_arch(x.device))]
    return prune


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str):
    fn = getattr(kernels, _KERNEL_FNS[kernel])
    tiles = dict.fromkeys(t for family in _TABLES[kernel].values() for t in family)
    every = [t.config() for t in tiles]
    # (pruning replaces this list by the candidates of the dtype, d, dr and GPU of each call)
    return triton.autotune(configs=every, key=_TUNE_KEYS[kernel],
                           prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


def _launch(kernel: str, grid_of, args: tuple, flags: dict) -> None:
    """Run ``kernel`` with fixed interpreter tiles, or autotuned on a GPU."""
    if interpreting():
        t = default_tiles(kernel, 0, 0, torch.float32)
        fn = getattr(kernels, _KERNEL_FNS[kernel])
        fn[grid_of(t)](*args, **flags, **t.meta(), num_warps=t.num_warps, num_stages=t.num_stages)
    else:
        def grid(meta):
            return grid_of(Tiles(meta["BM"], meta["BN"], meta["BK"], meta["BKR"], meta.get("BD", 0), 0, 0))
        _tuned(kernel)[grid](*args, **flags)


def _launch_fixed(fn, grid, t: Tiles, args: tuple, flags: dict) -> None:
    """A kernel with one configuration (margin, merge)."""
    fn[grid](*args, **flags, **t.meta(), num_warps=t.num_warps, num_stages=t.num_stages)


def dot_flags(dtype: torch.dtype) -> dict:
    """``PREC``: float32 dots in ``FP32_PRECISION`` (ROCm has no tf32x3: "ieee" there), half dots in
    Triton's default (the option only concerns float32); ``UPCAST``: interpreter and bfloat16."""
    prec = None
    if dtype == torch.float32:
        prec = "ieee" if torch.version.hip else FP32_PRECISION
    return dict(PREC=prec, UPCAST=interpreting() and dtype == torch.bfloat16)


def _prepare(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all):
    """Contiguous embeddings; without a reference the ref pointers are dummies (never read)."""
    emb = [e.contiguous() for e in (img, txt, img_all, txt_all)]
    has_ref = ref_img is not None
    refs = [r.contiguous() for r in (ref_img, ref_txt, ref_img_all, ref_txt_all)] if has_ref else emb
    return emb, refs, has_ref, (ref_img.shape[1] if has_ref else 0)


def forward(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
            u_img, u_txt, offset, gamma, eps, columns_are_rows=False):
    """Returns ``(phi, u_img_new, u_txt_new, margin, wsum_img, wsum_txt)`` (float32).

    One process (``columns_are_rows``, N = B, offset 0): :func:`forward_transposed`, each score tile
    once. Otherwise ``_fwd_kernel``, one program per (row block, direction)."""
    (x, t, X, T), (xr, tr, Xr, Tr), has_ref, DR = _prepare(img, txt, img_all, txt_all, ref_img, ref_txt,
                                                            ref_img_all, ref_txt_all)
    B, D = x.shape
    N = X.shape[0]
    if columns_are_rows and N == B and offset == 0:
        return forward_transposed(x, t, xr, tr, has_ref, DR, logit_scale, u_img, u_txt, gamma, eps)
    f32 = dict(dtype=torch.float32, device=x.device)
    s = logit_scale.detach().reshape(1).to(torch.float32)
    u_old = [u.detach().to(torch.float32).contiguous() for u in (u_img, u_txt)]
    u_img_new, u_txt_new, margin, wsum_img, wsum_txt = (torch.empty(B, **f32) for _ in range(5))
    wdsum = torch.empty(2, B, **f32)
    gamma_one = gamma == 1.0
    args = (x, t, X, T, xr, tr, Xr, Tr, s, *u_old, u_img_new, u_txt_new, margin, wsum_img, wsum_txt, wdsum,
            B, N, offset, math.log(eps), math.log(N), math.log(gamma),
            0.0 if gamma_one else math.log1p(-gamma))
    flags = dict(D=D, DR=DR, HAS_REF=has_ref, GAMMA_ONE=gamma_one, **dot_flags(x.dtype))
    _launch("fwd", lambda tiles: fwd_grid(B, tiles), args, flags)
    phi = wdsum.sum()
    return phi, u_img_new, u_txt_new, margin, wsum_img, wsum_txt


def forward_transposed(x, t, xr, tr, has_ref, DR, logit_scale, u_img, u_txt, gamma, eps, plan=None):
    """One process: margins, then ``_fwd_t_kernel`` (each tile S_ij = <x_i, t_j> - <xr_i, tr_j> once,
    partial statistics of both directions), then ``_fwd_t_merge_kernel`` (merge and epilogue).

    Extra memory: the partial buffers, ``plan.partial_bytes(B)``, plus the [B]-sized outputs."""
    B, D = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    s = logit_scale.detach().reshape(1).to(torch.float32)
    u_old = [u.detach().to(torch.float32).contiguous() for u in (u_img, u_txt)]
    u_img_new, u_txt_new, margin, wsum_img, wsum_txt = (torch.empty(B, **f32) for _ in range(5))
    wdsum = torch.empty(2, B, **f32)
    if plan is None:
        plan = plan_for(B, D, DR, x.dtype, x.device)
    else:                                     # a given plan (tests): every group and split needs a block
        bm, bn = _largest_fwdt_blocks(D, DR, x.dtype, x.device)
        if not (1 <= plan.groups <= triton.cdiv(B, bn) and 1 <= plan.splits <= triton.cdiv(B, bm)):
            raise ValueError(f"plan {plan}: needs 1 <= groups <= {triton.cdiv(B, bn)} column blocks and "
                             f"1 <= splits <= {triton.cdiv(B, bm)} row blocks at B = {B}")
    row_part = torch.empty(plan.groups, 3, B, **f32)
    col_part = torch.empty(plan.splits, 3, B, **f32)
    shapes = dict(D=D, DR=DR, HAS_REF=has_ref)
    mt, mg = _clamp(MARGIN_TILES, D, DR), MERGE_TILES
    if interpreting():                        # small blocks: several programs and K chunks on tiny shapes
        mt, mg = replace(mt, BM=16, BK=16, BKR=16), replace(mg, BM=16)
    _launch_fixed(kernels._margin_kernel, (triton.cdiv(B, mt.BM),), mt, (x, t, xr, tr, margin, B), shapes)
    _launch("fwdt", lambda tiles: plan.grid,
            (x, t, xr, tr, s, margin, row_part, col_part, B, plan.groups, plan.splits, plan.panel_cols),
            dict(**shapes, **dot_flags(x.dtype)))
    gamma_one = gamma == 1.0
    _launch_fixed(kernels._fwd_t_merge_kernel, (triton.cdiv(B, mg.BM),), mg,
                  (row_part, col_part, *u_old, u_img_new, u_txt_new, wsum_img, wsum_txt, wdsum,
                   B, plan.groups, plan.splits, math.log(eps), math.log(B), math.log(gamma),
                   0.0 if gamma_one else math.log1p(-gamma)), dict(GAMMA_ONE=gamma_one))
    phi = wdsum.sum()
    return phi, u_img_new, u_txt_new, margin, wsum_img, wsum_txt


def backward(grad_phi, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
             u_img_new, u_txt_new, margin, wsum_img, wsum_txt, col_u_img, col_u_txt, col_margin, offset,
             column_grads):
    """Launch the row (and, with ``column_grads``, the column) backward kernel; returns
    ``(d_img, d_txt, d_img_all | None, d_txt_all | None)`` in the input dtype."""
    (x, t, X, T), (xr, tr, Xr, Tr), has_ref, DR = _prepare(img, txt, img_all, txt_all, ref_img, ref_txt,
                                                            ref_img_all, ref_txt_all)
    B, D = x.shape
    N = X.shape[0]
    s = logit_scale.detach().reshape(1).to(torch.float32)
    grad = grad_phi.detach().reshape(1).to(torch.float32)
    stats = [v.detach().to(torch.float32).contiguous() for v in (u_img_new, u_txt_new, margin, wsum_img, wsum_txt)]
    fold = col_u_img is not None
    cols = ([v.detach().to(torch.float32).contiguous() for v in (col_u_img, col_u_txt, col_margin)]
            if fold else stats[:3])
    d_img, d_txt = torch.empty_like(x), torch.empty_like(t)
    common = dict(D=D, DR=DR, HAS_REF=has_ref, SCALE_P=x.dtype == torch.float16, **dot_flags(x.dtype))
    embeddings = (x, t, X, T, xr, tr, Xr, Tr, s, grad)
    _launch("bwd", lambda tiles: bwd_grid(B, D, tiles),
            (*embeddings, *stats, *cols, d_img, d_txt, B, N, offset), dict(IS_ROW=True, FOLD=fold, **common))
    if not column_grads:
        return d_img, d_txt, None, None
    d_img_all, d_txt_all = torch.empty_like(X), torch.empty_like(T)
    _launch("bwd", lambda tiles: bwd_grid(N, D, tiles),
            (*embeddings, *stats, *stats[:3], d_img_all, d_txt_all, B, N, offset),
            dict(IS_ROW=False, FOLD=False, **common))
    return d_img, d_txt, d_img_all, d_txt_all
