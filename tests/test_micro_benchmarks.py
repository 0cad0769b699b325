"""The microbenchmarks (``benchmarks/micro``, pytest-benchmark) cannot rot: the suite runs them once,
untimed (``--benchmark-disable``), in their own pytest process (this session's options and testpaths
are the tests')."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("pytest_benchmark")


def test_microbenchmarks_run_once(tmp_path, request):
    """Nothing written into the tree: pytest-benchmark's storage (``.benchmarks``, made even when disabled)
    goes to ``$DRRHO_KERNELS_RESULTS/<test>`` or a temporary directory."""
    from benchmarks import harness
    storage = harness.results_dir(tmp_path, request.node.name)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/micro", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider", "-rs", f"--benchmark-storage=file://{storage}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    counts = {what: int(n) for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out.splitlines()[-1])}
    # torch, the unfused loss and the GEMM floor run anywhere: 2 shapes x 2 dtypes x 2 modes each
    assert counts.get("passed", 0) >= 3 * 8 and not counts.get("failed") and not counts.get("error"), out[-2000:]
