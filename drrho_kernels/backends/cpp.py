"""Loader of the compiled C++ extension (``drrho_kernels._C``), with one clear warning on failure.

The extension (csrc/) registers ``drrho::cpp_fwd`` and ``drrho::cpp_bwd`` (CPU kernels) with the
dispatcher; this module adds their fake implementations and autograd through
:func:`drrho_kernels.ops.define_fused_ops`. Without the extension the package still imports and
``backend="auto"`` falls back to the torch backend.

Everything happens once, when this module is imported (the first time a CPU backend is resolved):
the import of ``_C``, the registrations, and, if the import failed, one ``RuntimeWarning`` naming
the cause. :func:`load` and :func:`fused_ops` then only read module state, so ``torch.compile``
traces them without a graph break even when the first call of the loss is inside a compiled
function (Dynamo runs imports for real but traces, and would otherwise re-run, the function bodies).
"""
from __future__ import annotations

import warnings
from types import ModuleType

_C: ModuleType | None = None
_load_error: str | None = None
_ops: tuple | None = None

try:
    from .. import _C  # noqa: F811  (importing registers the ops with the dispatcher)
except Exception as exc:  # ImportError (not built), OSError or an undefined symbol (torch mismatch)
    _C = None
    _load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"drrho_kernels: the C++ extension could not be loaded ({_load_error}); CPU tensors "
                  "use the torch backend. Reinstall with a C++ compiler and torch already installed "
                  "(pip install --no-build-isolation -e .; see README) to build it.", RuntimeWarning,
                  stacklevel=2)
else:
    from ..ops import define_fused_ops

    _ops = define_fused_ops("cpp", None, None)


def load() -> ModuleType | None:
    """The extension module, or None when it could not be loaded (the warning was given at import)."""
    return _C


def load_error() -> str:
    """Why the extension is not available, or ``"loaded"``."""
    return _load_error or "loaded"


def fused_ops():
    """``(drrho::cpp_fwd, drrho::cpp_bwd)`` with fake implementations and autograd registered."""
    if _ops is None:
        raise RuntimeError(f"the C++ extension is not available ({load_error()})")
    return _ops


def build_info() -> dict:
    """Compiler, OpenMP, SIMD level and tiling of the loaded extension (empty dict when not loaded)."""
    return {} if _C is None else dict(_C.build_info())
