"""The benchmark tools never rot: the quick sweep and the plots end to end, and the pieces that decide
what a number means (interleaved timing, the backward timed alone, the floor's products, ratios, the
memory guard, OOM from a fresh process, presets, the committed results, the authors' snapshot).

The end-to-end test runs the real command in a subprocess (``python -m benchmarks.sweep --quick``), as
a user would; the rest check the pieces on fake steps and made-up rows.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import harness, plot, steps, sweep

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ROW_FIELDS = {"impl", "mode", "B", "N", "d", "dr", "dtype", "ref", "status", "reason", "median_s", "p20_s", "p80_s",
              "n_repeat", "peak_extra_bytes", "speedup_vs_unfused", "time_over_floor", "predicted_peak_bytes"}
META_FIELDS = {"date", "commit", "torch", "triton", "cpu", "torch_threads", "device", "device_tag", "wall_s"}


@pytest.fixture
def out_dir(tmp_path, request):
    """Where a test writes: ``$DRRHO_KERNELS_RESULTS/<test>`` if set, else its own temporary directory."""
    return harness.results_dir(tmp_path, request.node.name)


@pytest.mark.slow
def test_quick_sweep_json_and_plots(out_dir):
    out = out_dir / "sweep.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--quick", "--no-progress", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(p.name for p in out_dir.iterdir()) == ["sweep.json"]         # nothing written beside it
    payload = json.loads(out.read_text())
    assert META_FIELDS <= set(payload["meta"]), set(payload["meta"])
    assert payload["config"]["preset"] == "quick" and payload["config"]["slices"]
    rows = payload["rows"]
    for r in rows:
        assert ROW_FIELDS <= set(r), sorted(ROW_FIELDS - set(r))
        assert r["status"] in ("ok", "OOM", "skipped"), r      # every baseline and backend here must run

    def find(impl, mode, **kw):
        return [r for r in rows if r["impl"] == impl and r["mode"] == mode and all(r[k] == v for k, v in kw.items())]

    # a fused backend that is not built here, or fails its smoke run, is skipped with the reason (its own
    # tests say why); the interpreter path itself must be taken: TRITON_INTERPRET is the sweep's to set
    skipped = payload["config"]["skipped_impls"]
    assert set(skipped) <= {"cpp", "triton"} and "TRITON_INTERPRET" not in skipped.get("triton", ""), skipped
    for impl in ("torch", "unfused", "gemm_floor", "clip_ce", *({"cpp", "triton"} - set(skipped))):
        for mode in steps.MODES:                               # the backward too: measured, never derived
            [r] = find(impl, mode, B=32, N=32, slice="square")
            assert r["status"] == "ok" and 1 <= r["n_repeat"] <= 3 and 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"], r
            assert not r.get("derived")
    fb = find("torch", "forward_backward", B=32, N=32, slice="square")[0]
    assert fb["peak_extra_bytes"] is not None and fb["speedup_vs_unfused"] > 0 and fb["time_over_floor"] > 0
    assert find("triton", "forward", B=32)[0]["interpreter"] is True
    assert find("gemm_floor", "backward", B=32)[0]["floor_gemms"] == 4
    # under bfloat16 autocast (float32 features), the family's module forms and the selection: measured, with
    # their ratios to the others of their slice
    for impl in ("unfused", "gemm_floor", "torch", *({"cpp"} - set(skipped))):
        [r] = find(impl, "forward_backward", autocast="bfloat16")
        assert r["status"] == "ok" and r["slice"] == "autocast" and r["dtype"] == "float32", r
        assert set(r["time_over"]) == {"unfused", "gemm_floor", "torch", *({"cpp"} - set(skipped))} - {impl}
    family = [r for r in rows if r["slice"] == "family"]
    assert {r["impl"] for r in family} == {"torch/module", "torch/per_direction", "torch/individual", "torch/distill"}
    assert all(r["status"] == "ok" and r["time_over"]["torch/module"] > 0 for r in family if r["impl"] != "torch/module")
    assert find("torch/jest", "forward")[0]["status"] == "ok"
    # The distributed shard (N = 3B): clip_ce is skipped with a reason, the fused and unfused run.
    assert find("clip_ce", "forward", B=16, N=48)[0]["status"] == "skipped"
    assert find("torch", "backward", B=16, N=48)[0]["status"] == "ok"
    # The OOM guard: B = 2^20 is predicted out of memory and never run.
    guard = find("unfused", "forward", B=1 << 20)[0]
    assert guard["status"] == "OOM" and guard["oom_predicted"] and guard["reason"].endswith("not run"), guard

    written = plot.main([str(out), "--out-dir", str(out_dir / "png")])
    assert {p.name.split("_")[1] for p in written} == {"time", "memory", "speedup"}, written
    assert all(p.stat().st_size > 10_000 for p in written)


class FakeStep:
    """``prepare()`` (untimed) sleeps ``setup`` seconds; the returned callable sleeps ``run`` and records itself."""

    def __init__(self, name, calls, run=0.0, setup=0.0, fail_on=None):
        self.name, self.calls, self.run, self.setup, self.fail_on = name, calls, run, setup, fail_on

    def prepare(self):
        time.sleep(self.setup)
        return self

    def __call__(self):
        self.calls.append(self.name)
        time.sleep(self.run)
        if self.calls.count(self.name) == self.fail_on:
            raise MemoryError("simulated")


def test_timing_interleaves_the_implementations_of_a_shape():
    """Rounds run every implementation once (a slow spell hits all alike); a failing one is its own result."""
    calls = []
    todo = {i: FakeStep(i, calls, fail_on=2 if i == "unfused" else None) for i in ("torch", "cpp", "unfused")}
    results = harness.time_steps(todo, repeat=3, min_repeat=1)
    assert calls == ["torch", "cpp", "unfused",            # warm-up
                     "torch", "cpp", "unfused",            # round 1: unfused fails here and drops out
                     "torch", "cpp", "torch", "cpp"]       # rounds 2 and 3
    assert isinstance(results["unfused"], MemoryError)
    assert results["torch"]["n_repeat"] == 3 and results["cpp"]["n_repeat"] == 3
    # A warm-up slower than budget / repeat cuts the rounds, never below min_repeat.
    cut = harness.time_steps({"slow": FakeStep("slow", [], run=0.02)}, repeat=10, min_repeat=2, budget=0.05)
    assert cut["slow"]["n_repeat"] == 2 and not cut["slow"]["first_run_counted"]


def test_backward_is_timed_without_its_forward():
    """Mode backward: each sample's fresh forward runs in prepare(), untimed; only loss.backward() is timed."""
    result = harness.time_steps({"b": FakeStep("b", [], run=0.001, setup=0.05)}, repeat=3, min_repeat=3)
    assert result["b"]["median_s"] < 0.03, result
    for impl, kind in (("torch", "Tensor"), ("gemm_floor", "Floor")):
        step, output_bytes = steps.make_step(impl, 8, 8, 8, 8, mode="backward")
        timed = step.prepare()                             # the forward has run: what is left is its backward
        assert timed.__name__ == "backward" and type(timed.__self__).__name__ == kind, timed
        timed()
        assert output_bytes > 0
        assert steps.make_step(impl, 8, 8, 8, 8, mode="forward_backward")[0].prepare().mode == "forward_backward"


def test_floor_does_the_products_it_counts():
    """The floor's forward and backward run exactly floor_gemm_count matrix products (one process and a shard)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.__name__.split(".")[0] == "mm"
            return func(*args, **(kwargs or {}))

    for B, N, ref in ((8, 8, True), (8, 8, False), (4, 12, True), (4, 12, False)):
        for mode in steps.MODES:
            timed = steps.make_step("gemm_floor", B, N, 8, 8, ref=ref, mode=mode)[0].prepare()
            with CountMM() as mm:                          # what is timed (backward: not its forward)
                timed()
            assert mm.n == steps.floor_gemm_count(B, N, ref, mode), (B, N, ref, mode, mm.n)


def _row(impl, mode, t, status="ok", B=1024, ref=True, peak=None):
    return {"impl": impl, "mode": mode, "B": B, "N": B, "d": 512, "dr": 512 if ref else None, "dtype": "float32",
            "ref": ref, "status": status, "reason": None, "median_s": t, "p20_s": t, "p80_s": t, "n_repeat": 3,
            "peak_extra_bytes": peak}


def test_ratios_against_the_same_shape_and_mode():
    rows = [_row("torch", "backward", 2.0), _row("torch", "forward_backward", 3.0),
            _row("unfused", "backward", 7.0), _row("unfused", "forward_backward", 9.0),
            _row("gemm_floor", "backward", 1.0), _row("gemm_floor", "forward_backward", 1.5),
            _row("clip_ce", "forward_backward", 4.5, ref=None), _row("torch", "forward_backward", 1.0, ref=False),
            _row("unfused", "forward_backward", None, status="OOM", B=32768),
            _row("torch", "forward_backward", 5.0, B=32768)]
    sweep.add_ratios(rows)
    by = {(r["impl"], r["mode"], r["B"], r["ref"]): r for r in rows}
    assert by[("torch", "backward", 1024, True)]["speedup_vs_unfused"] == pytest.approx(3.5)
    assert by[("torch", "backward", 1024, True)]["time_over_floor"] == pytest.approx(2.0)
    assert by[("torch", "forward_backward", 1024, True)]["speedup_vs_unfused"] == pytest.approx(3.0)
    assert by[("clip_ce", "forward_backward", 1024, None)]["speedup_vs_unfused"] == pytest.approx(2.0)
    assert by[("torch", "forward_backward", 1024, False)]["speedup_vs_unfused"] is None   # no unfused without ref
    assert by[("torch", "forward_backward", 32768, True)]["speedup_vs_unfused"] is None   # the unfused ran out
    assert by[("unfused", "forward_backward", 32768, True)]["time_over_floor"] is None


def test_memory_prediction_brackets_a_24gb_machine():
    """The guard's prediction is an upper bound of every peak the committed CPU sweep measured, and tight
    enough to run the unfused loss up to B = 16384 on a 24 GB machine, not at 24576."""
    def peak(impl, B):
        return sweep.predict_peak_bytes(dict(impl=impl, mode="forward_backward", B=B, N=B, d=512, dr=512,
                                             dtype="float32", ref=True))
    assert peak("unfused", 16384) < 22 * 2 ** 30 < peak("unfused", 24576)
    assert peak("torch", 24576) < 2 * 2 ** 30
    measured = [r for r in plot.load(RESULTS / "sweep_cpu-amd-epyc-2t_2026-11-23.json")["rows"]
                if r["mode"] == "forward_backward" and r["status"] == "ok" and r["peak_extra_bytes"]]
    assert len(measured) > 40
    under = [(r["impl"], r["B"], r["N"], r["d"]) for r in measured if sweep.predict_peak_bytes(r) < r["peak_extra_bytes"]]
    assert not under, under


def preset(name):
    return sweep.presets()[name][3]


def test_presets_and_grid_flags(monkeypatch):
    points = sweep.expand(preset("full-cuda"), "cuda")
    assert max(p["B"] for p in points if p["slice"] == "main" and p["impl"] == "triton") >= 131072
    assert {p["d"] for p in points} == {256, 512, 1024} and {p["mode"] for p in points} == set(steps.MODES)
    assert any(p["N"] != p["B"] for p in points) and {p["dtype"] for p in points} == {"float32", "bfloat16"}
    assert {p["ref"] for p in points} == {True, False, None}
    # --cpu-step: the old cpu_step measurement, authors included when DRRHO_AUTHORS_REPO is set
    monkeypatch.delenv("DRRHO_AUTHORS_REPO", raising=False)
    step_points = sweep.expand(preset("cpu-step"), "cpu")
    assert [p["impl"] for p in step_points] == ["gemm_floor", "unfused", "torch", "cpp"]
    assert {(p["B"], p["N"], p["d"], p["dr"], p["dtype"], p["ref"], p["mode"]) for p in step_points} == {
        (4096, 4096, 512, 512, "float32", True, "forward_backward")}
    monkeypatch.setenv("DRRHO_AUTHORS_REPO", "somewhere")
    assert "authors" in [p["impl"] for p in sweep.expand(preset("cpu-step"), "cpu")]
    # the retired --cpu-half as docs/RESULTS.md reproduces it with plain arguments: B = 4096 in bfloat16 and
    # float32 timed as one group, then cpp against the unfused loss in bfloat16, no memory runs
    plain = ["--modes", "forward_backward", "--no-memory", "--repeat", "5", "--min-repeat", "1", "--point-budget", "60"]
    for argv, want in ((["--B", "4096", "--dtype", "bfloat16", "float32", "--impls", "cpp", "gemm_floor", "unfused"],
                        {(i, t) for i in ("cpp", "gemm_floor", "unfused") for t in ("bfloat16", "float32")}),
                       (["--B", "512", "1024", "2048", "8192", "16384", "--dtype", "bfloat16", "--impls", "cpp",
                         "unfused"], {("cpp", "bfloat16"), ("unfused", "bfloat16")})):
        args = sweep.parse_args(argv + plain)
        assert (args.repeat, args.min_repeat, args.point_budget, args.no_memory) == (5, 1, 60.0, True)
        half = sweep.expand([sweep.grid("custom", B=args.B, dtypes=args.dtype)], "cpu", args.impls, args.modes)
        assert {(p["impl"], p["dtype"]) for p in half} == want and {p["mode"] for p in half} == {"forward_backward"}
        assert len(sweep.timing_groups([dict(p, status="ok") for p in half])) == len(args.B)
    args = sweep.parse_args(["--cpu-step"])
    assert (args.repeat, args.point_budget, args.memory_modes) == (7, 0, ["forward_backward"])
    assert sweep.parse_args(["--quick"]).repeat == 3 and sweep.parse_args(["--full-cuda"]).point_budget == 20
    # --cpu-autocast (issue 21): B = N = 4096 (the authors' SogCLRLoss with DRRHO_AUTHORS_REPO) and the paper's
    # per-rank shape, 640 anchors of 5120 columns (ours, the unfused stand-in), float32 under bfloat16 autocast
    ac = sweep.expand(preset("cpu-autocast"), "cpu")
    assert {(p["B"], p["N"], p["dtype"], p["autocast"], p["mode"]) for p in ac} == {
        (4096, 4096, "float32", "bfloat16", "forward_backward"), (640, 5120, "float32", "bfloat16", "forward_backward")}
    assert {p["impl"] for p in ac if p["B"] == 4096} == {"cpp", "torch", "unfused", "gemm_floor", "authors"}
    assert {p["impl"] for p in ac if p["B"] == 640} == {"cpp", "torch", "unfused", "gemm_floor"}
    assert sweep.parse_args(["--cpu-autocast"]).point_budget == 0 and not any(p["_memory"] for p in ac)
    # the family (was benchmarks.family): the module's forms, distillation, the selection against the authors'
    assert {p["impl"] for p in sweep.expand(preset("temperatures"), "cpu")} == {
        "cpp/module", "cpp/per_direction", "cpp/individual"}
    assert {p["impl"] for p in sweep.expand(preset("distill"), "cpu")} == {"cpp/module", "cpp/distill"}
    sel = sweep.expand(preset("selection"), "cpu")
    assert {(p["impl"], p["B"], p["mode"]) for p in sel} == {(i, b, "forward") for i in ("cpp/jest", "authors/jest")
                                                             for b in (4096, 16384)}
    args = sweep.parse_args(["--B", "64", "--N-factor", "1", "2", "--ref", "--no-ref"])
    assert args.repeat == 7 and args.point_budget == 20
    custom = sweep.grid("custom", B=args.B, n_factor=args.N_factor, d=[16], dtypes=["float32"], refs=[True, False])
    pts = sweep.expand([custom], "cpu", ["torch"], ["forward"])
    assert {(p["N"], p["ref"]) for p in pts} == {(64, True), (128, True), (64, False), (128, False)}
    with pytest.raises(SystemExit):
        sweep.parse_args(["--quick", "--B", "64"])


def oom_target(**kwargs):
    """A step builder that runs out of memory (the harness's OOM path, without exhausting the machine)."""
    raise MemoryError("simulated")


def test_harness_reports_oom_from_a_fresh_process():
    assert harness.peak_extra_rss("tests.test_benchmarks_quick:oom_target", {}) == {"error": "OOM"}


def test_plots_from_made_up_rows(out_dir):
    """All three figures, OOM points included."""
    rows = []
    for B in (1024, 2048, 4096):
        for impl, t in (("torch", 3e-9), ("unfused", 9e-9), ("gemm_floor", 1e-9)):
            for mode, k in (("forward", 1), ("backward", 2), ("forward_backward", 3)):
                oom = impl == "unfused" and B == 4096
                rows.append(_row(impl, mode, None if oom else k * t * B * B, status="OOM" if oom else "ok", B=B,
                                 peak=None if oom else (100 if impl == "torch" else 13 * 4 * B * B)))
    sweep.add_ratios(rows)
    meta = {"date": "2026-01-01T00:00:00+00:00", "commit": "abc", "cpu": "Test CPU", "torch_threads": 2}
    path = out_dir / "sweep_test.json"
    path.write_text(json.dumps({"meta": meta, "config": {"ram_guard_bytes": 20 << 30}, "rows": rows}))
    assert {p.name.split("_")[2] for p in plot.plot_file(path, out_dir)} == {"time", "memory", "speedup"}


def test_committed_sweep_still_plots():
    """The committed CPU sweep (backward derived, from before it was measured) holds docs/RESULTS.md's rows (B =
    4096: cpp 782 ms / 7.8 MiB, torch 998 ms / 47.8 MiB), and its time figure says the backward panel is derived
    (a measured one does not)."""
    [path] = RESULTS.glob("sweep_cpu-amd-epyc-2t_2026-11-23.json")
    payload, key = plot.load(path), ("float32", 512, 512, True, 1)
    rows = plot.groups(payload["rows"])[key]
    fb = {r["impl"]: r for r in rows if r["mode"] == "forward_backward" and r["B"] == 4096}
    assert [(round(fb[i]["median_s"] * 1e3), round(fb[i]["peak_extra_bytes"] / 2**20, 1)) for i in ("cpp", "torch")
            ] == [(782, 7.8), (998, 47.8)]
    figures = [plot.figure(payload["meta"], key, "time", rows, None, []),
               plot.figure(payload["meta"], key, "time", [dict(r, derived=False) for r in rows], None, [])]
    titles = [[ax.get_title() for ax in fig.axes] for fig in figures]
    assert titles[0][1].startswith("backward (derived") and titles[1][1] == "backward", titles


def test_authors_snapshot_comes_from_the_environment_only(tmp_path, monkeypatch):
    from benchmarks import authors
    loss = "src/fast_clip/loss.py"
    try:
        monkeypatch.delenv("DRRHO_AUTHORS_REPO", raising=False)
        authors.load_module.cache_clear()
        module, why = authors.load_module()
        assert module is None and "DRRHO_AUTHORS_REPO" in why
        (tmp_path / "checkout" / loss).parent.mkdir(parents=True)
        (tmp_path / "checkout" / loss).write_text("MARK = 1\n")
        monkeypatch.setenv("DRRHO_AUTHORS_REPO", str(tmp_path / "checkout"))
        authors.load_module.cache_clear()
        assert authors.load_module()[0].MARK == 1
        git = ["git", "-C", str(tmp_path / "checkout"), "-c", "user.name=t", "-c", "user.email=t@t"]
        for args in (["init", "-q"], ["add", loss], ["commit", "-qm", "x"]):
            subprocess.run(git + args, check=True, capture_output=True)
        (tmp_path / "checkout" / loss).unlink()               # only the git directory's HEAD has it now
        monkeypatch.setenv("DRRHO_AUTHORS_REPO", str(tmp_path / "checkout" / ".git"))
        authors.load_module.cache_clear()
        assert authors.load_module()[0].MARK == 1
    finally:
        authors.load_module.cache_clear()


def test_no_machine_paths_in_the_benchmarks():
    files = [p for p in (REPO / "benchmarks").rglob("*") if p.suffix in (".py", ".md", ".json")] + [REPO / "README.md"]
    bad = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in files
           for m in re.finditer(r"/(?:work|home|Users|root|mnt|tmp)/[\w.+-]+", p.read_text())]
    assert not bad, bad


@pytest.mark.parametrize("preset", ["distill", "selection"])
def test_family_presets_at_a_toy_size(preset, out_dir):
    """The family's cases (was benchmarks.family) through the sweep at a toy size: each measured (memory in its
    own process, time interleaved) with its ratio to the others. The selection times the authors' function
    (with DRRHO_AUTHORS_REPO set) in a process group of its own: none is left behind, nor the variables of
    torch.distributed, nor another torch thread count."""
    import torch.distributed as dist

    from benchmarks import authors
    out, env, threads = out_dir / "family.json", dict(os.environ), torch.get_num_threads()
    impls, mode = {"distill": (["torch/module", "torch/distill"], "forward_backward"),
                   "selection": (["torch/jest", "authors/jest"], "forward")}[preset]
    sweep.main(["--B", "64", "--d", "16", "--dr", "8", "--impls", *impls, "--modes", mode, "--memory-modes", mode,
                "--repeat", "1", "--min-repeat", "1", "--no-progress", "--out", str(out)])
    assert not (dist.is_available() and dist.is_initialized())
    assert dict(os.environ) == env and torch.get_num_threads() == threads
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    theirs = preset == "selection" and authors.jest_namespace()[0] is not None
    assert rows["authors/jest" if preset == "selection" else "torch/distill"]["status"] == ("ok" if theirs or
                                                                                           preset == "distill" else "skipped")
    for name in [i for i in impls if rows[i]["status"] == "ok"]:
        assert rows[name]["median_s"] > 0 and rows[name]["peak_extra_bytes"] >= 0, rows[name]
    ratio = ("torch/distill", "torch/module") if preset == "distill" else ("authors/jest", "torch/jest")
    assert preset == "selection" and not theirs or rows[ratio[0]]["time_over"][ratio[1]] > 0
