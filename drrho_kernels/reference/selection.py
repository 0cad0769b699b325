"""Example selection with the reference model, without score matrices (SPEC 2.3; arXiv 2406.17711).

:func:`jest_select` is the authors' joint example selection (``jointly_sample_batch_softmax`` in
DRRho-CLIP's ``src/training/train.py``): from a super-batch of ``b`` pairs per process it draws
``k = floor(b (1 - filter_ratio))`` pairs in ``n_chunks`` chunks. With the learner's scale ``t_l`` and
the reference's ``t_r``, the learnability score of a pair is ``t_r <xr_i, tr_i> - t_l <x_i, t_i>`` (the
diagonal of the authors' score matrix, the only part of it they use); the first chunk is drawn with
weights ``score - min(score)``, and every later chunk by the scores conditioned on the pairs drawn so
far (in every process)::

    cond_i = score_i + 1/2 (lse_l^I_i + lse_l^T_i) - 1/2 (lse_r^I_i + lse_r^T_i)
    lse_l^I_i = log sum_{j drawn} exp(t_l <x_i, t_j>),  lse_l^T_i = log sum_{j drawn} exp(t_l <t_i, x_j>)

(``lse_r`` the same with the reference's features and ``t_r``), top-k or sampled without replacement
in proportion to ``exp(cond)``; pairs already drawn are excluded. The authors build ``[b, B]`` matrices
for this; here every quantity is a diagonal or a per-row log-sum-exp over the drawn columns, computed
by the backend's forward op with the drawn pairs as its columns: O(b) memory beyond the features.

Where this differs from the authors' function, on purpose:

- ``k`` is ``floor(b (1 - filter_ratio))`` computed exactly, split over the chunks as evenly as possible
  (the first ``k mod n_chunks`` chunks one larger). Theirs draws ``int(b (100 - 100 f) / 100 / n_chunks)``
  per chunk in floating point: fewer pairs than their training loop then expects when the chunks do
  not divide (b = 12, f = 0.5, 4 chunks: 4 pairs drawn, 6 expected, and their loss fails), and one pair
  fewer at f = 0.8, b = 100 (19.999... rounds down). When the chunks divide, the sizes are the same.
- No process group is needed (theirs fails without one for ``n_chunks >= 2``).
- Sampling weights are ``exp(cond - max cond)`` (theirs ``exp(cond)``, which overflows float32 above 88);
  equal weights replace an all-zero first-chunk weighting (theirs raises).

:func:`rho_select` is the plain alternative: the ``k`` pairs with the largest per-sample RHO loss
(the target's contrastive loss minus the reference's, SPEC 2.3, averaged over the two directions).
"""
from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import torch

from ..backends import resolve
from ..backends.common import positive_similarities
from ..core import ops
from ..core.inputs import TileInputs, accumulation_dtype
from ..loss.functional import drrho_clip_loss
from ..loss.validate import _describe, check_all_finite, check_int, check_real, check_tensor
from ..parallel.collectives import all_gather, resolve_group

__all__ = ["jest_select", "rho_select", "selection_sizes", "Selection"]


class Selection(NamedTuple):
    """:func:`jest_select` with ``return_scores=True``."""

    indices: torch.Tensor          # [k] int64, chunk by chunk
    scores: torch.Tensor           # [b] the learnability of each pair, t_r <xr_i, tr_i> - t_l <x_i, t_i>
    conditional: list              # per later chunk, [b]: the conditional scores (-inf: drawn already)


def selection_sizes(batch: int, filter_ratio: float, n_chunks: int) -> list[int]:
    """The number of pairs of each chunk: ``floor(b (1 - filter_ratio))`` split as evenly as possible."""
    total = int(batch * (1 - Fraction(repr(float(filter_ratio)))))
    if total < n_chunks:
        raise ValueError(f"n_chunks: expected at most floor(B (1 - filter_ratio)) = {total} chunks (B = {batch}, "
                         f"filter_ratio = {filter_ratio}): every chunk draws at least one pair, got {n_chunks}")
    base, extra = divmod(total, n_chunks)
    return [base + (1 if c < extra else 0) for c in range(n_chunks)]


def _check(img, txt, ref_img, ref_txt, logit_scale, ref_scale, filter_ratio):
    img, txt = check_tensor("img", img, ndim=2), check_tensor("txt", txt, ndim=2)
    ref_img, ref_txt = check_tensor("ref_img", ref_img, ndim=2), check_tensor("ref_txt", ref_txt, ndim=2)
    b = img.shape[0]
    for name, x, width in (("txt", txt, img.shape[1]), ("ref_img", ref_img, None), ("ref_txt", ref_txt, ref_img.shape[1])):
        if x.shape[0] != b or (width is not None and x.shape[1] != width) or x.device != img.device:
            raise ValueError(f"{name}: expected {b} rows{'' if width is None else f' of width {width}'} on "
                             f"{img.device} (like img), got {_describe(x)}")
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale: expected one scale, got {_describe(logit_scale)}")
        logit_scale = float(logit_scale.detach())
    t_l = check_real("logit_scale", logit_scale, low=0.0, low_open=True, high_open=True)
    t_r = check_real("ref_scale", ref_scale, low=0.0, low_open=True, high_open=True)
    f = check_real("filter_ratio", filter_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    check_all_finite(img=img, txt=txt, ref_img=ref_img, ref_txt=ref_txt)
    # under autocast the float32 embeddings enter every product (the diagonal too) at the autocast dtype
    img, txt, ref_img, ref_txt = ops.autocast_embeddings(img.detach(), txt.detach(), ref_img.detach().to(img.dtype),
                                                         ref_txt.detach().to(img.dtype))
    return img, txt, ref_img, ref_txt, t_l, t_r, f


def _drawn_lse(backend, rows, cols, scale) -> torch.Tensor:
    """``[B]``: (1/2)(log sum_{j} exp(scale <x_i, t_j>) + log sum_j exp(scale <t_i, x_j>)) over the
    columns ``cols`` (the drawn pairs), through the forward op (no row is a column: no positive)."""
    x, t = rows
    X, T = cols
    acc = accumulation_dtype(x.dtype)
    n = X.shape[0]
    s = torch.full((2, x.shape[0]), scale, dtype=acc, device=x.device)
    tiles = TileInputs(x, t, X, T, None, None, None, None, s, n, False, 1.0, False, False)
    stats, margin, _ = ops.forward(backend, tiles)
    # d = s (y_ij - m_i) with m_i = <x_i, t_i>: log sum_j exp(s y_ij) = M + log E + s m_i
    lse = stats[:, 0] + torch.log(stats[:, 1]) + scale * margin
    return 0.5 * (lse[0] + lse[1])


def _fused_backend(backend: str, device, dtype) -> str:
    name = resolve(backend, device, dtype)
    return "torch" if name == "reference" else name


@torch.no_grad()
def jest_select(img, txt, ref_img, ref_txt, logit_scale, *, ref_scale=100.0, filter_ratio=0.8, n_chunks=2,
                topk=False, generator: torch.Generator | None = None, process_group=None,
                backend="auto", return_scores=False):
    """Joint example selection from a super-batch (the authors' ``jointly_sample_batch_softmax``).

    Args:
        img, txt: ``[b, d]`` the learner's (target's) embeddings of this process's super-batch.
        ref_img, ref_txt: ``[b, dr]`` the reference model's embeddings of the same pairs.
        logit_scale: the learner's scale ``t_l`` (a float or 1-element tensor). ref_scale: the reference's
            ``t_r`` (the authors' train.py passes 100).
        filter_ratio: the share of the super-batch left out, in (0, 1). n_chunks: chunks of the draw, >= 1.
        topk: later chunks take the top scores (else sampled in proportion to ``exp(cond)``); the first
            chunk is always sampled (as the authors do).
        generator: the ``torch.Generator`` of the draws (None: the global one, as the authors').
        process_group: None (one process), ``"world"`` or a ``ProcessGroup``: the conditional scores
            count the pairs drawn on every process.
        backend: the backend of the per-row log-sum-exps (``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"``).
        return_scores: also return the scores (a :class:`Selection`), for logging.

    Returns:
        ``[k]`` int64 indices into this process's super-batch (on the CPU, like the authors'), chunk by
        chunk; with ``return_scores`` a :class:`Selection`.

    Raises:
        TypeError, ValueError: bad arguments, or chunks that cannot all draw a pair.

    Example::

        >>> import torch, drrho_kernels as dk
        >>> g = torch.Generator().manual_seed(0)
        >>> f = lambda: torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
        >>> idx = dk.jest_select(f(), f(), f(), f(), 10.0, filter_ratio=0.5, n_chunks=2, generator=g)
        >>> idx.shape, len(set(idx.tolist()))
        (torch.Size([10]), 10)
    """
    img, txt, ref_img, ref_txt, t_l, t_r, f = _check(img, txt, ref_img, ref_txt, logit_scale, ref_scale,
                                                     filter_ratio)
    n_chunks = check_int("n_chunks", n_chunks, low=1)
    if not isinstance(topk, bool):
        raise TypeError(f"topk: expected a bool, got {_describe(topk)}")
    b = img.shape[0]
    sizes = selection_sizes(b, f, n_chunks)
    name = _fused_backend(backend, img.device, img.dtype)
    group = None
    if process_group is not None:
        group = resolve_group(process_group)
    pos = positive_similarities(img, txt, ref_img, ref_txt)
    score = t_r * pos[1] - t_l * pos[0]                       # the learnability of each pair (the diagonal)
    weights = score - score.min()
    if not bool((weights > 0).any()):
        weights = torch.ones_like(weights)
    drawn = torch.multinomial(weights.cpu(), sizes[0], replacement=False, generator=generator)
    chosen, conditional = [drawn], []
    for size in sizes[1:]:
        idx = torch.cat(chosen).to(img.device)
        cols = [img[idx], txt[idx], ref_img[idx], ref_txt[idx]]
        if group is not None:
            cols = [all_gather(c, group, "selection") for c in cols]
        cond = score + _drawn_lse(name, (img, txt), cols[:2], t_l) - _drawn_lse(name, (ref_img, ref_txt), cols[2:], t_r)
        cond[idx] = -torch.inf
        cond = cond.cpu()
        conditional.append(cond)
        if topk:
            new = cond.topk(size).indices
        else:
            new = torch.multinomial(torch.exp(cond - cond.max()), size, replacement=False, generator=generator)
        chosen.append(new)
    if return_scores:
        return Selection(torch.cat(chosen), score.cpu(), conditional)
    return torch.cat(chosen)


@torch.no_grad()
def rho_select(img, txt, ref_img, ref_txt, logit_scale, *, filter_ratio=0.8, eps=1e-14, process_group=None,
               backend="auto") -> torch.Tensor:
    """The ``floor(b (1 - filter_ratio))`` pairs with the largest per-sample RHO loss, largest first.

    The RHO loss of a pair is its target contrastive loss minus the reference's (SPEC 2.3:
    ``(1/s) log(eps + (1/N) sum_{j != i} exp(s (sim_ij - sim_ii)))`` with ``s = logit_scale`` for both),
    averaged over its image and text anchors, against this process's pairs (or, with a process group,
    the global batch). Arguments as in :func:`jest_select`.

    Example::

        >>> import torch, drrho_kernels as dk
        >>> g = torch.Generator().manual_seed(0)
        >>> f = lambda: torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=1)
        >>> img, txt, ref_img, ref_txt = f(), f(), f(), f()
        >>> idx = dk.rho_select(img, txt, ref_img, ref_txt, 10.0, filter_ratio=0.7, backend="torch")
        >>> len(idx), len(set(idx.tolist()))          # floor(10 (1 - 0.7)) = 3 distinct pairs
        (3, 3)
    """
    img, txt, ref_img, ref_txt, t_l, _, f = _check(img, txt, ref_img, ref_txt, logit_scale, 100.0, filter_ratio)
    b = img.shape[0]
    k = selection_sizes(b, f, 1)[0]
    u = torch.zeros(b, device=img.device)
    cols = {}
    if process_group is not None:
        import torch.distributed as dist
        group = resolve_group(process_group)
        gathered = [all_gather(x, group, "selection") for x in (img, txt, ref_img, ref_txt)]
        cols = dict(img_all=gathered[0], txt_all=gathered[1], ref_img_all=gathered[2], ref_txt_all=gathered[3],
                    offset=dist.get_rank(group) * b)
    out = drrho_clip_loss(img, txt, t_l, u, u, ref_img=ref_img, ref_txt=ref_txt, eps=eps, backend=backend,
                          return_per_sample=True, **cols)
    v = out.per_sample
    rho = 0.5 * ((v.target_img - v.ref_img) + (v.target_txt - v.ref_txt))
    return rho.topk(k).indices.cpu()
