"""Row-chunked PyTorch backend (``backend="torch"``): the op pair of ``ops.py`` with O(chunk x N) memory.

The forward makes one pass over row chunks of the similarity matrices and keeps online
log-sum-exp statistics per anchor; the backward recomputes the chunks (the weights need the
finished ``u``). No ``[B, N]`` tensor is held, only ``[R, N]`` chunks with ``R * N`` about
``CHUNK_ELEMENTS``. Runs on any device.

Notation (SPEC.md, ``_inputs.py``): rows ``x, t`` ``[B, d]``, columns ``X, T`` ``[N, d]``, reference
``xr, tr, Xr, Tr`` ``[., dr]``, margin ``m_i = <x_i, t_i> - <xr_i, tr_i>``, per-row scales
``s[k, i]``. For a row chunk ``c``:

    S^I_c = x_c T^T - xr_c Tr^T      d^I = s[0, c] (S^I_c - m_c)       image anchors, text columns
    S^T_c = t_c X^T - tr_c Xr^T      d^T = s[1, c] (S^T_c - m_c)       text anchors, image columns

One process (``columns_are_rows``: X = x, T = t) needs only ``S_c = S^I_c``: the text-anchor matrix
is its transpose, so the text anchors' statistics are column reductions of the same chunk, and the
two weighted products of the backward share one weight matrix ``P = G^I W^I + (G^T W^T)^T``
(``G`` the per-row gains):

    dx_c = P_c t - partner_c t_c        dt += P_c^T x_c        (then dt -= partner t)

Six ``[B, d] x [d, N]``-sized products per step (two forward, two recomputed and two weighted in
the backward): the GEMM floor.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from .._inputs import TileInputs, Weights
from .._math import pair_margin

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


def _concat(chunks):
    return torch.stack([torch.cat(parts) for parts in zip(*chunks)])


@torch.no_grad()
def forward(k: TileInputs):
    """``(stats [2, 3, B], margin [B])`` in the accumulation dtype (see ``ops.py``)."""
    acc = k.acc_dtype
    B, N = k.batch, k.n_columns
    scale = k.scale.to(acc)
    margin = pair_margin(k.img, k.txt, k.ref_img, k.ref_txt)
    R = chunk_rows(B, N)
    T = k.txt_all.to(acc)
    Tr = None if k.ref_img is None else k.ref_txt_all.to(acc)
    img_stats = []
    if k.columns_are_rows:
        col_stats = None
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            sim = _similarity(k.img, T, k.ref_img, Tr, r0, r1, acc)
            positive = _positive_entries(r0, r1, k.offset, sim.device)
            d_img = (sim - margin[r0:r1, None]).mul_(scale[0, r0:r1, None])
            img_stats.append(_online_stats(d_img, 1, positive))
            del d_img
            d_txt_t = sim.sub_(margin[None, :]).mul_(scale[1][None, :])   # [i, j] = d^T_{j, i}: text anchor j
            chunk = _online_stats(d_txt_t, 0, positive)
            col_stats = chunk if col_stats is None else _merge(col_stats, chunk)
        txt_stats = torch.stack(col_stats)
    else:
        X = k.img_all.to(acc)
        Xr = None if k.ref_img is None else k.ref_img_all.to(acc)
        txt_chunks = []
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            for rows, cols, ref_rows, ref_cols, s, out in ((k.img, T, k.ref_img, Tr, scale[0], img_stats),
                                                            (k.txt, X, k.ref_txt, Xr, scale[1], txt_chunks)):
                d = _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc)
                d.sub_(margin[r0:r1, None]).mul_(s[r0:r1, None])
                out.append(_online_stats(d, 1, _positive_entries(r0, r1, k.offset, d.device)))
                del d
        txt_stats = _concat(txt_chunks)
    return torch.stack([_concat(img_stats), txt_stats]), margin


def _weights(sim, scale, margin, log_norm, gain, along_rows: bool):
    """``gain * exp(scale (sim - margin) - log_norm)`` with the anchor's vectors along rows ([R]) or
    columns ([N]) of ``sim``; a new tensor."""
    view = (lambda v: v[:, None]) if along_rows else (lambda v: v[None, :])
    return (sim - view(margin)).mul_(view(scale)).sub_(view(log_norm)).exp_().mul_(view(gain))


@torch.no_grad()
def backward(gain, col_gain, k: TileInputs, w: Weights, column_grads: bool):
    """Gradients for img, txt (and img_all, txt_all when ``column_grads``), see ``ops.py``.

    A fold (``columns_are_rows``, or ``w.col_*`` given) adds the column anchors' terms to the row
    gradients; column gradients, when asked, hold the row anchors' terms only.
    """
    acc = k.acc_dtype
    B, N = k.batch, k.n_columns
    scale, log_norm, gain = k.scale.to(acc), w.log_norm.to(acc), gain.to(acc)
    partner = (gain * w.wsum.to(acc)).sum(0)
    margin = w.margin.to(acc)
    R = chunk_rows(B, N)
    x_acc, t_acc = k.img.to(acc), k.txt.to(acc)
    Tr = None if k.ref_img is None else k.ref_txt_all.to(acc)
    d_img = torch.empty_like(x_acc)
    d_txt = torch.empty_like(t_acc)

    if k.columns_are_rows:
        # One similarity chunk gives both directions' weights: P = G^I W^I + (G^T W^T)^T.
        d_txt.zero_()
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            r = slice(r0, r1)
            positive = _positive_entries(r0, r1, k.offset, x_acc.device)
            sim = _similarity(k.img, t_acc, k.ref_img, Tr, r0, r1, acc)
            p = _weights(sim, scale[0, r], margin[r], log_norm[0, r], gain[0, r], True)
            p += _weights(sim, scale[1], margin, log_norm[1], gain[1], False)
            p[positive] = 0.0
            d_img[r0:r1] = p @ t_acc
            d_txt.addmm_(p.T, x_acc[r0:r1])
        d_img.sub_(partner[:, None] * t_acc)
        d_txt.sub_(partner[:, None] * x_acc)
        return d_img.to(k.img.dtype), d_txt.to(k.txt.dtype), None, None

    T = k.txt_all.to(acc)
    X = k.img_all.to(acc)
    Xr = None if k.ref_img is None else k.ref_img_all.to(acc)
    d_img_all = torch.zeros_like(X) if column_grads else None
    d_txt_all = torch.zeros_like(T) if column_grads else None
    col = (lambda kk: (w.col_scale[kk].to(acc), w.col_margin.to(acc), w.col_log_norm[kk].to(acc),
                       col_gain[kk].to(acc))) if w.fold else None
    for r0 in range(0, B, R):
        r1 = min(r0 + R, B)
        r = slice(r0, r1)
        positive = _positive_entries(r0, r1, k.offset, x_acc.device)
        for kk, rows, rows_acc, cols, ref_rows, ref_cols, out, out_cols in (
                (0, k.img, x_acc, T, k.ref_img, Tr, d_img, d_txt_all),
                (1, k.txt, t_acc, X, k.ref_txt, Xr, d_txt, d_img_all)):
            sim = _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc)
            p = _weights(sim, scale[kk, r], margin[r], log_norm[kk, r], gain[kk, r], True)
            p[positive] = 0.0
            if out_cols is not None:                 # column gradients: this process's anchors only
                out_cols.addmm_(p.T, rows_acc[r0:r1])
            if col is not None:                      # the column anchors of the other direction
                p += _weights(sim, *col(1 - kk), False)
                p[positive] = 0.0
            out[r0:r1] = p @ cols
            del sim, p
    d_img.sub_(partner[:, None] * t_acc)
    d_txt.sub_(partner[:, None] * x_acc)
    if column_grads:
        d_img_all, d_txt_all = d_img_all.to(k.img.dtype), d_txt_all.to(k.txt.dtype)
    return d_img.to(k.img.dtype), d_txt.to(k.txt.dtype), d_img_all, d_txt_all


ops.register("torch", forward, backward)
