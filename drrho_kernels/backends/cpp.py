"""Loader of the compiled C++ extension (``drrho_kernels._C``), with one clear warning on failure.

The extension registers ``drrho::cpp_fwd`` and ``drrho::cpp_bwd`` (CPU kernels) with the
dispatcher; this module adds their fake implementations and autograd through
:func:`drrho_kernels.ops.define_fused_ops`. Without the extension the package still imports and
``backend="auto"`` falls back to the torch backend.
"""
from __future__ import annotations

import functools
import warnings

_load_error: str | None = None


@functools.lru_cache(maxsize=None)
def load():
    """The extension module, or None (with a single warning naming the cause)."""
    global _load_error
    try:
        from .. import _C  # noqa: F401  (importing registers the ops)
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        _load_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"drrho_kernels: the C++ extension could not be loaded ({_load_error}); "
                      "CPU tensors use the torch backend. Reinstall with a C++ compiler "
                      "(see README) to build it.", RuntimeWarning, stacklevel=3)
        return None
    return _C


def load_error() -> str:
    load()
    return _load_error or "loaded"


@functools.lru_cache(maxsize=None)
def fused_ops():
    if load() is None:
        raise RuntimeError(f"the C++ extension is not available ({load_error()})")
    from ..ops import define_fused_ops
    return define_fused_ops("cpp", None, None)
