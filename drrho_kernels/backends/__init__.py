"""Backend registry: which implementations exist on this machine and which one ``"auto"`` picks.

``"torch"``: row-chunked PyTorch, any device. ``"reference"``: the dense SPEC.md statement
(checking, tiny inputs). ``"triton"``: fused GPU kernels (CUDA/ROCm tensors; CPU tensors only
under ``TRITON_INTERPRET=1``). ``"cpp"``: the compiled CPU extension, when it was built.
``"auto"``: triton for CUDA tensors, cpp for CPU tensors when built, torch otherwise.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None   # looks for it, does not import it


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    if not triton_installed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter())


def cpp_usable(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    from . import cpp
    return cpp.load() is not None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` here, best first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and triton_usable(device):
        names.append("triton")
    if cpp_usable(device):
        names.append("cpp")
    names.append("torch")
    if device.type == "cpu" and triton_usable(device):
        names.append("triton")
    names.append("reference")
    return names


def resolve(name: str, device: torch.device) -> str:
    """The backend that runs for ``backend=name`` on ``device``; a clear error if it cannot."""
    if name == "auto":
        return available_backends(device)[0]
    if name == "triton" and not triton_usable(device):
        why = ("triton is not installed" if not triton_installed() else
               f"the tensors are on {device}: Triton needs CUDA (or ROCm) tensors, or CPU tensors "
               "with TRITON_INTERPRET=1 set before drrho_kernels is imported")
        raise RuntimeError(f"backend='triton' cannot run here: {why}. Use backend='auto' or 'torch'.")
    if name == "cpp" and not cpp_usable(device):
        from . import cpp
        why = (f"the tensors are on {device}, the C++ extension is CPU-only" if device.type != "cpu"
               else f"the C++ extension is not available ({cpp.load_error()})")
        raise RuntimeError(f"backend='cpp' cannot run here: {why}. Use backend='auto' or 'torch'.")
    return name


def fused_ops(name: str):
    """The (forward, backward) op pair of a fused backend."""
    from .. import ops
    if name == "torch":
        return ops.torch_fwd, ops.torch_bwd
    if name == "triton":
        from .triton import ops as triton_ops
        return triton_ops.fused_ops()
    if name == "cpp":
        from . import cpp
        return cpp.fused_ops()
    raise ValueError(f"backend: {name!r} has no fused ops")


# Load the C++ extension now (no GPU involved), so that a missing or broken build is reported once, at import.
from . import cpp as _cpp  # noqa: E402,F401
