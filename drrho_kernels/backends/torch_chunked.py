"""Row-chunked PyTorch backend: SPEC.md with O(chunk x N) extra memory on any device.

The forward makes one pass over row chunks of the similarity matrices and keeps online
log-sum-exp statistics per anchor; the backward recomputes the chunks (the weights need the
finished ``u``). No ``[B, N]`` tensor is held, only ``[R, N]`` chunks with ``R * N`` about
``CHUNK_ELEMENTS``.

Notation (SPEC.md): rows ``x, t`` ``[B, d]``, columns ``X, T`` ``[N, d]``, reference ``xr, tr,
Xr, Tr`` ``[., dr]``, margin ``m_i = <x_i, t_i> - <xr_i, tr_i>``. For a row chunk ``c``:

    S^I_c = x_c T^T - xr_c Tr^T      d^I = s (S^I_c - m_c)       image anchors, text columns
    S^T_c = t_c X^T - tr_c Xr^T      d^T = s (S^T_c - m_c)       text anchors, image columns

Single process (``columns_are_rows``: X = x, T = t) needs only ``S_c = S^I_c``: the text-anchor
matrix is its transpose, so the text anchors' statistics are column reductions of the same chunk
and the two weighted products of the backward share one weight matrix ``P = W^I + (W^T)^T``:

    dx_c = coef (P_c t - (wsum^I_c + wsum^T_c) t_c)        dt += coef P_c^T x_c

That is six ``[B, d] x [d, N]``-sized products per step (two in the forward, two recomputed and two
weighted in the backward): the GEMM floor.
"""
from __future__ import annotations

import math

import torch

from .._math import log_eps_plus_mean_exp, ma_update, pair_margin

CHUNK_ELEMENTS = 1 << 22   # elements of one [R, N] chunk temporary (16 MiB in float32)

_NEG_INF = -math.inf


def chunk_rows(batch: int, n_columns: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, min(batch, chunk_elements // n_columns))


def _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc):
    """``<rows_i, cols_j> - <ref_rows_i, ref_cols_j>`` for rows r0:r1, in ``acc``; ``cols`` already in ``acc``."""
    sim = rows[r0:r1].to(acc) @ cols.T
    if ref_rows is not None:
        sim.addmm_(ref_rows[r0:r1].to(acc), ref_cols.T, alpha=-1.0)
    return sim


def _positive_entries(r0, r1, offset, device, transposed=False):
    """Index of the positive entries (row i, column offset + i) of a chunk of rows r0:r1."""
    rows = torch.arange(r1 - r0, device=device)
    cols = rows + (r0 + offset)
    return (cols, rows) if transposed else (rows, cols)


def _online_stats(d, dim, positive):
    """Max, sum of exp(d - max) and sum of exp(d - max) * d along ``dim``, the positives excluded.

    ``d`` is overwritten. A line whose entries are all excluded (a column whose only row in this
    chunk is its positive) gets max -inf and sums 0, which :func:`_merge` handles.
    """
    d[positive] = _NEG_INF
    top = d.amax(dim=dim, keepdim=True)
    e = (d - torch.where(top == _NEG_INF, torch.zeros_like(top), top)).exp_()
    d[positive] = 0.0
    return top.squeeze(dim), e.sum(dim), e.mul_(d).sum(dim)


def _merge(stats_a, stats_b):
    """Merge the online statistics (max, sumexp, sumexp_d) of two disjoint sets of entries."""
    (ma, sa, da), (mb, sb, db) = stats_a, stats_b
    top = torch.maximum(ma, mb)
    fa = torch.where(sa > 0, torch.exp(ma - top), torch.zeros_like(sa))
    fb = torch.where(sb > 0, torch.exp(mb - top), torch.zeros_like(sb))
    return top, sa * fa + sb * fb, da * fa + db * fb


def _finish(stats, u_old, n_columns, eps, gamma):
    """u_new, sum_j w_ij and sum_j w_ij d_ij from the online statistics of each anchor."""
    top, sumexp, sumexp_d = stats
    u_new = ma_update(u_old, log_eps_plus_mean_exp(top, sumexp, n_columns, eps), gamma)
    scale = torch.exp(top - u_new)
    return u_new, scale * sumexp, scale * sumexp_d


@torch.no_grad()
def forward(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
            u_img, u_txt, offset, gamma, eps, columns_are_rows):
    """Returns ``(phi, u_img_new, u_txt_new, margin, wsum_img, wsum_txt)``, all in the accumulation dtype."""
    acc = torch.float64 if img.dtype == torch.float64 else torch.float32
    B, N = img.shape[0], img_all.shape[0]
    s = logit_scale.to(acc).reshape(())
    margin = pair_margin(img, txt, ref_img, ref_txt)
    R = chunk_rows(B, N)
    T = txt_all.to(acc)
    Tr = None if ref_img is None else ref_txt_all.to(acc)
    img_stats = []
    if columns_are_rows:
        col_stats = None
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            sim = _similarity(img, T, ref_img, Tr, r0, r1, acc)
            positive = _positive_entries(r0, r1, offset, sim.device)
            d_img = (sim - margin[r0:r1, None]).mul_(s)
            img_stats.append(_online_stats(d_img, 1, positive))
            del d_img
            d_txt_t = sim.sub_(margin[None, :]).mul_(s)     # [i, j] = d^T_{j, i}: text anchor j, image column i
            chunk = _online_stats(d_txt_t, 0, positive)
            col_stats = chunk if col_stats is None else _merge(col_stats, chunk)
        txt_stats = col_stats
    else:
        X = img_all.to(acc)
        Xr = None if ref_img is None else ref_img_all.to(acc)
        txt_chunks = []
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            for rows, cols, ref_rows, ref_cols, out in ((img, T, ref_img, Tr, img_stats),
                                                         (txt, X, ref_txt, Xr, txt_chunks)):
                d = _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc)
                d.sub_(margin[r0:r1, None]).mul_(s)
                out.append(_online_stats(d, 1, _positive_entries(r0, r1, offset, d.device)))
                del d
        txt_stats = tuple(torch.cat(parts) for parts in zip(*txt_chunks))
    img_stats = tuple(torch.cat(parts) for parts in zip(*img_stats))
    u_img_new, wsum_img, wdsum_img = _finish(img_stats, u_img, N, eps, gamma)
    u_txt_new, wsum_txt, wdsum_txt = _finish(txt_stats, u_txt, N, eps, gamma)
    phi = (wdsum_img + wdsum_txt).sum()
    return phi, u_img_new, u_txt_new, margin, wsum_img, wsum_txt


def _row_weights(sim, s, row_margin, row_u, positive):
    """w_ij = exp(s (sim_ij - m_i) - u_i) of the row anchors, 0 at the positives (``sim`` is kept)."""
    w = (sim - row_margin[:, None]).mul_(s).sub_(row_u[:, None]).exp_()
    w[positive] = 0.0
    return w


def _add_column_weights(w, sim, s, col_margin, col_u, positive):
    """Add ``w_{j, i}`` of column anchor j (the other modality) over row i: exp(s (sim_ij - mc_j) - uc_j).

    This is the fold of the column terms; ``sim`` is overwritten.
    """
    w += sim.sub_(col_margin[None, :]).mul_(s).sub_(col_u[None, :]).exp_()
    w[positive] = 0.0
    return w


@torch.no_grad()
def backward(grad_phi, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all,
             logit_scale, u_img_new, u_txt_new, margin, wsum_img, wsum_txt, col_u_img, col_u_txt,
             col_margin, offset, columns_are_rows, column_grads):
    """Gradients of ``phi`` for img, txt (and img_all, txt_all when ``column_grads``).

    With ``col_u_img``/``col_u_txt``/``col_margin`` given, the column terms of every anchor are folded
    into the row gradients (single process, or the distributed scheme that gathers ``u``). Column
    gradients, when asked, hold the row anchors' terms only (the fold never enters them).
    """
    acc = margin.dtype
    B, N = img.shape[0], img_all.shape[0]
    s = logit_scale.to(acc).reshape(())
    coef = grad_phi.to(acc).reshape(()) * s      # d phi / d x = s * [SPEC bracket]
    R = chunk_rows(B, N)
    fold = col_u_img is not None
    wsum = wsum_img + wsum_txt                   # both directions' row sums multiply the partner
    x_acc, t_acc = img.to(acc), txt.to(acc)
    T = t_acc if columns_are_rows else txt_all.to(acc)
    Tr = None if ref_img is None else ref_txt_all.to(acc)
    d_img = torch.empty_like(x_acc)
    d_txt = torch.empty_like(t_acc)

    # One process with the columns' state equal to the rows' own (what the autograd glue passes):
    # one similarity chunk gives both directions' weights, P = W^I + (W^T)^T.
    transposed = (columns_are_rows and fold and not column_grads
                  and (col_u_txt is u_txt_new or torch.equal(col_u_txt, u_txt_new)))
    if transposed:
        d_txt.zero_()
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            positive = _positive_entries(r0, r1, offset, img.device)
            sim = _similarity(img, T, ref_img, Tr, r0, r1, acc)
            p = _row_weights(sim, s, margin[r0:r1], u_img_new[r0:r1], positive)
            _add_column_weights(p, sim, s, col_margin, col_u_txt, positive)
            d_img[r0:r1] = p @ T
            d_txt.addmm_(p.T, x_acc[r0:r1])
        d_img.sub_(wsum[:, None] * t_acc).mul_(coef)
        d_txt.sub_(wsum[:, None] * x_acc).mul_(coef)
        return d_img.to(img.dtype), d_txt.to(txt.dtype), None, None

    X = img_all.to(acc)
    Xr = None if ref_img is None else ref_img_all.to(acc)
    d_img_all = torch.zeros_like(X) if column_grads else None
    d_txt_all = torch.zeros_like(T) if column_grads else None
    for r0 in range(0, B, R):
        r1 = min(r0 + R, B)
        positive = _positive_entries(r0, r1, offset, img.device)
        for rows, rows_acc, cols, ref_rows, ref_cols, u_row, col_u, out, out_cols in (
                (img, x_acc, T, ref_img, Tr, u_img_new, col_u_txt, d_img, d_txt_all),
                (txt, t_acc, X, ref_txt, Xr, u_txt_new, col_u_img, d_txt, d_img_all)):
            sim = _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc)
            p = _row_weights(sim, s, margin[r0:r1], u_row[r0:r1], positive)
            if out_cols is not None:                 # column gradients: this process's anchors only
                out_cols.addmm_(p.T, rows_acc[r0:r1])
            if fold:
                _add_column_weights(p, sim, s, col_margin, col_u, positive)
            out[r0:r1] = p @ cols
            del sim, p
    d_img.sub_(wsum[:, None] * t_acc).mul_(coef)
    d_txt.sub_(wsum[:, None] * x_acc).mul_(coef)
    if column_grads:
        d_img_all = d_img_all.mul_(coef).to(img.dtype)
        d_txt_all = d_txt_all.mul_(coef).to(txt.dtype)
    return d_img.to(img.dtype), d_txt.to(txt.dtype), d_img_all, d_txt_all
