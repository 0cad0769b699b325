"""The digits example runs end to end (``--quick``), single process and under torchrun (gloo), with each
temperature form, with the distillation and selection targets (``--distill``, ``--select``), and its
``--seeds`` driver writes the summary."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
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


def _load_example():
    """The example as a module (its ``main`` is not run): for its helpers and its argument checks."""
    spec = importlib.util.spec_from_file_location("train_digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _check_outputs(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    targets = results["config"]["targets"]
    assert targets[:2] == ["target_plain", "target_drrho"]
    for key in ["reference_accuracy"] + [f"{t}_{k}accuracy" for t in targets for k in ("", "peak_")]:
        assert isinstance(results[key], float) and 0.0 <= results[key] <= 1.0, (key, results[key])
    assert {"config", "history", "runtime_s"} <= set(results)
    assert set(results["history"]) == {"reference", *targets}
    for run in ["reference"] + targets:
        hist = results["history"][run]
        assert len(hist["loss"]) == len(hist["accuracy"]) == len(hist["step"]) >= 1
        assert all(0.0 <= a <= 1.0 for a in hist["accuracy"]) and all(math.isfinite(x) for x in hist["loss"])
    for run in targets[1:]:                           # every target takes the same number of steps
        assert results["history"][run]["step"] == results["history"]["target_plain"]["step"]
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
    assert temp["applies_to"] == results["config"]["targets"]
    for run in results["config"]["targets"]:
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
    for flag in ("--epochs", "--seed", "--seeds", "--temperature", "--backend", "--quick", "--out", "--distill",
                 "--distill-weight", "--distill-scale", "--select", "--filter-ratio", "--select-chunks",
                 "--select-ref-scale"):
        assert flag in proc.stdout
    for form in ("global", "per_direction", "individual"):
        assert form in proc.stdout


@pytest.mark.slow        # the example end to end, twice: ~10 s
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


@pytest.mark.slow
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
def test_distill_and_select_targets_with_seeds_driver(tmp_path):
    """``--distill --select`` over two seeds: both extra targets train (outputs, histories, temperatures),
    the summary covers them, and the selection target trains on the selected pairs only: every step's
    sub-batch has ``floor(S (1 - f))`` pairs (here B = 30, f = 0.7: super-batches of S = 100), and the loss's
    state was updated for exactly the pairs trained on, fewer than the candidates drawn."""
    batch, f, chunks = 30, 0.7, 3
    cmd = [sys.executable, str(EXAMPLE), "--quick", "--seed", "5", "--seeds", "2", "--distill", "--select",
           "--batch-size", str(batch), "--filter-ratio", str(f), "--select-chunks", str(chunks),
           "--distill-weight", "2.0", "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    targets = ["target_plain", "target_drrho", "target_drrho_distill", "target_drrho_select"]
    super_batch = math.ceil(batch / (1 - Fraction("0.7")))
    assert super_batch == 100 and math.floor(super_batch * (1 - Fraction("0.7"))) == batch
    summary = json.loads((tmp_path / "summary.json").read_text())
    entry = summary["forms"]["global"]
    assert entry["seeds"] == [5, 6] and set(entry["final_temperature"]) == set(targets)
    assert "DRRho+distill" in proc.stdout and "DRRho+select" in proc.stdout
    for seed in (5, 6):
        r = _check_outputs(tmp_path / "global" / f"seed{seed}")
        assert r["config"]["targets"] == targets
        assert r["distillation"] == dict(weight=2.0, teacher_scale=100.0, teacher="the reference model's embeddings")
        h = r["history"]
        assert h["target_drrho_distill"]["loss"] != h["target_drrho"]["loss"]      # the extra term is there
        sel = r["selection"]
        assert (sel["super_batch"], sel["sub_batch"], sel["n_chunks"], sel["filter_ratio"]) == (100, 30, 3, 0.7)
        assert sel["sub_batch_sizes"] == [batch] and sel["steps"] == h["target_drrho_select"]["step"][-1]
        assert sel["state_updated_only_trained"] and sel["state_updated_samples"] == sel["trained_samples"]
        assert 0 < sel["trained_samples"] <= sel["steps"] * batch
        assert sel["trained_samples"] < sel["candidate_samples"] <= r["config"]["n_train"]
        for k in ("candidate_noisy_fraction", "selected_noisy_fraction"):
            assert 0.0 <= sel[k] <= 1.0 and len(h["target_drrho_select"][k]) == len(h["target_drrho_select"]["loss"])
    for name in ["reference"] + targets:
        values = [json.loads((tmp_path / "global" / f"seed{s}" / "results.json").read_text())[f"{name}_accuracy"]
                  for s in (5, 6)]
        assert entry[name]["values"] == values
        assert entry[name]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert entry["selection"]["sub_batch"] == batch


def test_select_sub_batch_keeps_floor_of_the_kept_share():
    """The example's selection step keeps ``floor(b (1 - f))`` distinct pairs of the candidates, for uneven
    super-batches too, and ``super_batch_size`` gives back exactly ``B`` pairs for any ``f``."""
    import torch
    ex = _load_example()
    for b in (1, 7, 30, 64, 100):
        for f in ("0.1", "0.3", "0.5", "0.7", "0.8", "0.9"):
            s = ex.super_batch_size(b, float(f))
            assert math.floor(s * (1 - Fraction(f))) == b and math.floor((s - 1) * (1 - Fraction(f))) < b, (b, f)
    tok = ex.Tokenizer()
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():                     # the models' initialisation leaves the global RNG alone
        torch.manual_seed(0)
        model = ex.TinyCLIP(len(tok.vocab) + 1, dim=16, hidden=32)
        reference = ex.TinyCLIP(len(tok.vocab) + 1, dim=8, hidden=32)
    x = torch.rand(200, 64, generator=g)
    tokens = tok([ex.caption(i % 10, i % len(ex.TEMPLATES)) for i in range(200)])
    for b, f, chunks in ((128, "0.5", 2), (12, "0.5", 4), (100, "0.8", 2), (37, "0.3", 5), (10, "0.9", 1)):
        args = ex.parse_args(["--select", "--filter-ratio", f, "--select-chunks", str(chunks)])
        candidates = torch.randperm(200, generator=g)[:b]
        kept = ex.select_sub_batch(model, reference, x, tokens, candidates, args, torch.Generator().manual_seed(1),
                                   ex.Dist())
        assert kept.numel() == math.floor(b * (1 - Fraction(f))), (b, f, kept.numel())
        assert len(set(kept.tolist())) == kept.numel() and set(kept.tolist()) <= set(candidates.tolist())


@pytest.mark.parametrize("argv, message", [
    (["--select", "--filter-ratio", "0"], "--filter-ratio: expected the share of each super-batch left out, in (0, 1)"),
    (["--select", "--filter-ratio", "1"], "in (0, 1), got 1.0"),
    (["--select", "--filter-ratio", "-0.5"], "in (0, 1), got -0.5"),
    (["--select", "--filter-ratio", "nan"], "in (0, 1), got nan"),
    (["--filter-ratio", "0.5"], "--filter-ratio: applies to --select only"),
    (["--select-chunks", "2"], "--select-chunks: applies to --select only"),
    (["--distill-weight", "1"], "--distill-weight: applies to --distill only"),
    (["--distill", "--distill-weight", "0"], "--distill-weight: expected a finite value > 0, got 0.0"),
    (["--distill", "--distill-weight", "-1"], "--distill-weight: expected a finite value > 0"),
    (["--distill", "--distill-scale", "inf"], "--distill-scale: expected a finite value > 0, got inf"),
    (["--distill", "--n-ref", "10"], "--distill needs a trained reference model: --n-ref 10"),
    (["--select", "--n-ref", "63"], "--select needs a trained reference model"),
    (["--distill", "--temperature", "individual"], "--distill: expected --temperature global or per_direction"),
    (["--distill", "--temperature", "all"], "got 'all'"),
    (["--select", "--temperature", "per_direction"], "--select: expected --temperature global"),
    (["--select", "--select-chunks", "0"], "--select-chunks: expected 1 to --batch-size (64) chunks"),
    (["--select", "--select-chunks", "65"], "got 65"),
    (["--select", "--select-ref-scale", "0"], "--select-ref-scale: expected a finite logit scale > 0"),
])
def test_bad_distill_and_select_flags(argv, message, capsys):
    ex = _load_example()
    with pytest.raises(SystemExit) as exc:
        ex.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_super_batch_larger_than_the_training_split_is_rejected():
    pytest.importorskip("sklearn")
    ex = _load_example()
    args = ex.parse_args(["--select", "--filter-ratio", "0.99", "--no-progress"])
    with pytest.raises(SystemExit, match=r"super-batch of 6400 pairs .* exceeds the 1047 training pairs"):
        ex.run(args, ex.Dist())


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
