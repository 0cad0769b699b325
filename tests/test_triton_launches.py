"""Where and how the Triton kernels launch (interpreter; no GPU needed).

- Every launch of a forward or backward op runs under its tensors' device (SPEC 3.2): a notebook whose
  current device is 0, or a reference model on a second GPU, must not run the kernels of tensors on
  ``cuda:1`` on GPU 0. Two GPUs are never available here, so the device guard is replaced by a recorder
  and every launch must happen inside it, for the tensors' device.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import drrho_kernels as dk

pytest.importorskip("triton")
if "triton" not in dk.available_backends("cpu"):
    pytest.skip("Triton's interpreter is not on (TRITON_INTERPRET=1)", allow_module_level=True)

from drrho_kernels.backends.triton import backward, forward, forward_transposed, launch  # noqa: E402


@pytest.fixture
def recorded_launches(monkeypatch):
    """Replace the device guard by a recorder; every kernel launch records the guard it runs under."""
    state = dict(inside=None, guards=[], launches=[])

    @contextlib.contextmanager
    def guard(device):
        state["guards"].append(device)
        state["inside"] = device
        try:
            yield
        finally:
            state["inside"] = None

    def recording(fn):
        def wrapped(*args, **kwargs):
            state["launches"].append(state["inside"])
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(launch, "device_guard", guard)
    for module in (forward, forward_transposed, backward):
        for name in ("launch", "launch_fixed"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, recording(getattr(launch, name)))
    return state


@pytest.mark.parametrize("columns", [False, True], ids=["one-process", "columns"])
def test_every_launch_runs_under_its_tensors_device(recorded_launches, columns):
    g = torch.Generator().manual_seed(0)
    f = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1).requires_grad_()  # noqa: E731
    x, t = f(20), f(20)
    kw = dict(img_all=f(40), txt_all=f(40), offset=20) if columns else {}
    loss, _, _ = dk.drrho_clip_loss(x, t, 10.0, torch.zeros(20), torch.zeros(20), backend="triton", **kw)
    loss.backward()
    launches = recorded_launches["launches"]
    assert len(launches) >= 2 and len(recorded_launches["guards"]) == 2          # the forward op and the backward op
    assert all(d == x.device for d in launches), launches                         # none outside a guard


# ------------------------------------------------------------------------------------------------
# Small per-rank batches fill the GPU: the forward and backward kernels also split the columns when the
# rows cannot give every SM two programs (tiles.column_splits, from the SM count). Here the SM count of
# the interpreter's pretend GPU is raised so that the test shapes split, and every split result is held
# against the unsplit one (2 SMs: no split) and against the float64 torch backend.

from drrho_kernels.backends.triton import tiles  # noqa: E402


def test_column_splits_rule():
    assert tiles.column_splits(row_programs=264, n_columns=5120, bn=128, sms=132) == 1      # rows fill the GPU
    assert tiles.column_splits(row_programs=10, n_columns=5120, bn=128, sms=132) == 20      # B = 640, BM = 128:
    # 27 parts wanted, 40 column blocks: 2 blocks a part, 20 parts (27 would leave 7 empty)
    assert tiles.column_splits(row_programs=20, n_columns=5120, bn=32, sms=132) == 14       # its backward
    assert tiles.column_splits(row_programs=2, n_columns=100, bn=64, sms=132) == 2          # <= column blocks
    assert tiles.column_splits(row_programs=1, n_columns=10 ** 6, bn=16, sms=132) == tiles.MAX_PARTS


B_SPLIT, N_SPLIT = 20, 70
PATHS = {"plain": {}, "distill": dict(distill_weight=0.5), "per_sample": dict(return_per_sample=True)}


def _split_inputs(d, dr, columns):
    g = torch.Generator().manual_seed(1)
    f = lambda n, w: torch.nn.functional.normalize(torch.randn(n, w, generator=g, dtype=torch.float64), dim=1)  # noqa: E731
    x, t, xr, tr = f(B_SPLIT, d), f(B_SPLIT, d), f(B_SPLIT, dr), f(B_SPLIT, dr)
    t = torch.nn.functional.normalize(x + 0.5 * t, dim=1)                  # correlated pairs, as in training
    if not columns:
        return dict(img=x, txt=t, ref_img=xr, ref_txt=tr)
    X, T, Xr, Tr = f(N_SPLIT, d), f(N_SPLIT, d), f(N_SPLIT, dr), f(N_SPLIT, dr)
    X[10:30], T[10:30], Xr[10:30], Tr[10:30] = x, t, xr, tr
    return dict(img=x, txt=t, ref_img=xr, ref_txt=tr, img_all=X, txt_all=T, ref_img_all=Xr, ref_txt_all=Tr,
                offset=10)


FAST_SPLITS = {(False, torch.float32, "plain"), (True, torch.float32, "plain"), (True, torch.bfloat16, "distill")}
SPLIT_CASES = [pytest.param(c, dt, path, marks=() if (c, dt, path) in FAST_SPLITS else pytest.mark.slow,
                            id=f"{'columns' if c else 'one-process'}-{name}-{path}")
               for c in (False, True) for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"),
                                                       (torch.float16, "fp16")) for path in PATHS]


@pytest.mark.parametrize("columns, dtype, path", SPLIT_CASES)
def test_split_kernels_match_the_unsplit_ones(monkeypatch, columns, dtype, path):
    from drrho_kernels.backends.triton import backward as bwd, forward as fwd
    d, dr = 40, 24
    inputs = _split_inputs(d, dr, columns)

    def evaluate(sms, dt, backend="triton"):
        """The loss, state and gradients; the truth (float64) on the inputs rounded to ``dtype`` first."""
        monkeypatch.setattr(launch, "INTERPRETER_SMS", sms)
        rounded = {k: v.to(dtype).to(dt) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        leaves = {k: rounded[k].requires_grad_() for k in ("img", "txt", "img_all", "txt_all") if k in rounded}
        kw = {k: leaves.get(k, v) for k, v in rounded.items()}
        acc = torch.float64 if dt == torch.float64 else torch.float32
        scale = torch.tensor(30.0, dtype=acc, requires_grad=True)
        u = torch.full((B_SPLIT,), -2.0, dtype=acc)
        out = dk.drrho_clip_loss(kw.pop("img"), kw.pop("txt"), scale, u, u, backend=backend, **kw, **PATHS[path])
        grads = torch.autograd.grad(out[0], [*leaves.values(), scale])
        return [out[0], out[1], out[2], *(g.double() for g in grads)]

    n_out, n_in = B_SPLIT, N_SPLIT if columns else B_SPLIT
    monkeypatch.setattr(launch, "INTERPRETER_SMS", 64)
    extra = path != "plain"
    assert bwd.backward_splits(n_out, n_in, d, dr, dtype, path == "distill", None, 64)[0] > 1
    if columns:       # the one-process forward is the transposed kernel: its own plan (test_triton_interpreter)
        assert fwd.forward_splits(n_out, n_in, d, dr, dtype, extra, None, 64)[0] > 1
    split, unsplit = evaluate(64, dtype), evaluate(2, dtype)
    truth = evaluate(2, torch.float64, backend="torch")
    # split against unsplit: float32 reordering, or one rounding of the half output (its unit roundoff)
    same = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    tol = 1e-5 if dtype == torch.float32 else 2e-2              # against float64 (SPEC "Numerics")
    for k, (a, b, c) in enumerate(zip(split, unsplit, truth)):
        a, b, c = a.double(), b.double(), c.double()
        assert (a - b).norm() <= same * max(c.norm(), 1e-12), (k, (a - b).norm() / c.norm())
        assert (a - c).norm() <= tol * max(c.norm(), 1e-12), (k, (a - c).norm() / c.norm())
