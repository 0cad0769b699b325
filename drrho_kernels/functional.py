"""``drrho_clip_loss``: the functional API, and the one path every fused evaluation takes.

    validate (``_validate.py``)  ->  forward op: per-anchor statistics (``ops.forward``)
      ->  epilogue: new u, weights (``_math.finish``)  ->  phi op: sum w d with autograd (``ops.phi``)
      ->  loss (``_math.assemble_loss``)  ->  the new state in the caller's dtype

The distributed scheme that gathers ``u`` takes the same path (:func:`fused_terms`, then
:func:`loss_from_terms` with the gathered columns' weights).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import ops
from ._inputs import LossInputs, Weights
from ._math import assemble_loss, finish
from ._validate import validate
from .backends.reference import reference_loss


def drrho_clip_loss(img, txt, logit_scale, u_img, u_txt, *, ref_img=None, ref_txt=None, img_all=None,
                    txt_all=None, ref_img_all=None, ref_txt_all=None, offset=0, gamma=0.8, eps=1e-14,
                    rho=8.0, backend="auto"):
    r"""DRRho-CLIP loss (arXiv 2505.06699) of one batch, with the moving-average update of ``u``.

    .. math::

        L = \frac{1}{s_\perp B}\sum_i \frac{1}{N-1}\sum_{j \ne p(i)} (w^I_{ij} d^I_{ij} + w^T_{ij} d^T_{ij})
            + \frac{\rho}{s} + \frac{1}{2Bs}\sum_i (u^I_i + u^T_i),
        \quad w_{ij} = e^{d_{ij} - u_i},\ d_{ij} = s\,a_{ij}

    with ``a`` the RHO-shifted similarity margins (target minus reference) and ``u`` the updated
    log-domain moving averages of ``log(eps + mean_j exp(d_ij))``: see SPEC.md. Without a reference
    model it is the SogCLR / FastCLIP global contrastive loss with a global temperature.

    Args:
        img, txt: ``[B, d]`` target embeddings of this step's pairs (the anchors), float16, bfloat16,
            float32 or float64, same dtype and device.
        logit_scale: ``s = 1/tau > 0``, a Python float or a 1-element tensor (may require grad).
        u_img, u_txt: ``[B]`` float32 (or float64) state of the B anchors before the step; an entry that
            is 0, +-inf or NaN is unset. Not modified.
        ref_img, ref_txt: ``[B, dr]`` reference embeddings of the same pairs (both or neither; no grad;
            cast to the dtype of ``img``).
        img_all, txt_all: ``[N, d]`` columns, the global batch (default: ``img``, ``txt``, N = B). With
            gradient, they receive the column terms of this process's anchors.
        ref_img_all, ref_txt_all: ``[N, dr]`` reference columns (required with ``img_all`` and a reference).
        offset: row ``i`` is column ``offset + i`` of the global batch (``0 <= offset <= N - B``).
        gamma: moving-average rate in (0, 1]. eps: floor inside the log (> 0). rho: DRO term (>= 0).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"reference"`` (dense, for checking).

    Returns:
        ``(loss, u_img_new, u_txt_new)``: a 0-dim loss (float64 for float64 inputs, else float32) with
        gradients to ``img``, ``txt``, ``img_all``/``txt_all`` and ``logit_scale``; the ``[B]`` new state
        in the dtype of ``u_img``/``u_txt``.

    Raises:
        TypeError, ValueError: on any bad argument (see SPEC.md, "Bad input"), before any computation.

    Example::

        >>> import torch, drrho_kernels as dk
        >>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        >>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        >>> u = torch.zeros(8)
        >>> loss, u_img, u_txt = dk.drrho_clip_loss(img, txt, 10.0, u, u, backend="torch")
        >>> loss.backward()
        >>> img.grad.shape, u_img.shape
        (torch.Size([8, 16]), torch.Size([8]))
    """
    p = validate(img, txt, logit_scale, u_img, u_txt, ref_img=ref_img, ref_txt=ref_txt, img_all=img_all,
                 txt_all=txt_all, ref_img_all=ref_img_all, ref_txt_all=ref_txt_all, offset=offset, gamma=gamma,
                 eps=eps, rho=rho, backend=backend)
    return compute_loss(p)


def compute_loss(p: LossInputs):
    """Run the problem's backend; returns ``(loss, u_img_new, u_txt_new)`` (state in the caller's dtype)."""
    if p.backend == "reference":
        loss, u_new = reference_loss(p)
        return (loss, *state_out(p, u_new))
    terms = fused_terms(p)
    return (loss_from_terms(p, terms), *state_out(p, terms.u_new))


def state_out(p: LossInputs, u_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The new state ``[2, B]`` as ``(u_img_new, u_txt_new)``, detached, in the dtypes of ``u_img``/``u_txt``."""
    u_new = u_new.detach()
    return u_new[0].to(p.u_img.dtype), u_new[1].to(p.u_txt.dtype)


class FusedTerms:
    """What the forward op and the epilogue give: the new state and the weights' description."""

    def __init__(self, u_new, wsum, wdsum, margin):
        self.u_new, self.wsum, self.wdsum, self.margin = u_new, wsum, wdsum, margin

    def weights(self, **cols) -> Weights:
        """The backward's weights: in one process the fold uses the rows' own; ``cols`` give a fold's columns."""
        return Weights(self.u_new, self.wsum, self.margin, cols.get("col_scale"), cols.get("col_log_norm"),
                       cols.get("col_margin"))


def fused_terms(p: LossInputs) -> FusedTerms:
    """Forward op on the detached tiles, then the epilogue."""
    tiles = p.tiles
    detached = replace(tiles, **{name: getattr(tiles, name).detach() for name in ("img", "txt", "img_all",
                                                                                   "txt_all", "scale")})
    stats, margin = ops.forward(p.backend, detached)
    return FusedTerms(*finish(stats, p.u_old, p.n_columns, p.eps, p.gamma), margin)


def loss_from_terms(p: LossInputs, terms: FusedTerms, weights: Weights | None = None) -> torch.Tensor:
    """The loss, differentiable in the embeddings and the scale (weights held constant)."""
    phi = ops.phi(p.backend, terms.wdsum, p.tiles, weights if weights is not None else terms.weights())
    return assemble_loss(phi, p.logit_scale, terms.u_new, p.rho, p.n_columns)
