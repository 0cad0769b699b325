"""The fused op pairs as dispatcher ops, for every fused backend that can run here.

- ``torch.library.opcheck`` on ``drrho::<backend>_fwd`` and ``drrho::<backend>_bwd`` (schema, fake
  implementation, autograd registration, AOT dispatch with dynamic shapes) on small float64 and
  float32 inputs in every mode: single process with and without reference, distributed shapes with
  an offset, column gradients, and the fold of gathered column state.
- ``torch.compile(fullgraph=True)`` of a whole training step (tiny linear image/text encoders, the
  loss, backward and an SGD update) for the torch and cpp backends, through the module and through
  the functional API: no graph break, and the loss, gradients, new state and new parameters match
  eager.

Backends: ``torch`` always; ``cpp`` when the extension is built; ``triton`` when
``drrho_kernels.backends.triton`` exists and can run on CPU tensors (``TRITON_INTERPRET=1``, set by
conftest.py). Others are skipped with the reason.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import drrho_kernels as dk
from drrho_kernels import backends
from drrho_kernels.backends import cpp
from spec_oracle import make_case

CPU = torch.device("cpu")


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot be checked here, or None."""
    if name == "cpp" and cpp.load() is None:
        return f"C++ extension not built ({cpp.load_error()})"
    if name == "triton":
        if importlib.util.find_spec("drrho_kernels.backends.triton") is None:
            return "drrho_kernels.backends.triton does not exist"
        if not backends.triton_usable(CPU):
            return "triton cannot run on CPU tensors here (not installed, or TRITON_INTERPRET unset)"
    return None


def _backend_params(names):
    return [pytest.param(n, id=n, marks=pytest.mark.skipif(_unavailable(n) is not None,
                                                             reason=_unavailable(n) or "")) for n in names]


FUSED = _backend_params(["torch", "cpp", "triton"])
COMPILED = _backend_params(["torch", "cpp", "triton"])   # triton: the interpreter on CPU tensors

# mode -> make_case arguments
MODES = {
    "single-ref": dict(B=5, d=4, dr=3),
    "single-noref": dict(B=5, d=4, ref=False),
    "dist-ref": dict(B=4, N=9, d=4, dr=6, offset=3),
    "dist-noref": dict(B=4, N=9, d=4, ref=False, offset=5),
}
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def fwd_args(mode: str, dtype: torch.dtype, requires_grad: bool = True, seed: int = 0):
    """Arguments of ``<backend>_fwd`` as ``drrho_clip_loss`` passes them (single process: img_all is img)."""
    case = make_case(**MODES[mode], seed=seed)
    kw = case.kwargs(dtype=dtype, requires_grad=requires_grad)
    single = kw["img_all"] is None
    img, txt = kw["img"], kw["txt"]
    X, T = (img, txt) if single else (kw["img_all"], kw["txt_all"])
    ri, rt = kw["ref_img"], kw["ref_txt"]
    Xr, Tr = (ri, rt) if single else (kw["ref_img_all"], kw["ref_txt_all"])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(case.logit_scale, dtype=acc, requires_grad=requires_grad)
    return (img, txt, X, T, ri, rt, Xr, Tr, s, kw["u_img"], kw["u_txt"], case.offset, case.gamma, case.eps, single)


def bwd_args(fwd, mode: str, dtype: torch.dtype, variant: str):
    """Arguments of ``<backend>_bwd`` from a forward: ``variant`` is "rows" (no column terms), "columns"
    (column_grads) or "fold" (column state given: the rows' own in one process, gathered otherwise)."""
    args = fwd_args(mode, dtype, requires_grad=False)
    phi, u_img, u_txt, margin, wsum_img, wsum_txt = fwd(*args)
    single = args[-1]
    B = args[0].shape[0]
    if variant == "fold":
        if single:
            col = (u_img, u_txt, margin)
        else:   # the gathered state of all N anchors (any values of the right shape exercise the op)
            N = args[2].shape[0]
            g = torch.Generator().manual_seed(1)
            col = tuple(torch.randn(N, generator=g, dtype=u_img.dtype) * 0.1 + v.mean() for v in (u_img, u_txt, margin))
    else:
        col = (None, None, None)
    grad_phi = torch.tensor(0.75, dtype=phi.dtype)
    assert B == u_img.shape[0]
    return (grad_phi, *args[:9], u_img, u_txt, margin, wsum_img, wsum_txt, *col, args[11], single,
            variant == "columns")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_forward(backend, mode, dtype):
    fwd, _ = backends.fused_ops(backend)
    torch.library.opcheck(fwd, fwd_args(mode, dtype))


BWD_CASES = [("single-ref", "fold"), ("single-noref", "fold"), ("dist-ref", "rows"), ("dist-ref", "columns"),
             ("dist-noref", "columns"), ("dist-ref", "fold")]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("mode,variant", BWD_CASES, ids=[f"{m}-{v}" for m, v in BWD_CASES])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_backward(backend, mode, variant, dtype):
    fwd, bwd = backends.fused_ops(backend)
    torch.library.opcheck(bwd, bwd_args(fwd, mode, dtype, variant))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("mode,variant", [("single-ref", "fold"), ("dist-ref", "columns")],
                         ids=["single-ref-fold", "dist-ref-columns"])
@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_half_inputs(backend, mode, variant, dtype):
    """Half inputs: float32 statistics from the forward, gradients in the input dtype from the backward."""
    fwd, bwd = backends.fused_ops(backend)
    torch.library.opcheck(fwd, fwd_args(mode, dtype))
    torch.library.opcheck(bwd, bwd_args(fwd, mode, dtype, variant))


# --------------------------------------------------------------------------------------------------
# torch.compile of a training step


class TinyCLIP(torch.nn.Module):
    """Linear image and text encoders with L2-normalized outputs and a learned logit scale."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(16, 8)
        self.text = torch.nn.Linear(12, 8)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.3))

    def forward(self, pixels, tokens):
        img = torch.nn.functional.normalize(self.image(pixels), dim=1)
        txt = torch.nn.functional.normalize(self.text(tokens), dim=1)
        return img, txt, self.log_scale.exp()


def _sgd_(model, lr=0.5):
    # torch.optim optimizers break the graph on purpose in step() (see torch/optim/optimizer.py,
    # _use_grad); a plain in-place update is the same SGD step and traces into the graph.
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)


def _module_step(model, crit, pixels, tokens, index):
    img, txt, scale = model(pixels, tokens)
    loss = crit(img, txt, index, scale)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    _sgd_(model)
    for p in model.parameters():
        p.grad = None
    return loss.detach(), grads


def _functional_step(model, backend, pixels, tokens, u_img, u_txt):
    img, txt, scale = model(pixels, tokens)
    loss, u_img_new, u_txt_new = dk.drrho_clip_loss(img, txt, scale, u_img, u_txt, gamma=0.6, rho=2.0,
                                                    backend=backend)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    _sgd_(model)
    for p in model.parameters():
        p.grad = None
    return loss.detach(), grads, u_img_new, u_txt_new


def _batches(n_steps=3, batch=6, data_size=16):
    g = torch.Generator().manual_seed(3)
    for _ in range(n_steps):
        yield (torch.randn(batch, 16, generator=g), torch.randn(batch, 12, generator=g),
               torch.randperm(data_size, generator=g)[:batch])


TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_module_training_step_matches_eager(backend):
    torch.manual_seed(0)
    model = TinyCLIP()
    crit = dk.DRRhoCLIPLoss(16, gamma=0.6, gamma_schedule="constant", rho=2.0, backend=backend)
    eager_model, eager_crit = copy.deepcopy(model), copy.deepcopy(crit)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):   # lets Dynamo trace loss.backward()
        compiled = torch.compile(_module_step, fullgraph=True)
        for pixels, tokens, index in _batches():
            loss_c, grads_c = compiled(model, crit, pixels, tokens, index)
            loss_e, grads_e = _module_step(eager_model, eager_crit, pixels, tokens, index)
            torch.testing.assert_close(loss_c, loss_e, **TOL)
            for gc, ge in zip(grads_c, grads_e):
                torch.testing.assert_close(gc, ge, **TOL)
            torch.testing.assert_close(crit.u_img, eager_crit.u_img, **TOL)
            torch.testing.assert_close(crit.u_txt, eager_crit.u_txt, **TOL)
            for pc, pe in zip(model.parameters(), eager_model.parameters()):
                torch.testing.assert_close(pc, pe, **TOL)
    assert bool((crit.u_img != 0).any())


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_functional_training_step_matches_eager(backend):
    torch.manual_seed(0)
    model = TinyCLIP()
    eager_model = copy.deepcopy(model)
    u_img_c = u_txt_c = u_img_e = u_txt_e = torch.zeros(6)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_functional_step, fullgraph=True)
        for pixels, tokens, _ in _batches():
            loss_c, grads_c, u_img_c, u_txt_c = compiled(model, backend, pixels, tokens, u_img_c, u_txt_c)
            loss_e, grads_e, u_img_e, u_txt_e = _functional_step(eager_model, backend, pixels, tokens, u_img_e,
                                                                 u_txt_e)
            torch.testing.assert_close(loss_c, loss_e, **TOL)
            torch.testing.assert_close(u_img_c, u_img_e, **TOL)
            torch.testing.assert_close(u_txt_c, u_txt_e, **TOL)
            for gc, ge in zip(grads_c, grads_e):
                torch.testing.assert_close(gc, ge, **TOL)
    for pc, pe in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(pc, pe, **TOL)
