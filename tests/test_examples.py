"""The digits example runs end to end (``--quick``), single process and under torchrun (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

for _needed in ("sklearn", "matplotlib", "tqdm"):      # the example's extras (pip install .[examples])
    pytest.importorskip(_needed)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_digits.py"
ACCURACIES = ("reference_accuracy", "target_plain_accuracy", "target_drrho_accuracy")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _check_outputs(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    for key in ACCURACIES + ("target_plain_peak_accuracy", "target_drrho_peak_accuracy"):
        assert isinstance(results[key], float) and 0.0 <= results[key] <= 1.0, (key, results[key])
    assert {"config", "history", "runtime_s"} <= set(results)
    for run in ("reference", "target_plain", "target_drrho"):
        hist = results["history"][run]
        assert len(hist["loss"]) == len(hist["accuracy"]) == len(hist["step"]) >= 1
        assert all(0.0 <= a <= 1.0 for a in hist["accuracy"])
    assert results["history"]["target_plain"]["step"] == results["history"]["target_drrho"]["step"]
    png = out / "curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    return results


def test_help():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=60,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--epochs", "--seed", "--backend", "--quick", "--out"):
        assert flag in proc.stdout


def test_quick_run_writes_results_and_plot(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _check_outputs(tmp_path)
    assert results["config"]["world_size"] == 1 and results["config"]["quick"] is True
    assert "zero-shot test accuracy" in proc.stdout
    # Deterministic given the seed.
    again = tmp_path / "again"
    proc = subprocess.run(cmd[:-3] + ["--out", str(again), "--no-progress"], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((again / "results.json").read_text())["history"] == results["history"]


@pytest.mark.slow
def test_quick_run_under_torchrun_matches_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "torchrun"
    base = [str(EXAMPLE), "--quick", "--seed", "1", "--no-progress"]
    proc = subprocess.run([sys.executable] + base + ["--out", str(single)], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                          + base + ["--out", str(multi)], capture_output=True, text=True, timeout=180, env=_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = _check_outputs(single), _check_outputs(multi)
    assert b["config"]["world_size"] == 2
    for run in ("reference", "target_plain", "target_drrho"):
        for x, y in zip(a["history"][run]["loss"], b["history"][run]["loss"]):
            assert abs(x - y) <= 1e-4 * abs(x), (run, a["history"][run]["loss"], b["history"][run]["loss"])
    for key in ACCURACIES:
        assert abs(a[key] - b[key]) <= 0.01, (key, a[key], b[key])
