"""Small test utilities shared by the test files (no package logic here): the one relative error, and
evaluations of the public API on an oracle's :class:`spec_oracle.Case`."""
from __future__ import annotations

import math

import numpy as np
import torch

import drrho_kernels as dk
from spec_oracle import Case, array, oracle


def run_backend(case: Case, backend: str, dtype=torch.float64, scale_grad=True):
    """Evaluate the public API on a case; return the loss, u and all gradients as float64 NumPy."""
    kw = case.kwargs(dtype=dtype, requires_grad=True)
    img, txt = kw.pop("img"), kw.pop("txt")
    u_img, u_txt = kw.pop("u_img"), kw.pop("u_txt")
    if dtype == torch.float64:
        u_img, u_txt = u_img.double(), u_txt.double()
    s = torch.tensor(case.logit_scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     requires_grad=scale_grad)
    loss, u_img_new, u_txt_new = dk.drrho_clip_loss(img, txt, s, u_img, u_txt, backend=backend, **kw)
    leaves = [img, txt, s]
    if kw["img_all"] is not None:
        leaves += [kw["img_all"], kw["txt_all"]]
    grads = torch.autograd.grad(loss, leaves)
    out = dict(loss=loss.item(), u_img=u_img_new.double().numpy(), u_txt=u_txt_new.double().numpy(),
               d_img=grads[0].double().numpy(), d_txt=grads[1].double().numpy(), d_s=grads[2].item(),
               loss_dtype=loss.dtype, grad_dtype=grads[0].dtype, u_dtype=u_img_new.dtype)
    if len(grads) > 3:
        out.update(d_img_all=grads[3].double().numpy(), d_txt_all=grads[4].double().numpy())
    return out


def rel_err(got, want, dtype=None) -> float:
    """Norm-wise relative error ``|got - want| / |want|`` of arrays, tensors or numbers, in float64 (absolute
    where ``want`` is 0). With a half ``dtype`` (the gradients' dtype), entries whose true value lies below
    the dtype's smallest normal number count as 0."""
    got, want = array(got), array(want)
    if dtype in (torch.float16, torch.bfloat16):
        tiny = torch.finfo(dtype).tiny
        got, want = np.where(np.abs(want) < tiny, 0.0, got), np.where(np.abs(want) < tiny, 0.0, want)
        if not np.any(want):
            return float(np.linalg.norm(got)) / (tiny * math.sqrt(want.size))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def compare(result: dict, case: Case, *, loss_tol: float, grad_tol: float, u_tol: float) -> dict:
    """Assert a backend result matches the oracle; return the errors for reporting."""
    want = oracle(case)
    errs = {k: rel_err(result[k], want[k]) for k in want if k in result}
    for key, err in errs.items():
        tol = loss_tol if key == "loss" else u_tol if key.startswith("u_") else grad_tol
        assert err <= tol, f"{key}: relative error {err:.3e} > {tol:.1e} (all: {errs})"
    return errs


def problem(case: Case, backend: str, dtype=torch.float64, device="cpu", requires_grad=False, **options):
    """The checked problem (``LossInputs``) of a case, as ``drrho_clip_loss`` builds it, on ``device``
    (``options``: more of ``check_options``'s keywords, e.g. ``distill_weight``, ``per_sample``)."""
    from drrho_kernels.loss.functional import resolved
    from drrho_kernels.loss.validate import check_options, validate
    kw = case.kwargs(dtype=dtype, requires_grad=requires_grad)
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            kw[k] = v.to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw["u_img"], kw["u_txt"] = kw["u_img"].to(acc), kw["u_txt"].to(acc)
    s = torch.tensor(float(case.logit_scale), dtype=acc, device=device, requires_grad=requires_grad)
    opts = check_options(gamma=kw.pop("gamma"), eps=kw.pop("eps"), rho=kw.pop("rho"), backend=backend, **options)
    return resolved(validate(kw.pop("img"), kw.pop("txt"), s, kw.pop("u_img"), kw.pop("u_txt"), opts, **kw))


def detached(tiles):
    """A ``TileInputs`` with its tensors detached (what the forward op receives)."""
    from dataclasses import replace
    return replace(tiles, **{k: v.detach() for k, v in vars(tiles).items() if isinstance(v, torch.Tensor)})
