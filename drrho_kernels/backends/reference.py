"""Dense reference: SPEC.md written out with ``[B, N]`` matrices and autograd.

Reads like the specification, holds about a dozen ``[B, N]`` tensors, and is meant for checking
(``backend="reference"``) and tiny inputs. Every fused backend is tested against it and against an
independent float64 re-statement in the tests.
"""
from __future__ import annotations

import math

import torch

from .._math import ma_update
from .._validate import Problem


def reference_loss(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(loss, u_img_new, u_txt_new)`` for a checked :class:`Problem` (u in the accumulation dtype)."""
    acc = p.acc_dtype
    x, t = p.img.to(acc), p.txt.to(acc)
    X, T = (x, t) if p.columns_are_rows else (p.img_all.to(acc), p.txt_all.to(acc))
    s = p.logit_scale.to(acc)
    B, N = p.batch, p.n_columns

    # a^I_ij = (<x_i, T_j> - <x_i, t_i>) - (<xr_i, Tr_j> - <xr_i, tr_i>); a^T_ij likewise with t_i, X_j.
    positive = (x * t).sum(-1, keepdim=True)
    a_img = x @ T.T - positive
    a_txt = t @ X.T - positive
    if p.has_ref:
        xr, tr = p.ref_img.to(acc), p.ref_txt.to(acc)
        Xr, Tr = p.ref_img_all.to(acc), p.ref_txt_all.to(acc)
        ref_positive = (xr * tr).sum(-1, keepdim=True)
        a_img = a_img - (xr @ Tr.T - ref_positive)
        a_txt = a_txt - (tr @ Xr.T - ref_positive)
    d_img, d_txt = s * a_img, s * a_txt

    # Negatives only: every column but p(i) = offset + i.
    negative = torch.ones(B, N, dtype=torch.bool, device=x.device)
    negative[torch.arange(B, device=x.device), p.offset + torch.arange(B, device=x.device)] = False

    with torch.no_grad():
        def log_eps_plus_g(d):
            log_g = torch.logsumexp(d.masked_fill(~negative, -math.inf), dim=1) - math.log(N)
            return torch.logaddexp(log_g, torch.full_like(log_g, math.log(p.eps)))

        u_img = ma_update(p.u_img, log_eps_plus_g(d_img), p.gamma)
        u_txt = ma_update(p.u_txt, log_eps_plus_g(d_txt), p.gamma)
        w_img = torch.exp(d_img - u_img[:, None]) * negative
        w_txt = torch.exp(d_txt - u_txt[:, None]) * negative

    s_ = s.detach()
    weighted = (w_img * d_img + w_txt * d_txt).sum(1) / (N - 1)
    loss = weighted.mean() / s_ + p.rho / s + (u_img + u_txt).mean() / 2 / s
    return loss, u_img, u_txt
