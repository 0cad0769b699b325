"""Loader of the compiled C++ extension (``drrho_kernels._C``), with one clear warning on failure.

This module defines the op pair ``drrho::cpp_fwd`` / ``drrho::cpp_bwd`` (schemas, fake
implementations: :func:`drrho_kernels.ops.register`), then imports the extension (csrc/), whose
``register_kernels()`` implements them with the CPU kernels. The schemas are spelled
out only on the Python side; the dispatcher checks at load time that the C++ signatures match
them. Without the extension the package still imports and ``backend="auto"`` falls back to the
torch backend.

Everything happens once, when this module is imported (by the backend registry, at the package's
import): the definitions, the import of ``_C`` and, if it failed, one ``RuntimeWarning`` naming the
cause. :func:`load` then only reads module state, so ``torch.compile`` traces it without a graph
break.
"""
from __future__ import annotations

import warnings
from types import ModuleType

from .. import ops

_C: ModuleType | None = None
_load_error: str | None = None

ops.register("cpp")          # defined here, implemented by the extension
try:
    from .. import _C  # noqa: F811
    _C.register_kernels()    # raises if the build's kernel signatures do not match the schemas (a stale build)
except Exception as exc:  # ImportError (not built), OSError, an undefined symbol (torch mismatch), a stale build
    _C = None
    _load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"drrho_kernels: the C++ extension could not be loaded ({_load_error}); CPU tensors "
                  "use the torch backend. Reinstall with a C++ compiler and torch already installed "
                  "(pip install --no-build-isolation -e .; see README) to build it.", RuntimeWarning,
                  stacklevel=2)


def load() -> ModuleType | None:
    """The extension module, or None when it could not be loaded (the warning was given at import)."""
    return _C


def load_error() -> str:
    """Why the extension is not available, or ``"loaded"``."""
    return _load_error or "loaded"


def build_info() -> dict:
    """Compiler, OpenMP, SIMD level and tiling of the loaded extension (empty dict when not loaded)."""
    return {} if _C is None else dict(_C.build_info())
