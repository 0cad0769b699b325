"""Loader of the compiled C++ extension (``drrho_kernels._C``), with one clear warning on failure.

This module defines the op pair ``drrho::cpp_fwd`` / ``drrho::cpp_bwd`` (schemas, fake
implementations: :func:`drrho_kernels.core.ops.register`), then imports the extension (csrc/), whose
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

from ..core import ops
from ..core.inputs import TileInputs, scalar_fields

_C: ModuleType | None = None
_load_error: str | None = None

ops.register("cpp")          # defined here, implemented by the extension
try:
    from .. import _C  # noqa: F811
    _C.register_kernels()    # raises if the build's kernel signatures do not match the schemas (a stale build)
    if list(_C.tile_scalar_names()) != scalar_fields(TileInputs):
        raise RuntimeError(f"stale build: its kernels read the scalars {list(_C.tile_scalar_names())}, the ops pass "
                           f"{scalar_fields(TileInputs)}")
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


HALF_GEMM_ENV = "DRRHO_KERNELS_CPU_HALF_GEMM"
HALF_GEMM_MODES = ("auto", "on", "off", "brgemm", "mkl", "emulate", "timed")


def _dtype_name(dtype) -> str:
    import torch
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, dtype)
    if name not in ("bfloat16", "float16"):
        raise ValueError(f"dtype: expected torch.bfloat16 or torch.float16, got {dtype!r}")
    return name


def half_gemm(dtype=None) -> dict:
    """Which tile products the C++ kernels use for half-precision inputs of ``dtype`` on this CPU, and why.

    ``dtype``: ``torch.bfloat16`` (default) or ``torch.float16`` (or their names). Returns a dict:
    ``path`` (``"upcast"``: inputs converted to float32, float32 products; ``"brgemm"``: oneDNN's
    batch-reduce GEMM with half inputs and float32 accumulation (AMX CPUs); ``"mkl"``: MKL's half GEMMs;
    ``"emulate"``: the brgemm path's layouts with a scalar product, for tests; ``None`` when the mode asks
    for a path that cannot run here, and then every call of the kernels with that dtype raises
    ``reason``), ``mode`` (the value of ``DRRHO_KERNELS_CPU_HALF_GEMM``, default ``auto``), ``error``,
    ``reason`` (one sentence: what was chosen and why), ``candidates`` (per candidate: ``usable``,
    ``note``, ``self_test_s``), ``upcast_self_test_s`` and ``cpu_flags``. Every sum and exponential is
    float32 on every path.

    Decided once per process on first use (the first half-precision call of the kernels, or this
    function): ``auto`` runs each candidate's exact self-test and times the usable ones that can be
    faster (brgemm; MKL only on CPUs with avx512_bf16/amx_bf16, resp. avx512_fp16/amx_fp16) against the
    upcast path; a candidate wins at <= 0.9x the upcast time. ``on``: the first candidate that passes its
    self-test, untimed; ``off``: upcast; ``brgemm`` / ``mkl`` / ``emulate``: that path; ``timed``: auto
    without the CPU-flag filter. Without the extension: ``path`` None and the load error as ``reason``.
    """
    name = _dtype_name(dtype) if dtype is not None else "bfloat16"
    if _C is None:
        return {"dtype": name, "mode": None, "path": None, "error": True,
                "reason": f"C++ extension not loaded ({load_error()})", "candidates": {},
                "upcast_self_test_s": None, "cpu_flags": []}
    return dict(_C.half_gemm_info(name))


def _redecide_half_gemm(dtype, mode: str = "") -> dict:
    """Decide the half-precision path of ``dtype`` again as ``DRRHO_KERNELS_CPU_HALF_GEMM=mode`` would
    (``""``: the variable's value again); returns :func:`half_gemm`'s dict. For tests and benchmarks that
    compare paths in one process; never while the kernels run on another thread."""
    if _C is None:
        raise RuntimeError(f"C++ extension not loaded ({load_error()})")
    return dict(_C._half_gemm_redecide(_dtype_name(dtype), mode))
