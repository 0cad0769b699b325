r"""Forward, distributed shape: each anchor's statistics over its negatives (``_fwd_kernel``).

Inputs (row-major, contiguous; ``*`` = float16, bfloat16 or float32, all the same):

    x, t     [B, d]  *   rows: this step's image / text anchors
    X, T     [N, d]  *   columns: the global batch
    xr, tr   [B, dr] *   reference rows        Xr, Tr [N, dr] *   reference columns   (HAS_REF only)
    scale    [2, B] f32  s of each anchor, per direction
    offset   int         row i is column p(i) = offset + i

Per anchor, direction 0 (image anchors x_i against text columns T_j) and 1 (text anchors t_i
against image columns X_j), online over column blocks (running max, never exp of an unshifted
number):

    S_ij = <o_i, C_j> - <or_i, Cr_j>      m_i = <x_i, t_i> - <xr_i, tr_i>      d_ij = s_i (S_ij - m_i)
    M_i = max_j d_ij     E_i = sum_j exp(d_ij - M_i)     F_i = sum_j exp(d_ij - M_i) d_ij     (j != p(i))

With ``EXTRA`` (distillation or per-sample outputs) the target's and the reference's tiles stay apart
(``Y``, ``Z``; the same two products) and three more groups of statistics follow (``helpers.py``):
the target ``s (y - y_i)``, the teacher ``t_d (z - z_i)`` with values ``y``, the reference ``s (z - z_i)``.

Outputs: ``stats`` [2, K, B] f32 (direction, statistic, anchor; K = 3, or 12 with EXTRA) and ``margin``
[B] f32. The epilogue (new u, weights) is ``drrho_kernels.core.epilogue``. Grid (cdiv(B, BM), 2 directions,
S column parts): a small per-rank batch (B = 640 on 132 SMs gives 10-20 row programs) also cuts the
columns into S parts (``tiles.column_splits``, from the SM count); each part writes its partial statistics
(``[S, 2, K, B]``) and ``_merge_splits_kernel`` merges them in a fixed order (no atomics). S = 1 writes
``stats`` directly. Legend of the names: ``helpers.py``; here also i_s / n_s the column part and their number.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import positive_similarities
from .helpers import _group_exponent, _merge_parts, _online, _pair_dots, _scores, _scores_split, _store_stats
from .launch import (INTERPRETING, device_arch, dot_flags, f32, largest_blocks, launch, launch_fixed, operands,
                     target_of)
from .tiles import column_splits, part_length, transposed_forward_runs


@triton.jit(do_not_specialize=["B", "N", "offset", "part_cols"])
def _fwd_kernel(p_x, p_t, p_X, p_T, p_xr, p_tr, p_Xr, p_Tr, p_scale, p_stats, p_margin, B, N, offset, t_d, part_cols,
                D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr, EXTRA: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (i_m, i_dir, i_s): anchors i_m*BM .. +BM of direction i_dir, one pass over the ``part_cols``
    columns of part i_s (a multiple of BN; the last part may be shorter or empty); the first part of
    direction 0 also writes the margins. The statistics go to ``p_stats`` at [i_s, i_dir] (``[n_s, 2, NSTAT,
    B]``). Without a reference the teacher and reference groups stay unwritten (the statistics buffer is
    zeroed)."""
    i_m = tl.program_id(0)
    i_dir = tl.program_id(1)
    i_s = tl.program_id(2)
    if i_dir == 0:
        p_rows, p_cols, p_rrows, p_rcols = p_x, p_T, p_xr, p_Tr
    else:
        p_rows, p_cols, p_rrows, p_rcols = p_t, p_X, p_tr, p_Xr
    NSTAT: tl.constexpr = 12 if EXTRA else 3

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    b_ypos, b_zpos = _pair_dots(p_x, p_t, p_xr, p_tr, o_m64, m_m, D, DR, HAS_REF, BM, BK, BKR)
    b_margin = b_ypos - b_zpos
    if i_dir == 0 and i_s == 0:
        tl.store(p_margin + o_m64, b_margin, mask=m_m)
    b_s = tl.load(p_scale + i_dir * B + o_m64, mask=m_m, other=1.0)
    o_pos = o_m + offset                                   # column index of each row's positive

    b_max0 = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_e0 = tl.zeros([BM], dtype=tl.float32)
    b_f0 = tl.zeros([BM], dtype=tl.float32)
    b_max1, b_e1, b_f1 = b_max0, b_e0, b_f0
    b_max2, b_e2, b_f2 = b_max0, b_e0, b_f0
    b_max3, b_e3, b_f3 = b_max0, b_e0, b_f0
    j_lo = i_s * part_cols                                # (the loop's bound stays a kernel argument)
    for jj in range(0, part_cols, BN):
        o_n = j_lo + jj + tl.arange(0, BN)
        m_n = o_n < N
        o_n64 = o_n.to(tl.int64)
        m_neg = m_n[None, :] & (o_n[None, :] != o_pos[:, None])       # negatives, by index
        if EXTRA:
            b_y, b_z = _scores_split(p_rows, p_cols, p_rrows, p_rcols, o_m64, o_n64, m_m, m_n,
                                     D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
            b_d, b_v = _group_exponent(b_y, b_z, b_s, b_ypos, b_zpos, b_margin, t_d, 0, 1)
            b_max0, b_e0, b_f0 = _online(b_max0, b_e0, b_f0, b_d, b_v, m_neg, 1)
            b_d, b_v = _group_exponent(b_y, b_z, b_s, b_ypos, b_zpos, b_margin, t_d, 1, 1)
            b_max1, b_e1, b_f1 = _online(b_max1, b_e1, b_f1, b_d, b_v, m_neg, 1)
            if HAS_REF:
                b_d, b_v = _group_exponent(b_y, b_z, b_s, b_ypos, b_zpos, b_margin, t_d, 2, 1)
                b_max2, b_e2, b_f2 = _online(b_max2, b_e2, b_f2, b_d, b_v, m_neg, 1)
                b_d, b_v = _group_exponent(b_y, b_z, b_s, b_ypos, b_zpos, b_margin, t_d, 3, 1)
                b_max3, b_e3, b_f3 = _online(b_max3, b_e3, b_f3, b_d, b_v, m_neg, 1)
        else:
            b_sc = _scores(p_rows, p_cols, p_rrows, p_rcols, o_m64, o_n64, m_m, m_n,
                           D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
            b_d = b_s[:, None] * (b_sc - b_margin[:, None])
            b_max0, b_e0, b_f0 = _online(b_max0, b_e0, b_f0, b_d, b_d, m_neg, 1)
    p_out = p_stats + (tl.program_id(2) * 2 + i_dir) * NSTAT * B
    _store_stats(p_out, b_max0, b_e0, b_f0, o_m64, m_m, B)
    if EXTRA:
        _store_stats(p_out + 3 * B, b_max1, b_e1, b_f1, o_m64, m_m, B)
        if HAS_REF:
            _store_stats(p_out + 6 * B, b_max2, b_e2, b_f2, o_m64, m_m, B)
            _store_stats(p_out + 9 * B, b_max3, b_e3, b_f3, o_m64, m_m, B)


def forward(k):
    """``(stats [2, 3, B], margin [B])`` (float32) of a ``TileInputs``: the one-process forward
    (``forward_transposed``, each score tile once) or ``_fwd_kernel`` (columns given, or one process on a
    path and GPU where the transposed kernel has no spill-free configuration: ``tiles.transposed_forward_runs``)."""
    if k.columns_are_rows and (INTERPRETING or transposed_forward_runs(
            k.img.dtype, device_arch(k.img.device), k.with_distill or k.with_alone)):
        from .forward_transposed import forward_transposed
        return forward_transposed(k)
    x, t, X, T, xr, tr, Xr, Tr = operands(k)
    B, D = x.shape
    N = X.shape[0]
    extra = k.with_distill or k.with_alone
    splits, part_cols = forward_splits(B, N, D, k.ref_dim, x.dtype, extra, *target_of(x.device))
    stats = torch.zeros(2, k.n_stats, B, dtype=torch.float32, device=x.device)
    parts = stats if splits == 1 else torch.empty(splits, 2, k.n_stats, B, dtype=torch.float32, device=x.device)
    margin = torch.empty(B, dtype=torch.float32, device=x.device)
    args = (x, t, X, T, xr, tr, Xr, Tr, f32(k.scale), parts, margin, B, N, k.offset, float(k.distill_scale), part_cols)
    flags = dict(D=D, DR=k.ref_dim, HAS_REF=k.has_ref, EXTRA=extra, **dot_flags(x.dtype))
    launch(_fwd_kernel, "fwd", lambda tiles: (triton.cdiv(B, tiles.BM), 2, splits), args, flags)
    if splits > 1:
        n_groups = (4 if k.has_ref else 2) if extra else 1
        launch_fixed(_merge_splits_kernel, "merge", lambda t_: (triton.cdiv(B, t_.BM), 2),
                     (parts, stats, B, splits), dict(NSTAT=k.n_stats, NGROUPS=n_groups))
    return stats, margin, positive_pairs(k)


def forward_splits(B: int, N: int, D: int, DR: int, dtype: torch.dtype, extra: bool, arch,
                   sms: int) -> tuple[int, int]:
    """``(parts, columns per part)`` of ``_fwd_kernel`` for this shape on ``arch`` with ``sms`` SMs
    (``tiles.column_splits``; each part whole blocks of the largest BN among the candidates)."""
    bm, bn, _ = largest_blocks("fwd", D, DR, dtype, arch, dict(EXTRA=extra))
    parts = column_splits(2 * triton.cdiv(B, bm), N, bn, sms)
    return parts, part_length(N, bn, parts)


@triton.jit(do_not_specialize=["B", "n_splits"])
def _merge_splits_kernel(p_part, p_stats, B, n_splits, NSTAT: tl.constexpr, NGROUPS: tl.constexpr,
                         BM: tl.constexpr):
    """Grid (cdiv(B, BM), 2): the statistics of direction ``i_dir`` merged over the column parts
    (``p_part`` [n_splits, 2, NSTAT, B]) into ``p_stats`` [2, NSTAT, B], group by group, in part order."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    i_dir = tl.program_id(1)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    for g in tl.static_range(NGROUPS):
        b_max, b_e, b_f = _merge_parts(p_part + (i_dir * NSTAT + 3 * g) * B, n_splits, 2 * NSTAT * B, B, o_m64,
                                       m_m, BM)
        _store_stats(p_stats + (i_dir * NSTAT + 3 * g) * B, b_max, b_e, b_f, o_m64, m_m, B)


def positive_pairs(k):
    """``[2, B]``: ``<x_i, t_i>`` and ``<xr_i, tr_i>`` (float32; the one-process forward's margin kernel
    writes them itself)."""
    return positive_similarities(k.img, k.txt, k.ref_img, k.ref_txt).float()
