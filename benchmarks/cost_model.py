"""Analytic cost of one DRRho-CLIP step (forward + backward): fused Triton kernels, unfused loss, GEMM floor.

A static tool (no timing). For ``B`` rows against ``N`` columns (``N == B``: one process), widths ``d``
(target) and ``dr`` (reference), input ``dtype``:

- :func:`triton_cost`: the kernels of ``drrho_kernels.backends.triton`` with the tile tables and the
  one-process plan of its ``tiles`` module (``candidates``, ``transposed_plan``, ``MARGIN_TILES``,
  ``MERGE_TILES``) and the grids of ``forward.py`` / ``backward.py``: ``(cdiv(B, BM), 2)``,
  ``(cdiv(n_outer, BM), 2, cdiv(d, BD))``. FLOPs as the tensor cores execute them (partial tiles
  padded; the backward recomputes the score tiles for each of its ``cdiv(d, BD)`` d-slices). One
  process runs the transposed forward (margin, ``_fwd_t_kernel``, merge: each score tile once for
  both directions), a distributed shard the two-direction forward. The forwards write the statistics
  ``[2, 3, B]`` and the margins ``[B]`` (the epilogue runs in torch on ``[B]`` vectors, not counted);
  the backward reads scale, norm, gain, weight sum ``[2, B]`` and margins ``[B]`` (a fold also its
  columns' scale, norm, gain ``[2, N]`` and margins ``[N]``).
- :func:`unfused_cost`: ``baselines.unfused_drrho_loss`` traced at a proxy shape (every aten op reads
  its inputs from and writes its outputs to HBM); :func:`floor_cost`: the GEMM floor.

A fused kernel (``_kernel_cost``) reads its outer block once and the inner vectors once per wave of
resident programs; per-row vectors and outputs once. Roofline (``H100``): 989 TFLOP/s bf16 dense, 495
TFLOP/s TF32 (float32 runs tf32x3), 3.35 TB/s HBM, 16 exponentials per clock per SM. Two designs not
built are priced too. ``python -m benchmarks.cost_model`` prints a table, writes ``results/cost_model.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch

from drrho_kernels.backends.triton import tiles as tile_tables

H100 = dict(name="H100 SXM (dense)", bf16_flops=989.4e12, tf32_flops=494.7e12, hbm_bytes_per_s=3.35e12,
            sms=132, clock_hz=1.83e9, mufu_exp_per_clk_sm=16, l2_bytes=50 << 20)
ELEM = {"bfloat16": 2, "float16": 2, "float32": 4}
F32 = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded(n: int, block: int) -> int:
    return _cdiv(n, block) * block


DISTILL_EXPS = 2     # per score and direction: exp(s <x, T>) of the student, exp(t_d <xr, Tr>) of the teacher


def _candidates(kernel, d, dr, dtype, arch, extra=False):
    """The launcher's candidates (``extra``: the EXTRA / DISTILL path's table, as distillation launches)."""
    return tile_tables.candidates(kernel, d, dr, getattr(torch, dtype), arch,
                                  {tile_tables.PATH_FLAGS.get(kernel, "EXTRA"): extra})


def _fixed(name, tiles, programs, hbm_bytes, exps=0):
    """A kernel without a dot (margin, merge): grid (programs,)."""
    return dict(kernel=name, grid=[programs], tiles=tiles.name, programs=programs, waves=1, flops=0, score_flops=0,
                weighted_flops=0, exps=exps, hbm_bytes=hbm_bytes)


def _kernel_cost(name, *, grid, tiles, n_inner, d, dr, ref, weighted, exps_per_score, outer_reads, inner_reads,
                 vector_bytes, out_bytes, concurrent):
    """FLOPs (tensor-core, executed), exponentials and HBM bytes of one kernel launch (see module doc)."""
    programs = math.prod(grid)
    inner_steps = _cdiv(n_inner, tiles.BN)
    score = 2 * tiles.BM * tiles.BN * (_padded(d, tiles.BK) + (_padded(dr, tiles.BKR) if ref else 0))
    wflops = 2 * tiles.BM * tiles.BN * tiles.BD if weighted else 0
    waves = _cdiv(programs, concurrent)
    return dict(kernel=name, grid=list(grid), tiles=tiles.name, programs=programs, waves=waves,
                flops=programs * inner_steps * (score + wflops), score_flops=programs * inner_steps * score,
                weighted_flops=programs * inner_steps * wflops,
                exps=programs * inner_steps * tiles.BM * tiles.BN * exps_per_score,
                hbm_bytes=outer_reads + waves * inner_reads + vector_bytes + out_bytes)


def transposed_forward_kernels(B, d, dr, dtype, ref, arch=90, programs_per_sm=1, sms=H100["sms"],
                               l2_bytes=H100["l2_bytes"], tiles=None, distill=False):
    """Margin kernel, ``_fwd_t_kernel`` on the plan's (groups, splits) grid, merge. Each score tile once (two
    exps per score). HBM: the columns (t, tr) once (a group's panel is shared in L2), the rows (x, xr) once
    per panel, scale [2, B] and margins [B], the partials written once and read by the merge, which writes
    the statistics [2, 3, B]; the partial slots' read-modify-writes stay in L2 (``l2_partial_bytes``)."""
    dr_eff = dr if ref else 0
    cands = _candidates("fwdt", d, dr_eff, dtype, arch, distill)
    t = tiles or cands[0]
    vec_bytes = (d + dr_eff) * ELEM[dtype]
    plan = tile_tables.transposed_plan(B, max(c.BM for c in cands), max(c.BN for c in cands), vec_bytes, sms, l2_bytes)
    n_bm, n_bn = _cdiv(B, t.BM), _cdiv(B, t.BN)
    n_panels = _cdiv(_cdiv(n_bn, plan.groups), max(1, plan.panel_cols // t.BN))   # the largest group's panels
    n_tiles = n_bm * n_bn
    flops = n_tiles * 2 * t.BM * t.BN * (_padded(d, t.BK) + (_padded(dr, t.BKR) if ref else 0))
    partial = plan.partial_bytes(B)
    programs = plan.groups * plan.splits
    margin = _candidates("margin", d, dr_eff, dtype, arch)[0]
    fwdt = dict(kernel="fwd_t", grid=list(plan.grid), tiles=t.name, programs=programs,
                waves=_cdiv(programs, sms * programs_per_sm), flops=flops, score_flops=flops, weighted_flops=0,
                exps=2 * n_tiles * t.BM * t.BN * (1 + DISTILL_EXPS * distill),
                hbm_bytes=B * vec_bytes + n_panels * B * vec_bytes + 3 * F32 * B + partial,
                plan=dict(groups=plan.groups, splits=plan.splits, panel_cols=plan.panel_cols, panels=n_panels),
                partial_bytes=partial,
                l2_partial_bytes=2 * 3 * F32 * (n_tiles * t.BN + n_panels * plan.groups * n_bm * t.BM))
    # the margin kernel reads the pairs once and writes the margins [B] and the positives [2, B]
    return [_fixed("fwd_t_margin", margin, _cdiv(B, margin.BM), 2 * B * vec_bytes + 3 * F32 * B), fwdt,
            _fixed("fwd_t_merge", tile_tables.MERGE_TILES, _cdiv(B, tile_tables.MERGE_TILES.BM), partial + 6 * F32 * B,
                   exps=2 * (plan.groups + plan.splits) * B)]


def triton_kernels(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90,
                   programs_per_sm=1, sms=H100["sms"], tiles=None, distill=False):
    """Per-kernel costs of one forward + backward. ``column_grads`` (default ``N != B``): the scheme that gathers
    with gradient (row kernel without fold + column kernel); else the row kernel folds the column anchors'
    terms. ``tiles``: ``{"fwd" | "fwdt" | "bwd": Tiles}`` overrides the default (first) candidates.
    ``distill`` (needs ``ref``): the distillation term of SPEC 2.2 in the same kernels: the same tiles and
    products (no FLOP added), ``DISTILL_EXPS`` more exponentials per score (the student's and the teacher's
    softmax numerators) and the rows' two log-sum-exps per direction as extra per-row vectors."""
    if distill and not ref:
        raise ValueError("distill: the teacher is the reference model (ref=True)")
    extra = DISTILL_EXPS * distill
    dr = d if dr is None else dr
    dr_eff = dr if ref else 0
    column_grads = (N != B) if column_grads is None else column_grads
    elem = ELEM[dtype]
    t_fwd = (tiles or {}).get("fwd") or _candidates("fwd", d, dr_eff, dtype, arch, distill)[0]
    t_bwd = (tiles or {}).get("bwd") or _candidates("bwd", d, dr_eff, dtype, arch, distill)[0]
    concurrent = sms * programs_per_sm
    vec = lambda n: n * (d + dr_eff) * elem            # noqa: E731  target + reference vectors
    common = dict(d=d, dr=dr, ref=ref, concurrent=concurrent)
    # one process: the transposed forward, except where its path has no spill-free tile (launcher's rule)
    if N == B and not column_grads and tile_tables.transposed_forward_runs(getattr(torch, dtype), arch, distill):
        ks = transposed_forward_kernels(B, d, dr, dtype, ref, arch, programs_per_sm, sms, tiles=(tiles or {}).get("fwdt"),
                                        distill=distill)
    else:
        # each direction reads its rows, and its margin prologue the partner rows; scale [2, B] read,
        # statistics [2, 3, B] and margins [B] written
        ks = [_kernel_cost("fwd", grid=(_cdiv(B, t_fwd.BM), 2), tiles=t_fwd, n_inner=N, weighted=False,
                           exps_per_score=1 + extra, outer_reads=4 * vec(B), inner_reads=2 * vec(N),
                           vector_bytes=F32 * B * (2 + 6 + 1 + 3 * extra), out_bytes=0, **common),
              # the positives [2, B] (<x_i, t_i>, <xr_i, tr_i>): one pass over the rows in PyTorch
              _fixed("fwd_positives", t_fwd, 1, 2 * vec(B) + 2 * F32 * B)]
    fold = not column_grads
    slices = _cdiv(d, t_bwd.BD)
    ks.append(_kernel_cost(
        "bwd_row_fold" if fold else "bwd_row", grid=(_cdiv(B, t_bwd.BM), 2, slices), tiles=t_bwd, n_inner=N,
        weighted=True, exps_per_score=(2 if fold else 1) * (1 + extra),
        # every d-slice program re-reads its outer rows (slices of one row block are not co-resident); the
        # partner rows (t for x, x for t) once per slice, in the epilogue. Per row: scale, norm, gain, wsum
        # [2, B] and margins [B]; a fold's columns (in one process the rows' own): scale, norm, gain [2, N], margins [N]
        outer_reads=slices * (2 * vec(B) + 2 * B * t_bwd.BD * elem), inner_reads=2 * vec(N),
        vector_bytes=F32 * (9 * B + (7 * N if fold else 0) + 2 * extra * (B + (N if fold else 0))),
        out_bytes=2 * B * d * elem, **common))
    if column_grads:
        ks.append(_kernel_cost(
            "bwd_col", grid=(_cdiv(N, t_bwd.BM), 2, slices), tiles=t_bwd, n_inner=B, weighted=True,
            exps_per_score=1 + extra, outer_reads=slices * 2 * vec(N), inner_reads=2 * vec(B),
            vector_bytes=F32 * (7 + 2 * extra) * B,
            out_bytes=2 * N * d * elem, **common))
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
    """FLOPs and HBM bytes of one fused forward + backward, with the per-kernel split and a roofline
    (``distill=True``: with the distillation term, see :func:`triton_kernels`)."""
    ks = triton_kernels(B, N, d, dr, dtype, ref, column_grads, arch, **kw)
    flops = sum(k["flops"] for k in ks)
    hbm = sum(k["hbm_bytes"] for k in ks)
    exps = sum(k["exps"] for k in ks)
    return dict(impl="triton", flops=flops, hbm_bytes=hbm, exps=exps, kernels=ks,
                **_roofline(flops, hbm, exps, dtype))


def floor_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None) -> dict:
    """The GEMM floor of an implementation that stores no [B, N] matrix, and the compulsory traffic: per
    distinct score matrix (one in one process, two for a shard) the similarities, their recomputation and
    the two weighted products, as ``steps.Floor`` times them; the scheme that gathers ``u``
    (``column_grads=False``) needs no column product. Every input read once per pass, gradients written once."""
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


_PROXY = dict(B=6, N=14, d=5, dr=9)     # distinct values: every tensor dimension names its symbol


@functools.lru_cache(maxsize=None)
def _unfused_trace(dtype: str, ref: bool, distributed: bool):
    """Aten ops of one unfused forward + backward at the proxy shape, as symbolic shapes.

    Returns a list of ``(op, [(symbols, itemsize) read], [(symbols, itemsize) written], mm_symbols)``.
    View ops move no data and are skipped; a broadcast (stride 0) dimension of an input is not read.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from . import baselines, steps
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

    cols, off = steps.make_inputs(P["B"], P["N"], P["d"], P["dr"], getattr(torch, dtype), ref, "cpu")
    x, t = (cols[k][off:off + P["B"]].clone().requires_grad_() for k in ("img_all", "txt_all"))
    rx, rt = (cols[k][off:off + P["B"]] if ref else None for k in ("ref_img_all", "ref_txt_all"))
    for k in ("img_all", "txt_all"):
        cols[k].requires_grad_(distributed)
    u = torch.zeros(P["B"])
    s = torch.tensor(14.0, requires_grad=True)
    with Trace():
        loss, _, _ = baselines.unfused_drrho_loss(x, t, s, u, u, rx, rt, offset=off, **(cols if distributed else {}))
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
    """The design not built, for the record: the forward also accumulates the row gradient (flash-attention
    style, same tiles and d-slices as the backward), the backward only the column terms."""
    dr = d if dr is None else dr
    dr_eff = dr if ref else 0
    column_grads = (N != B) if column_grads is None else column_grads
    t = _candidates("bwd", d, dr_eff, dtype, arch)[0]
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
    feeds d x_i += P_ij t_j ([BM, BD] accumulator over the column loop) and d t_j += P_ij^T x_i ([BN, BD]
    per tile, summed over the row blocks). ``atomic_bytes``: float32 atomics into d t (non-deterministic);
    ``partial_bytes``: deterministic instead, one [N, d] float32 accumulator per row group, and
    ``partial_rmw_bytes`` its per-tile read-modify-write. ``flops``: both accumulators in registers halve
    BD; ``flops_same_bd``: today's BD, needing ``acc_regs_same_bd`` registers per thread."""
    dr = d if dr is None else dr
    dr_eff = dr if ref else 0
    t = _candidates("bwd", d, dr_eff, dtype, arch)[0]
    n_bm, n_bn = -(-B // t.BM), -(-B // t.BN)
    k_pad = _padded(d, t.BK) + (_padded(dr, t.BKR) if ref else 0)
    tile_s = 2 * t.BM * t.BN * k_pad
    tile_w = 2 * t.BM * t.BN * _padded(d, t.BD)            # one weighted product over all of d
    slices_half = -(-d // max(16, t.BD // 2))
    plan = tile_tables.transposed_plan(B, t.BM, t.BN, (d + dr_eff) * ELEM[dtype], sms, l2_bytes)
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
    # the widest common CLIP embeddings (ViT-L 768, ViT-H 1024, ViT-bigG 1280) with a ViT-B reference (512)
    dict(B=32768, N=32768, d=768, dr=512),
    dict(B=32768, N=32768, d=1024, dr=512),
    dict(B=32768, N=32768, d=1280, dr=512),
)


def report(shapes=SHAPES, dtypes=("bfloat16", "float32")) -> dict:
    rows = []
    for shape, dtype in ((s, t) for s in shapes for t in dtypes):
        row = dict(shape=shape, dtype=dtype, triton=triton_cost(**shape, dtype=dtype),
                   triton_distill=triton_cost(**shape, dtype=dtype, distill=True),
                   unfused=unfused_cost(**{k: shape[k] for k in ("B", "N", "d", "dr")}, dtype=dtype),
                   floor=floor_cost(**shape, dtype=dtype), grad_in_forward=grad_in_forward_flops(**shape, dtype=dtype))
        if shape["B"] == shape["N"]:
            row["transposed_backward"] = transposed_backward_alternative(shape["B"], shape["d"], shape["dr"], dtype)
        rows.append(row)
    return dict(hardware=H100, model=__doc__.split("\n\n")[0], rows=rows)


def _fmt(x, unit):
    for k, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= k:
            return f"{x / k:.2f} {s}{unit}"
    return f"{x:.0f} {unit}"


def table(rep: dict) -> str:
    lines = [f"{'shape':<30}{'dtype':<9}{'impl':<9}{'FLOP':>12}{'HBM':>11}{'FLOP/B':>9}{'t_mma':>9}{'t_hbm':>9}"
             f"{'t_exp':>9}  bound"]
    for r in rep["rows"]:
        s, tri = r["shape"], r["triton"]
        label = f"B={s['B']} N={s['N']} d={s['d']}" + (" fold" if s.get("column_grads") is False else "")
        for impl in ("floor", "triton", "unfused"):
            c = r[impl]
            lines.append(f"{label:<30}{r['dtype']:<9}{impl:<9}{_fmt(c['flops'], 'F'):>12}{_fmt(c['hbm_bytes'], 'B'):>11}"
                         f"{c['intensity_flop_per_byte']:>9.0f}"
                         + "".join(f"{c[k] * 1e3:>8.2f}m" for k in ("t_tensor_s", "t_hbm_s", "t_exp_s"))
                         + f"  {c['bound_by']}")
        lines.append(f"{'':<39}triton/floor FLOP {tri['flops'] / r['floor']['flops']:.2f}x; unfused/triton HBM "
                     f"{r['unfused']['hbm_bytes'] / tri['hbm_bytes']:.0f}x; grad-in-forward design "
                     f"{r['grad_in_forward']['flops'] / tri['flops']:.2f}x the FLOPs; kernels: "
                     + ", ".join(f"{k['kernel']} {k['tiles']} grid {k['grid']}" + (f" plan {k['plan']}" if "plan" in k
                                                                                    else "") for k in tri["kernels"]))
        dis = r["triton_distill"]
        lines.append(f"{'':<39}with distillation: FLOP {dis['flops'] / tri['flops']:.2f}x (no extra product), exps "
                     f"{dis['exps'] / tri['exps']:.2f}x, t_exp {dis['t_exp_s'] * 1e3:.2f}m, bound "
                     f"{dis['t_bound_s'] / tri['t_bound_s']:.2f}x ({dis['bound_by']})")
    return "\n".join(lines)


def markdown(rep: dict) -> str:
    """The README's table: every shape and dtype, modelled H100 time of each path and the ratios."""
    lines = ["| shape | dtype | Triton: modelled time (bound) | / GEMM floor | / unfused loss | with distillation |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rep["rows"]:
        s, tri = r["shape"], r["triton"]
        shape = (f"B = {s['B']}, N = {s['N']}, d = {s['d']}, dr = {s['dr']}"
                 + (", `gather_u`" if s.get("column_grads") is False else (", `gather_grad`" if s["N"] != s["B"] else "")))
        ratio_u = tri["t_bound_s"] / r["unfused"]["t_bound_s"]
        lines.append(f"| {shape} | {r['dtype']} | {tri['t_bound_s'] * 1e3:.1f} ms ({tri['bound_by']}) | "
                     f"{tri['t_bound_s'] / r['floor']['t_bound_s']:.2f}x | "
                     f"{'**' if ratio_u > 1 else ''}{ratio_u:.2f}x{'**' if ratio_u > 1 else ''} | "
                     f"{r['triton_distill']['t_bound_s'] / tri['t_bound_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cost_model.json")
    parser.add_argument("--markdown", action="store_true", help="print the README's table instead of the text one")
    args = parser.parse_args(argv)
    rep = report()
    print(markdown(rep) if args.markdown else table(rep))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
