"""Build script: the Python package, plus the C++ CPU extension ``drrho_kernels._C`` when it can be built.

The extension (csrc/) is optional. It is built with ``torch.utils.cpp_extension`` against the torch
that is already installed, so install torch first and build without isolation::

    pip install torch==2.13.0
    pip install --no-build-isolation -e ".[test]"

With build isolation (plain ``pip install .``) pip builds in a fresh environment that has no torch
(torch is deliberately not a build requirement: pip would fetch a second, possibly different torch
and the extension would not match the one you run), so the package installs without the extension.
The same happens without a C++ compiler or if the compilation fails: the install still succeeds, and
at import ``drrho_kernels`` falls back to the torch backend with one RuntimeWarning naming the cause.

``DRRHO_KERNELS_BUILD_CPP``: ``auto`` (default: try, skip on failure), ``1`` (a failure is an
error), ``0`` (do not build it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
MODE = os.environ.get("DRRHO_KERNELS_BUILD_CPP", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    raise SystemExit(f"DRRHO_KERNELS_BUILD_CPP: expected 'auto', '0' or '1', got {MODE!r}")


def _note(message: str) -> None:
    print(f"drrho_kernels setup: {message}", file=sys.stderr, flush=True)


def _files(pattern: str) -> list[str]:
    # Relative paths: setuptools requires them (and they keep the build reproducible).
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob(pattern))


def _flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags: -O3 and OpenMP like torch's own CPU build (at::parallel_for needs it)."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    if sys.platform == "darwin":   # Apple clang has no OpenMP by default: at::parallel_for runs serially
        return ["-O3", "-g0", "-ffp-contract=fast"], []
    return ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast"], ["-fopenmp"]


def _extension_build():
    """``(ext_modules, cmdclass)``: the extension and its builder, or nothing (with the reason printed)."""
    if MODE == "0":
        _note("DRRHO_KERNELS_BUILD_CPP=0: building without the C++ extension")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # noqa: BLE001 (any failure means: no extension)
        reason = (f"torch is not importable in the build environment ({type(exc).__name__}: {exc}); "
                  "build with --no-build-isolation after installing torch to get it")
        if MODE == "1":
            raise SystemExit(f"drrho_kernels setup: DRRHO_KERNELS_BUILD_CPP=1 but {reason}")
        _note(f"building without the C++ extension: {reason}")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that, in ``auto`` mode, drops the extension instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                self._skip(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._skip(exc, ext)

        def _skip(self, exc, ext=None):
            if MODE == "1":
                _note(f"DRRHO_KERNELS_BUILD_CPP=1: the C++ extension failed to build ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); failing the install")
                raise exc
            _note(f"building without the C++ extension: the build failed ({type(exc).__name__}: "
                  f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}). The package works "
                  "without it (torch backend on CPU).")
            # Forget the extension so that later steps (copying it into the source tree for an
            # editable install, listing the wheel's outputs) do not look for the missing file.
            self.extensions = [e for e in self.extensions if e is not ext] if ext is not None else []
            self.distribution.ext_modules = list(self.extensions)

        def _built(self, ext) -> bool:
            """Whether the compiled file of ``ext`` exists in the build directory."""
            inplace, self.inplace = self.inplace, 0
            try:
                return os.path.exists(self.get_ext_fullpath(ext.name))
            finally:
                self.inplace = inplace

        def copy_extensions_to_source(self):
            saved, self.extensions = self.extensions, [e for e in self.extensions if self._built(e)]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = saved

    compile_args, link_args = _flags()
    ext = CppExtension(
        name="drrho_kernels._C",
        sources=_files("*.cpp"),
        depends=_files("*.h"),   # rebuild when a header changes; shipped in the sdist
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": compile_args},
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
