"""torch.autograd.gradcheck of the public API's gradients in float64, for every temperature form.

The loss's gradient is defined with the weights ``w`` and the new state ``u`` held constant (SPEC.md),
so it is the derivative of the *frozen* objective: the loss with ``w``, ``u`` and the detached scales
``s_`` held at the evaluation point. The truth is the independent float64 oracle of the tests
(``family_oracle.global_oracle`` with ``frozen``: nothing from the package). The checked function's
forward evaluates that frozen oracle on its (perturbed) inputs; its backward is the package's: it
re-evaluates ``drrho_clip_loss`` at the saved point and returns its autograd gradients. gradcheck
compares them with finite differences of the frozen oracle, with respect to the embeddings, the
columns and each scale (``s_img`` and ``s_txt`` separately for the per-direction form).
"""
import dataclasses

import pytest
import torch

import drrho_kernels as dk
from family_oracle import global_oracle
from spec_oracle import make_case

BACKENDS = ["torch", "reference"] + (["cpp"] if "cpp" in dk.available_backends("cpu") else [])
FORMS = ("multiply_tau", "no_multiply_tau", "per_direction")


def make_checked_function(case, backend, distributed, form="multiply_tau"):
    """``(fn, inputs)``: ``fn(x, t, X, T, s_img, s_txt)`` is the frozen oracle forward, package backward."""
    kw = case.kwargs()
    refs = {k: kw[k] for k in ("ref_img", "ref_txt", "ref_img_all", "ref_txt_all")}
    u_img, u_txt = kw["u_img"].double(), kw["u_txt"].double()
    common = dict(offset=kw["offset"], gamma=kw["gamma"], eps=kw["eps"], rho=kw["rho"], backend=backend,
                  multiply_tau=form != "no_multiply_tau")

    def api_loss(x, t, X, T, s_img, s_txt):
        cols = dict(img_all=X, txt_all=T) if distributed else {}
        r = dict(refs) if distributed else dict(ref_img=refs["ref_img"], ref_txt=refs["ref_txt"])
        scale = (s_img, s_txt) if form == "per_direction" else s_img
        return dk.drrho_clip_loss(x, t, scale, u_img, u_txt, **cols, **r, **common)

    def oracle_case(x, t, X, T, s_img):
        fields = dict(img=x.detach(), txt=t.detach(), logit_scale=float(s_img))
        if distributed:
            fields.update(img_all=X.detach(), txt_all=T.detach())
        return dataclasses.replace(case, **fields)

    base = global_oracle(case, form=form, scale_txt=case.logit_scale * 1.3 if form == "per_direction" else None)
    frozen = {k: base[k] for k in ("u_img", "u_txt", "w_img", "w_txt", "s_img_", "s_txt_")}

    class Checked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t, X, T, s_img, s_txt):
            ctx.save_for_backward(x, t, X, T, s_img, s_txt)
            scale_txt = float(s_txt) if form == "per_direction" else None
            out = global_oracle(oracle_case(x, t, X, T, s_img), form=form, scale_txt=scale_txt, frozen=frozen)
            return torch.tensor(out["loss"], dtype=torch.float64)

        @staticmethod
        def backward(ctx, grad):
            leaves = [v.detach().requires_grad_() for v in ctx.saved_tensors]
            with torch.enable_grad():
                loss, _, _ = api_loss(*leaves)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            return tuple(None if g is None else grad * g for g in grads)

    x0, t0 = kw["img"], kw["txt"]
    X0 = kw["img_all"] if distributed else torch.zeros(1, x0.shape[1], dtype=torch.float64)
    T0 = kw["txt_all"] if distributed else torch.zeros(1, x0.shape[1], dtype=torch.float64)
    s_img = torch.tensor(base["s_img_"], dtype=torch.float64, requires_grad=True)
    s_txt = torch.tensor(base["s_txt_"], dtype=torch.float64, requires_grad=form == "per_direction")
    inputs = (x0.clone().requires_grad_(), t0.clone().requires_grad_(), X0.clone().requires_grad_(distributed),
              T0.clone().requires_grad_(distributed), s_img, s_txt)
    return Checked.apply, inputs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref,distributed", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["ref", "noref", "ref-dist-offset", "noref-dist-offset"])
def test_gradcheck(backend, ref, distributed, form):
    case = make_case(B=4, N=7 if distributed else None, d=3, dr=2, ref=ref, offset=2, seed=11, scale=3.0)
    fn, inputs = make_checked_function(case, backend, distributed, form)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    """The harness can fail: a backward that forgets the column terms (no fold) is caught."""
    from torch.autograd.gradcheck import GradcheckError

    from drrho_kernels.core import ops

    correct = ops.op
    position = 4 + [name for name, _ in ops._TILE_FIELDS].index("scalars")     # after the four gains
    flag = [name for name, _ in ops.TileInputs.OP_SCALARS].index("columns_are_rows")

    def without_column_terms(backend, which):
        real = correct(backend, which)
        if which != "bwd":
            return real

        def call(*args):
            # as if the rows were not also the columns: the fold (the column anchors' terms) is lost
            scalars = list(args[position])
            scalars[flag] = 0.0
            return real(*args[:position], scalars, *args[position + 1:])
        return call

    monkeypatch.setattr(ops, "op", without_column_terms)
    case = make_case(B=4, d=3, seed=12)
    fn, inputs = make_checked_function(case, "torch", False)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_detects_a_per_direction_scale_swap(monkeypatch):
    """The harness can tell the two scales apart: per-direction rows scaled by the other direction's s fail."""
    from torch.autograd.gradcheck import GradcheckError

    from drrho_kernels.loss import validate as _validate

    correct = _validate.row_scales

    def swapped(t, batch, acc):
        return correct(t, batch, acc).flip(0)

    monkeypatch.setattr(_validate, "row_scales", swapped)
    case = make_case(B=4, d=3, seed=13, scale=3.0)
    fn, inputs = make_checked_function(case, "torch", False, "per_direction")
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
