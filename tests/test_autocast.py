"""SPEC part 3.1: the loss inside ``torch.autocast``, as the users' training loops call it.

Under CUDA autocast ``F.normalize`` returns float32, so the embeddings reach the loss as float32 (on the
CPU autocast leaves a bfloat16 Linear's normalized output in bfloat16: here the float32 features are
built by hand, as CUDA hands them over). The contract: the tile products take the embeddings at the
autocast dtype, as ``torch.matmul`` does, and nothing else changes. The truth is the same call on the
embeddings cast by hand (the half path, itself checked against the oracle in test_conformance.py):
loss, new state and gradients must be *equal*, the gradients float32 (the embeddings' dtype), the state
float32; float64 is never downcast. Every form (global with and without a reference, per direction,
no multiply_tau, per-sample temperatures, distillation, per-sample outputs, columns given), the
selection, the module, both distributed schemes and a compiled step.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import drrho_kernels as dk
from drrho_kernels.core.inputs import TauOptions, TauState
from drrho_kernels.loss.functional import individual_clip_loss
from processes import spawn

BACKENDS = ["torch", "cpp", "triton", "reference"]
B, N, D, DR = 12, 20, 8, 6
TAU = TauOptions(lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, tau_min=0.01, tau_max=1.0, grad_clamp=5.0, epoch=1)


def _unit(n, d, g):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _data(seed=0, columns=False):
    """Correlated float32 pairs (each text near its image) and a reference model's embeddings."""
    g = torch.Generator().manual_seed(seed)
    n = N if columns else B
    img = _unit(n, D, g)
    txt = torch.nn.functional.normalize(img + 0.5 * _unit(n, D, g), dim=1)
    ref_img, ref_txt = _unit(n, DR, g), _unit(n, DR, g)
    u = torch.rand(2, B, generator=g) - 3.0
    return dict(img=img, txt=txt, ref_img=ref_img, ref_txt=ref_txt, u=u)


def _skip_unavailable(backend):
    if backend == "cpp" and "cpp" not in dk.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    if backend == "triton" and "triton" not in dk.available_backends("cpu"):
        pytest.skip("triton cannot run here (not installed, or TRITON_INTERPRET unset)")


FORMS = {
    "global-ref": dict(),
    "global-noref": dict(ref=False),
    "per_direction": dict(pair=True),
    "no_multiply_tau": dict(kw=dict(multiply_tau=False)),
    "distill": dict(kw=dict(distill_weight=0.5, distill_scale=60.0)),
    "per_sample": dict(kw=dict(return_per_sample=True)),
    "columns": dict(columns=True),
    "individual": dict(individual=True),
}


def _call(form, data, backend, half):
    """One evaluation; ``half``: the embeddings cast to it by hand (None: as they are). Returns the outputs
    and the leaves whose gradients count."""
    spec = FORMS[form]
    cast = (lambda x: x.to(half)) if half is not None else (lambda x: x)
    leaves = [data["img"].clone().requires_grad_(), data["txt"].clone().requires_grad_()]
    img, txt = cast(leaves[0]), cast(leaves[1])
    refs = dict(ref_img=cast(data["ref_img"]), ref_txt=cast(data["ref_txt"])) if spec.get("ref", True) else {}
    u_img, u_txt = data["u"][0].clone(), data["u"][1].clone()
    if spec.get("individual"):
        state = TauState(torch.full((2, B), 0.05), torch.zeros(2, B), torch.zeros(2, B), torch.zeros(2, B))
        out = individual_clip_loss(img, txt, u_img.exp(), u_txt.exp(), state, TAU, backend=backend, **refs)
        return (out[0], out[1], out[2], *out[3].tau), leaves
    scale = torch.tensor(14.0, requires_grad=True)
    leaves.append(scale)
    logit_scale = (scale, torch.tensor(9.0)) if spec.get("pair") else scale
    kw = dict(spec.get("kw", {}))
    if spec.get("columns"):       # a shard: rows 4..15 of the 20 columns, the columns with gradient
        cols = [cast(leaves[0]), cast(leaves[1])]       # rows and columns cast apart, as autocast casts them
        img, txt = cast(leaves[0][4:4 + B]), cast(leaves[1][4:4 + B])
        refs = dict(ref_img=refs["ref_img"][4:4 + B], ref_txt=refs["ref_txt"][4:4 + B],
                    img_all=cols[0], txt_all=cols[1], ref_img_all=refs["ref_img"], ref_txt_all=refs["ref_txt"],
                    offset=4)
    out = dk.drrho_clip_loss(img, txt, logit_scale, u_img, u_txt, backend=backend, **refs, **kw)
    if kw.get("return_per_sample"):
        return (out.loss, out.u_img, out.u_txt, *(v for v in out.per_sample if v is not None)), leaves
    return tuple(out), leaves


def _results(form, data, backend, half, autocast_dtype=None):
    if autocast_dtype is None:
        out, leaves = _call(form, data, backend, half)
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            out, leaves = _call(form, data, backend, half)
    grads = torch.autograd.grad(out[0], leaves)
    return [o.detach() for o in out], list(grads)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_embeddings_under_autocast_equal_the_half_call(backend, form):
    _skip_unavailable(backend)
    if backend == "reference" and form == "individual":
        pytest.skip("the dense reference states the global and per-direction forms only")
    data = _data(columns=form == "columns")
    got, got_grads = _results(form, data, backend, None, torch.bfloat16)
    want, want_grads = _results(form, data, backend, torch.bfloat16)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {k}: {a} vs {b}"
    for k, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert a.dtype == torch.float32, f"gradient {k} comes back as {a.dtype}, not the embeddings' float32"
        assert torch.equal(a, b.float()), f"gradient {k} differs from the call on inputs cast by hand"
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32       # the state stays float32
    # and autocast did change something: the float32 call (no autocast) differs
    plain, _ = _results(form, data, backend, None)
    assert not torch.equal(plain[0], got[0])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float16_autocast_and_float64_inputs(backend):
    _skip_unavailable(backend)
    data = _data()
    got, got_grads = _results("global-ref", data, backend, None, torch.float16)
    want, want_grads = _results("global-ref", data, backend, torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b.float()) for a, b in zip(got_grads, want_grads))
    # float64 is never downcast: under autocast the float64 call is the float64 call
    data64 = {k: v.double() if k != "u" else v for k, v in data.items()}
    a64, g64 = _results("global-ref", data64, backend, None, torch.bfloat16)
    b64, h64 = _results("global-ref", data64, backend, None)
    assert a64[0].dtype == torch.float64 and all(torch.equal(a, b) for a, b in zip(a64 + g64, b64 + h64))


def test_torch_backend_products_do_not_autocast_on_their_own():
    """Regression: under CPU autocast with a reference model the torch backend raised
    ``RuntimeError: self and mat2 must have the same dtype, but got BFloat16 and Float``; without one its
    loss silently changed (its own float32 products autocast)."""
    data = _data()
    for form in ("global-ref", "global-noref"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = _call(form, data, "torch", None)
        want, _ = _call(form, data, "torch", torch.bfloat16)
        assert torch.equal(out[0], want[0])
    # the op itself, called under autocast with float32 tiles, computes its products at bfloat16 once
    from drrho_kernels.core import ops
    from helpers import problem
    from spec_oracle import make_case
    p = problem(make_case(B=5, d=4), "torch", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats, _, _ = ops.forward("torch", p.tiles)
    x, t, xr, tr = (getattr(p.tiles, f).bfloat16() for f in ("img", "txt", "ref_img", "ref_txt"))
    half = dataclasses.replace(p.tiles, img=x, txt=t, img_all=x, txt_all=t, ref_img=xr, ref_txt=tr, ref_img_all=xr,
                               ref_txt_all=tr)
    assert torch.equal(stats, ops.forward("torch", half)[0]) and stats.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_selection_under_autocast(backend):
    _skip_unavailable(backend)
    d = _data()
    args = (d["img"], d["txt"], d["ref_img"], d["ref_txt"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dk.rho_select(*args, 10.0, filter_ratio=0.5, backend=backend)
        got_j = dk.jest_select(*args, 10.0, filter_ratio=0.5, n_chunks=3, topk=True, backend=backend,
                               generator=torch.Generator().manual_seed(1), return_scores=True)
    half = [a.bfloat16() for a in args]
    assert torch.equal(got, dk.rho_select(*half, 10.0, filter_ratio=0.5, backend=backend))
    want_j = dk.jest_select(*half, 10.0, filter_ratio=0.5, n_chunks=3, topk=True, backend=backend,
                            generator=torch.Generator().manual_seed(1), return_scores=True)
    assert torch.equal(got_j.indices, want_j.indices)
    assert all(torch.equal(a, b) for a, b in zip(got_j.conditional, want_j.conditional))


def _module_steps(backend, half, autocast, **kw):
    """Three module steps over the same samples (the state carries over), as the training loop takes them."""
    crit = dk.DRRhoCLIPLoss(40, gamma_schedule="constant", gamma=0.7, backend=backend, **kw)
    out = []
    for step in range(3):
        d = _data(seed=step)
        img = d["img"].clone().requires_grad_()
        cast = (lambda x: x.to(half)) if half else (lambda x: x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = crit(cast(img), cast(d["txt"]), torch.arange(B) * 3, None if kw else 12.0,
                        ref_img=cast(d["ref_img"]), ref_txt=cast(d["ref_txt"]))
        loss.backward()
        out += [loss.detach(), img.grad]
    return out + [b.clone() for b in crit.buffers()]


@pytest.mark.parametrize("form", ["global", "individual"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_module_steps_under_autocast(backend, form):
    _skip_unavailable(backend)
    kw = dict(temperature="individual") if form == "individual" else {}
    got = _module_steps(backend, None, True, **kw)
    want = _module_steps(backend, torch.bfloat16, False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(t.dtype == torch.float32 for t in got)


class _Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(16, D), torch.nn.Linear(12, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.3))

    def forward(self, pixels, tokens):
        # CUDA autocast hands the loss float32 features (F.normalize runs in float32 there): as here
        return (torch.nn.functional.normalize(self.image(pixels).float(), dim=1),
                torch.nn.functional.normalize(self.text(tokens).float(), dim=1), self.log_scale.exp())


def _training_step(model, crit, pixels, tokens, index):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, scale = model(pixels, tokens)
        loss = crit(img, txt, index, scale, ref_img=txt.detach(), ref_txt=img.detach())
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)
            p.grad = None
    return loss.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_compiled_training_step_under_autocast_matches_eager(backend):
    """The dispatcher's autocast implementation holds in a compiled step (aot_eager: inductor's own fusion of
    the towers' bfloat16 arithmetic is another question); the same casts, the same numbers."""
    _skip_unavailable(backend)
    torch.manual_seed(0)
    model = _Towers()
    crit = dk.DRRhoCLIPLoss(16, gamma=0.6, gamma_schedule="constant", rho=2.0, backend=backend)
    eager_model, eager_crit = copy.deepcopy(model), copy.deepcopy(crit)
    g = torch.Generator().manual_seed(3)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_training_step, fullgraph=True, backend="aot_eager")
        for _ in range(3):
            batch = (torch.randn(6, 16, generator=g), torch.randn(6, 12, generator=g),
                     torch.randperm(16, generator=g)[:6])
            loss_c, grads_c = compiled(model, crit, *batch)
            loss_e, grads_e = _training_step(eager_model, eager_crit, *batch)
            assert torch.equal(loss_c, loss_e) and all(torch.equal(a, b) for a, b in zip(grads_c, grads_e))
            assert torch.equal(crit.u_img, eager_crit.u_img) and torch.equal(crit.u_txt, eager_crit.u_txt)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# Both distributed schemes, W = 2 (gloo): under autocast equals the call on inputs cast by hand.

def _dist_worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for scheme in ("gather_u", "gather_grad"):
            for form in ("global", "distill", "individual"):
                kw = dict(distill_weight=0.5) if form == "distill" else {}
                kw.update(temperature="individual") if form == "individual" else None
                runs = []
                for autocast in (True, False):
                    crit = dk.DRRhoCLIPLoss(40, gamma_schedule="constant", gamma=0.7, backend="torch",
                                            process_group="world", distributed_scheme=scheme, **kw)
                    out = []
                    for step in range(2):
                        d = _data(seed=10 * step + rank)
                        img = d["img"].clone().requires_grad_()
                        cast = (lambda x: x) if autocast else (lambda x: x.bfloat16())
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                            loss = crit(cast(img), cast(d["txt"]), torch.arange(B) * 2 + rank,
                                        None if form == "individual" else 12.0, ref_img=cast(d["ref_img"]),
                                        ref_txt=cast(d["ref_txt"]))
                        loss.backward()
                        out += [loss.detach(), img.grad]
                    runs.append(out + [b.clone() for b in crit.buffers()])
                results[f"{scheme}-{form}"] = runs
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_schemes_under_autocast(tmp_path):
    spawn(_dist_worker, 2, str(tmp_path), timeout=240.0, what="autocast workers")
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(results) == 6
        for name, (got, want) in results.items():
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"rank {rank} {name}"
            assert got[1].dtype == torch.float32, name


# ------------------------------------------------------------------------------------------------
# The integrations under autocast.

def test_hugging_face_example_runs_under_autocast(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "train_hf_clip.py"
    spec = importlib.util.spec_from_file_location("train_hf_clip_amp", path)
    ex = importlib.util.module_from_spec(spec)
    sys.modules["train_hf_clip_amp"] = ex           # dataclasses look their module up there
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(ex)
        out = ex.main(["--quick", "--no-progress", "--precision", "amp_bf16", "--out", str(tmp_path)])
    finally:
        sys.modules.pop("train_hf_clip_amp", None)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert out["config"]["precision"] == "amp_bf16"
    assert all(0.0 <= out[k] <= 1.0 for k in ("target_plain_accuracy", "target_drrho_accuracy"))


def test_open_clip_adapter_under_autocast():
    """The open_clip adapter as open_clip's ``train_one_epoch`` calls it with ``--precision amp_bf16``: the
    model's features float32 (as CUDA autocast hands them over), the loss under autocast equals the loss
    on the features cast by hand."""
    from drrho_kernels.integrations.open_clip import DRRhoOpenCLIPLoss
    d = _data()
    runs = []
    for autocast in (True, False):
        loss_fn = DRRhoOpenCLIPLoss(40, backend="cpp" if "cpp" in dk.available_backends() else "torch",
                                    require_reference=False)
        img = d["img"].clone().requires_grad_()
        cast = (lambda x: x) if autocast else (lambda x: x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = dict(image_features=cast(img), text_features=cast(d["txt"]), logit_scale=torch.tensor(14.0))
            losses = loss_fn(**out, index=torch.arange(B), output_dict=True)
        total = sum(losses.values())
        total.backward()
        runs.append([total.detach(), img.grad, loss_fn.criterion.u_img.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
