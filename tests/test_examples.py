"""The digits example runs end to end (``--quick``), single process and under torchrun (gloo), with each
temperature form, and its ``--seeds`` driver writes the summary."""
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
TAU_INIT, TAU_RANGE = 0.07, (0.01, 1.0)        # the example's initial temperature, every form's clamp range


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
    _check_temperatures(results)
    return results


def _check_temperatures(results: dict) -> None:
    """The form is recorded, every target's temperatures moved from their initial value and stayed in range."""
    temp = results["temperature"]
    form = temp["form"]
    assert form == results["config"]["temperature"] and temp["init"] == TAU_INIT
    assert temp["reference"]["form"] == "global"
    lo, hi = TAU_RANGE
    for run in ("target_plain", "target_drrho"):
        t, hist = temp[run], results["history"][run]
        assert len(hist["tau_img"]) == len(hist["tau_txt"]) == len(hist["loss"])
        if form == "global":
            assert set(t) == {"logit_scale", "tau"} and t["tau"] == pytest.approx(1 / t["logit_scale"])
            taus = [t["tau"]]
            assert hist["tau_img"] == hist["tau_txt"] and hist["tau_img"][-1] == t["tau"]
        elif form == "per_direction":
            assert set(t) == {"logit_scale_img", "logit_scale_txt", "tau_img", "tau_txt"}
            assert t["tau_img"] == pytest.approx(1 / t["logit_scale_img"])
            taus = [t["tau_img"], t["tau_txt"]]
            assert [hist["tau_img"][-1], hist["tau_txt"][-1]] == taus
        else:
            assert form == "individual" and 0 < t["samples"] <= results["config"]["n_train"]
            for k in ("tau_img", "tau_txt"):
                s = t[k]
                assert lo <= s["min"] <= s["mean"] <= s["max"] <= hi, (run, k, s)
                assert s["min"] < TAU_INIT, (run, k, s)          # the loss updated them (quick: down by a step)
                assert hist[k][-1] == s["mean"] and hist[f"{k}_min"][-1] == s["min"]
            taus = [t["tau_img"]["mean"], t["tau_txt"]["mean"]]
        for tau in taus:
            assert lo <= tau <= hi and abs(tau - TAU_INIT) > 1e-4, (run, form, t)


def test_help():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=60,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--epochs", "--seed", "--seeds", "--temperature", "--backend", "--quick", "--out"):
        assert flag in proc.stdout
    for form in ("global", "per_direction", "individual"):
        assert form in proc.stdout


def test_quick_run_writes_results_and_plot(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _check_outputs(tmp_path)
    assert results["config"]["world_size"] == 1 and results["config"]["quick"] is True
    assert results["temperature"]["form"] == "global"             # the default
    assert "zero-shot test accuracy" in proc.stdout
    # Deterministic given the seed.
    again = tmp_path / "again"
    proc = subprocess.run(cmd[:-3] + ["--out", str(again), "--no-progress"], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((again / "results.json").read_text())["history"] == results["history"]


def test_each_temperature_form_and_seeds_driver(tmp_path):
    """``--quick`` with every ``--temperature`` form, two seeds each, in one process (``--temperature all``):
    each run's outputs and learned temperatures, and the mean +- std summary."""
    cmd = [sys.executable, str(EXAMPLE), "--quick", "--seed", "3", "--seeds", "2", "--temperature", "all",
           "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["forms"]) == ["global", "per_direction", "individual"]
    assert "over 2 seeds" in proc.stdout
    for form in ("global", "per_direction", "individual"):
        assert f"seed 3, temperature {form}" in proc.stdout
    for form, entry in summary["forms"].items():
        assert entry["seeds"] == [3, 4]
        runs = [_check_outputs(tmp_path / form / f"seed{seed}") for seed in (3, 4)]
        assert [r["temperature"]["form"] for r in runs] == [form, form]
        assert [r["config"]["seed"] for r in runs] == [3, 4]
        for name in ("reference", "target_plain", "target_drrho"):
            values = [r[f"{name}_accuracy"] for r in runs]
            assert entry[name]["values"] == values
            assert entry[name]["mean"] == pytest.approx(sum(values) / 2)
            assert entry[name]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)   # ddof = 1
        assert set(entry["final_temperature"]) == {"target_plain", "target_drrho"}
        if form == "per_direction":                                # two scales, each learned on its own
            assert all(r["temperature"]["target_drrho"]["tau_img"] != r["temperature"]["target_drrho"]["tau_txt"]
                       for r in runs)
    # The reference model is always trained with the global form: the same for every form of a seed.
    refs = {form: entry["reference"]["values"] for form, entry in summary["forms"].items()}
    assert refs["global"] == refs["per_direction"] == refs["individual"]


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
