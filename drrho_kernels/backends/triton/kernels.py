r"""Triton kernels of the DRRho-CLIP loss (SPEC.md, docs/DESIGN.md): forward statistics and gradients.

What is computed
----------------
Inputs (row-major, contiguous; ``*`` = float16, bfloat16 or float32, all the same):

    x, t     [B, d]  *   rows: this step's image / text anchors
    X, T     [N, d]  *   columns: the global batch (X = x, T = t in one process)
    xr, tr   [B, dr] *   reference rows        Xr, Tr [N, dr] *   reference columns   (HAS_REF only)
    s        [1] f32     logit scale           u      [B] f32     moving averages before the step
    offset   int         row i is column p(i) = offset + i

Scores of one (anchor, column) pair, direction I (image anchors, text columns) and T (text anchors,
image columns), and the margin of the positive pair:

    S^I_ij = <x_i, T_j> - <xr_i, Tr_j>      S^T_ij = <t_i, X_j> - <tr_i, Xr_j>      m_i = <x_i, t_i> - <xr_i, tr_i>
    d_ij   = s (S_ij - m_i)                 (for both directions, over the negatives j != p(i))

Forward (``_fwd_kernel``), per anchor, online over column blocks (running max M, never exp of an
unshifted number):

    M_i = max_j d_ij     E_i = sum_j exp(d_ij - M_i)     F_i = sum_j exp(d_ij - M_i) d_ij
    l_i = logaddexp(log eps, M_i + log E_i - log N)          = log(eps + (1/N) sum_j exp(d_ij))
    u_i <- l_i if gamma == 1 or u_i unset (0, +-inf, NaN), else logaddexp(u_i + log(1-gamma), l_i + log gamma)
    wsum_i = exp(M_i - u_i) E_i  = sum_j w_ij         wdsum_i = exp(M_i - u_i) F_i = sum_j w_ij d_ij
    with w_ij = exp(d_ij - u_i) (new u); phi = sum_i (wdsum^I_i + wdsum^T_i) is a [B] sum on the host side.

One process (``columns_are_rows``: X = x, T = t, N = B, offset 0): S^T = (S^I)^T, so the forward
computes each tile S_ij = <x_i, t_j> - <xr_i, tr_j> once and feeds both reductions (the "transpose
trick"): the image anchor i over the text columns j, d^I_ij = s (S_ij - m_i), reduced along the row,
and the text anchor j over the image columns i, d^T_ji = s (S_ij - m_j), reduced along the column.
Three launches (launch.forward_transposed):

    _margin_kernel        m = <x, t> - <xr, tr>, [B]; both reductions need every margin
    _fwd_t_kernel         grid (G groups of column blocks, C splits of row blocks); program (g, c) walks
                          its rectangle in panels of its columns: for each row block i of the split, for
                          each column block j of the panel, tile S_ij. The row (M, E, F) are reduced in
                          registers over the panel and merged into ``row_part[g]`` once per (panel, i);
                          the column (M, E, F) are read, updated and written back in ``col_part[c]`` per
                          tile. Partial buffers: row_part [G, 3, B], col_part [C, 3, B] float32, each
                          entry with one writer (no atomics, deterministic, nothing to zero)
    _fwd_t_merge_kernel   online max merge of the G (rows) and C (columns) partials, then the epilogue
                          above for both directions

Why the rows go to registers and the columns through memory: a [BM] vector along the M dimension of
the MMA accumulator costs one or two registers per thread, a [BN] vector along N costs BN / 4
(mma.sync, wgmma) to BN (tcgen05), and the online update holds about six of them: the column side is
the expensive one, so it is not also held across the K loop, and BN is 32 or 64 (launch._FWDT).
Positives (i == j) are excluded by index, as everywhere. G, C and the panel width come from
launch.transposed_plan (about two programs per SM; G, C <= 32, so the partials take at most
24 * 32 * B bytes: 12 MiB at B = 32768 on an H100). Cost (benchmarks/cost_model.py, B = N = 32768,
d = dr = 512, bf16): 2.2 TFLOP in the forward instead of 4.4, 8.8 TFLOP per step against the six
product floor of 6.6 (1.33x; 1.67x before).

Backward (``_bwd_kernel``): the tiles are recomputed (``u`` is final only after the forward), with
``coef = grad_phi * s`` (d phi / d x = s * [SPEC bracket]):

    row kernel     d x_i = coef (sum_j P^x_ij T_j - (wsum^I_i + wsum^T_i) t_i)     P^x_ij = w^I_ij [+ w^T_{j,i}]
                   d t_i = coef (sum_j P^t_ij X_j - (wsum^I_i + wsum^T_i) x_i)     P^t_ij = w^T_ij [+ w^I_{j,i}]
    column kernel  d T_j = coef sum_i w^I_ij x_i        d X_j = coef sum_i w^T_ij t_i      (column_grads only)

The bracketed "fold" terms are the weights of the column anchors j (other modality) over row i, read
from the same score tile: w^T_{j,i} = exp(s (S^I_ij - mc_j) - uc^T_j), w^I_{j,i} = exp(s (S^T_ij - mc_j) -
uc^I_j) with the columns' state ``uc`` and margin ``mc`` given (one process: the rows' own). Every
weight of a positive (j = offset + i), of a column j >= N or of a row i >= B is 0, by index.

One generic backward kernel serves both: a program owns a block of "outer" vectors (rows for the row
kernel, columns for the column kernel) and loops over blocks of "inner" vectors; its score tile is
``S = O I^T - Or Ir^T`` and it accumulates ``acc += P @ I`` (the inner vectors are both the score
operand and the weighted product's operand):

    kernel   direction  O   Or   I   Ir   P from the stats of          output
    row      0 (I)      x   xr   T   Tr   outer u^I, m [+ inner uc^T]  d_img  (partner t)
    row      1 (T)      t   tr   X   Xr   outer u^T, m [+ inner uc^I]  d_txt  (partner x)
    column   0 (I)      T   Tr   x   xr   inner u^I, m                 d_txt_all
    column   1 (T)      X   Xr   t   tr   inner u^T, m                 d_img_all

Numerics: every dot accumulates in float32. Float32 operands use ``PREC`` = "tf32x3" (three TF32
tensor-core passes, about float32 accuracy; set by launch.FP32_PRECISION), never plain TF32: a score
error of 1e-3 (TF32) times s = 100 would move the weights by 10%. Half operands (bf16/fp16) take the
tensor cores directly; the weights P are cast to the input dtype for the weighted product. Float16
cannot hold every weight (w_ij reaches N / gamma, above 65504 at large N, and is tiny when u is
stale), so with ``SCALE_P`` each outer row keeps a running power-of-two scale c_i and feeds
P / c_i in [0, 2^14] to the dot, rescaling its accumulator when c_i grows (flash-attention style);
the epilogue multiplies by c_i. Powers of two make every rescaling exact.

Design choice: recompute in the backward, not gradients in the forward
----------------------------------------------------------------------
The weights need the new ``u``, known only at the end of a row's pass. The alternative, the
flash-attention forward (accumulate sum_j exp(d_ij - M_i) C_j and rescale by exp(M_i - u_i) at the end),
would (1) return gradients from the forward, which the op schema (ops.FWD_SCHEMA) does not have and
evaluation does not want; (2) hold the [BM, BD] accumulator, with its d-slicing, in the forward too;
(3) still need the column anchors' terms in a backward pass, while here one weighted product per
direction carries both (the fold). ``benchmarks/cost_model.py`` (``grad_in_forward_flops``) counts it:
1.50x the tensor-core FLOPs of this design for one process (B = N = 32768, d = dr = 512, bf16), 1.20x
for the distributed scheme that gathers u; 0.75x only for the scheme that gathers with gradient (which
the gather-u scheme beats anyway: 2.75 against 4.40 TFLOP per step at B = 4096, N = 65536).

Design choice: the transpose trick in the forward, not in the backward
----------------------------------------------------------------------
In one process the backward's two directions also read the same tiles (the fold makes P^x of
direction I the transpose of P^t of direction T), so one tile could feed d x_i += P_ij t_j and
d t_j += P_ij^T x_i. The forward's partials are [B] statistics; the backward's would be [B, d]
gradients, and that changes the trade (``transposed_backward_alternative`` in the cost model; bf16,
B = N = 32768, d = dr = 512, sm_90 tiles BM = 64, BN = 32, BD = 512):

- one side's accumulator has to span the other loop. Atomics (each tile adds its [BN, d] float32
  column part to d t): 69 GB of atomic read-modify-writes per step, against 1.8 GB of HBM traffic for
  the whole step now, and a summation order that changes from run to run. Deterministic partial
  buffers instead: one [N, d] float32 accumulator per row group, 0.75 GiB for 12 groups (12x the
  64 MiB budget, growing with B d), plus 137 GB of per-tile read-modify-writes of the side that does
  not stay in registers;
- the FLOPs do not drop: the registers would hold the [BM, BD] row accumulator and the [BN, BD] column
  part together (192 registers per thread at BD = 512), so BD halves, and every d-slice recomputes its
  score tiles: 1.00x the current backward's FLOPs (0.67x only at an unreachable BD = 512).

So the backward keeps its two fold programs per row block (each recomputes its tile), with
deterministic outputs and no extra memory.

Legend
------
    i_   program ids            o_   index vectors (int64 once they address memory)
    m_   boolean masks          p_   pointers (arguments) or pointer blocks
    b_   loaded / computed blocks and per-row vectors held in registers
    BM   outer block (rows of a program)   BN inner block (columns per step)
    BK, BKR  chunks of d and dr in the score K-loops   BD output columns of d per program (the grid
    splits d into cdiv(d, BD) programs so that the [BM, BD] float32 accumulator fits in registers)
    _fwd_t_kernel: i_g / i_c group (of column blocks) and split (of row blocks); r_ / c_ row / column
    ranges; q panel start; b_r* / b_c* the rows' / columns' (M, E, F); p_rp / p_cp this program's slots

Launch wrappers (grids, block sizes, autotuning) are in ``launch.py``; the torch op glue in ``ops.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

P_EXP = tl.constexpr(14)   # float16 weights fed to a dot stay below 2^14 = 16384 (max 65504)
C_INIT = tl.constexpr(7.888609052210118e-31)   # 2^-100: initial SCALE_P scale (below any weight that matters)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

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
def _logaddexp(a, b):
    """log(exp(a) + exp(b)), stable; a, b not both -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


@triton.jit
def _ma_update(b_u_old, b_l, log_gamma, log_1m_gamma, GAMMA_ONE: tl.constexpr):
    """The moving-average rule of SPEC.md (same as ``_math.ma_update``): u <- l when gamma == 1 or
    u is unset (exactly 0, +-inf or NaN), else logaddexp(u + log(1 - gamma), l + log(gamma))."""
    b_u_new = b_l
    if not GAMMA_ONE:
        m_unset = (b_u_old == 0.0) | (b_u_old != b_u_old) | (tl.abs(b_u_old) == float("inf"))
        b_u_new = tl.where(m_unset, b_l, _logaddexp(b_u_old + log_1m_gamma, b_l + log_gamma))
    return b_u_new


@triton.jit
def _scores(p_o, p_i, p_or, p_ir, o_out, o_in, m_out, m_in,
            D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr,
            BO: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """S = O[o_out] I[o_in]^T - Or[o_out] Ir[o_in]^T, a [BO, BI] float32 tile; masked vectors read 0.

    ``o_out``, ``o_in`` are int64 vector indices. The reference product is accumulated first and
    negated once per tile, so the operand tiles go to the dot untouched.
    """
    b_s = tl.zeros([BO, BI], dtype=tl.float32)
    if HAS_REF:
        b_s = -_panel_dot(b_s, p_or, p_ir, o_out, o_in, m_out, m_in, DR, BKR, PREC, UPCAST)
    return _panel_dot(b_s, p_o, p_i, o_out, o_in, m_out, m_in, D, BK, PREC, UPCAST)


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
def _row_margin(p_x, p_t, p_xr, p_tr, o_m, m_m, D: tl.constexpr, DR: tl.constexpr,
                HAS_REF: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr):
    """m_i = <x_i, t_i> - <xr_i, tr_i> for a block of rows, float32."""
    b_m = _rowwise_dot(p_x, p_t, o_m, m_m, D, BM, BK)
    if HAS_REF:
        b_m -= _rowwise_dot(p_xr, p_tr, o_m, m_m, DR, BM, BKR)
    return b_m


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
def _epilogue(b_max, b_e, b_f, p_u, p_u_new, p_wsum, p_wdsum, o_m64, m_m,
              log_eps, log_n, log_gamma, log_1m_gamma, GAMMA_ONE: tl.constexpr):
    """From an anchor's (M, E, F): l, the moving average, and the stores of u_new, wsum, wdsum."""
    b_l = _logaddexp(log_eps, b_max + tl.log(b_e) - log_n)
    b_u_old = tl.load(p_u + o_m64, mask=m_m, other=0.0).to(tl.float32)
    b_u_new = _ma_update(b_u_old, b_l, log_gamma, log_1m_gamma, GAMMA_ONE)
    b_scale = tl.exp(b_max - b_u_new)
    tl.store(p_u_new + o_m64, b_u_new, mask=m_m)
    tl.store(p_wsum + o_m64, b_scale * b_e, mask=m_m)
    tl.store(p_wdsum + o_m64, b_scale * b_f, mask=m_m)


# ----------------------------------------------------------------------------------------------
# forward: grid (cdiv(B, BM), 2 directions)
# ----------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["B", "N", "offset"])
def _fwd_kernel(p_x, p_t, p_X, p_T, p_xr, p_tr, p_Xr, p_Tr, p_s, p_u_img, p_u_txt,
                p_u_img_new, p_u_txt_new, p_margin, p_wsum_img, p_wsum_txt, p_wdsum,
                B, N, offset, log_eps, log_n, log_gamma, log_1m_gamma,
                D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr, GAMMA_ONE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Per anchor: u_new, wsum = sum_j w_ij and wdsum = sum_j w_ij d_ij; direction 0 also writes m.

    Program (i_m, i_dir): rows i_m*BM .. +BM of direction i_dir (0: image anchors x against text
    columns T, 1: text anchors t against image columns X), one pass over all N columns.
    """
    i_m = tl.program_id(0)
    i_dir = tl.program_id(1)
    if i_dir == 0:
        p_rows, p_cols, p_rrows, p_rcols = p_x, p_T, p_xr, p_Tr
        p_u, p_u_new, p_wsum = p_u_img, p_u_img_new, p_wsum_img
    else:
        p_rows, p_cols, p_rrows, p_rcols = p_t, p_X, p_tr, p_Xr
        p_u, p_u_new, p_wsum = p_u_txt, p_u_txt_new, p_wsum_txt

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    b_margin = _row_margin(p_x, p_t, p_xr, p_tr, o_m64, m_m, D, DR, HAS_REF, BM, BK, BKR)
    if i_dir == 0:
        tl.store(p_margin + o_m64, b_margin, mask=m_m)
    b_s = tl.load(p_s).to(tl.float32)
    o_pos = o_m + offset                                   # column index of each row's positive

    b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_e = tl.zeros([BM], dtype=tl.float32)
    b_f = tl.zeros([BM], dtype=tl.float32)
    for j in range(0, N, BN):
        o_n = j + tl.arange(0, BN)
        m_n = o_n < N
        b_sc = _scores(p_rows, p_cols, p_rrows, p_rcols, o_m64, o_n.to(tl.int64), m_m, m_n,
                       D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
        m_neg = m_n[None, :] & (o_n[None, :] != o_pos[:, None])       # negatives, by index
        b_d = tl.where(m_neg, b_s * (b_sc - b_margin[:, None]), float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_d, axis=1))
        b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)  # a row without negatives yet
        b_alpha = tl.exp(b_max - b_shift)
        b_p = tl.exp(b_d - b_shift[:, None])                          # 0 on excluded entries
        b_e = b_e * b_alpha + tl.sum(b_p, axis=1)
        b_f = b_f * b_alpha + tl.sum(b_p * tl.where(m_neg, b_d, 0.0), axis=1)
        b_max = b_max_new

    _epilogue(b_max, b_e, b_f, p_u, p_u_new, p_wsum, p_wdsum + i_dir * B, o_m64, m_m,
              log_eps, log_n, log_gamma, log_1m_gamma, GAMMA_ONE)


# ----------------------------------------------------------------------------------------------
# forward, one process (columns_are_rows): each score tile once, row and column reductions
# ----------------------------------------------------------------------------------------------

@triton.jit
def _online(b_max, b_e, b_f, b_d, m_neg, AXIS: tl.constexpr):
    """Fold a tile of exponents ``b_d`` (finite everywhere; only the entries where ``m_neg`` count)
    into the running (M, E, F) of the lines along ``AXIS`` (1: the rows' statistics, 0: the columns')."""
    b_max_new = tl.maximum(b_max, tl.max(tl.where(m_neg, b_d, float("-inf")), axis=AXIS))
    b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)     # a line without negatives yet
    b_alpha = tl.exp(b_max - b_shift)
    b_p = tl.exp(tl.where(m_neg, b_d - tl.expand_dims(b_shift, AXIS), float("-inf")))   # 0 where excluded
    b_e = b_e * b_alpha + tl.sum(b_p, axis=AXIS)
    b_f = b_f * b_alpha + tl.sum(b_p * b_d, axis=AXIS)
    return b_max_new, b_e, b_f


@triton.jit
def _merge_stats(b_max, b_e, b_f, b_max2, b_e2, b_f2):
    """(M, E, F) of the union of two disjoint sets of entries (either may be empty: M = -inf, E = F = 0)."""
    b_top = tl.maximum(b_max, b_max2)
    b_shift = tl.where(b_top == float("-inf"), 0.0, b_top)
    b_a = tl.exp(b_max - b_shift)
    b_b = tl.exp(b_max2 - b_shift)
    return b_top, b_e * b_a + b_e2 * b_b, b_f * b_a + b_f2 * b_b


@triton.jit(do_not_specialize=["B"])
def _margin_kernel(p_x, p_t, p_xr, p_tr, p_margin, B,
                   D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr):
    """m_i = <x_i, t_i> - <xr_i, tr_i>, grid (cdiv(B, BM),): the transposed forward needs every
    margin (rows' and columns') before its first tile."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    b_m = _row_margin(p_x, p_t, p_xr, p_tr, o_m64, m_m, D, DR, HAS_REF, BM, BK, BKR)
    tl.store(p_margin + o_m64, b_m, mask=m_m)


@triton.jit(do_not_specialize=["B", "n_groups", "n_splits", "panel_cols"])
def _fwd_t_kernel(p_x, p_t, p_xr, p_tr, p_s, p_margin, p_row_part, p_col_part,
                  B, n_groups, n_splits, panel_cols,
                  D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Partial (M, E, F) of both directions from one pass over the score matrix S = x t^T - xr tr^T.

    Program (g, c): the column blocks (BN text anchors) of group g times the row blocks (BM image
    anchors) of split c, both balanced over the cdiv(B, BN) column and cdiv(B, BM) row blocks. It
    walks its rectangle panel by panel (``panel_cols`` columns, rounded to whole column blocks):
    for each row block i of the split (outer loop), for each column block j of the panel (inner
    loop), one [BM, BN] tile S_ij feeds

        the image anchors i (rows):    d^I = s (S_ij - m_i)   -> ``p_row_part`` [n_groups, 3, B], slot g
        the text anchors j (columns):  d^T = s (S_ij - m_j)   -> ``p_col_part`` [n_splits, 3, B], slot c

    The rows' statistics are reduced in registers over the panel's columns (along the tile's M
    dimension, a few registers per thread), then merged into slot g once per (panel, i). The
    columns' statistics span the row loop: they are read, updated and written back per tile in the
    program's own slot c (L2-resident), loaded after the tile's K loop (a [BN] vector along the N
    dimension of the MMA layout costs BN / 4 registers per thread: it is not held across the K loop).
    Every slot entry has exactly one writer, whose first visit initialises it (the masked load
    returns the empty statistics): nothing needs zeroing, and the result is deterministic.
    Positives (i == j) are excluded by index.
    """
    i_g = tl.program_id(0)
    i_c = tl.program_id(1)
    n_bm = tl.cdiv(B, BM)
    n_bn = tl.cdiv(B, BN)
    r_lo = (i_c * n_bm // n_splits) * BM
    r_hi = ((i_c + 1) * n_bm // n_splits) * BM
    c_lo = (i_g * n_bn // n_groups) * BN
    c_hi = ((i_g + 1) * n_bn // n_groups) * BN
    n_blocks = (c_hi - c_lo) // BN                                     # >= 1 (n_groups <= n_bn)
    n_panels = tl.cdiv(n_blocks, tl.maximum(panel_cols // BN, 1))
    panel = tl.cdiv(n_blocks, n_panels) * BN                           # even panels, whole blocks
    b_s = tl.load(p_s).to(tl.float32)
    p_rp = p_row_part + i_g * 3 * B          # this program's slots: M at +0, E at +B, F at +2B
    p_cp = p_col_part + i_c * 3 * B

    for q in range(c_lo, c_hi, panel):
        q_hi = tl.minimum(q + panel, c_hi)
        for i in range(r_lo, r_hi, BM):
            o_m = i + tl.arange(0, BM)
            m_m = o_m < B
            o_m64 = o_m.to(tl.int64)
            b_mr = tl.load(p_margin + o_m64, mask=m_m, other=0.0)
            # earlier panels of this group (a vector comparison: the interpreter mistypes scalar ones)
            m_seen = m_m & (o_m * 0 + q > c_lo)
            b_rmax = tl.load(p_rp + o_m64, mask=m_seen, other=float("-inf"))
            b_re = tl.load(p_rp + B + o_m64, mask=m_seen, other=0.0)
            b_rf = tl.load(p_rp + 2 * B + o_m64, mask=m_seen, other=0.0)
            for j in range(q, q_hi, BN):
                o_n = j + tl.arange(0, BN)
                m_n = o_n < B
                o_n64 = o_n.to(tl.int64)
                b_sc = _scores(p_x, p_t, p_xr, p_tr, o_m64, o_n64, m_m, m_n,
                               D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
                m_neg = m_m[:, None] & m_n[None, :] & (o_m[:, None] != o_n[None, :])
                b_rmax, b_re, b_rf = _online(b_rmax, b_re, b_rf, b_s * (b_sc - b_mr[:, None]), m_neg, 1)
                b_mc = tl.load(p_margin + o_n64, mask=m_n, other=0.0)
                b_tmax, b_te, b_tf = _online(tl.full([BN], float("-inf"), tl.float32), tl.zeros([BN], tl.float32),
                                             tl.zeros([BN], tl.float32), b_s * (b_sc - b_mc[None, :]), m_neg, 0)
                m_cseen = m_n & (o_n * 0 + i > r_lo)                   # earlier row blocks of this split
                b_cmax = tl.load(p_cp + o_n64, mask=m_cseen, other=float("-inf"))
                b_ce = tl.load(p_cp + B + o_n64, mask=m_cseen, other=0.0)
                b_cf = tl.load(p_cp + 2 * B + o_n64, mask=m_cseen, other=0.0)
                b_cmax, b_ce, b_cf = _merge_stats(b_cmax, b_ce, b_cf, b_tmax, b_te, b_tf)
                tl.debug_barrier()        # every thread has read this tile's column slots (write after read)
                tl.store(p_cp + o_n64, b_cmax, mask=m_n)
                tl.store(p_cp + B + o_n64, b_ce, mask=m_n)
                tl.store(p_cp + 2 * B + o_n64, b_cf, mask=m_n)
                tl.debug_barrier()        # ... and sees them at the next row block (read after write)
            tl.store(p_rp + o_m64, b_rmax, mask=m_m)
            tl.store(p_rp + B + o_m64, b_re, mask=m_m)
            tl.store(p_rp + 2 * B + o_m64, b_rf, mask=m_m)
            tl.debug_barrier()


@triton.jit
def _merge_parts(p_part, n_parts, B, o_m64, m_m, BM: tl.constexpr):
    """Online max merge of the (M, E, F) partials ``p_part`` [n_parts, 3, B] of a block of anchors."""
    b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_e = tl.zeros([BM], dtype=tl.float32)
    b_f = tl.zeros([BM], dtype=tl.float32)
    for k in range(0, n_parts):
        p = p_part + k * 3 * B + o_m64
        b_pmax = tl.load(p, mask=m_m, other=float("-inf"))
        b_top = tl.maximum(b_max, b_pmax)
        b_shift = tl.where(b_top == float("-inf"), 0.0, b_top)
        b_a = tl.exp(b_max - b_shift)                         # 0 for a side without entries
        b_b = tl.exp(b_pmax - b_shift)
        b_e = b_e * b_a + tl.load(p + B, mask=m_m, other=0.0) * b_b
        b_f = b_f * b_a + tl.load(p + 2 * B, mask=m_m, other=0.0) * b_b
        b_max = b_top
    # lanes past B: finite stand-ins (their stores are masked; no log(0) in the epilogue)
    return tl.where(m_m, b_max, 0.0), tl.where(m_m, b_e, 1.0), b_f


@triton.jit(do_not_specialize=["B", "n_groups", "n_splits"])
def _fwd_t_merge_kernel(p_row_part, p_col_part, p_u_img, p_u_txt, p_u_img_new, p_u_txt_new,
                        p_wsum_img, p_wsum_txt, p_wdsum,
                        B, n_groups, n_splits, log_eps, log_n, log_gamma, log_1m_gamma,
                        GAMMA_ONE: tl.constexpr, BM: tl.constexpr):
    """Grid (cdiv(B, BM),): merge the partials of ``_fwd_t_kernel`` (image anchors over the column
    groups, text anchors over the row splits) and run the epilogue of both directions."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    b_max, b_e, b_f = _merge_parts(p_row_part, n_groups, B, o_m64, m_m, BM)
    _epilogue(b_max, b_e, b_f, p_u_img, p_u_img_new, p_wsum_img, p_wdsum, o_m64, m_m,
              log_eps, log_n, log_gamma, log_1m_gamma, GAMMA_ONE)
    b_max, b_e, b_f = _merge_parts(p_col_part, n_splits, B, o_m64, m_m, BM)
    _epilogue(b_max, b_e, b_f, p_u_txt, p_u_txt_new, p_wsum_txt, p_wdsum + B, o_m64, m_m,
              log_eps, log_n, log_gamma, log_1m_gamma, GAMMA_ONE)


# ----------------------------------------------------------------------------------------------
# backward: grid (cdiv(n_outer, BM), 2 directions, cdiv(d, BD))
# ----------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["B", "N", "offset"])
def _bwd_kernel(p_x, p_t, p_X, p_T, p_xr, p_tr, p_Xr, p_Tr, p_s, p_grad,
                p_u_img, p_u_txt, p_margin, p_wsum_img, p_wsum_txt, p_cu_img, p_cu_txt, p_cmargin,
                p_out_img, p_out_txt,
                B, N, offset,
                D: tl.constexpr, DR: tl.constexpr, HAS_REF: tl.constexpr, IS_ROW: tl.constexpr,
                FOLD: tl.constexpr, SCALE_P: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKR: tl.constexpr, BD: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Weighted products of the gradient, one [BM, BD] output block per program (table in the module doc).

    IS_ROW: outer = the B rows, inner = the N columns; writes d_img (direction 0) / d_txt (1), with the
    partner term. Else outer = the N columns, inner = the B rows; writes d_txt_all (0) / d_img_all (1).
    FOLD (row kernel only): add the column anchors' weights (``p_cu_*``, ``p_cmargin``, [N]).
    """
    i_m = tl.program_id(0)
    i_dir = tl.program_id(1)
    i_d = tl.program_id(2)
    if IS_ROW:
        n_out = B
        n_in = N
        if i_dir == 0:
            p_o, p_or, p_i, p_ir, p_partner, p_out = p_x, p_xr, p_T, p_Tr, p_t, p_out_img
            p_u, p_cu = p_u_img, p_cu_txt
        else:
            p_o, p_or, p_i, p_ir, p_partner, p_out = p_t, p_tr, p_X, p_Xr, p_x, p_out_txt
            p_u, p_cu = p_u_txt, p_cu_img
    else:
        n_out = N
        n_in = B
        if i_dir == 0:
            p_o, p_or, p_i, p_ir, p_out, p_u = p_T, p_Tr, p_x, p_xr, p_out_txt, p_u_img
        else:
            p_o, p_or, p_i, p_ir, p_out, p_u = p_X, p_Xr, p_t, p_tr, p_out_img, p_u_txt

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < n_out
    o_m64 = o_m.to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_s = tl.load(p_s).to(tl.float32)
    if IS_ROW:
        b_m_out = tl.load(p_margin + o_m64, mask=m_m, other=0.0)
        b_u_out = tl.load(p_u + o_m64, mask=m_m, other=0.0)
        o_pos = o_m + offset                    # inner index of each outer row's positive
    else:
        o_pos = o_m - offset                    # inner (row) index whose positive is this column

    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_c = tl.full([BM], C_INIT, dtype=tl.float32)         # SCALE_P: running power-of-two scale
    for j in range(0, n_in, BN):
        o_n = j + tl.arange(0, BN)
        m_n = o_n < n_in
        o_n64 = o_n.to(tl.int64)
        b_sc = _scores(p_o, p_i, p_or, p_ir, o_m64, o_n64, m_m, m_n,
                       D, DR, HAS_REF, BM, BN, BK, BKR, PREC, UPCAST)
        m_w = m_m[:, None] & m_n[None, :] & (o_n[None, :] != o_pos[:, None])
        if IS_ROW:
            b_p = tl.where(m_w, tl.exp(b_s * (b_sc - b_m_out[:, None]) - b_u_out[:, None]), 0.0)
            if FOLD:
                b_mc = tl.load(p_cmargin + o_n64, mask=m_n, other=0.0)
                b_uc = tl.load(p_cu + o_n64, mask=m_n, other=0.0)
                b_p += tl.where(m_w, tl.exp(b_s * (b_sc - b_mc[None, :]) - b_uc[None, :]), 0.0)
        else:
            b_m_in = tl.load(p_margin + o_n64, mask=m_n, other=0.0)
            b_u_in = tl.load(p_u + o_n64, mask=m_n, other=0.0)
            b_p = tl.where(m_w, tl.exp(b_s * (b_sc - b_m_in[None, :]) - b_u_in[None, :]), 0.0)
        if SCALE_P:
            b_pmax = tl.maximum(tl.max(b_p, axis=1), C_INIT)          # rows without weights keep c
            b_c_new = tl.maximum(b_c, tl.exp2(tl.ceil(tl.log2(b_pmax)) - P_EXP))
            b_acc = b_acc * (b_c / b_c_new)[:, None]
            b_c = b_c_new
            b_p = b_p * (1.0 / b_c)[:, None]
        b_v = tl.load(p_i + o_n64[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_acc = _dot(b_p.to(b_v.dtype), b_v, b_acc, PREC, UPCAST)

    b_coef = tl.load(p_grad).to(tl.float32) * b_s
    if SCALE_P:
        b_out = b_acc * (b_coef * b_c)[:, None]
    else:
        b_out = b_acc * b_coef
    o_md = o_m64[:, None] * D + o_d[None, :]
    m_md = m_m[:, None] & m_d[None, :]
    if IS_ROW:
        b_wsum = (tl.load(p_wsum_img + o_m64, mask=m_m, other=0.0)
                  + tl.load(p_wsum_txt + o_m64, mask=m_m, other=0.0))
        b_partner = tl.load(p_partner + o_md, mask=m_md, other=0.0).to(tl.float32)
        b_out -= (b_coef * b_wsum)[:, None] * b_partner
    tl.store(p_out + o_md, b_out.to(p_out.dtype.element_ty), mask=m_md)
