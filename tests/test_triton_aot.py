"""GPU readiness without a GPU: every Triton kernel compiled ahead of time for sm_80, sm_90, sm_100.

``benchmarks/aot_report.py`` compiles each kernel variant (forward; the one-process forward's margin,
tile and merge kernels; backward rows with and without fold; backward columns) at every autotuning
candidate of ``tiles.candidates`` for each architecture and dtype (bf16, fp16, fp32), with
``triton.compile`` on an ``ASTSource`` and a ``GPUTarget``; it runs in a subprocess because this test
session interprets the kernels (conftest sets ``TRITON_INTERPRET=1``). The assertions: it compiles; no
register spills (``cuobjdump --dump-resource-usage`` reports LOCAL = STACK = 0); shared memory within
the architecture's per-block limit; tensor-core instructions present (mma.sync on sm_80, wgmma on
sm_90, tcgen05 on sm_100) in every kernel with a dot (all but the margin and merge kernels, which are
[B]-sized memory passes); float32 dots in tf32x3 (or ieee), never plain tf32.

The table goes to a temporary file here; ``python -m benchmarks.aot_report`` writes the committed
``benchmarks/results/triton_aot_<triton version>.json``. A cold Triton cache costs a few minutes
(about 120 compiles on 2 cores); a warm one (``~/.triton/cache``) seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90", "sm_100")


def _toolchain_missing() -> str | None:
    try:
        from triton.backends import backends
    except ImportError:
        return "triton has no backends registry"
    if "nvidia" not in backends:
        return "triton was built without the NVIDIA backend"
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return f"no cuobjdump at {cuobjdump}"
    return None


pytestmark = pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "triton_aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_report", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=3600)
    if not out.exists():
        pytest.fail(f"aot_report produced no table (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    data["stdout"], data["stderr"] = proc.stdout, proc.stderr
    return data


def _rows(report, arch):
    rows = [r for r in report["rows"] if r["arch"] == arch]
    assert rows, f"no kernels compiled for {arch}"
    return rows


def _label(r) -> str:
    return f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']}"


def test_every_candidate_compiled(report):
    sys.path.insert(0, str(REPO))
    from benchmarks.aot_report import jobs
    expected = {(v, dt, f"sm_{cc}", t.name) for v, dt, cc, t in jobs()}
    got = {(r["kernel"], r["dtype"], r["arch"], r["config"]) for r in report["rows"]}
    assert got == expected
    errors = [f"{_label(r)}: {r['error']}" for r in report["rows"] if "error" in r]
    assert not errors, "\n".join(errors)
    variants = {r["kernel"] for r in report["rows"]}
    assert variants == {"fwd", "fwd_t_margin", "fwd_t", "fwd_t_merge", "bwd_row_fold", "bwd_row", "bwd_col"}
    assert {r["kernel"] for r in report["rows"] if not r["has_dot"]} == {"fwd_t_margin", "fwd_t_merge"}
    assert {r["dtype"] for r in report["rows"]} == {"bf16", "fp16", "fp32"}


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(report, arch):
    bad = [f"{_label(r)}: {r['registers']} registers, LOCAL {r['spill_local_bytes']} B, STACK {r['stack_bytes']} B"
           for r in _rows(report, arch) if "error" not in r and (r["spill_local_bytes"] or r["stack_bytes"])]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_within_limit(report, arch):
    limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024}[arch]
    bad = [f"{_label(r)}: {r['shared_bytes']} B" for r in _rows(report, arch)
           if "error" not in r and r["shared_bytes"] > limit]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_cores_used(report, arch):
    instr = {"sm_80": "mma_sync_count", "sm_90": "wgmma_count", "sm_100": "tcgen05_count"}[arch]
    bad = [_label(r) for r in _rows(report, arch) if "error" not in r and r["has_dot"] and r[instr] == 0]
    assert not bad, f"no {instr[:-6]} instruction in:\n" + "\n".join(bad)


def test_float32_dots_are_tf32x3_or_ieee(report):
    rows = [r for r in report["rows"] if r["dtype"] == "fp32" and "error" not in r and r["has_dot"]]
    assert rows
    bad = [f"{_label(r)}: {r['fp32_dot_precision']}" for r in rows
           if not r["fp32_dot_precision"] or set(r["fp32_dot_precision"]) - {"tf32x3", "ieee"}]
    assert not bad, "\n".join(bad)


def test_floating_point_contraction_is_stated(report):
    """Every compile states its FMA contraction (launch.FP_FUSION): Triton's warning about its default
    flipping in 3.10 never fires, with TRITON_DEFAULT_FP_FUSION unset."""
    assert "TRITON_DEFAULT_FP_FUSION" not in report["stderr"]
