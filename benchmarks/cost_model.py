"""Analytic cost of one DRRho-CLIP step (forward + backward): fused Triton kernels, unfused loss, GEMM floor.

Three models of the same step, for ``B`` rows against ``N`` columns (``N == B``: one process),
embedding widths ``d`` (target) and ``dr`` (reference), input ``dtype``:

- :func:`triton_cost`: the fused backend as launched by ``drrho_kernels.backends.triton.launch``. Grids
  and tile sizes are imported from there (``candidates``, ``fwd_grid``, ``bwd_grid``,
  ``transposed_plan``), so the FLOPs are those the tensor cores execute, padding of partial tiles
  included, and the recomputation of the score tiles for every d-slice of the backward (``cdiv(d, BD)``
  slices) is counted. One process runs the transposed forward (each score tile once for both
  directions; :func:`transposed_forward_kernels`, with its partial buffers' traffic), the distributed
  shapes the two-direction forward. :func:`transposed_backward_alternative` prices the transpose trick
  in the backward (not implemented: atomics or [., N, d] partials, and no FLOP saving).
- :func:`unfused_cost`: ``benchmarks.baselines.unfused_drrho_loss`` (the authors' eager-PyTorch
  sequence), traced once at a small proxy shape with a dispatch mode that records every aten op's
  inputs and outputs; each dimension of the proxy maps to B, N, d or dr, so the same op list is
  evaluated at any shape. Every op reads its inputs from and writes its outputs to HBM (eager PyTorch,
  tensors far beyond L2).
- :func:`floor_cost`: the arithmetic floor, the six ``[B, d] x [d, N]``-sized products (four without a
  reference), and the compulsory traffic: every input read once per pass, the gradients written once.

HBM model of a fused kernel (``_kernel_cost``): a program reads its outer block once from HBM (its
re-reads per column block hit L2) and streams all inner vectors; the programs resident at the same
time (a "wave": ``SMS x programs_per_sm``) walk the columns in step, so the inner vectors come from HBM
once per wave. Per-row statistics and outputs are read / written once.

Roofline (``H100``): about 989 TFLOP/s dense bf16/fp16, 495 TFLOP/s TF32 (float32 runs tf32x3: three
TF32 products per float32 product), 3.35 TB/s HBM, and 16 exponentials per clock per SM on the MUFU
(the weights' ``exp`` is a second, non-tensor-core limit).

``python -m benchmarks.cost_model`` prints the table and writes ``benchmarks/results/cost_model.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch

H100 = dict(name="H100 SXM (dense)", bf16_flops=989.4e12, tf32_flops=494.7e12, hbm_bytes_per_s=3.35e12,
            sms=132, clock_hz=1.83e9, mufu_exp_per_clk_sm=16, l2_bytes=50 << 20)
ELEM = {"bfloat16": 2, "float16": 2, "float32": 4}
TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _launch():
    from drrho_kernels.backends.triton import launch
    return launch


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def _kernel_cost(name, *, grid, tiles, n_inner, d, dr, ref, weighted, exps_per_score, outer_reads, inner_reads,
                 stats_bytes, out_bytes, concurrent):
    """FLOPs (tensor-core, executed), exponentials and HBM bytes of one kernel launch (see module doc)."""
    programs = math.prod(grid)
    k_target = _padded(d, tiles.BK)
    k_ref = _padded(dr, tiles.BKR) if ref else 0
    inner_steps = -(-n_inner // tiles.BN)
    score_flops = 2 * tiles.BM * tiles.BN * (k_target + k_ref)
    weighted_flops = 2 * tiles.BM * tiles.BN * tiles.BD if weighted else 0
    flops = programs * inner_steps * (score_flops + weighted_flops)
    waves = -(-programs // concurrent)
    hbm = outer_reads + waves * inner_reads + stats_bytes + out_bytes
    return dict(kernel=name, grid=list(grid), tiles=tiles.name, programs=programs, waves=waves,
                flops=flops, score_flops=programs * inner_steps * score_flops,
                weighted_flops=programs * inner_steps * weighted_flops,
                exps=programs * inner_steps * tiles.BM * tiles.BN * exps_per_score,
                hbm_bytes=hbm)


def transposed_forward_kernels(B, d, dr, dtype, ref, arch=90, programs_per_sm=1, sms=H100["sms"],
                               l2_bytes=H100["l2_bytes"], tiles=None):
    """The one-process forward of ``launch.forward_transposed``: margin kernel, ``_fwd_t_kernel`` on the
    plan's (groups, splits) grid, merge kernel. Each [BM, BN] tile of S is computed once (two exps per
    score: one per direction). HBM: the columns (t, tr) once (each belongs to one group's panel, which
    the group's programs share in L2), the rows (x, xr) once per panel (the programs of a split read
    the same row block at the same time), the partial buffers written once and read by the merge.
    The per-tile read-modify-write of the column slots and the per-(panel, row block) one of the row
    slots stay in L2: ``l2_partial_bytes``."""
    launch = _launch()
    dr_eff = dr if ref else 0
    elem = ELEM[dtype]
    tdtype = TORCH_DTYPE[dtype]
    cands = launch.candidates("fwdt", d, dr_eff, tdtype, arch)
    t = tiles or cands[0]
    vec_bytes = (d + dr_eff) * elem
    plan = launch.transposed_plan(B, max(c.BM for c in cands), max(c.BN for c in cands), vec_bytes,
                                  sms, l2_bytes)
    n_bm, n_bn = -(-B // t.BM), -(-B // t.BN)
    group_blocks = -(-n_bn // plan.groups)                      # the largest group's column blocks
    n_panels = -(-group_blocks // max(1, plan.panel_cols // t.BN))
    k_pad = _padded(d, t.BK) + (_padded(dr, t.BKR) if ref else 0)
    tiles_total = n_bm * n_bn
    flops = tiles_total * 2 * t.BM * t.BN * k_pad
    partial = plan.partial_bytes(B)
    f32 = 4
    programs = plan.groups * plan.splits
    margin = dict(kernel="fwd_t_margin", grid=[-(-B // launch.MARGIN_TILES.BM)], tiles=launch.MARGIN_TILES.name,
                  programs=-(-B // launch.MARGIN_TILES.BM), waves=1, flops=0, score_flops=0, weighted_flops=0,
                  exps=0, hbm_bytes=2 * B * vec_bytes + f32 * B)
    fwdt = dict(kernel="fwd_t", grid=list(plan.grid), tiles=t.name, programs=programs,
                waves=-(-programs // (sms * programs_per_sm)), flops=flops, score_flops=flops, weighted_flops=0,
                exps=2 * tiles_total * t.BM * t.BN,
                hbm_bytes=B * vec_bytes + n_panels * B * vec_bytes + f32 * B + partial,
                plan=dict(groups=plan.groups, splits=plan.splits, panel_cols=plan.panel_cols, panels=n_panels),
                partial_bytes=partial,
                l2_partial_bytes=2 * 3 * f32 * (tiles_total * t.BN + n_panels * plan.groups * n_bm * t.BM))
    merge = dict(kernel="fwd_t_merge", grid=[-(-B // launch.MERGE_TILES.BM)], tiles=launch.MERGE_TILES.name,
                 programs=-(-B // launch.MERGE_TILES.BM), waves=1, flops=0, score_flops=0, weighted_flops=0,
                 exps=2 * (plan.groups + plan.splits) * B + 6 * B,
                 hbm_bytes=partial + f32 * B * (2 + 6))
    return [margin, fwdt, merge]


def triton_kernels(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90,
                   programs_per_sm=1, sms=H100["sms"], tiles=None):
    """Per-kernel costs of one forward + backward. ``column_grads`` (default: ``N != B``) selects the
    distributed scheme that gathers with gradient (row kernel without fold + column kernel); otherwise
    the row kernel folds the column anchors' terms (one process, or the scheme that gathers ``u``).
    One process (``N == B`` without column gradients) runs the transposed forward
    (:func:`transposed_forward_kernels`), the distributed shapes the two-direction one.
    ``tiles``: ``{"fwd": Tiles, "fwdt": Tiles, "bwd": Tiles}`` to override the default (first) candidates."""
    launch = _launch()
    dr = d if dr is None else dr
    dr_eff = dr if ref else 0
    column_grads = (N != B) if column_grads is None else column_grads
    elem = ELEM[dtype]
    tdtype = TORCH_DTYPE[dtype]
    t_fwd = (tiles or {}).get("fwd") or launch.candidates("fwd", d, dr_eff, tdtype, arch)[0]
    t_bwd = (tiles or {}).get("bwd") or launch.candidates("bwd", d, dr_eff, tdtype, arch)[0]
    concurrent = sms * programs_per_sm
    vec = lambda n: n * (d + dr_eff) * elem            # noqa: E731  target + reference vectors
    f32 = 4
    ks = []
    if N == B and not column_grads:
        ks += transposed_forward_kernels(B, d, dr, dtype, ref, arch, programs_per_sm, sms,
                                         tiles=(tiles or {}).get("fwdt"))
    else:
        grid = launch.fwd_grid(B, t_fwd)
        ks.append(_kernel_cost(
            "fwd", grid=grid, tiles=t_fwd, n_inner=N, d=d, dr=dr, ref=ref, weighted=False, exps_per_score=1,
            # each direction reads its rows, and its margin prologue the partner rows (counted from HBM)
            outer_reads=4 * vec(B), inner_reads=2 * vec(N),
            stats_bytes=f32 * B * (2 + 2 * 3 + 2), out_bytes=0, concurrent=concurrent))
    fold = not column_grads
    slices = -(-d // t_bwd.BD)
    grid = launch.bwd_grid(B, d, t_bwd)
    ks.append(_kernel_cost(
        "bwd_row_fold" if fold else "bwd_row", grid=grid, tiles=t_bwd, n_inner=N, d=d, dr=dr, ref=ref,
        weighted=True, exps_per_score=2 if fold else 1,
        # every d-slice program re-reads its outer rows (slices of one row block are not co-resident);
        # the partner rows (t for x, x for t) are read once per slice, in the epilogue
        outer_reads=slices * (2 * vec(B) + 2 * B * t_bwd.BD * elem), inner_reads=2 * vec(N),
        stats_bytes=f32 * (B * 5 + (3 * N if fold else 0)), out_bytes=2 * B * d * elem, concurrent=concurrent))
    if column_grads:
        grid = launch.bwd_grid(N, d, t_bwd)
        ks.append(_kernel_cost(
            "bwd_col", grid=grid, tiles=t_bwd, n_inner=B, d=d, dr=dr, ref=ref, weighted=True, exps_per_score=1,
            outer_reads=slices * 2 * vec(N), inner_reads=2 * vec(B), stats_bytes=f32 * B * 3,
            out_bytes=2 * N * d * elem, concurrent=concurrent))
    return ks


def _roofline(flops, hbm_bytes, exps, dtype, hw=H100):
    peak = hw["bf16_flops"] if dtype != "float32" else hw["tf32_flops"] / 3.0   # tf32x3: 3 TF32 products
    t_mma = flops / peak
    t_hbm = hbm_bytes / hw["hbm_bytes_per_s"]
    t_exp = exps / (hw["sms"] * hw["clock_hz"] * hw["mufu_exp_per_clk_sm"]) if exps else 0.0
    bound = max((t_mma, "tensor cores"), (t_hbm, "HBM"), (t_exp, "exp (MUFU)"))
    return dict(intensity_flop_per_byte=flops / hbm_bytes if hbm_bytes else math.inf,
                ridge_flop_per_byte=peak / hw["hbm_bytes_per_s"], t_tensor_s=t_mma, t_hbm_s=t_hbm,
                t_exp_s=t_exp, t_bound_s=bound[0], bound_by=bound[1])


def triton_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90, **kw) -> dict:
    """FLOPs and HBM bytes of one fused forward + backward, with the per-kernel split and a roofline."""
    ks = triton_kernels(B, N, d, dr, dtype, ref, column_grads, arch, **kw)
    flops = sum(k["flops"] for k in ks)
    hbm = sum(k["hbm_bytes"] for k in ks)
    exps = sum(k["exps"] for k in ks)
    return dict(impl="triton", flops=flops, hbm_bytes=hbm, exps=exps, kernels=ks,
                **_roofline(flops, hbm, exps, dtype))


def floor_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None) -> dict:
    """The GEMM floor of an implementation that stores no [B, N] matrix, and the compulsory traffic.

    Per distinct score matrix: the target and reference similarities, their recomputation in the
    backward, and the two weighted products (rows and columns): six [B, d] x [d, N]-sized products
    (four without reference), as ``baselines.gemm_floor`` times them. One process has one score matrix
    (the text anchors' is its transpose); the distributed shape (B rows, N != B columns) has two, and
    in the scheme that gathers ``u`` (``column_grads=False``) each needs only the row product.
    Traffic: every input read once per pass (forward, backward), the gradients written once.
    """
    dr = d if dr is None else dr
    dr_eff = dr if ref else 0
    column_grads = (N != B) if column_grads is None else column_grads
    elem = ELEM[dtype]
    matrices = 1 if N == B else 2
    weighted = 2 if (N == B or column_grads) else 1     # the scheme that gathers u needs no column product
    flops = matrices * (2 * (2 * B * N * (d + dr_eff)) + weighted * (2 * B * N * d))
    inputs = (B * (d + dr_eff) * 2 + (N * (d + dr_eff) * 2 if N != B else 0)) * elem
    grads = (2 * B * d + (2 * N * d if column_grads else 0)) * elem
    hbm = 2 * inputs + grads
    exps = 2 * matrices * B * N        # every weight once in the forward, once recomputed
    return dict(impl="gemm_floor", flops=flops, hbm_bytes=hbm, exps=exps, score_matrices=matrices,
                **_roofline(flops, hbm, exps, dtype))


# ----------------------------------------------------------------------------------------------
# unfused: trace benchmarks.baselines.unfused_drrho_loss once per (dtype, ref, distributed)
# ----------------------------------------------------------------------------------------------

_PROXY = dict(B=6, N=14, d=5, dr=9)     # distinct values: every tensor dimension names its symbol


@functools.lru_cache(maxsize=None)
def _unfused_trace(dtype: str, ref: bool, distributed: bool):
    """Aten ops of one unfused forward + backward at the proxy shape, as symbolic shapes.

    Returns a list of ``(op, [(symbols, itemsize) read], [(symbols, itemsize) written], mm_symbols)``.
    View ops move no data and are skipped; a broadcast (stride 0) dimension of an input is not read.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from . import baselines
    P = dict(_PROXY)
    if not distributed:
        P["N"] = P["B"]
    names = {P["B"]: "B", P["N"]: "N", P["d"]: "d", P["dr"]: "dr"}

    def symbols(t, read):
        dims = [s for s, st in zip(t.shape, t.stride()) if not (read and st == 0)]
        return tuple(names.get(s, s) for s in dims)

    ops = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "is_view", False) or func.__name__.split(".")[0] in ("detach", "alias", "lift_fresh"):
                return out
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            reads = [(symbols(a, True), a.element_size()) for a in flat_in if a.numel() > 1]
            writes = [(symbols(o, False), o.element_size()) for o in flat_out if o.numel() > 1]
            mm = None
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
                a, b = flat_in[-2], flat_in[-1]
                mm = (names.get(a.shape[-2], a.shape[-2]), names.get(a.shape[-1], a.shape[-1]),
                      names.get(b.shape[-1], b.shape[-1]))
            ops.append((func.__name__, reads, writes, mm))
            return out

    g = torch.Generator().manual_seed(0)
    tdt = TORCH_DTYPE[dtype]

    def emb(n, w):
        return torch.nn.functional.normalize(torch.randn(n, w, generator=g), dim=1).to(tdt)

    X, T = emb(P["N"], P["d"]), emb(P["N"], P["d"])
    Xr, Tr = (emb(P["N"], P["dr"]), emb(P["N"], P["dr"])) if ref else (None, None)
    off = (P["N"] - P["B"]) // 2 if distributed else 0
    x, t = X[off:off + P["B"]].clone().requires_grad_(), T[off:off + P["B"]].clone().requires_grad_()
    cols = {}
    if distributed:
        X.requires_grad_()
        T.requires_grad_()
        cols = dict(img_all=X, txt_all=T, ref_img_all=Xr, ref_txt_all=Tr)
    rx, rt = (Xr[off:off + P["B"]], Tr[off:off + P["B"]]) if ref else (None, None)
    u = torch.zeros(P["B"])
    s = torch.tensor(14.0, requires_grad=True)
    with Trace():
        loss, _, _ = baselines.unfused_drrho_loss(x, t, s, u, u, rx, rt, offset=off, **cols)
        loss.backward()
    return ops


def unfused_cost(B, N, d, dr=None, dtype="bfloat16", ref=True) -> dict:
    """FLOPs and HBM bytes of ``baselines.unfused_drrho_loss`` forward + backward at this shape."""
    dr = d if dr is None else dr
    real = dict(B=B, N=N, d=d, dr=dr)
    size = lambda syms: math.prod(real.get(s, s) if isinstance(s, str) else s for s in syms)  # noqa: E731
    flops = hbm = bn_bytes = 0
    n_bn = 0
    for _name, reads, writes, mm in _unfused_trace(dtype, ref, N != B):
        for syms, item in reads + writes:
            b = size(syms) * item
            hbm += b
            if sum(s in ("B", "N") for s in syms) >= 2:       # a [B, N] matrix (B and N coincide in one process)
                bn_bytes += b
                n_bn += 1
        if mm is not None:
            flops += 2 * size(mm)
    return dict(impl="unfused", flops=flops, hbm_bytes=hbm, bn_matrix_bytes=bn_bytes, bn_matrix_passes=n_bn,
                bn_matrix_bytes_each=B * N * 4, exps=4 * B * N, **_roofline(flops, hbm, 4 * B * N, dtype))


def grad_in_forward_flops(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90) -> dict:
    """The alternative design, for the record: the forward also accumulates the row gradient
    (flash-attention-forward style, rescaled by the running max), the backward only the column terms.
    Same tiles and d-slices as the backward (the same [BM, BD] accumulator)."""
    launch = _launch()
    dr = d if dr is None else dr
    dr_eff = dr if ref else 0
    column_grads = (N != B) if column_grads is None else column_grads
    t = launch.candidates("bwd", d, dr_eff, TORCH_DTYPE[dtype], arch)[0]
    slices = -(-d // t.BD)
    S = lambda rows, cols: 2 * _padded(rows, t.BM) * _padded(cols, t.BN) * (  # noqa: E731
        _padded(d, t.BK) + (_padded(dr, t.BKR) if ref else 0))
    W = lambda rows, cols: 2 * _padded(rows, t.BM) * _padded(cols, t.BN) * slices * t.BD  # noqa: E731
    # forward: per direction, every slice recomputes the scores for its accumulator, plus the row product
    fwd = 2 * (slices * S(B, N) + W(B, N))
    # backward: the column terms (fold: the other modality's anchors over these rows; or the columns)
    outer, inner = (N, B) if column_grads else (B, N)
    bwd = 2 * (slices * S(outer, inner) + W(outer, inner))
    return dict(design="gradient in forward", flops=fwd + bwd, fwd_flops=fwd, bwd_flops=bwd)


def transposed_backward_alternative(B, d, dr=None, dtype="bfloat16", ref=True, arch=90, sms=H100["sms"],
                                    l2_bytes=H100["l2_bytes"]) -> dict:
    """The backward with the transpose trick, for the record (one process): each tile S_ij computed once
    feeds d x_i += P_ij t_j (rows: a [BM, BD] accumulator spanning the column loop) and d t_j += P_ij^T x_i
    (columns: [BN, BD] per tile, summed over every row block). Same tiles as the backward kernel.

    - ``atomic_bytes``: float32 atomic read-modify-writes if every tile adds its column part into d t
      (2 x 4 bytes per element, cdiv(B, BM) N d elements); non-deterministic summation order.
    - ``partial_bytes``: deterministic instead, each of the forward plan's G column groups... here row
      groups, one [N, d] float32 column accumulator each (G N d 4 bytes); ``partial_rmw_bytes``: the side
      that does not stay in registers (the row accumulator across a group's column blocks) is read and
      written per tile (2 x 4 x BM d per tile).
    - ``flops``: one score tile per (i, j) and both weighted products; the registers hold both
      accumulators ([BM, BD] + [BN, BD] float32), so the d-slice BD halves and every slice recomputes its
      scores. ``flops_same_bd``: the unreachable case with today's BD (the accumulators would need
      ``acc_regs_same_bd`` registers per thread).
    """
    launch = _launch()
    dr = d if dr is None else dr
    dr_eff = dr if ref else 0
    t = launch.candidates("bwd", d, dr_eff, TORCH_DTYPE[dtype], arch)[0]
    n_bm, n_bn = -(-B // t.BM), -(-B // t.BN)
    k_pad = _padded(d, t.BK) + (_padded(dr, t.BKR) if ref else 0)
    tile_s = 2 * t.BM * t.BN * k_pad
    tile_w = 2 * t.BM * t.BN * _padded(d, t.BD)            # one weighted product over all of d
    slices_half = -(-d // max(16, t.BD // 2))
    plan = launch.transposed_plan(B, t.BM, t.BN, (d + dr_eff) * ELEM[dtype], sms, l2_bytes)
    groups = plan.splits                                     # row groups (the forward plan's splits)
    return dict(design="backward with the transpose trick", tiles=t.name, flops=n_bm * n_bn * (slices_half * tile_s
                + 2 * tile_w), flops_same_bd=n_bm * n_bn * (-(-d // t.BD) * tile_s + 2 * tile_w),
                acc_regs_same_bd=(t.BM + t.BN) * t.BD // (32 * t.num_warps),
                atomic_bytes=2 * 4 * n_bm * B * d, row_groups=groups, partial_bytes=4 * groups * B * d,
                partial_rmw_bytes=2 * 4 * n_bm * n_bn * t.BM * d)


SHAPES = (
    dict(B=32768, N=32768, d=512, dr=512),
    dict(B=262144, N=262144, d=512, dr=512),
    dict(B=4096, N=65536, d=512, dr=512),                        # one of 16 processes, gather with grad
    dict(B=4096, N=65536, d=512, dr=512, column_grads=False),    # same, the scheme that gathers u (fold)
    dict(B=4096, N=16384, d=768, dr=768),
    dict(B=32768, N=32768, d=1024, dr=1024),
)


def report(shapes=SHAPES, dtypes=("bfloat16", "float32")) -> dict:
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            dims = {k: shape[k] for k in ("B", "N", "d", "dr")}
            tri = triton_cost(**shape, dtype=dtype)
            unf = unfused_cost(**dims, dtype=dtype)
            flo = floor_cost(**shape, dtype=dtype)
            alt = grad_in_forward_flops(**shape, dtype=dtype)
            row = dict(shape=shape, dtype=dtype, triton=tri, unfused=unf, floor=flo, grad_in_forward=alt)
            if shape["B"] == shape["N"]:
                row["transposed_backward"] = transposed_backward_alternative(shape["B"], shape["d"], shape["dr"],
                                                                             dtype)
            rows.append(row)
    return dict(hardware=H100, model=__doc__.split("\n\n")[0], rows=rows)


def _fmt(x, unit):
    for k, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= k:
            return f"{x / k:.2f} {s}{unit}"
    return f"{x:.0f} {unit}"


def table(rep: dict) -> str:
    lines = [f"{'shape':<30}{'dtype':<9}{'impl':<9}{'FLOP':>12}{'HBM':>11}{'FLOP/B':>9}{'t_mma':>9}"
             f"{'t_hbm':>9}{'t_exp':>9}  bound"]
    for r in rep["rows"]:
        s = r["shape"]
        label = f"B={s['B']} N={s['N']} d={s['d']}" + (" fold" if s.get("column_grads") is False else "")
        for impl in ("floor", "triton", "unfused"):
            c = r[impl]
            ms = "".join(f"{c[k] * 1e3:>8.2f}m" for k in ("t_tensor_s", "t_hbm_s", "t_exp_s"))
            lines.append(f"{label:<30}{r['dtype']:<9}{impl:<9}{_fmt(c['flops'], 'F'):>12}"
                         f"{_fmt(c['hbm_bytes'], 'B'):>11}{c['intensity_flop_per_byte']:>9.0f}{ms}  {c['bound_by']}")
        tri, alt = r["triton"], r["grad_in_forward"]
        lines.append(f"{'':<39}triton/floor FLOP {tri['flops'] / r['floor']['flops']:.2f}x; unfused/triton HBM "
                     f"{r['unfused']['hbm_bytes'] / tri['hbm_bytes']:.0f}x; grad-in-forward design "
                     f"{alt['flops'] / tri['flops']:.2f}x the FLOPs; kernels: "
                     + ", ".join(f"{k['kernel']} {k['tiles']} grid {k['grid']}" for k in tri["kernels"]))
        for k in tri["kernels"]:
            if "plan" in k:
                lines.append(f"{'':<39}fwd_t plan {k['plan']}: partial buffers {k['partial_bytes'] / 2**20:.1f} MiB, "
                             f"L2 read-modify-write {_fmt(k['l2_partial_bytes'], 'B')}")
        tb = r.get("transposed_backward")
        if tb:
            bwd = sum(k["flops"] for k in tri["kernels"] if k["kernel"].startswith("bwd"))
            lines.append(f"{'':<39}transposed backward: {tb['flops'] / bwd:.2f}x the backward FLOPs "
                         f"({tb['flops_same_bd'] / bwd:.2f}x at today's BD, {tb['acc_regs_same_bd']} accumulator "
                         f"registers/thread); atomics {_fmt(tb['atomic_bytes'], 'B')} or partials "
                         f"{tb['partial_bytes'] / 2**30:.2f} GiB + {_fmt(tb['partial_rmw_bytes'], 'B')} RMW")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cost_model.json")
    args = parser.parse_args(argv)
    rep = report()
    print(table(rep))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
