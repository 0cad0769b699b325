"""``drrho_clip_loss``: the functional API. Validates once, picks the backend, returns the loss and new state."""
from __future__ import annotations

import torch

from . import backends
from ._math import assemble_loss
from ._validate import Problem, validate
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
    problem = validate(img, txt, logit_scale, u_img, u_txt, ref_img=ref_img, ref_txt=ref_txt,
                       img_all=img_all, txt_all=txt_all, ref_img_all=ref_img_all, ref_txt_all=ref_txt_all,
                       offset=offset, gamma=gamma, eps=eps, rho=rho, backend=backend)
    return compute_loss(problem)


def compute_loss(p: Problem):
    """Run the selected backend on a checked problem; returns ``(loss, u_img_new, u_txt_new)``."""
    name = backends.resolve(p.backend, p.device)
    if name == "reference":
        loss, u_img_new, u_txt_new = reference_loss(p)
    else:
        fwd, _ = backends.fused_ops(name)
        phi, u_img_new, u_txt_new, _margin, _wsum_img, _wsum_txt = fwd(
            p.img, p.txt, p.img_all, p.txt_all, p.ref_img, p.ref_txt, p.ref_img_all, p.ref_txt_all,
            p.logit_scale, p.u_img, p.u_txt, p.offset, p.gamma, p.eps, p.columns_are_rows)
        loss = assemble_loss(phi, p.logit_scale, u_img_new, u_txt_new, p.rho, p.n_columns)
    return loss, u_img_new.detach().to(p.u_img.dtype), u_txt_new.detach().to(p.u_txt.dtype)
