"""Row-chunked PyTorch backend (``backend="torch"``): the op pair of ``core/ops.py`` with O(chunk x N) memory.

The forward makes one pass over row chunks of the similarity matrices and keeps online
log-sum-exp statistics per anchor; the backward recomputes the chunks (the weights need the
finished ``u``). No ``[B, N]`` tensor is held, only ``[R, N]`` chunks with ``R * N`` about
``CHUNK_ELEMENTS``. Runs on any device.

Notation (SPEC.md, ``core/inputs.py``): rows ``x, t`` ``[B, d]``, columns ``X, T`` ``[N, d]``, reference
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

from ..core import ops
from ..core.inputs import TileInputs, Weights
from .common import positive_similarities

CHUNK_ELEMENTS = 1 << 22   # elements of one [R, N] chunk temporary (16 MiB in float32)

_NEG_INF = -math.inf


def chunk_rows(batch: int, n_columns: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, min(batch, chunk_elements // n_columns))


def _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc, split=False):
    """``<rows_i, cols_j> - <ref_rows_i, ref_cols_j>`` for rows r0:r1, in ``acc``; ``cols`` already in ``acc``.
    ``split``: ``(y, z)``, the two products apart (z is None without a reference)."""
    y = rows[r0:r1].to(acc) @ cols.T
    if split:
        return y, None if ref_rows is None else ref_rows[r0:r1].to(acc) @ ref_cols.T
    if ref_rows is not None:
        y.addmm_(ref_rows[r0:r1].to(acc), ref_cols.T, alpha=-1.0)
    return y


def _scores(rows, cols, ref_rows, ref_cols, r0, r1, acc, keep_parts: bool):
    """``(sim, y, z)``: ``sim = y - z`` for rows r0:r1 and, with ``keep_parts`` (distillation, per-sample
    outputs), the target and reference products apart (else None: one product accumulated in place)."""
    if not keep_parts:
        return _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc), None, None
    y, z = _similarity(rows, cols, ref_rows, ref_cols, r0, r1, acc, split=True)
    return (y if z is None else y - z), y, z


def _positive_entries(r0, r1, offset, device, n_columns):
    """Index of the positive entries (row i, column offset + i) of a chunk of rows r0:r1 (none when the
    rows are not among the columns: offset + i >= N)."""
    count = max(0, min(r1 - r0, n_columns - offset - r0))        # rows i with offset + r0 + i < N: a prefix
    rows = torch.arange(count, device=device)
    return rows, rows + (r0 + offset)


def _online_stats(d, dim, positive, values=None):
    """Max, sum of exp(d - max) and sum of exp(d - max) * v along ``dim`` (``v = d`` unless ``values``),
    the positives excluded. ``d`` is overwritten. A line whose entries are all excluded (a column whose
    only row in this chunk is its positive) gets max -inf and sums 0, which :func:`_merge` handles."""
    d[positive] = _NEG_INF
    top = d.amax(dim=dim, keepdim=True)
    e = (d - torch.where(top == _NEG_INF, torch.zeros_like(top), top)).exp_()
    if values is None:
        d[positive] = 0.0
        values = d
    return top.squeeze(dim), e.sum(dim), e.mul_(values).sum(dim)


def _merge(stats_a, stats_b):
    """Merge the online statistics (max, sumexp, sumexp_v) of two disjoint sets of entries."""
    (ma, sa, da), (mb, sb, db) = stats_a, stats_b
    top = torch.maximum(ma, mb)
    fa = torch.where(sa > 0, torch.exp(ma - top), torch.zeros_like(sa))
    fb = torch.where(sb > 0, torch.exp(mb - top), torch.zeros_like(sb))
    return top, sa * fa + sb * fb, da * fa + db * fb


def _line(v, along_rows):
    return v[:, None] if along_rows else v[None, :]


def _chunk_stats(sim, y, z, k: TileInputs, dim, lines, positive, margin, pos, scale, inplace=False):
    """Statistics ``[K, lines]`` of one chunk along ``dim`` (1: the chunk's rows are the anchors, 0: its
    columns are) in the order of ``core.inputs.STATS``; ``margin``, ``pos`` ``[2]`` and ``scale`` are the
    anchors' (already cut to ``lines``). ``sim`` is overwritten with ``inplace`` (its last use; never
    when it is ``y`` itself); ``y`` and ``z`` are read."""
    rows = dim == 1
    s = _line(scale, rows)
    inplace = inplace and sim is not y
    out = list(_online_stats((sim.sub_(_line(margin, rows)) if inplace else sim - _line(margin, rows)).mul_(s),
                             dim, positive))
    if k.with_distill or k.with_alone:
        out += _online_stats((y - _line(pos[0], rows)).mul_(s), dim, positive)
        if k.has_ref:
            zc = z - _line(pos[1], rows)
            out += _online_stats(zc * k.distill_scale, dim, positive, values=y)
            out += _online_stats(zc.mul_(s), dim, positive)
        else:
            empty = torch.full((lines,), _NEG_INF, dtype=sim.dtype, device=sim.device), sim.new_zeros(lines)
            out += [*empty, sim.new_zeros(lines)] * 2
    return out


def _merge_all(a, b):
    """Merge lists of statistics, triple (M, E, F) by triple."""
    return [v for g in range(0, len(a), 3) for v in _merge(a[g:g + 3], b[g:g + 3])]


@torch.no_grad()
def forward(k: TileInputs):
    """``(stats [2, K, B], margin [B], positives [2, B])`` in the accumulation dtype (see ``core/ops.py``)."""
    acc = k.acc_dtype
    B, N = k.batch, k.n_columns
    scale = k.scale.to(acc)
    pos = positive_similarities(k.img, k.txt, k.ref_img, k.ref_txt)
    margin = pos[0] - pos[1]
    split = k.with_distill or k.with_alone
    R = chunk_rows(B, N)
    T = k.txt_all.to(acc)
    Tr = None if k.ref_img is None else k.ref_txt_all.to(acc)
    img_stats = []
    if k.columns_are_rows:
        col_stats = None
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            r = slice(r0, r1)
            sim, y, z = _scores(k.img, T, k.ref_img, Tr, r0, r1, acc, split)
            positive = _positive_entries(r0, r1, k.offset, sim.device, N)
            img_stats.append(_chunk_stats(sim, y, z, k, 1, r1 - r0, positive, margin[r], pos[:, r], scale[0, r]))
            # column j of the chunk is text anchor j over image columns i
            chunk = _chunk_stats(sim, y, z, k, 0, B, positive, margin, pos, scale[1], inplace=True)
            col_stats = chunk if col_stats is None else _merge_all(col_stats, chunk)
        txt_stats = torch.stack(col_stats)
    else:
        X = k.img_all.to(acc)
        Xr = None if k.ref_img is None else k.ref_img_all.to(acc)
        txt_chunks = []
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            r = slice(r0, r1)
            for rows, cols, ref_rows, ref_cols, s, out in ((k.img, T, k.ref_img, Tr, scale[0], img_stats),
                                                            (k.txt, X, k.ref_txt, Xr, scale[1], txt_chunks)):
                sim, y, z = _scores(rows, cols, ref_rows, ref_cols, r0, r1, acc, split)
                positive = _positive_entries(r0, r1, k.offset, sim.device, N)
                out.append(_chunk_stats(sim, y, z, k, 1, r1 - r0, positive, margin[r], pos[:, r],
                                        s[r], inplace=True))
        txt_stats = _concat(txt_chunks)
    return torch.stack([_concat(img_stats), txt_stats]), margin, pos


def _concat(chunks):
    return torch.stack([torch.cat(parts) for parts in zip(*chunks)])


def _weights(sim, scale, margin, log_norm, gain, along_rows: bool, inplace: bool = False):
    """``gain * exp(scale (sim - margin) - log_norm)`` with the anchor's vectors along rows ([R]) or columns
    ([N]) of ``sim``: a new tensor, or ``sim`` overwritten (``inplace``). The gain is a multiply, not a shift
    of the exponent by ``log gain``: that would need every gain > 0, which only a read of the device could
    tell (SPEC 3.2)."""
    view = (lambda v: v[:, None]) if along_rows else (lambda v: v[None, :])
    w = (sim.sub_(view(margin)) if inplace else sim - view(margin)).mul_(view(scale)).sub_(view(log_norm)).exp_()
    return w.mul_(view(gain))


def _distill_weights(y, z, scale, distill_scale, lse_q, lse_p, dgain, along_rows: bool):
    """``dgain (exp(s y - lse_q) - exp(t_d z - lse_p))`` over every column: the distillation's weights."""
    view = (lambda v: v[:, None]) if along_rows else (lambda v: v[None, :])
    q = (y * view(scale)).sub_(view(lse_q)).exp_()
    return q.sub_((z * distill_scale).sub_(view(lse_p)).exp_()).mul_(view(dgain))


@torch.no_grad()
def backward(gains, k: TileInputs, w: Weights, column_grads: bool):
    """Gradients for img, txt (and img_all, txt_all when ``column_grads``), see ``core/ops.py``.

    A fold (``columns_are_rows``, or ``w.col_*`` given) adds the column anchors' terms to the row
    gradients; column gradients, when asked, hold the row anchors' terms only.
    """
    gain, col_gain, dgain, col_dgain = gains
    acc = k.acc_dtype
    B, N = k.batch, k.n_columns
    scale, gain = k.scale.to(acc), gain.to(acc)
    partner = (gain * w.wsum.to(acc)).sum(0)
    log_norm = w.log_norm.to(acc)
    margin = w.margin.to(acc)
    distill = dgain is not None
    R = chunk_rows(B, N)
    x_acc, t_acc = k.img.to(acc), k.txt.to(acc)
    Tr = None if k.ref_img is None else k.ref_txt_all.to(acc)
    d_img = torch.empty_like(x_acc)
    d_txt = torch.empty_like(t_acc)
    lse = (w.lse_q.to(acc), w.lse_p.to(acc), dgain.to(acc)) if distill else None

    if k.columns_are_rows:
        # One similarity chunk gives both directions' weights: P = G^I W^I + (G^T W^T)^T (+ distillation).
        d_txt.zero_()
        for r0 in range(0, B, R):
            r1 = min(r0 + R, B)
            r = slice(r0, r1)
            positive = _positive_entries(r0, r1, k.offset, x_acc.device, N)
            sim, y, z = _scores(k.img, t_acc, k.ref_img, Tr, r0, r1, acc, distill)
            p = _weights(sim, scale[0, r], margin[r], log_norm[0, r], gain[0, r], True)
            p += _weights(sim, scale[1], margin, log_norm[1], gain[1], False,
                          inplace=True)                              # sim's last use
            p[positive] = 0.0
            if distill:
                q_, p_, g_ = lse
                p += _distill_weights(y, z, scale[0, r], k.distill_scale, q_[0, r], p_[0, r], g_[0, r], True)
                p += _distill_weights(y, z, scale[1], k.distill_scale, q_[1], p_[1], g_[1], False)
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
    if w.fold:
        col_log_norm, col_gain_w = w.col_log_norm.to(acc), col_gain.to(acc)
    col = (lambda kk: (w.col_scale[kk].to(acc), w.col_margin.to(acc), col_log_norm[kk],
                       col_gain_w[kk])) if w.fold else None
    col_distill = (lambda kk: (w.col_scale[kk].to(acc), k.distill_scale, w.col_lse_q[kk].to(acc),
                               w.col_lse_p[kk].to(acc), col_dgain[kk].to(acc))) if w.fold and distill else None
    for r0 in range(0, B, R):
        r1 = min(r0 + R, B)
        r = slice(r0, r1)
        positive = _positive_entries(r0, r1, k.offset, x_acc.device, N)
        for kk, rows, rows_acc, cols, ref_rows, ref_cols, out, out_cols in (
                (0, k.img, x_acc, T, k.ref_img, Tr, d_img, d_txt_all),
                (1, k.txt, t_acc, X, k.ref_txt, Xr, d_txt, d_img_all)):
            sim, y, z = _scores(rows, cols, ref_rows, ref_cols, r0, r1, acc, distill)
            p = _weights(sim, scale[kk, r], margin[r], log_norm[kk, r], gain[kk, r], True)
            p[positive] = 0.0
            if distill:
                q_, p_, g_ = lse
                p += _distill_weights(y, z, scale[kk, r], k.distill_scale, q_[kk, r], p_[kk, r], g_[kk, r], True)
            if out_cols is not None:                 # column gradients: this process's anchors only
                out_cols.addmm_(p.T, rows_acc[r0:r1])
            if col is not None:                      # the column anchors of the other direction
                fold = _weights(sim, *col(1 - kk), False, inplace=True)       # sim's last use
                fold[positive] = 0.0
                p += fold
                if col_distill is not None:
                    p += _distill_weights(y, z, *col_distill(1 - kk), False)
            out[r0:r1] = p @ cols
            del sim, p
    d_img.sub_(partner[:, None] * t_acc)
    d_txt.sub_(partner[:, None] * x_acc)
    if column_grads:
        d_img_all, d_txt_all = d_img_all.to(k.img.dtype), d_txt_all.to(k.txt.dtype)
    return d_img.to(k.img.dtype), d_txt.to(k.txt.dtype), d_img_all, d_txt_all


ops.register("torch", forward, backward)
