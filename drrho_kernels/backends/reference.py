"""Dense reference: SPEC.md written out with ``[B, N]`` matrices and autograd.

Reads like the specification, holds about a dozen ``[B, N]`` tensors, and is meant for checking
(``backend="reference"``) and tiny inputs. Every fused backend is tested against it and against an
independent float64 re-statement in the tests.
"""
from __future__ import annotations

import math

import torch

from .._inputs import LossInputs
from .._math import ma_update


def reference_loss(p: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, u_new)`` for a checked problem (``u_new`` ``[2, B]`` in the accumulation dtype)."""
    acc = p.acc_dtype
    k = p.tiles
    form = p.temperature
    if form.kind == "individual":
        raise ValueError("backend: 'reference' states the global and per-direction forms only; per-sample "
                         "temperatures (temperature='individual') run on 'torch', 'cpp' or 'triton'")
    x, t = k.img.to(acc), k.txt.to(acc)
    X, T = (x, t) if k.columns_are_rows else (k.img_all.to(acc), k.txt_all.to(acc))
    s_img, s_txt = form.scale_img.to(acc), form.scale_txt.to(acc)
    B, N = p.batch, p.n_columns

    # a^I_ij = (<x_i, T_j> - <x_i, t_i>) - (<xr_i, Tr_j> - <xr_i, tr_i>); a^T_ij likewise with t_i, X_j.
    positive = (x * t).sum(-1, keepdim=True)
    a_img = x @ T.T - positive
    a_txt = t @ X.T - positive
    if k.has_ref:
        xr, tr = k.ref_img.to(acc), k.ref_txt.to(acc)
        Xr, Tr = k.ref_img_all.to(acc), k.ref_txt_all.to(acc)
        ref_positive = (xr * tr).sum(-1, keepdim=True)
        a_img = a_img - (xr @ Tr.T - ref_positive)
        a_txt = a_txt - (tr @ Xr.T - ref_positive)
    d_img, d_txt = s_img * a_img, s_txt * a_txt

    # Negatives only: every column but p(i) = offset + i.
    negative = torch.ones(B, N, dtype=torch.bool, device=x.device)
    negative[torch.arange(B, device=x.device), k.offset + torch.arange(B, device=x.device)] = False

    with torch.no_grad():
        def log_eps_plus_g(d):
            log_g = torch.logsumexp(d.masked_fill(~negative, -math.inf), dim=1) - math.log(N)
            return torch.logaddexp(log_g, torch.full_like(log_g, math.log(p.eps)))

        u_img = ma_update(p.u_img, log_eps_plus_g(d_img), p.gamma)
        u_txt = ma_update(p.u_txt, log_eps_plus_g(d_txt), p.gamma)
        w_img = torch.exp(d_img - u_img[:, None]) * negative
        w_txt = torch.exp(d_txt - u_txt[:, None]) * negative

    # SPEC 2.1: A_k = (1/(B(N-1))) sum_ij w^k_ij d^k_ij, U_k = mean_i u^k_i
    A_img = (w_img * d_img).sum(1).mean() / (N - 1)
    A_txt = (w_txt * d_txt).sum(1).mean() / (N - 1)
    if not form.multiply_tau:
        loss = A_img + A_txt
    elif form.kind == "global":
        loss = (A_img + A_txt) / s_img.detach() + p.rho / s_img + (u_img + u_txt).mean() / 2 / s_img
    else:
        loss = (A_img / s_img.detach() + u_img.mean() / s_img + p.rho / s_img
                + A_txt / s_txt.detach() + u_txt.mean() / s_txt + p.rho / s_txt)
    return loss, torch.stack([u_img, u_txt])
