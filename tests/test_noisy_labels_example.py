"""The noisy-label example (DRRho risk for any loss) runs end to end with ``--quick`` and writes its outputs."""
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
EXAMPLE = ROOT / "examples" / "noisy_labels.py"
METHODS = ("erm", "cvar", "kl", "kl_constrained", "chi2")


@pytest.mark.slow        # the example end to end: ~5 s
def test_quick_run_writes_results_and_plot(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["quick"] is True and results["config"]["seeds"] == [0]
    assert set(results["summary"]) == set(METHODS) == set(results["runs"])
    for method in METHODS:
        s = results["summary"][method]
        assert 0.0 <= s["test_accuracy_mean"] <= 1.0 and len(s["test_accuracy"]) == 1
        for key in ("mean_weight_clean", "mean_weight_flipped", "var_rho_loss", "var_loss"):
            assert isinstance(s[key], float) and s[key] >= 0.0, (method, key, s[key])
        curve = results["runs"][method][0]["curve"]
        assert curve["step"] == results["runs"]["erm"][0]["curve"]["step"]      # same steps for every method
    erm = results["summary"]["erm"]
    assert erm["mean_weight_clean"] == pytest.approx(1.0) and erm["mean_weight_flipped"] == pytest.approx(1.0)
    assert set(results["runs"]["kl_constrained"][0]["risk_state"]) == {"u", "tau"}
    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    for word in ("test accuracy", "Var(l-l_ref)", "DRRho, chi-square", "saved"):
        assert word in proc.stdout


def test_help_lists_the_options():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--seeds", "--quick", "--out", "--no-progress", "--alpha", "--kl-radius", "--chi2-radius"):
        assert flag in proc.stdout
