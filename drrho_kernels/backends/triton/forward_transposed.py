r"""Forward, one process (``columns_are_rows``: X = x, T = t, N = B, offset 0): each score tile once.

S^T = (S^I)^T, so each tile S_ij = <x_i, t_j> - <xr_i, tr_j> feeds both reductions (the "transpose
trick"): image anchor i over the text columns j, d^I_ij = s^I_i (S_ij - m_i), reduced along the row,
and text anchor j over the image columns i, d^T_ji = s^T_j (S_ij - m_j), reduced along the column.
Three launches (``forward_transposed``):

    _margin_kernel        m = <x, t> - <xr, tr>, [B]; both reductions need every margin
    _fwd_t_kernel         grid (G groups of column blocks, C splits of row blocks); program (g, c) walks
                          its rectangle in panels of its columns: for each row block i of the split, for
                          each column block j of the panel, tile S_ij. The rows' (M, E, F) are reduced
                          in registers over the panel and merged into ``row_part[g]`` once per
                          (panel, i); the columns' (M, E, F) are read, updated and written back in
                          ``col_part[c]`` per tile. Partials: row_part [G, 3, B], col_part [C, 3, B]
                          float32, each entry with one writer (no atomics, deterministic, no zeroing)
    _fwd_t_merge_kernel   merge of the G (rows) and C (columns) partials into ``stats`` [2, 3, B]

G, C and the panel width come from ``tiles.transposed_plan``. Positives (i == j) are excluded by
index. Why the rows go to registers and the columns through memory: docs/DESIGN.md. Legend of
the names: ``helpers.py``; here also i_g / i_c the group and split, r_ / c_ row / column ranges,
q the panel start, b_r* / b_c* the rows' / columns' (M, E, F), p_rp / p_cp this program's slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .helpers import (_group_exponent, _load_stats, _merge_parts, _merge_stats, _online, _pair_dots, _scores,
                      _scores_split, _store_stats)
from .launch import INTERPRETING, dot_flags, f32, largest_blocks, launch, launch_fixed, operands, sm_count, target_of
from .tiles import INTERPRETER_L2_BYTES, Plan, transposed_plan


@triton.jit(do_not_specialize=["B"])
def _margin_kernel(p_x, p_t, p_xr, p_tr, p_margin, p_pos, B,
                   D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr):
    """m_i = <x_i, t_i> - <xr_i, tr_i> and the two similarities apart (``p_pos`` [2, B]), grid (cdiv(B, BM),)."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    b_y, b_z = _pair_dots(p_x, p_t, p_xr, p_tr, o_m64, m_m, D, DR, HAS_REF, BM, BK, BKR)
    tl.store(p_margin + o_m64, b_y - b_z, mask=m_m)
    tl.store(p_pos + o_m64, b_y, mask=m_m)
    tl.store(p_pos + B + o_m64, b_z, mask=m_m)


@triton.jit
def _column_update(p_cp, b_d, b_v, m_neg, o_n64, m_cseen, m_n, B, BN: tl.constexpr):
    """Merge one tile's column statistics into this program's column slot (read, merge, write back)."""
    b_tmax, b_te, b_tf = _online(tl.full([BN], float("-inf"), tl.float32), tl.zeros([BN], tl.float32),
                                 tl.zeros([BN], tl.float32), b_d, b_v, m_neg, 0)
    b_cmax, b_ce, b_cf = _load_stats(p_cp, o_n64, m_cseen, B)
    b_cmax, b_ce, b_cf = _merge_stats(b_cmax, b_ce, b_cf, b_tmax, b_te, b_tf)
    tl.debug_barrier()        # every thread has read this tile's column slots (write after read)
    _store_stats(p_cp, b_cmax, b_ce, b_cf, o_n64, m_n, B)
    tl.debug_barrier()        # ... and sees them at the next row block (read after write)


@triton.jit(do_not_specialize=["B", "n_groups", "n_splits", "panel_cols"])
def _fwd_t_kernel(p_x, p_t, p_xr, p_tr, p_scale, p_margin, p_pos, p_row_part, p_col_part,
                  B, n_groups, n_splits, panel_cols, t_d,
                  D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr, EXTRA: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Partial statistics of both directions from one pass over S = x t^T - xr tr^T.

    Program (g, c): the column blocks (BN text anchors) of group g times the row blocks (BM image
    anchors) of split c. Each tile S_ij feeds the image anchors i (``p_row_part`` slot g) and the
    text anchors j (``p_col_part`` slot c); with EXTRA every statistic group has its own [3, B] part of
    the slots (``NSTAT`` rows per slot). Every slot entry has exactly one writer, whose first visit
    initialises it (the masked load returns the empty statistics).
    """
    i_g = tl.program_id(0)
    i_c = tl.program_id(1)
    NSTAT: tl.constexpr = 12 if EXTRA else 3
    n_bm = tl.cdiv(B, BM)
    n_bn = tl.cdiv(B, BN)
    r_lo = (i_c * n_bm // n_splits) * BM
    r_hi = ((i_c + 1) * n_bm // n_splits) * BM
    c_lo = (i_g * n_bn // n_groups) * BN
    c_hi = ((i_g + 1) * n_bn // n_groups) * BN
    n_blocks = (c_hi - c_lo) // BN                                     # >= 1 (n_groups <= n_bn)
    n_panels = tl.cdiv(n_blocks, tl.maximum(panel_cols // BN, 1))
    panel = tl.cdiv(n_blocks, n_panels) * BN                           # even panels, whole blocks
    p_rp = p_row_part + i_g * NSTAT * B      # this program's slots: group k's M at +3kB, E at +(3k+1)B, F at +(3k+2)B
    p_cp = p_col_part + i_c * NSTAT * B

    for q in range(c_lo, c_hi, panel):
        q_hi = tl.minimum(q + panel, c_hi)
        for i in range(r_lo, r_hi, BM):
            o_m = i + tl.arange(0, BM)
            m_m = o_m < B
            o_m64 = o_m.to(tl.int64)
            b_mr = tl.load(p_margin + o_m64, mask=m_m, other=0.0)
            b_sr = tl.load(p_scale + o_m64, mask=m_m, other=1.0)          # image anchors' scales
            b_yr = tl.load(p_pos + o_m64, mask=m_m, other=0.0)
            b_zr = tl.load(p_pos + B + o_m64, mask=m_m, other=0.0)
            # earlier panels of this group (a vector comparison: the interpreter mistypes scalar ones)
            m_seen = m_m & (o_m * 0 + q > c_lo)
            b_rmax0, b_re0, b_rf0 = _load_stats(p_rp, o_m64, m_seen, B)
            b_rmax1, b_re1, b_rf1 = b_rmax0, b_re0, b_rf0
            b_rmax2, b_re2, b_rf2 = b_rmax0, b_re0, b_rf0
            b_rmax3, b_re3, b_rf3 = b_rmax0, b_re0, b_rf0
            if EXTRA:
                b_rmax1, b_re1, b_rf1 = _load_stats(p_rp + 3 * B, o_m64, m_seen, B)
                if HAS_REF:
                    b_rmax2, b_re2, b_rf2 = _load_stats(p_rp + 6 * B, o_m64, m_seen, B)
                    b_rmax3, b_re3, b_rf3 = _load_stats(p_rp + 9 * B, o_m64, m_seen, B)
            for j in range(q, q_hi, BN):
                o_n = j + tl.arange(0, BN)
                m_n = o_n < B
                o_n64 = o_n.to(tl.int64)
                m_neg = m_m[:, None] & m_n[None, :] & (o_m[:, None] != o_n[None, :])
                b_mc = tl.load(p_margin + o_n64, mask=m_n, other=0.0)
                b_scol = tl.load(p_scale + B + o_n64, mask=m_n, other=1.0)  # text anchors' scales
                m_cseen = m_n & (o_n * 0 + i > r_lo)                   # earlier row blocks of this split
                if EXTRA:
                    b_y, b_z = _scores_split(p_x, p_t, p_xr, p_tr, o_m64, o_n64, m_m, m_n,
                                             D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
                    b_yc = tl.load(p_pos + o_n64, mask=m_n, other=0.0)
                    b_zc = tl.load(p_pos + B + o_n64, mask=m_n, other=0.0)
                    b_d, b_v = _group_exponent(b_y, b_z, b_sr, b_yr, b_zr, b_mr, t_d, 0, 1)
                    b_rmax0, b_re0, b_rf0 = _online(b_rmax0, b_re0, b_rf0, b_d, b_v, m_neg, 1)
                    b_d, b_v = _group_exponent(b_y, b_z, b_scol, b_yc, b_zc, b_mc, t_d, 0, 0)
                    _column_update(p_cp, b_d, b_v, m_neg, o_n64, m_cseen, m_n, B, BN)
                    b_d, b_v = _group_exponent(b_y, b_z, b_sr, b_yr, b_zr, b_mr, t_d, 1, 1)
                    b_rmax1, b_re1, b_rf1 = _online(b_rmax1, b_re1, b_rf1, b_d, b_v, m_neg, 1)
                    b_d, b_v = _group_exponent(b_y, b_z, b_scol, b_yc, b_zc, b_mc, t_d, 1, 0)
                    _column_update(p_cp + 3 * B, b_d, b_v, m_neg, o_n64, m_cseen, m_n, B, BN)
                    if HAS_REF:
                        b_d, b_v = _group_exponent(b_y, b_z, b_sr, b_yr, b_zr, b_mr, t_d, 2, 1)
                        b_rmax2, b_re2, b_rf2 = _online(b_rmax2, b_re2, b_rf2, b_d, b_v, m_neg, 1)
                        b_d, b_v = _group_exponent(b_y, b_z, b_scol, b_yc, b_zc, b_mc, t_d, 2, 0)
                        _column_update(p_cp + 6 * B, b_d, b_v, m_neg, o_n64, m_cseen, m_n, B, BN)
                        b_d, b_v = _group_exponent(b_y, b_z, b_sr, b_yr, b_zr, b_mr, t_d, 3, 1)
                        b_rmax3, b_re3, b_rf3 = _online(b_rmax3, b_re3, b_rf3, b_d, b_v, m_neg, 1)
                        b_d, b_v = _group_exponent(b_y, b_z, b_scol, b_yc, b_zc, b_mc, t_d, 3, 0)
                        _column_update(p_cp + 9 * B, b_d, b_v, m_neg, o_n64, m_cseen, m_n, B, BN)
                else:
                    b_sc = _scores(p_x, p_t, p_xr, p_tr, o_m64, o_n64, m_m, m_n,
                                   D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
                    b_d = b_sr[:, None] * (b_sc - b_mr[:, None])
                    b_rmax0, b_re0, b_rf0 = _online(b_rmax0, b_re0, b_rf0, b_d, b_d, m_neg, 1)
                    b_d = b_scol[None, :] * (b_sc - b_mc[None, :])
                    _column_update(p_cp, b_d, b_d, m_neg, o_n64, m_cseen, m_n, B, BN)
            _store_stats(p_rp, b_rmax0, b_re0, b_rf0, o_m64, m_m, B)
            if EXTRA:
                _store_stats(p_rp + 3 * B, b_rmax1, b_re1, b_rf1, o_m64, m_m, B)
                if HAS_REF:
                    _store_stats(p_rp + 6 * B, b_rmax2, b_re2, b_rf2, o_m64, m_m, B)
                    _store_stats(p_rp + 9 * B, b_rmax3, b_re3, b_rf3, o_m64, m_m, B)
            tl.debug_barrier()


@triton.jit(do_not_specialize=["B", "n_groups", "n_splits"])
def _fwd_t_merge_kernel(p_row_part, p_col_part, p_stats, B, n_groups, n_splits, NGROUPS: tl.constexpr,
                        BM: tl.constexpr):
    """Grid (cdiv(B, BM),): image anchors over the column groups, text anchors over the row splits, for
    each of the ``NGROUPS`` statistic groups."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    NSTAT: tl.constexpr = 12 if NGROUPS > 1 else 3
    for g in tl.static_range(NGROUPS):
        b_max, b_e, b_f = _merge_parts(p_row_part + 3 * g * B, n_groups, NSTAT * B, B, o_m64, m_m, BM)
        _store_stats(p_stats + 3 * g * B, b_max, b_e, b_f, o_m64, m_m, B)
        b_max, b_e, b_f = _merge_parts(p_col_part + 3 * g * B, n_splits, NSTAT * B, B, o_m64, m_m, BM)
        _store_stats(p_stats + (NSTAT + 3 * g) * B, b_max, b_e, b_f, o_m64, m_m, B)


def plan_for(B: int, D: int, DR: int, dtype: torch.dtype, device: torch.device, extra: bool = False) -> Plan:
    """The plan of this call: from the device's SM count and L2 size, and the largest tiles among the
    candidates of its path (``extra``: EXTRA; so that every autotuned configuration has at least one
    block per group and split)."""
    vec_bytes = (D + DR) * torch.empty((), dtype=dtype).element_size()
    bm, bn, _ = largest_blocks("fwdt", D, DR, dtype, target_of(device)[0], dict(EXTRA=extra))
    if INTERPRETING:
        return transposed_plan(B, bm, bn, vec_bytes, sm_count(device), INTERPRETER_L2_BYTES)
    props = torch.cuda.get_device_properties(device)
    return transposed_plan(B, bm, bn, vec_bytes, sm_count(device), int(getattr(props, "L2_cache_size", 0)))


def forward_transposed(k, plan: Plan | None = None):
    """``(stats, margin)`` of a one-process ``TileInputs``: margins, ``_fwd_t_kernel``, merge.

    Extra memory: the partial buffers, ``plan.partial_bytes(B)``, plus the [B]-sized outputs. A given
    ``plan`` (tests) must leave every group and split at least one block."""
    x, t, _, _, xr, tr, _, _ = operands(k)
    B, D = x.shape
    DR = k.ref_dim
    f32_opts = dict(dtype=torch.float32, device=x.device)
    extra = k.with_distill or k.with_alone
    if plan is None:
        plan = plan_for(B, D, DR, x.dtype, x.device, extra)
    else:
        bm, bn, _ = largest_blocks("fwdt", D, DR, x.dtype, target_of(x.device)[0], dict(EXTRA=extra))
        if not (1 <= plan.groups <= triton.cdiv(B, bn) and 1 <= plan.splits <= triton.cdiv(B, bm)):
            raise ValueError(f"plan {plan}: needs 1 <= groups <= {triton.cdiv(B, bn)} column blocks and "
                             f"1 <= splits <= {triton.cdiv(B, bm)} row blocks at B = {B}")
    n_stat = k.n_stats
    margin = torch.empty(B, **f32_opts)
    positives = torch.empty(2, B, **f32_opts)
    stats = torch.zeros(2, n_stat, B, **f32_opts)
    row_part = torch.empty(plan.groups, n_stat, B, **f32_opts)
    col_part = torch.empty(plan.splits, n_stat, B, **f32_opts)
    shapes = dict(D=D, DR=DR, HAS_REF=k.has_ref)
    launch_fixed(_margin_kernel, "margin", lambda tl_: (triton.cdiv(B, tl_.BM),),
                 (x, t, xr, tr, margin, positives, B), shapes, D, DR)
    launch(_fwd_t_kernel, "fwdt", lambda tiles: plan.grid,
           (x, t, xr, tr, f32(k.scale), margin, positives, row_part, col_part, B, plan.groups, plan.splits,
            plan.panel_cols, float(k.distill_scale)), dict(**shapes, EXTRA=extra, **dot_flags(x.dtype)))
    n_groups = (4 if k.has_ref else 2) if extra else 1
    launch_fixed(_fwd_t_merge_kernel, "merge", lambda tl_: (triton.cdiv(B, tl_.BM),),
                 (row_part, col_part, stats, B, plan.groups, plan.splits), dict(NGROUPS=n_groups))
    return stats, margin, positives
