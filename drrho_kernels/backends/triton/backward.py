r"""Backward: the weighted products of the gradient (``_bwd_kernel``), tiles recomputed.

Weights of anchor i of direction k over column j (``core.inputs.Weights``; the positive j = offset + i,
columns j >= N and rows i >= B get 0, by index), and of the fold's column anchors:

    w_kij = exp(s_ki (S_kij - m_i) - norm_ki)          P^x_ij = gain_0i w_0ij [+ cgain_1j w'_1ji]
    w'_1ji = exp(cs_1j (S_0ij - cm_j) - cnorm_1j)      P^t_ij = gain_1i w_1ij [+ cgain_0j w'_0ji]

    row kernel     d x_i = sum_j P^x_ij T_j - partner_i t_i     partner_i = sum_k gain_ki wsum_ki
                   d t_i = sum_j P^t_ij X_j - partner_i x_i
    column kernel  d T_j = sum_i gain_0i w_0ij x_i     d X_j = sum_i gain_1i w_1ij t_i     (column_grads)

One generic kernel serves both: a program owns a block of "outer" vectors and loops over blocks of
"inner" vectors; its score tile is ``S = O I^T - Or Ir^T`` and it accumulates ``acc += P @ I``:

    kernel   direction  O   Or   I   Ir   weights from                              output
    row      0 (I)      x   xr   T   Tr   outer anchors (k = 0) [+ inner fold, k = 1]  d_img  (partner t)
    row      1 (T)      t   tr   X   Xr   outer anchors (k = 1) [+ inner fold, k = 0]  d_txt  (partner x)
    column   0 (I)      T   Tr   x   xr   inner anchors (k = 0)                        d_txt_all
    column   1 (T)      X   Xr   t   tr   inner anchors (k = 1)                        d_img_all

With ``DISTILL`` the target's and the reference's tiles stay apart (``y``, ``z``: the same two products)
and every weight gains the distillation term over every column, the positive included (SPEC 2.2):
``dgain_ki (exp(s_ki y_ij - lse_q_ki) - exp(t_d z_ij - lse_p_ki))``, and in a fold the column anchors'
likewise (their own ``y_ji = y_ij``, ``z_ji = z_ij`` in the same tile).

Grids (cdiv(B or N, BM), 2 directions x S inner parts, cdiv(d, BD)). A small per-rank batch (B = 640:
20 row programs in bfloat16 on 132 SMs) also cuts the inner vectors into S parts (``tiles.column_splits``,
from the SM count): each part writes a float32 partial ``[S, B, d]`` (the first part with the partner
term) and the parts are summed in a fixed order (``torch.sum`` over S: deterministic, no atomics).
S = 1 writes the gradient directly. In one process the fold's column anchors are the rows themselves. Every dot accumulates in float32; the weights are cast to the input dtype for the
weighted product. Float16 cannot hold every weight, so with ``SCALE_P`` each outer row keeps a
running power-of-two scale c_i and feeds P / c_i in [0, 2^14] to the dot, rescaling its accumulator
when c_i grows (flash-attention style); powers of two make every rescaling exact. Legend of the
names: ``helpers.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .helpers import _dot, _scores, _scores_split
from .launch import dot_flags, f32, largest_blocks, launch, operands, target_of
from .tiles import column_splits, part_length

P_EXP = tl.constexpr(14)   # float16 weights fed to a dot stay below 2^14 = 16384 (max 65504)
C_INIT = tl.constexpr(7.888609052210118e-31)   # 2^-100: initial SCALE_P scale (below any weight that matters)


@triton.jit
def _anchor_weights(b_sc, p_scale, p_norm, p_gain, p_margin, o, m, AXIS: tl.constexpr):
    """gain exp(scale (S - margin) - norm) of the anchors ``o`` (mask ``m``) lying along ``AXIS`` of
    the tile (1: the tile's rows are the anchors, 0: its columns)."""
    b_s = tl.expand_dims(tl.load(p_scale + o, mask=m, other=1.0), AXIS)
    b_n = tl.expand_dims(tl.load(p_norm + o, mask=m, other=0.0), AXIS)
    b_g = tl.expand_dims(tl.load(p_gain + o, mask=m, other=0.0), AXIS)
    b_m = tl.expand_dims(tl.load(p_margin + o, mask=m, other=0.0), AXIS)
    return b_g * tl.exp(b_s * (b_sc - b_m) - b_n)


@triton.jit
def _distill_weights(b_y, b_z, t_d, p_scale, p_lse_q, p_lse_p, p_dgain, o, m, AXIS: tl.constexpr):
    """dgain (exp(s y - lse_q) - exp(t_d z - lse_p)) of the anchors ``o`` along ``AXIS`` of the tile."""
    b_s = tl.expand_dims(tl.load(p_scale + o, mask=m, other=1.0), AXIS)
    b_q = tl.expand_dims(tl.load(p_lse_q + o, mask=m, other=0.0), AXIS)
    b_p = tl.expand_dims(tl.load(p_lse_p + o, mask=m, other=0.0), AXIS)
    b_g = tl.expand_dims(tl.load(p_dgain + o, mask=m, other=0.0), AXIS)
    return b_g * (tl.exp(b_s * b_y - b_q) - tl.exp(t_d * b_z - b_p))


@triton.jit(do_not_specialize=["B", "N", "offset", "part_inner"])
def _bwd_kernel(p_x, p_t, p_X, p_T, p_xr, p_tr, p_Xr, p_Tr,
                p_scale, p_norm, p_gain, p_wsum, p_margin, p_cscale, p_cnorm, p_cgain, p_cmargin,
                p_lse_q, p_lse_p, p_dgain, p_clse_q, p_clse_p, p_cdgain,
                p_out_img, p_out_txt, B, N, offset, t_d, part_inner,
                D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr, IS_ROW: tl.constexpr,
                FOLD: tl.constexpr, DISTILL: tl.constexpr, SCALE_P: tl.constexpr, SPLIT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr, BD: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One [BM, BD] output block per program (table in the module doc).

    IS_ROW: outer = the B rows, inner = the N columns; writes d_img (direction 0) / d_txt (1), with the
    partner term. Else outer = the N columns, inner = the B rows; writes d_txt_all (0) / d_img_all (1).
    Per-anchor vectors are [2, B] (``p_scale``, ``p_norm``, ``p_gain``, ``p_wsum``) and, for FOLD (row
    kernel only), [2, N] (``p_c*``); margins [B] and [N].
    """
    i_m = tl.program_id(0)
    i_dir = tl.program_id(1)
    if SPLIT:                                   # axis 1 holds the direction and the inner part
        i_dir = tl.program_id(1) % 2
    i_d = tl.program_id(2)
    if IS_ROW:
        n_out = B
        n_in = N
        if i_dir == 0:
            p_o, p_or, p_i, p_ir, p_partner, p_out = p_x, p_xr, p_T, p_Tr, p_t, p_out_img
        else:
            p_o, p_or, p_i, p_ir, p_partner, p_out = p_t, p_tr, p_X, p_Xr, p_x, p_out_txt
    else:
        n_out = N
        n_in = B
        if i_dir == 0:
            p_o, p_or, p_i, p_ir, p_out = p_T, p_Tr, p_x, p_xr, p_out_txt
        else:
            p_o, p_or, p_i, p_ir, p_out = p_X, p_Xr, p_t, p_tr, p_out_img
    k_row = i_dir * B                          # this direction's slice of the [2, B] vectors
    k_col = (1 - i_dir) * N                    # the fold's column anchors: the other direction, [2, N]

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < n_out
    o_m64 = o_m.to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    if IS_ROW:
        o_pos = o_m + offset                    # inner index of each outer row's positive
    else:
        o_pos = o_m - offset                    # inner (row) index whose positive is this column

    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_c = tl.full([BM], C_INIT, dtype=tl.float32)         # SCALE_P: running power-of-two scale
    j_lo = 0
    j_end = n_in
    if SPLIT:                                   # this program's inner part: part_inner vectors from j_lo
        j_lo = (tl.program_id(1) // 2) * part_inner
        j_end = part_inner
    for j in range(0, j_end, BN):
        o_n = j_lo + j + tl.arange(0, BN)
        m_n = o_n < n_in
        o_n64 = o_n.to(tl.int64)
        if DISTILL:
            b_y, b_z = _scores_split(p_o, p_i, p_or, p_ir, o_m64, o_n64, m_m, m_n,
                                     D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
            b_sc = b_y - b_z
        else:
            b_sc = _scores(p_o, p_i, p_or, p_ir, o_m64, o_n64, m_m, m_n,
                           D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
        m_in = m_m[:, None] & m_n[None, :]
        m_w = m_in & (o_n[None, :] != o_pos[:, None])
        if IS_ROW:
            b_p = _anchor_weights(b_sc, p_scale + k_row, p_norm + k_row, p_gain + k_row, p_margin, o_m64, m_m, 1)
            if FOLD:
                b_p += _anchor_weights(b_sc, p_cscale + k_col, p_cnorm + k_col, p_cgain + k_col, p_cmargin,
                                       o_n64, m_n, 0)
        else:
            b_p = _anchor_weights(b_sc, p_scale + k_row, p_norm + k_row, p_gain + k_row, p_margin, o_n64, m_n, 0)
        b_p = tl.where(m_w, b_p, 0.0)
        if DISTILL:              # every column, the positive included
            if IS_ROW:
                b_q = _distill_weights(b_y, b_z, t_d, p_scale + k_row, p_lse_q + k_row, p_lse_p + k_row,
                                       p_dgain + k_row, o_m64, m_m, 1)
                if FOLD:
                    b_q += _distill_weights(b_y, b_z, t_d, p_cscale + k_col, p_clse_q + k_col, p_clse_p + k_col,
                                            p_cdgain + k_col, o_n64, m_n, 0)
            else:
                b_q = _distill_weights(b_y, b_z, t_d, p_scale + k_row, p_lse_q + k_row, p_lse_p + k_row,
                                       p_dgain + k_row, o_n64, m_n, 0)
            b_p += tl.where(m_in, b_q, 0.0)
        if SCALE_P:
            b_pmax = tl.maximum(tl.max(tl.abs(b_p), axis=1), C_INIT)   # rows without weights keep c
            b_c_new = tl.maximum(b_c, tl.exp2(tl.ceil(tl.log2(b_pmax)) - P_EXP))
            b_acc = b_acc * (b_c / b_c_new)[:, None]
            b_c = b_c_new
            b_p = b_p * (1.0 / b_c)[:, None]
        b_v = tl.load(p_i + o_n64[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_acc = _dot(b_p.to(b_v.dtype), b_v, b_acc, PREC, UPCAST)

    if SCALE_P:
        b_out = b_acc * b_c[:, None]
    else:
        b_out = b_acc
    o_md = o_m64[:, None] * D + o_d[None, :]
    m_md = m_m[:, None] & m_d[None, :]
    if IS_ROW:
        b_partner = (tl.load(p_gain + o_m64, mask=m_m, other=0.0) * tl.load(p_wsum + o_m64, mask=m_m, other=0.0)
                     + tl.load(p_gain + B + o_m64, mask=m_m, other=0.0)
                     * tl.load(p_wsum + B + o_m64, mask=m_m, other=0.0))
        if SPLIT:                               # the partner term once, in the first part
            b_partner = tl.where(tl.program_id(1) // 2 == 0, b_partner, 0.0)
        b_pv = tl.load(p_partner + o_md, mask=m_md, other=0.0).to(tl.float32)
        b_out -= b_partner[:, None] * b_pv
    if SPLIT:                                   # this part's float32 [n_out, D] partial
        p_out += (tl.program_id(1) // 2).to(tl.int64) * n_out * D
    tl.store(p_out + o_md, b_out.to(p_out.dtype.element_ty), mask=m_md)


def backward(gains, k, w, column_grads: bool):
    """Launch the row (and, with ``column_grads``, the column) backward kernel of a ``TileInputs`` ``k``
    and ``Weights`` ``w``; returns ``(d_img, d_txt, d_img_all | None, d_txt_all | None)`` in the input dtype."""
    gain, col_gain, dgain, col_dgain = gains
    x, t, X, T, xr, tr, Xr, Tr = operands(k)
    B, D = x.shape
    N = X.shape[0]
    rows = [f32(v) for v in (k.scale, w.log_norm, gain, w.wsum, w.margin)]
    fold = k.columns_are_rows or w.fold
    distill = dgain is not None
    if k.columns_are_rows:                     # the fold's column anchors are the rows themselves
        cols = [rows[0], rows[1], rows[2], rows[4]]
    elif w.fold:
        cols = [f32(v) for v in (w.col_scale, w.col_log_norm, col_gain, w.col_margin)]
    else:
        cols = [rows[0], rows[1], rows[2], rows[4]]    # dummies, never read
    dist = [f32(v) for v in (w.lse_q, w.lse_p, dgain)] if distill else [rows[1]] * 3     # dummies without
    if distill and w.fold and not k.columns_are_rows:
        col_dist = [f32(v) for v in (w.col_lse_q, w.col_lse_p, col_dgain)]
    else:
        col_dist = dist                        # one process: the rows' own (or dummies)
    common = dict(D=D, DR=k.ref_dim, HAS_REF=k.has_ref, DISTILL=distill, SCALE_P=x.dtype == torch.float16,
                  **dot_flags(x.dtype))
    embeddings = (x, t, X, T, xr, tr, Xr, Tr)
    t_d = float(k.distill_scale)
    d_img, d_txt = _launch_split(
        (*embeddings, *rows, *cols, *dist, *col_dist), (B, N, k.offset, t_d), x, t, B, N,
        dict(IS_ROW=True, FOLD=fold, **common))
    if not column_grads or k.columns_are_rows:
        return d_img, d_txt, None, None
    d_img_all, d_txt_all = _launch_split(
        (*embeddings, *rows, *rows[:3], rows[4], *dist, *dist), (B, N, k.offset, t_d), X, T, N, B,
        dict(IS_ROW=False, FOLD=False, **common))
    return d_img, d_txt, d_img_all, d_txt_all


def backward_splits(n_out: int, n_in: int, D: int, DR: int, dtype: torch.dtype, distill: bool, arch,
                    sms: int) -> tuple[int, int]:
    """``(parts, inner vectors per part)`` of ``_bwd_kernel`` for ``n_out`` outer and ``n_in`` inner vectors on
    ``arch`` with ``sms`` SMs (``tiles.column_splits``, with the SPLIT path's tiles; the output slices of d count
    as programs too). One part: all ``n_in``."""
    bm, bn, bd = largest_blocks("bwd", D, DR, dtype, arch, dict(DISTILL=distill, SPLIT=True))
    parts = column_splits(2 * triton.cdiv(n_out, bm) * triton.cdiv(D, bd), n_in, bn, sms)
    return parts, n_in if parts == 1 else part_length(n_in, bn, parts)


def _launch_split(tensors, scalars, like_img, like_txt, n_out, n_in, flags):
    """One ``_bwd_kernel`` launch for ``n_out`` outer vectors (``like_*`` give the outputs' shape and dtype),
    cut into the inner parts of :func:`backward_splits`; returns the two gradients."""
    D = like_img.shape[1]
    splits, part_inner = backward_splits(n_out, n_in, D, flags["DR"], like_img.dtype, flags["DISTILL"],
                                         *target_of(like_img.device))
    if splits == 1:
        out_img, out_txt = torch.empty_like(like_img), torch.empty_like(like_txt)
    else:   # float32 partials [S, n_out, D], summed below in part order
        out_img, out_txt = (torch.empty(splits, *like.shape, dtype=torch.float32, device=like.device)
                            for like in (like_img, like_txt))
    launch(_bwd_kernel, "bwd", lambda tiles: (triton.cdiv(n_out, tiles.BM), 2 * splits, triton.cdiv(D, tiles.BD)),
           (*tensors, out_img, out_txt, *scalars, part_inner), dict(flags, SPLIT=splits > 1))
    if splits == 1:
        return out_img, out_txt
    return out_img.sum(0).to(like_img.dtype), out_txt.sum(0).to(like_txt.dtype)
