"""torch.autograd.gradcheck of the public API's gradients in float64.

The loss's gradient is defined with the weights ``w`` and the new state ``u`` held constant (SPEC.md),
so it is the derivative of the *frozen* objective

    L_w(x, t, X, T, s) = sum_ij w0_ij s a_ij(x, t, X, T) / (s0 B (N-1)) + rho / s + sum(u0) / (2 B s)

at the evaluation point (``w0``, ``u0``, ``s0`` from that point). The checked function's forward is
that frozen objective, written densely here; its backward is the package's: it re-evaluates
``drrho_clip_loss`` at the saved point and returns its autograd gradients. gradcheck compares them
with finite differences of the frozen objective.
"""
import pytest
import torch

import drrho_kernels as dk
from spec_oracle import make_case


def frozen_objective(x, t, X, T, s, xr, tr, Xr, Tr, w_img, w_txt, u_sum, s0, offset, rho):
    B, N = x.shape[0], X.shape[0]
    pos = (x * t).sum(-1, keepdim=True)
    a_img, a_txt = x @ T.T - pos, t @ X.T - pos
    if xr is not None:
        rpos = (xr * tr).sum(-1, keepdim=True)
        a_img, a_txt = a_img - (xr @ Tr.T - rpos), a_txt - (tr @ Xr.T - rpos)
    phi = (w_img * s * a_img).sum() + (w_txt * s * a_txt).sum()
    return phi / (s0 * B * (N - 1)) + rho / s + u_sum / (2 * B * s)


def make_checked_function(case, backend, distributed):
    kw = case.kwargs()
    refs = {k: kw[k] for k in ("ref_img", "ref_txt", "ref_img_all", "ref_txt_all")}
    u_img, u_txt = kw["u_img"].double(), kw["u_txt"].double()
    common = dict(offset=kw["offset"], gamma=kw["gamma"], eps=kw["eps"], rho=kw["rho"], backend=backend)

    def api_loss(x, t, X, T, s):
        cols = dict(img_all=X, txt_all=T) if distributed else {}
        r = dict(refs) if distributed else dict(ref_img=refs["ref_img"], ref_txt=refs["ref_txt"])
        return dk.drrho_clip_loss(x, t, s, u_img, u_txt, **cols, **r, **common)

    class Checked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t, X, T, s):
            ctx.save_for_backward(x, t, X, T, s)
            return frozen_objective(x, t, X if distributed else x, T if distributed else t, s,
                                    refs["ref_img"], refs["ref_txt"],
                                    refs["ref_img_all"] if distributed else refs["ref_img"],
                                    refs["ref_txt_all"] if distributed else refs["ref_txt"], **frozen)

        @staticmethod
        def backward(ctx, grad):
            leaves = [v.detach().requires_grad_() for v in ctx.saved_tensors]
            with torch.enable_grad():
                loss, _, _ = api_loss(*leaves)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            return tuple(None if g is None else grad * g for g in grads)

    # The frozen constants at the evaluation point, from the oracle-independent dense statement.
    x0, t0 = kw["img"], kw["txt"]
    X0 = kw["img_all"] if distributed else torch.zeros(1, x0.shape[1], dtype=torch.float64)
    T0 = kw["txt_all"] if distributed else torch.zeros(1, x0.shape[1], dtype=torch.float64)
    s0 = torch.tensor(case.logit_scale, dtype=torch.float64)
    with torch.no_grad():
        loss, u_i, u_t = api_loss(x0, t0, X0, T0, s0)
        Xc, Tc = (X0, T0) if distributed else (x0, t0)
        B, N = x0.shape[0], Xc.shape[0]
        pos = (x0 * t0).sum(-1, keepdim=True)
        a_img, a_txt = x0 @ Tc.T - pos, t0 @ Xc.T - pos
        if refs["ref_img"] is not None:
            xr, tr = refs["ref_img"], refs["ref_txt"]
            Xr, Tr = (refs["ref_img_all"], refs["ref_txt_all"]) if distributed else (xr, tr)
            rpos = (xr * tr).sum(-1, keepdim=True)
            a_img, a_txt = a_img - (xr @ Tr.T - rpos), a_txt - (tr @ Xr.T - rpos)
        neg = torch.ones(B, N, dtype=torch.bool)
        neg[torch.arange(B), kw["offset"] + torch.arange(B)] = False
        w_img = torch.exp(s0 * a_img - u_i[:, None]) * neg
        w_txt = torch.exp(s0 * a_txt - u_t[:, None]) * neg
    frozen = dict(w_img=w_img, w_txt=w_txt, u_sum=(u_i + u_t).sum(), s0=s0, offset=kw["offset"], rho=kw["rho"])
    inputs = (x0.clone().requires_grad_(), t0.clone().requires_grad_(), X0.clone().requires_grad_(distributed),
              T0.clone().requires_grad_(distributed), s0.clone().requires_grad_())
    return Checked.apply, inputs


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["cpp"] if "cpp" in dk.available_backends("cpu") else []))
@pytest.mark.parametrize("ref,distributed", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["ref", "noref", "ref-dist-offset", "noref-dist-offset"])
def test_gradcheck(backend, ref, distributed):
    case = make_case(B=4, N=7 if distributed else None, d=3, dr=2, ref=ref, offset=2, seed=11, scale=3.0)
    fn, inputs = make_checked_function(case, backend, distributed)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    """The harness can fail: a backward that forgets the column terms (no fold) is caught."""
    from torch.autograd.gradcheck import GradcheckError

    from dataclasses import replace

    from drrho_kernels import ops

    correct = ops.backward

    def without_column_terms(backend, gain, col_gain, tiles, weights, column_grads):
        # as if the rows were not also the columns: the fold (the column anchors' terms) is lost
        return correct(backend, gain, col_gain, replace(tiles, columns_are_rows=False), weights, column_grads)

    monkeypatch.setattr(ops, "backward", without_column_terms)
    case = make_case(B=4, d=3, seed=12)
    fn, inputs = make_checked_function(case, "torch", False)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
