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
