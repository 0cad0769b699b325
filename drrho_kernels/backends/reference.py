"""Dense reference: SPEC.md written out with ``[B, N]`` matrices and autograd.

Reads like the specification, holds about a dozen ``[B, N]`` tensors, and is meant for checking
(``backend="reference"``) and tiny inputs. Every fused backend is tested against it and against an
independent float64 re-statement in the tests.
"""
from __future__ import annotations

import math

import torch

from ..core.epilogue import ma_update
from ..core.inputs import LossInputs


def reference_loss(p: LossInputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Return ``(loss, u_new, per_sample)`` for a checked problem: ``u_new`` ``[2, B]`` in the accumulation
    dtype, ``per_sample`` the fields of :class:`drrho_kernels.PerSample` (SPEC 2.3)."""
    acc = p.acc_dtype
    k = p.tiles
    o = p.options
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
    y_img, y_txt = x @ T.T, t @ X.T                       # the target's similarities (the student's logits / s)
    a_img = y_img - positive
    a_txt = y_txt - positive
    z_img = z_txt = None
    if k.has_ref:
        xr, tr = k.ref_img.to(acc), k.ref_txt.to(acc)
        Xr, Tr = k.ref_img_all.to(acc), k.ref_txt_all.to(acc)
        ref_positive = (xr * tr).sum(-1, keepdim=True)
        z_img, z_txt = xr @ Tr.T, tr @ Xr.T               # the reference's (the teacher's logits / t_d)
        a_img = a_img - (z_img - ref_positive)
        a_txt = a_txt - (z_txt - ref_positive)
    d_img, d_txt = s_img * a_img, s_txt * a_txt

    # Negatives only: every column but p(i) = offset + i.
    negative = torch.ones(B, N, dtype=torch.bool, device=x.device)
    negative[torch.arange(B, device=x.device), k.offset + torch.arange(B, device=x.device)] = False

    def log_eps_plus_g(d):
        log_g = torch.logsumexp(d.masked_fill(~negative, -math.inf), dim=1) - math.log(N)
        return torch.logaddexp(log_g, torch.full_like(log_g, math.log(o.eps)))

    with torch.no_grad():
        l_img, l_txt = log_eps_plus_g(d_img), log_eps_plus_g(d_txt)
        u_img = ma_update(p.u_img, l_img, o.gamma)
        u_txt = ma_update(p.u_txt, l_txt, o.gamma)
        w_img = torch.exp(d_img - u_img[:, None]) * negative
        w_txt = torch.exp(d_txt - u_txt[:, None]) * negative

    # SPEC 2.1: A_k = (1/(B(N-1))) sum_ij w^k_ij d^k_ij, U_k = mean_i u^k_i
    A_img = (w_img * d_img).sum(1).mean() / (N - 1)
    A_txt = (w_txt * d_txt).sum(1).mean() / (N - 1)
    if not form.multiply_tau:
        loss = A_img + A_txt
    elif form.kind == "global":
        loss = (A_img + A_txt) / s_img.detach() + o.rho / s_img + (u_img + u_txt).mean() / 2 / s_img
    else:
        loss = (A_img / s_img.detach() + u_img.mean() / s_img + o.rho / s_img
                + A_txt / s_txt.detach() + u_txt.mean() / s_txt + o.rho / s_txt)

    # SPEC 2.2: H(p_i, q_i) over all N columns, q the student's softmax, p the teacher's.
    def cross_entropy(y, z, s):
        return -(torch.softmax(k.distill_scale * z, dim=1) * torch.log_softmax(s * y, dim=1)).sum(1)

    h_img = h_txt = None
    if k.has_ref and (o.distill_weight > 0 or o.per_sample):
        h_img, h_txt = cross_entropy(y_img, z_img, s_img), cross_entropy(y_txt, z_txt, s_txt)
        if o.distill_weight > 0:
            distill = o.distill_weight * 0.5 * (h_img.mean() + h_txt.mean()) if form.kind == "global" else None
            if not form.multiply_tau:
                loss = loss + o.distill_weight * 0.5 * (h_img.mean() + h_txt.mean())
            elif form.kind == "global":
                loss = loss + distill / s_img.detach()
            else:
                loss = loss + o.distill_weight * 0.5 * (h_img.mean() / s_img.detach() + h_txt.mean() / s_txt.detach())
    values = {}
    if o.per_sample:
        with torch.no_grad():
            alone = lambda sim, s: log_eps_plus_g(s * (sim - sim.diagonal(k.offset)[:, None])) / s  # noqa: E731
            refs = (alone(z_img, s_img), alone(z_txt, s_txt)) if k.has_ref else (None, None)
            hs = (h_img.detach(), h_txt.detach()) if h_img is not None else (None, None)
            values = dict(l_img=l_img, l_txt=l_txt, u_img=u_img, u_txt=u_txt, target_img=alone(y_img, s_img),
                          target_txt=alone(y_txt, s_txt), ref_img=refs[0], ref_txt=refs[1], distill_img=hs[0],
                          distill_txt=hs[1])
    return loss, torch.stack([u_img, u_txt]), values
