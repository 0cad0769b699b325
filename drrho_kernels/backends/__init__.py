"""Backend registry: which implementations exist on this machine and which one runs.

``"torch"``: row-chunked PyTorch, any device. ``"reference"``: the dense SPEC.md statement
(checking, tiny inputs). ``"triton"``: fused GPU kernels (CUDA/ROCm tensors; CPU tensors only
under ``TRITON_INTERPRET=1``). ``"cpp"``: the compiled CPU extension, when it was built.
``"auto"``: triton for CUDA tensors, cpp for CPU tensors when built, torch otherwise.

Each fused backend registers its op pair with :mod:`drrho_kernels.core.ops` when its module is imported:
``torch_chunked`` and ``cpp`` here, at import (neither touches a GPU); ``triton`` on the first
:func:`resolve` that selects it, so that importing the package never imports triton.

One resolution rule: Triton has no float64 kernels, so float64 inputs that would run on Triton
(``backend="triton"``, or ``"auto"`` on CUDA tensors) run on the torch backend, on the same device.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import cpp, torch_chunked  # noqa: F401  (importing registers their ops)

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
    return device.type == "cpu" and cpp.load() is not None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` here, best first (``backend="auto"`` takes the first).

    Example::

        >>> import drrho_kernels as dk
        >>> names = dk.available_backends("cpu")
        >>> names[0] in ("cpp", "torch"), "torch" in names, names[-1]    # cpp first when it is built
        (True, True, 'reference')
    """
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


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs for ``backend=name`` on tensors of ``device`` and ``dtype``.

    Raises:
        RuntimeError: the named backend cannot run here (not installed, not built, wrong device).
    """
    if name == "auto":
        name = available_backends(device)[0]
    if name == "triton" and not triton_usable(device):
        why = ("triton is not installed" if not triton_installed() else
               f"the tensors are on {device}: Triton needs CUDA (or ROCm) tensors, or CPU tensors "
               "with TRITON_INTERPRET=1 set before drrho_kernels is imported")
        raise RuntimeError(f"backend='triton' cannot run here: {why}. Use backend='auto' or 'torch'.")
    if name == "cpp" and not cpp_usable(device):
        why = (f"the tensors are on {device}, the C++ extension is CPU-only" if device.type != "cpu"
               else f"the C++ extension is not available ({cpp.load_error()})")
        raise RuntimeError(f"backend='cpp' cannot run here: {why}. Use backend='auto' or 'torch'.")
    if name == "triton":
        if dtype == torch.float64:
            return "torch"
        # registers drrho::triton_fwd / _bwd (an import statement: Dynamo runs it for real when tracing)
        from . import triton  # noqa: F401
    return name
