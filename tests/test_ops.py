"""The fused ops as dispatcher ops, for every fused backend that can run here.

- ``torch.library.opcheck`` (schema, fake implementation, autograd registration, AOT dispatch with
  dynamic shapes) on ``drrho::<backend>_fwd``, ``drrho::<backend>_bwd`` and the shared
  ``drrho::loss`` (whose registered autograd calls the backend's ``_bwd``), on small float64 and
  float32 inputs in every mode: single process with and without reference, distributed shapes with
  an offset, column gradients, and the fold of gathered column state; half inputs too.
- The schemas: one definition (``ops.py``, derived from the fields of ``TileInputs`` and
  ``Weights``); every backend's ops carry it.
- ``torch.compile(fullgraph=True)`` of a whole training step (tiny linear image/text encoders, the
  loss, backward and an SGD update) for every fused backend, through the module and through the
  functional API: no graph break, and the loss, gradients, new state and new parameters match eager.

Backends: ``torch`` always; ``cpp`` when the extension is built; ``triton`` when it can run on CPU
tensors (``TRITON_INTERPRET=1``, set by conftest.py without a GPU). Others are skipped with the reason.
"""
from __future__ import annotations

import copy

import pytest
import torch

import drrho_kernels as dk
from drrho_kernels import backends
from drrho_kernels.core import ops
from drrho_kernels.core.inputs import as_args
from drrho_kernels.backends import cpp
from drrho_kernels.loss.functional import fused_terms
from helpers import detached, problem
from spec_oracle import make_case

CPU = torch.device("cpu")


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot be checked here, or None."""
    if name == "cpp" and cpp.load() is None:
        return f"C++ extension not built ({cpp.load_error()})"
    if name == "triton" and not backends.triton_usable(CPU):
        return "triton cannot run on CPU tensors here (not installed, or TRITON_INTERPRET unset)"
    return None


FUSED = [pytest.param(n, id=n, marks=pytest.mark.skipif(_unavailable(n) is not None, reason=_unavailable(n) or ""))
         for n in ("torch", "cpp", "triton")]
for _name in ("torch", "cpp", "triton"):       # register the ops of every backend checked here (ops.op looks them up)
    if _unavailable(_name) is None:
        backends.resolve(_name, CPU)

# mode -> make_case arguments
MODES = {
    "single-ref": dict(B=5, d=4, dr=3),
    "single-noref": dict(B=5, d=4, ref=False),
    "dist-ref": dict(B=4, N=9, d=4, dr=6, offset=3),
    "dist-noref": dict(B=4, N=9, d=4, ref=False, offset=5),
}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
# the extra statistics and the distillation weights (SPEC 2.2, 2.3)
EXTRA = dict(distill_weight=0.5, distill_scale=30.0, per_sample=True)


def backend_dtypes(dtypes: dict):
    """``(backend, dtype)`` parameters of the fused backends, ids ``<backend>-<dtype>``; no Triton x float64:
    Triton has no float64 kernels (float64 resolves to the torch backend: test_conformance.py's
    test_float64_on_triton_resolves_to_torch)."""
    return [pytest.param(p.values[0], dtype, marks=p.marks, id=f"{p.values[0]}-{name}") for p in FUSED
            for name, dtype in dtypes.items() if not (p.values[0] == "triton" and dtype == torch.float64)]


def fwd_args(backend, mode, dtype, extra=False):
    p = problem(make_case(**MODES[mode]), backend, dtype, **(EXTRA if extra else {}))
    return as_args(detached(p.tiles))


def weights_of(backend, mode, dtype, variant, extra=False):
    """The problem, its forward terms and the backward's weights: ``variant`` "rows" (no column terms),
    "columns" (column_grads) or "fold" (column state given: the rows' own in one process, gathered
    values of the right shape otherwise)."""
    p = problem(make_case(**MODES[mode]), backend, dtype, **(EXTRA if extra else {}))
    terms = fused_terms(p)
    if variant == "fold" and not p.tiles.columns_are_rows:
        N = p.n_columns
        g = torch.Generator().manual_seed(1)
        noise = lambda *shape: torch.randn(*shape, generator=g, dtype=terms.margin.dtype) * 0.1   # noqa: E731
        cols = {}
        if terms.distill:
            cols = dict(col_lse_q=terms.extras["lse_q"].mean() + noise(2, N),
                        col_lse_p=terms.extras["lse_p"].mean() + noise(2, N))
        weights = terms.weights(col_scale=p.tiles.scale[:, :1].expand(2, N).detach() + noise(2, N).abs(),
                                col_log_norm=terms.u_new.mean() + noise(2, N), col_margin=noise(N), **cols)
    else:
        weights = terms.weights()
    return p, terms, weights


def bwd_args(backend, mode, dtype, variant, extra=False):
    p, terms, weights = weights_of(backend, mode, dtype, variant, extra)
    gain = 0.75 * p.tiles.scale.detach()
    col_gain = None if weights.col_scale is None else 0.75 * weights.col_scale
    dgain = -0.3 * p.tiles.scale.detach() if extra else None
    col_dgain = None if not extra or weights.col_scale is None else -0.3 * weights.col_scale
    return (gain, col_gain, dgain, col_dgain, *as_args(detached(p.tiles)), *as_args(weights), variant == "columns")


def loss_args(backend, mode, dtype, variant, extra=False):
    p, terms, weights = weights_of(backend, mode, dtype, variant, extra)
    h = (terms.extras["h"], terms.extras["h_ds"]) if extra else (None, None)
    p = problem(make_case(**MODES[mode]), backend, dtype, requires_grad=True, **(EXTRA if extra else {}))
    if variant == "rows":        # columns without gradient (the gather_u shape)
        from dataclasses import replace
        p = replace(p, tiles=replace(p.tiles, img_all=p.tiles.img_all.detach(), txt_all=p.tiles.txt_all.detach()))
    return ops.loss_args(backend, terms.wdsum, p.tiles, weights, u_new=terms.u_new, temperature=p.temperature,
                         rho=p.options.rho, distill_weight=p.options.distill_weight, wsum=terms.wsum,
                         h=h[0], h_ds=h[1])


def test_one_schema_for_every_backend():
    """The schemas are derived once from the inputs' fields; every backend's ops carry them."""
    assert ops.TILE_ARGS.startswith("Tensor img, Tensor txt, Tensor img_all, Tensor txt_all, Tensor? ref_img")
    for name in [p.values[0] for p in FUSED if _unavailable(p.values[0]) is None]:
        backends.resolve(name, CPU)                      # imports (registers) the backend
        for which, schema in (("fwd", ops.FWD_SCHEMA), ("bwd", ops.BWD_SCHEMA)):
            registered = ops.op(name, which)._schema
            assert str(registered) == str(torch._C.parse_schema(f"drrho::{name}_{which}{schema}"))
    assert str(torch.ops.drrho.loss.default._schema) == str(torch._C.parse_schema(f"drrho::loss{ops.LOSS_SCHEMA}"))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES))
def test_opcheck_forward(backend, mode, dtype):
    torch.library.opcheck(ops.op(backend, "fwd"), fwd_args(backend, mode, dtype))


BWD_CASES = [("single-ref", "fold"), ("single-noref", "fold"), ("dist-ref", "rows"), ("dist-ref", "columns"),
             ("dist-noref", "columns"), ("dist-ref", "fold")]


@pytest.mark.parametrize("mode,variant", BWD_CASES, ids=[f"{m}-{v}" for m, v in BWD_CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES))
def test_opcheck_backward(backend, mode, variant, dtype):
    torch.library.opcheck(ops.op(backend, "bwd"), bwd_args(backend, mode, dtype, variant))


@pytest.mark.parametrize("mode,variant", [("single-ref", "fold"), ("dist-ref", "columns"), ("dist-ref", "fold"),
                                          ("dist-noref", "rows")], ids=lambda v: v)
@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES))
def test_opcheck_loss(backend, mode, variant, dtype):
    """The op with autograd: its backward (the backend's _bwd) under opcheck's autograd and AOT tests."""
    torch.library.opcheck(torch.ops.drrho.loss.default, loss_args(backend, mode, dtype, variant))


EXTRA_CASES = [("single-ref", "fold"), ("dist-ref", "columns"), ("dist-ref", "fold"), ("dist-ref", "rows")]


@pytest.mark.parametrize("mode,variant", EXTRA_CASES, ids=[f"{m}-{v}" for m, v in EXTRA_CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtypes(DTYPES))
def test_opcheck_with_distillation_and_per_sample_statistics(backend, mode, variant, dtype):
    """The ops with the extra statistics (K = 12) and the distillation weights (dgain, lse_q, lse_p)."""
    args = fwd_args(backend, mode, dtype, extra=True)          # first: it registers the ops
    torch.library.opcheck(ops.op(backend, "fwd"), args)
    torch.library.opcheck(ops.op(backend, "bwd"), bwd_args(backend, mode, dtype, variant, extra=True))
    torch.library.opcheck(torch.ops.drrho.loss.default, loss_args(backend, mode, dtype, variant, extra=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("mode,variant", [("single-ref", "fold"), ("dist-ref", "columns")],
                         ids=["single-ref-fold", "dist-ref-columns"])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_half_inputs(backend, mode, variant, dtype):
    """Half inputs: float32 statistics from the forward, gradients in the input dtype from the backward."""
    torch.library.opcheck(ops.op(backend, "fwd"), fwd_args(backend, mode, dtype))
    torch.library.opcheck(ops.op(backend, "bwd"), bwd_args(backend, mode, dtype, variant))


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


@pytest.mark.slow        # torch.compile: seconds per backend, ~15 s for the first compilation of a process
@pytest.mark.parametrize("backend", FUSED)
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


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
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
