"""Shared ``@triton.jit`` helpers of the kernel files: score tiles, row dots, online log-sum-exp.

Legend (fla's prefixes): ``i_`` program ids, ``o_`` index vectors (int64 once they address memory),
``m_`` boolean masks, ``p_`` pointers, ``b_`` blocks and per-row vectors held in registers.
Statistics ``(M, E, F)`` of a set of exponents ``d_j``: ``M = max_j d_j``, ``E = sum_j exp(d_j - M)``,
``F = sum_j exp(d_j - M) d_j`` (or of other values); the empty set is ``(-inf, 0, 0)``. The groups of
the forward (``core.inputs.STATS``), with ``y``, ``z`` the target's and the reference's tiles and ``y_i``,
``z_i`` the pair's own: 0 DRRho ``s (y - z - m_i)``; 1 target ``s (y - y_i)``; 2 teacher ``t_d (z - z_i)``
with values ``y``; 3 reference ``s (z - z_i)``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, float32 accumulation. ``UPCAST`` (interpreter only): bfloat16 operands are
    widened first, because the interpreter's dot reads bfloat16 as raw integers; products of
    bfloat16 values are exact in float32, so this is what the tensor cores compute."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _panel_dot(b_s, p_a, p_b, o_out, o_in, m_out, m_in, W: tl.constexpr, BW: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    """b_s + A[o_out] B[o_in]^T for row-major [*, W] matrices A, B, in K-blocks of BW (masked reads 0)."""
    p_a = p_a + o_out[:, None] * W
    p_b = p_b + o_in[None, :] * W
    for k in range(0, W, BW):
        o_k = k + tl.arange(0, BW)
        m_k = o_k < W
        b_a = tl.load(p_a + o_k[None, :], mask=m_out[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b + o_k[:, None], mask=m_k[:, None] & m_in[None, :], other=0.0)
        b_s = _dot(b_a, b_b, b_s, PREC, UPCAST)
    return b_s


@triton.jit
def _scores(p_o, p_i, p_or, p_ir, o_out, o_in, m_out, m_in,
            D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr,
            BO: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """S = O[o_out] I[o_in]^T - Or[o_out] Ir[o_in]^T, a [BO, BI] float32 tile; masked vectors read 0.

    The reference product is accumulated first and negated once per tile, so the operand tiles go
    to the dot untouched.
    """
    b_s = tl.zeros([BO, BI], dtype=tl.float32)
    if HAS_REF:
        b_s = -_panel_dot(b_s, p_or, p_ir, o_out, o_in, m_out, m_in, DR, BKR, PREC, UPCAST)
    return _panel_dot(b_s, p_o, p_i, o_out, o_in, m_out, m_in, D, BK, PREC, UPCAST)


@triton.jit
def _scores_split(p_o, p_i, p_or, p_ir, o_out, o_in, m_out, m_in,
                  D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr,
                  BO: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``(Y, Z)``: the target's ``O I^T`` and the reference's ``Or Ir^T`` tiles apart (Z = 0 without a
    reference); the same two products as :func:`_scores`, kept in two accumulators."""
    b_z = tl.zeros([BO, BI], dtype=tl.float32)
    if HAS_REF:
        b_z = _panel_dot(b_z, p_or, p_ir, o_out, o_in, m_out, m_in, DR, BKR, PREC, UPCAST)
    b_y = _panel_dot(tl.zeros([BO, BI], dtype=tl.float32), p_o, p_i, o_out, o_in, m_out, m_in, D, BK, PREC, UPCAST)
    return b_y, b_z


@triton.jit
def _rowwise_dot(p_a, p_b, o_m, m_m, W: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr):
    """<a_i, b_i> in float32 for a block of rows of row-major [*, W] matrices, in K-blocks of BW."""
    b_m = tl.zeros([BM], dtype=tl.float32)
    for k in range(0, W, BW):
        o_k = k + tl.arange(0, BW)
        m = m_m[:, None] & (o_k[None, :] < W)
        o = o_m[:, None] * W + o_k[None, :]
        b_a = tl.load(p_a + o, mask=m, other=0.0).to(tl.float32)
        b_b = tl.load(p_b + o, mask=m, other=0.0).to(tl.float32)
        b_m += tl.sum(b_a * b_b, axis=1)
    return b_m


@triton.jit
def _pair_dots(p_x, p_t, p_xr, p_tr, o_m, m_m, D: tl.constexpr, DR: tl.constexpr,
               HAS_REF: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr):
    """``(<x_i, t_i>, <xr_i, tr_i>)`` for a block of rows, float32 (the second 0 without a reference)."""
    b_y = _rowwise_dot(p_x, p_t, o_m, m_m, D, BM, BK)
    b_z = tl.zeros([BM], dtype=tl.float32)
    if HAS_REF:
        b_z = _rowwise_dot(p_xr, p_tr, o_m, m_m, DR, BM, BKR)
    return b_y, b_z


@triton.jit
def _row_margin(p_x, p_t, p_xr, p_tr, o_m, m_m, D: tl.constexpr, DR: tl.constexpr,
                HAS_REF: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr):
    """m_i = <x_i, t_i> - <xr_i, tr_i> for a block of rows, float32."""
    b_m = _rowwise_dot(p_x, p_t, o_m, m_m, D, BM, BK)
    if HAS_REF:
        b_m -= _rowwise_dot(p_xr, p_tr, o_m, m_m, DR, BM, BKR)
    return b_m


@triton.jit
def _online(b_max, b_e, b_f, b_d, b_v, m_neg, AXIS: tl.constexpr):
    """Fold a tile of exponents ``b_d`` (finite everywhere; only the entries where ``m_neg`` count)
    into the running (M, E, F) of the lines along ``AXIS`` (1: the rows' statistics, 0: the columns');
    F sums ``exp(d - M) v`` with the values ``b_v`` (``b_d`` itself for the usual F)."""
    b_max_new = tl.maximum(b_max, tl.max(tl.where(m_neg, b_d, float("-inf")), axis=AXIS))
    b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)     # a line without negatives yet
    b_alpha = tl.exp(b_max - b_shift)
    b_p = tl.exp(tl.where(m_neg, b_d - tl.expand_dims(b_shift, AXIS), float("-inf")))   # 0 where excluded
    b_e = b_e * b_alpha + tl.sum(b_p, axis=AXIS)
    b_f = b_f * b_alpha + tl.sum(b_p * b_v, axis=AXIS)
    return b_max_new, b_e, b_f


@triton.jit
def _merge_stats(b_max, b_e, b_f, b_max2, b_e2, b_f2):
    """(M, E, F) of the union of two disjoint sets of entries (either may be empty: M = -inf, E = F = 0)."""
    b_top = tl.maximum(b_max, b_max2)
    b_shift = tl.where(b_top == float("-inf"), 0.0, b_top)
    b_a = tl.exp(b_max - b_shift)
    b_b = tl.exp(b_max2 - b_shift)
    return b_top, b_e * b_a + b_e2 * b_b, b_f * b_a + b_f2 * b_b


@triton.jit
def _group_exponent(b_y, b_z, b_s, b_y_pos, b_z_pos, b_m_pos, t_d, GROUP: tl.constexpr, AXIS: tl.constexpr):
    """``(d, v)`` of statistic group ``GROUP`` for a tile, the anchors' vectors (``b_s`` scale, ``b_*_pos``
    the pair's own similarities and margin) lying along ``AXIS`` of the tile (1: rows, 0: columns)."""
    b_s = tl.expand_dims(b_s, AXIS)
    if GROUP == 0:
        b_d = b_s * ((b_y - b_z) - tl.expand_dims(b_m_pos, AXIS))
        b_v = b_d
    elif GROUP == 1:
        b_d = b_s * (b_y - tl.expand_dims(b_y_pos, AXIS))
        b_v = b_d
    elif GROUP == 2:
        b_d = t_d * (b_z - tl.expand_dims(b_z_pos, AXIS))
        b_v = b_y
    else:
        b_d = b_s * (b_z - tl.expand_dims(b_z_pos, AXIS))
        b_v = b_d
    return b_d, b_v


@triton.jit
def _store_stats(p_stats, b_max, b_e, b_f, o_m64, m_m, B):
    """Write (M, E, F) of a block of anchors to one direction's ``[3, B]`` slice of the statistics."""
    tl.store(p_stats + o_m64, b_max, mask=m_m)
    tl.store(p_stats + B + o_m64, b_e, mask=m_m)
    tl.store(p_stats + 2 * B + o_m64, b_f, mask=m_m)


@triton.jit
def _load_stats(p, o64, m, B):
    """(M, E, F) of a block of anchors from one ``[3, B]`` slot (empty statistics where ``m`` is false)."""
    return (tl.load(p + o64, mask=m, other=float("-inf")), tl.load(p + B + o64, mask=m, other=0.0),
            tl.load(p + 2 * B + o64, mask=m, other=0.0))


@triton.jit
def _merge_parts(p_part, n_parts, stride, B, o_m64, m_m, BM: tl.constexpr):
    """Merge of the (M, E, F) partials ``p_part`` (one ``[3, B]`` group every ``stride`` entries) of a block."""
    b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_e = tl.zeros([BM], dtype=tl.float32)
    b_f = tl.zeros([BM], dtype=tl.float32)
    for k in range(0, n_parts):
        b_pmax, b_pe, b_pf = _load_stats(p_part + k * stride, o_m64, m_m, B)
        b_max, b_e, b_f = _merge_stats(b_max, b_e, b_f, b_pmax, b_pe, b_pf)
    return b_max, b_e, b_f
