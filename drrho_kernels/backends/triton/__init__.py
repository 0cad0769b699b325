"""The fused Triton backend (``backend="triton"``): implements ``drrho::triton_fwd`` / ``drrho::triton_bwd``.

Cut by kernel family:

- ``helpers.py``: the shared ``@triton.jit`` helpers (score tiles, row dots, online log-sum-exp, merge);
- ``forward.py``: ``_fwd_kernel`` (distributed shape: B rows against N columns) and :func:`forward`;
- ``forward_transposed.py``: the one-process forward (each score tile once, both directions);
- ``backward.py``: ``_bwd_kernel`` (row and column weighted products) and its launcher;
- ``tiles.py``: tile tables, autotune candidates and the one-process plan (configuration only);
- ``launch.py``: interpreter or GPU (decided once), dot precision, the launch helpers.

This package is imported by the backend registry on the first call that resolves to ``"triton"``,
never by ``import drrho_kernels``, so importing the package touches neither triton nor CUDA. The
ops run on CUDA (or ROCm) tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first ``backend="triton"`` call). Float64 inputs never reach
them: the registry resolves them to the torch backend.
"""
from __future__ import annotations

import torch

from ...core import ops
from . import backward, forward, launch
from .launch import INTERPRETING


def _on_device(fn, name: str):
    def checked(*args):
        tiles = args[0] if name == "fwd" else args[1]
        if tiles.img.device.type == "cpu" and not INTERPRETING:
            raise RuntimeError(
                f"drrho::triton_{name}: the tensors are on cpu: the Triton kernels need CUDA (or ROCm) tensors, or "
                "CPU tensors with TRITON_INTERPRET=1 set before the first backend='triton' call. "
                "Use backend='auto' or 'torch'.")
        if tiles.img.dtype == torch.float64:
            raise TypeError(f"drrho::triton_{name}: float64 inputs have no Triton kernel (backend='triton' "
                            "resolves them to the torch backend)")
        with launch.device_guard(tiles.img.device):     # every launch on the tensors' GPU, whatever is current
            return fn(*args)
    return checked


# Registered when this package is imported, not inside a function: Dynamo runs imports for real but
# traces function bodies, so a registration reached for the first time inside torch.compile would
# be traced (and fail) rather than run.
ops.register("triton", _on_device(forward.forward, "fwd"), _on_device(backward.backward, "bwd"),
             dispatch_keys=("CUDA", "CPU"))
