"""The benchmark suite never rots: the quick sweep, the plots and gpu_bench's CPU dry run, end to end.

The end-to-end tests run the real commands in subprocesses (``python -m benchmarks.sweep --quick``,
``python -m benchmarks.gpu_bench --dry-run``), as a user would; the rest check the pure pieces
(OOM verdicts, derived rows, ratios, memory prediction) on made-up rows.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bench, harness, sweep

REPO = Path(__file__).resolve().parent.parent
ROW_FIELDS = {"impl", "mode", "B", "N", "d", "dr", "dtype", "ref", "status", "reason", "median_s", "p20_s", "p80_s",
              "peak_extra_bytes", "speedup_vs_unfused", "time_over_floor", "derived"}
META_FIELDS = {"date", "commit", "torch", "triton", "cpu", "torch_threads", "device", "device_tag", "wall_s"}


def _run(args, timeout):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_quick_sweep_json_and_plots(tmp_path):
    out = tmp_path / "sweep.json"
    _run(["benchmarks.sweep", "--quick", "--no-progress", "--out", str(out)], timeout=300)
    payload = json.loads(out.read_text())
    assert META_FIELDS <= set(payload["meta"]), set(payload["meta"])
    assert payload["config"]["preset"] == "quick" and payload["config"]["slices"]
    rows = payload["rows"]
    for r in rows:
        assert ROW_FIELDS <= set(r), sorted(ROW_FIELDS - set(r))
        assert r["status"] in ("ok", "OOM", "skipped", "error", "timeout"), r
        assert r["status"] != "error", r                  # every baseline and the torch backend must run

    def find(impl, mode, **kw):
        return [r for r in rows if r["impl"] == impl and r["mode"] == mode
                and all(r[k] == v for k, v in kw.items())]

    for impl in ("torch", "unfused", "gemm_floor", "clip_ce"):
        for mode in ("forward", "forward_backward", "backward"):
            sel = find(impl, mode, B=32, N=32)
            assert sel and sel[0]["status"] == "ok", (impl, mode, sel)
            if mode == "backward":                    # derived; None when noise made it non-positive
                assert sel[0]["derived"] and (sel[0]["median_s"] is None or sel[0]["median_s"] > 0), sel
            else:
                assert sel[0]["median_s"] is not None and sel[0]["median_s"] > 0
    fb = find("torch", "forward_backward", B=32, N=32)[0]
    assert fb["peak_extra_bytes"] is not None and fb["p20_s"] <= fb["median_s"] <= fb["p80_s"]
    assert fb["speedup_vs_unfused"] > 0 and fb["time_over_floor"] > 0
    assert find("torch", "backward", B=32)[0]["derived"] is True
    # The distributed shard (N = 3B): clip_ce is skipped with a reason, the fused and unfused run.
    assert find("clip_ce", "forward", B=16, N=48)[0]["status"] == "skipped"
    assert find("torch", "forward_backward", B=16, N=48)[0]["status"] == "ok"
    # The OOM guard: B = 2^20 is predicted out of memory and never run.
    guard = find("unfused", "forward", B=1 << 20)[0]
    assert guard["status"] == "OOM" and guard["oom_predicted"]
    assert (out.with_suffix(".csv")).read_text().startswith("provider,mode,metric")

    from benchmarks import plot
    written = plot.main([str(out), "--out-dir", str(tmp_path / "png"), "--no-hbm"])   # HBM: next test
    kinds = {p.name.split("_")[1] for p in written}
    assert {"time", "memory", "speedup"} <= kinds, written
    assert all(p.stat().st_size > 10_000 for p in written)


@pytest.mark.slow
def test_gpu_bench_dry_run(tmp_path):
    proc = _run(["benchmarks.gpu_bench", "--dry-run", "--out", str(tmp_path)], timeout=300)
    [path] = tmp_path.glob("gpu_bench_cpu-dry-run_*.json")
    payload = json.loads(path.read_text())
    assert payload["config"]["dry_run"] and payload["config"]["dtype"] == "bfloat16"
    assert {"torch", "commit", "device"} <= set(payload["meta"])
    assert [t["target"] for t in payload["targets"]] == ["T1", "T2", "T3", "T4", "T5", "T6"]
    assert all(t["verdict"] in ("PASS", "FAIL", "N/A") for t in payload["targets"])
    assert all(m["status"] == "ok" for m in payload["measurements"]), payload["measurements"]
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout


def _row(label, status="ok", t=None, mem=None):
    return {"label": label, "status": status, "reason": None if status == "ok" else "x", "median_s": t,
            "peak_extra_bytes": mem}


def test_gpu_bench_verdicts_handle_oom():
    shapes = gpu_bench.FULL
    rows = {"square/fused": _row("square/fused", t=0.020, mem=40 << 20),
            "square/floor": _row("square/floor", t=0.015),
            "square/unfused": _row("square/unfused", "OOM"),
            "square/clip_ce": _row("square/clip_ce", t=0.030),
            "big/fused": _row("big/fused", "OOM"),
            "rect/fused": _row("rect/fused", t=0.010),
            "rect/floor": _row("rect/floor", t=0.005)}
    v = {t["target"]: t["verdict"] for t in gpu_bench.evaluate(rows, shapes)}
    assert v == {"T1": "PASS", "T2": "N/A", "T3": "PASS", "T4": "PASS", "T5": "FAIL", "T6": "FAIL"}
    rows["square/fused"] = _row("square/fused", "OOM")
    v = {t["target"]: t["verdict"] for t in gpu_bench.evaluate(rows, shapes)}
    assert v["T1"] == v["T2"] == v["T3"] == v["T4"] == "FAIL"


def _srow(impl, mode, t, status="ok", B=1024, ref=True, peak=None):
    return {"impl": impl, "mode": mode, "B": B, "N": B, "d": 512, "dr": 512 if ref else None, "dtype": "float32",
            "ref": ref, "status": status, "reason": None, "median_s": t, "p20_s": t, "p80_s": t, "n_repeat": 3,
            "peak_extra_bytes": peak, "peak_raw_bytes": peak, "output_bytes": 0, "derived": False}


def test_derived_backward_and_ratios():
    rows = [_srow("torch", "forward", 1.0, peak=10), _srow("torch", "forward_backward", 3.0, peak=20),
            _srow("unfused", "forward", 2.0, peak=100), _srow("unfused", "forward_backward", 9.0, peak=200),
            _srow("gemm_floor", "forward", 0.5), _srow("gemm_floor", "forward_backward", 1.5),
            _srow("clip_ce", "forward_backward", 4.5, ref=None),
            _srow("unfused", "forward_backward", None, status="OOM", B=32768),
            _srow("unfused", "forward", 5.0, B=32768)]
    rows[-1]["ref"] = rows[-2]["ref"] = True
    rows += sweep.derive_backward(rows)
    sweep.add_ratios(rows)
    by = {(r["impl"], r["mode"], r["B"]): r for r in rows}
    bwd = by[("torch", "backward", 1024)]
    assert bwd["derived"] and bwd["median_s"] == pytest.approx(2.0) and bwd["p20_s"] is None
    assert by[("torch", "forward_backward", 1024)]["speedup_vs_unfused"] == pytest.approx(3.0)
    assert by[("torch", "forward_backward", 1024)]["time_over_floor"] == pytest.approx(2.0)
    assert by[("torch", "forward_backward", 1024)]["memory_vs_unfused"] == pytest.approx(0.1)
    assert by[("clip_ce", "forward_backward", 1024)]["speedup_vs_unfused"] == pytest.approx(2.0)
    assert by[("unfused", "backward", 32768)]["status"] == "OOM"


def test_ratios_with_a_backward_that_noise_left_without_a_time():
    """On a busy machine the unfused (or floor) forward can time slower than its forward + backward: the
    derived backward has no time, and the ratios against it are None instead of crashing the sweep."""
    rows = [_srow("torch", "forward", 1.0), _srow("torch", "forward_backward", 3.0),
            _srow("unfused", "forward", 2.0), _srow("unfused", "forward_backward", 1.9),
            _srow("gemm_floor", "forward", 0.5), _srow("gemm_floor", "forward_backward", 0.4)]
    rows += sweep.derive_backward(rows)
    sweep.add_ratios(rows)
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert by[("unfused", "backward")]["median_s"] is None and by[("gemm_floor", "backward")]["median_s"] is None
    torch_bwd = by[("torch", "backward")]
    assert torch_bwd["median_s"] == pytest.approx(2.0)
    assert torch_bwd["speedup_vs_unfused"] is None and torch_bwd["time_over_floor"] is None
    assert by[("torch", "forward_backward")]["speedup_vs_unfused"] == pytest.approx(1.9 / 3.0)


def test_memory_prediction_brackets_a_24gb_machine():
    gib = 1 << 30

    def unfused(B):
        return sweep.predict_peak_bytes("unfused", "forward_backward", B, B, 512, 512, "float32", True)
    assert unfused(16384) < 22 * gib < unfused(24576)
    assert sweep.predict_peak_bytes("torch", "forward_backward", 24576, 24576, 512, 512, "float32", True) < 2 * gib


def test_grid_flags_and_presets():
    points = sweep.expand(sweep.preset_slices("full-cpu", "cpu"), "cpu")
    main = [p for p in points if p["slice"] == "main" and p["impl"] == "torch"]
    assert max(p["B"] for p in main) >= 16384
    assert {p["d"] for p in points} == {256, 512, 1024}
    assert any(p["N"] != p["B"] for p in points) and {p["dtype"] for p in points} == {"float32", "bfloat16"}
    assert {p["ref"] for p in points} == {True, False, None}
    args = sweep.parse_args(["--B", "64", "--N-factor", "1", "2", "--ref", "--no-ref"])
    pts = sweep.expand(sweep.custom_slices(args), "cpu", ["torch"], ["forward"])
    assert {(p["N"], p["ref"]) for p in pts} == {(64, True), (128, True), (64, False), (128, False)}
    with pytest.raises(SystemExit):
        sweep.parse_args(["--quick", "--B", "64"])


def oom_target(**kwargs):
    """A step builder that runs out of memory (the harness's OOM path, without exhausting the machine)."""
    raise MemoryError("simulated")


def test_harness_reports_oom_from_a_fresh_process():
    result = harness.peak_extra_rss("tests.test_benchmarks_quick:oom_target", {})
    assert result == {"error": "OOM"}


def test_plots_from_made_up_rows_with_a_cost_model(tmp_path, monkeypatch):
    """All four figures, OOM points included (the HBM one from benchmarks/cost_model.py or a stand-in)."""
    import types

    from benchmarks import plot
    rows = []
    for B in (1024, 2048, 4096):
        for impl, t in (("torch", 3e-9), ("unfused", 9e-9), ("gemm_floor", 1e-9)):
            for mode, k in (("forward", 1), ("forward_backward", 3)):
                oom = impl == "unfused" and B == 4096
                r = _srow(impl, mode, None if oom else k * t * B * B, status="OOM" if oom else "ok", B=B,
                          peak=None if oom else (100 if impl == "torch" else 13 * 4 * B * B))
                rows.append(r)
    rows += sweep.derive_backward(rows)
    sweep.add_ratios(rows)
    meta = {"date": "2026-01-01T00:00:00+00:00", "commit": "abc", "cpu": "Test CPU", "torch_threads": 2,
            "device": "cpu"}
    path = tmp_path / "sweep_test.json"
    path.write_text(json.dumps({"meta": meta, "config": {"ram_guard_bytes": 20 << 30}, "rows": rows}))

    model, _ = plot.load_cost_model()
    if model is None:                                   # the real cost model when present, else a stand-in
        def cost(scale):
            return lambda B, N, d, dr, dtype, ref: {"flops": 2 * B * N * d, "hbm_bytes": scale * B * N}
        model = types.SimpleNamespace(triton_cost=cost(1), unfused_cost=cost(52), floor_cost=cost(0.5))
        monkeypatch.setattr(plot, "load_cost_model", lambda: (model, None))
    written = plot.plot_file(path, tmp_path)
    assert {p.name.split("_")[2] for p in written} == {"time", "memory", "speedup", "hbm"}, written


def test_markdown_tables_print_time_memory_and_oom(tmp_path, capsys):
    """`plot --markdown`: one row per B with each implementation's time / memory; OOM stays visible."""
    from benchmarks import plot
    rows = [_srow("torch", "forward_backward", 0.25, B=1024, peak=3 * 2**20),
            _srow("unfused", "forward_backward", 0.0123, B=1024, peak=100 * 2**20),
            _srow("torch", "forward_backward", 2.0, B=4096, peak=5 * 2**20),
            _srow("unfused", "forward_backward", None, status="OOM", B=4096, peak=None)]
    meta = {"date": "2026-01-01T00:00:00+00:00", "commit": "abc", "cpu": "Test CPU", "torch_threads": 2}
    path = tmp_path / "sweep_md.json"
    path.write_text(json.dumps({"meta": meta, "config": {}, "rows": rows}))
    assert plot.main([str(path), "--markdown"]) == []
    out = capsys.readouterr().out
    assert "Test CPU, 2 threads, 2026-01-01, commit abc" in out
    assert "| B | N | torch | unfused |" in out
    assert "| 1024 | 1024 | 250 ms / 3.0 MiB | 12.3 ms / 100.0 MiB |" in out
    assert "| 4096 | 4096 | 2,000 ms / 5.0 MiB | OOM |" in out
    assert not list(tmp_path.glob("*.png"))


def test_cpu_timing_interleaves_the_implementations_of_a_shape(monkeypatch):
    """Rounds run every implementation once (a slow spell hits all alike); a failing one is its own result."""
    from benchmarks import steps as steps_module
    calls = []

    def fake_make_step(impl, **kw):
        def step():
            calls.append(impl)
            if impl == "unfused" and calls.count("unfused") == 2:
                raise MemoryError("simulated")
        return step, 0

    monkeypatch.setattr(steps_module, "make_step", fake_make_step)
    rows = [_srow(i, "forward_backward", None) | {"slice": "main"} for i in ("torch", "cpp", "unfused")]
    rows.append(_srow("torch", "forward", None) | {"slice": "main"})
    groups = sweep.timing_groups(rows)
    assert sorted(len(g) for g in groups) == [1, 3]
    group = next(g for g in groups if len(g) == 3)
    args = sweep.parse_args(["--repeat", "3", "--min-repeat", "1"])
    results = sweep.time_cpu_group(group, args)
    assert calls == ["torch", "cpp", "unfused",            # warm-up
                     "torch", "cpp", "unfused",            # round 1: unfused fails here and drops out
                     "torch", "cpp", "torch", "cpp"]       # rounds 2 and 3
    by_impl = {r["impl"]: results[id(r)] for r in group}
    assert isinstance(by_impl["unfused"], MemoryError)
    assert by_impl["torch"]["n"] == 3 and by_impl["cpp"]["n"] == 3
