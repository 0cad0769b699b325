"""Test configuration: the Triton mode, the seeds, where results go, and the isolation guard.

Triton: without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set before triton is imported); with one, they are compiled and the GPU tests run
(``TRITON_INTERPRET=0`` set here, explicitly, so that nothing can turn the interpreter on halfway through a
GPU session). ``TRITON_INTERPRET`` set by the caller wins either way. Spawned worker processes inherit
the choice.

Results: a test that writes figures (e.g. the parity figures of tests/test_authors_parity.py) writes them
under the ``results_dir`` fixture: the directory named by ``DRRHO_KERNELS_RESULTS``, or a temporary one per
session. Nothing is written into the working tree.

Isolation: every test must leave the process as it found it. After each test the guard fails the test
(an error at its teardown) if it left ``torch.distributed`` initialised (the group is destroyed first, so
that the next test starts clean), changed ``os.environ`` (restored first), or left new, modified or removed
files in the working tree (a stat walk before and after; bytecode caches, ``.git`` and
``$DRRHO_KERNELS_RESULTS`` aside). A fixture of module or session scope is set up within its first test
and must leave the same state behind; what one writes at its teardown is caught at the end of the session
(the tree is compared with its start, and the run fails).
"""
import os
import random
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

REPO = Path(__file__).resolve().parent.parent
RESULTS_ENV = "DRRHO_KERNELS_RESULTS"

# The benchmarks package (measurement harness) lives beside the tests.
sys.path.insert(0, str(REPO))


# Files slow as a whole: their tests share fixtures that compile every Triton kernel variant for every target
# (minutes on 2 cores), more than the developers' loop (-m "not slow", 5 minutes) can hold.
SLOW_FILES = {"test_triton_aot.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory) -> Path:
    """Where tests write result files: ``$DRRHO_KERNELS_RESULTS`` (created if missing), else a temporary
    directory of this session; resolved by ``benchmarks.harness.results_dir``, the one place that reads the
    variable for writing (the benchmark tests call it with a subdirectory per test)."""
    from benchmarks.harness import results_dir as resolve
    return resolve(tmp_path_factory.mktemp("results"))


# ------------------------------------------------------------------------------------------- the guard
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache"}


def _named_results_dir() -> str | None:
    """``$DRRHO_KERNELS_RESULTS`` as an absolute path (where the caller asked for results: not a stray write)."""
    named = os.environ.get(RESULTS_ENV)
    return os.path.realpath(os.path.expanduser(named)) if named else None


def _tree_state() -> dict:
    """``{relative path: (mtime_ns, size)}`` of every file in the working tree but git's own, the bytecode
    caches and ``$DRRHO_KERNELS_RESULTS``: a stat walk (about 2 ms)."""
    out, stack, results = {}, [str(REPO)], _named_results_dir()
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in _SKIP_DIRS and os.path.realpath(entry.path) != results:
                        stack.append(entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            out[os.path.relpath(entry.path, REPO)] = (st.st_mtime_ns, st.st_size)
    return out


def _tree_changes(before: dict, after: dict) -> str | None:
    written = sorted(p for p in after if before.get(p) != after[p])
    removed = sorted(p for p in before if p not in after)
    if not (written or removed):
        return None
    return (f"changed the working tree {REPO}: written {written}, removed {removed} (results belong under the "
            f"results_dir fixture, ${RESULTS_ENV})")


_TREE_AT_START = _tree_state()


def pytest_sessionfinish(session, exitstatus):
    """What a fixture of module or session scope writes at its teardown escapes the per-test guard: the tree
    at the end of the session is compared with its start too."""
    change = _tree_changes(_TREE_AT_START, _tree_state())
    if change:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"ERROR: the test session {change}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Set by pytest for each test, or by a library itself at its first use or import (process-wide settings of
# theirs: the optimizers import torch._inductor, which names its cache directory; scikit-learn and joblib set
# KMP_INIT_AT_FORK at import): not the tests' doing, left as they are.
_LIBRARY_VARIABLES = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUBLAS_WORKSPACE_CONFIG",
                      "KMP_DUPLICATE_LIB_OK", "TORCH_WARM_POOL", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
                      "KMP_INIT_AT_FORK"}


def _environment() -> dict:
    """``os.environ`` but the variables that pytest, torch and Triton set themselves."""
    return {k: v for k, v in os.environ.items() if k not in _LIBRARY_VARIABLES}


def _distributed_initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@pytest.fixture(autouse=True)
def _isolation_guard():
    """Fail a test that leaves a process group, an environment change or files in the working tree."""
    env, tree = _environment(), _tree_state()
    yield
    problems = []
    if _distributed_initialised():
        torch.distributed.destroy_process_group()
        problems.append("left torch.distributed initialised (destroyed now)")
    now = _environment()
    if now != env:
        changed = sorted(k for k in set(env) | set(now) if env.get(k) != now.get(k))
        problems.append("changed os.environ: " + ", ".join(
            f"{k}: {env.get(k)!r} -> {now.get(k)!r}" for k in changed) + " (restored now)")
        for k in changed:
            if k in env:
                os.environ[k] = env[k]
            else:
                del os.environ[k]
    change = _tree_changes(tree, _tree_state())
    if change:
        problems.append(change)
    if problems:
        pytest.fail("the test did not clean up after itself: " + "; ".join(problems), pytrace=False)
