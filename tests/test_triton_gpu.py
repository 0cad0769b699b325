"""The compiled Triton kernels on a CUDA GPU, at training sizes (part of the GPU command, docs/TESTING.md).

On a CUDA machine ``python -m pytest`` runs them (conftest turns the interpreter on only without a GPU);
``python -m pytest -m gpu`` runs these and the targets. The kernels run at their default tiles here
(``launch.pinned_tiles``: one compile per kernel variant, no autotuning; the timed targets autotune).

Inputs as training gives them: s = 100, each text near its image, a reference model. The checks
(tests/gpu_checks.py) compare the weighted products with the partner term separated, norm-wise and row
by row, against the float64 torch backend on the same rounded inputs; tests/test_gpu_checks.py proves,
without a GPU, that a half-wrong weighted product fails them. Every path: one process, a shard with the
columns' gradients (gather_grad) or the fold (gather_u, B = 640 against 5120: the column split),
distillation, per-sample outputs, per-direction and per-sample temperatures, the module over three steps
(state included), autocast with float32 features, a compiled step; the steady-state step under
``torch.cuda.set_sync_debug_mode("error")`` (SPEC 3.2), in one process and in a process group.
"""
from __future__ import annotations

import dataclasses
import socket
from datetime import timedelta

import pytest
import torch

import drrho_kernels as dk
import gpu_checks as gc

triton = pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True, scope="module")
def _compiled_kernels_at_default_tiles():
    from drrho_kernels.backends.triton import launch
    if launch.interpreting():
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test the compiled kernels")
    with launch.pinned_tiles():
        yield


IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ALL = [torch.bfloat16, torch.float32, torch.float16]


def _cuda(inputs: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------------
# The weighted products, partner term separated.

SHAPES = {
    "one-B4096-d512": (4096, None, 512, 512, {}),
    "rank-B640-N5120-d512-fold": (640, 5120, 512, 512, dict(fold=True)),              # gather_u, split
    "shard-B1000-N3001-d1000-dr333-columns": (1000, 3001, 1000, 333, dict(column_grads=True)),    # odd, gather_grad
}


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: IDS[d])
@pytest.mark.parametrize("name", list(SHAPES))
def test_weighted_products(name, dtype):
    B, N, d, dr, kind = SHAPES[name]
    gc.check_weighted_products(_cuda(gc.training_inputs(B, N, d, dr, seed=1)), dtype, **kind)


@pytest.mark.parametrize("form", ["distill", "per_direction"])
@pytest.mark.parametrize("name", ["one-B4096-d512", "rank-B640-N5120-d512-fold"])
def test_weighted_products_of_the_other_forms(name, form):
    B, N, d, dr, kind = SHAPES[name]
    extra = dict(distill_weight=0.5) if form == "distill" else dict(scale_txt=60.0)
    gc.check_weighted_products(_cuda(gc.training_inputs(B, N, d, dr, seed=2)), torch.bfloat16, **kind, **extra)


# ------------------------------------------------------------------------------------------------
# Whole steps.

@pytest.mark.parametrize("form", ["plain", "per_sample", "distill", "per_direction"])
def test_step(form):
    kw = {"per_sample": dict(return_per_sample=True), "distill": dict(distill_weight=0.5),
          "per_direction": dict(scale_txt=60.0)}.get(form, {})
    gc.check_step(_cuda(gc.training_inputs(2048, None, 512, 512, seed=3)), torch.bfloat16, **kw)


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=lambda d: IDS[d])
@pytest.mark.parametrize("shape", [(2048, None), (640, 5120)], ids=["one-process", "rank"])
def test_step_under_autocast_with_float32_features(shape, autocast):
    """As open_clip (amp_bf16) and the authors' train.py (amp, float16) call the loss: float32 features
    inside autocast; the truth is the float64 call on the features rounded to the autocast dtype."""
    B, N = shape
    gc.check_step(_cuda(gc.training_inputs(B, N, 512, 512, seed=4)), torch.float32, autocast=autocast)


def _batches(n_steps=3, B=1024, seed=5):
    out = []
    for step in range(n_steps):
        inputs = gc.training_inputs(B, None, 512, 512, seed=seed + step)
        out.append((inputs, torch.randperm(10 * B, generator=torch.Generator().manual_seed(step))[:B]))
    return out


def _module_run(crit, batches, dtype, device, scale=True):
    losses, grads = [], []
    for step, (inputs, index) in enumerate(batches):
        crit.set_epoch(step)
        img = inputs["img"].to(device, dtype).requires_grad_()
        loss = crit(img, inputs["txt"].to(device, dtype), index, gc.S_TRAIN if scale else None,
                    ref_img=inputs["ref_img"].to(device, dtype), ref_txt=inputs["ref_txt"].to(device, dtype))
        loss.backward()
        losses.append(loss.detach().double().cpu())
        grads.append(img.grad.double().cpu())
    return losses, grads, {k: v.double().cpu() for k, v in crit.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("temperature", ["global", "individual"])
def test_module_three_steps_state_included(temperature):
    """Three steps of the module (cosine gamma schedule over epochs 0..2) on the GPU in bfloat16 against the
    same module with the float64 torch backend on the CPU: losses, gradients and the whole state."""
    batches = [({k: v.to(torch.bfloat16).double() for k, v in inp.items()}, idx) for inp, idx in _batches()]
    kw = dict(temperature=temperature, gamma_decay_epochs=3)
    got = _module_run(dk.DRRhoCLIPLoss(10240, backend="triton", **kw), batches, torch.bfloat16, "cuda",
                      scale=temperature == "global")
    want = _module_run(dk.DRRhoCLIPLoss(10240, backend="torch", **kw), batches, torch.float64, "cpu",
                       scale=temperature == "global")
    for a, b in zip(got[0], want[0]):
        assert gc.errors(a.reshape(1), b.reshape(1))[0] <= 1e-3
    for step, (a, b) in enumerate(zip(got[1], want[1])):
        gc.assert_close(a, b, torch.bfloat16, f"step {step} d_img")
    for name in want[2]:
        if name in ("u_img", "u_txt"):
            err = gc.errors(got[2][name], want[2][name])[0]
            assert err <= 1e-3, f"state {name}: {err:.2e}"
        else:   # the temperatures' Adam steps follow the sign of gradients near 0: a few entries may differ
            a, b = got[2][name], want[2][name]
            off = ((a - b).abs() > 1e-3 * b.abs().clamp_min(1e-3)).double().mean()
            assert off <= 0.01, f"state {name}: {float(off):.1%} of the entries differ"


def _step_fn(crit, inputs, index):
    img = inputs["img"].detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = crit(img, inputs["txt"], index, torch.tensor(gc.S_TRAIN, device="cuda"), ref_img=inputs["ref_img"],
                    ref_txt=inputs["ref_txt"])
    loss.backward()
    return loss.detach(), img.grad


def test_compiled_step_under_autocast_matches_eager():
    inputs = {k: v.float().cuda() for k, v in gc.training_inputs(1024, None, 512, 512, seed=6).items()}
    index = torch.arange(1024)
    crit_c, crit_e = (dk.DRRhoCLIPLoss(4096, backend="triton", gamma_schedule="constant") for _ in range(2))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_step_fn, fullgraph=True, backend="aot_eager")
        for _ in range(2):
            loss_c, grad_c = compiled(crit_c, inputs, index)
            loss_e, grad_e = _step_fn(crit_e, inputs, index)
            assert torch.equal(loss_c, loss_e) and torch.equal(grad_c, grad_e)
            assert torch.equal(crit_c.u_img, crit_e.u_img)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# SPEC 3.2: the steady-state step reads nothing from the device and copies nothing synchronously.

def _steady_state_steps(crit, n=3, B=1024):
    for step, (inputs, index) in enumerate(_batches(n, B)):
        inputs = {k: v.float().cuda() for k, v in inputs.items()}
        img = inputs["img"].requires_grad_()
        scale = torch.tensor(gc.S_TRAIN, device="cuda", requires_grad=True)
        args = (img, inputs["txt"], index, None if crit.temperature == "individual" else scale)
        if step == n - 1:                        # the first steps compile, decide the splits, move the state
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = crit(*args, ref_img=inputs["ref_img"], ref_txt=inputs["ref_txt"])
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                crit(*args, ref_img=inputs["ref_img"], ref_txt=inputs["ref_txt"]).backward()
    torch.cuda.synchronize()


@pytest.mark.parametrize("config", ["global", "individual", "state_on_cpu"])
def test_steady_state_step_never_syncs(config):
    kw = dict(temperature="individual") if config == "individual" else {}
    if config == "state_on_cpu":
        kw["state_device"] = "cpu"
    crit = dk.DRRhoCLIPLoss(20480, backend="triton", **kw)
    _steady_state_steps(crit)
    crit.complete_state_writes()
    assert bool((crit.u_img != 0).any())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["gather_u", "gather_grad"])
def test_steady_state_step_in_a_process_group_never_syncs(scheme):
    """NCCL, one rank: the ranks' agreement runs over a gloo group of host tensors, the indices go to the
    GPU through pinned memory; the step never waits on the device."""
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60), device_id=torch.device("cuda", 0))
    try:
        for sharding in ("replicated", "sharded"):
            crit = dk.DRRhoCLIPLoss(20480, backend="triton", process_group="world", distributed_scheme=scheme,
                                    state_sharding=sharding)
            _steady_state_steps(crit)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Numerics and memory at the edges.

def test_fp16_weights_beyond_65504_at_large_n():
    """B = 8 rows against N = 65536 columns with a low stored u: weights far above float16's 65504."""
    inputs = _cuda(gc.training_inputs(8, 65536, 64, 32, seed=7))
    got_p = gc.problem(inputs, torch.float16, "triton", u=-30.0, gamma=0.01)
    want_p = gc.problem(gc.rounded(inputs, torch.float16), torch.float64, "torch", u=-30.0, gamma=0.01)
    got, want = gc.weighted_products(got_p, column_grads=True), gc.weighted_products(want_p, column_grads=True)
    for k in want:
        assert torch.isfinite(got[k]).all(), k
        gc.assert_close(got[k], want[k], torch.float16, k)


def test_deterministic_and_no_bn_allocation():
    """Bitwise-equal gradients on repeat, and peak memory far below one [B, N] float32 matrix."""
    B = 8192
    inputs = {k: v.to("cuda", torch.bfloat16) for k, v in gc.training_inputs(B, None, 512, 512, seed=8).items()}

    def grads():
        x, t = inputs["img"].clone().requires_grad_(), inputs["txt"].clone().requires_grad_()
        u = torch.zeros(B, device="cuda")
        dk.drrho_clip_loss(x, t, gc.S_TRAIN, u, u, ref_img=inputs["ref_img"], ref_txt=inputs["ref_txt"],
                           backend="triton")[0].backward()
        return x.grad, t.grad
    a = grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    b = grads()
    peak = torch.cuda.max_memory_allocated() - before
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert peak < B * B * 4 / 2, f"peak extra memory {peak} B (one [B, B] float32 matrix is {B * B * 4} B)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: IDS[d])
def test_transposed_forward_vs_two_direction(dtype):
    """One process: the transposed forward (each tile once) against the two-direction kernel on the same
    inputs: the same float32 accumulation, other summation orders; deterministic."""
    from drrho_kernels.backends.triton import forward, forward_transposed
    p = gc.problem(_cuda(gc.training_inputs(4096, None, 512, 512, seed=9)), dtype, "triton")
    k = gc._detached(p.tiles)
    got = forward_transposed.forward_transposed(k)
    want = forward.forward(dataclasses.replace(k, columns_are_rows=False))
    again = forward_transposed.forward_transposed(k)
    for name, a, b, c in zip(("stats", "margin"), got, want, again):
        assert torch.equal(a, c), f"{name}: not deterministic"
        assert gc.errors(a.double().reshape(-1), b.double().reshape(-1))[0] <= 1e-4, name
