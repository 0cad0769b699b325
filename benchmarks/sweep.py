"""The benchmark sweep: fused backends against the baselines over B, N, d, dtype, reference and mode.

    python -m benchmarks.sweep --quick | --cpu-step | --cpu-half | --full-cpu | --full-cuda    # presets
    python -m benchmarks.sweep --B 512 1024 --N-factor 1 4 --d 512 --dtype float32 bfloat16 --ref --no-ref

Per group of points (one slice, shape and mode, every dtype): CPU memory first, each point in a fresh
process (one that dies of memory sends its siblings of that shape to one too; a point predicted above
the RAM guard is ``OOM``, not run), then time, interleaved in this process; on CUDA memory in process.
Writes ``benchmarks/results/sweep_<device-tag>_<date>[_<preset>].json`` after every group."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import harness, steps
from .steps import FUSED, IMPLS, MODES, NO_REF, SQUARE_ONLY

DEFAULT_IMPLS = {"cpu": ("torch", "cpp", "unfused", "clip_ce", "gemm_floor"),
                 "cuda": ("triton", "torch", "unfused", "clip_ce", "gemm_floor", "inf_cl")}
GIB = 1 << 30
DEFAULTS = dict(jobs=1, repeat=7, min_repeat=3, point_budget=20.0, threads=None, timeout=1800.0,
                memory_modes=["forward_backward"], profile=False, wait_idle=0.0)
PRESET_DEFAULTS = {"quick": dict(jobs=2, repeat=3, min_repeat=1, point_budget=2.0, threads=1, profile=True),
                   "cpu-step": dict(point_budget=0.0, profile=True),          # 0: every round, however long
                   "cpu-half": dict(repeat=5, min_repeat=1, point_budget=60.0)}
PRESET_DEVICE = {"cpu-step": "cpu", "cpu-half": "cpu", "full-cpu": "cpu", "full-cuda": "cuda"}


@dataclasses.dataclass
class Slice:
    """A cartesian grid. ``N``: absolute column counts, or ``n_factor``: N = round(factor * B)."""
    name: str
    B: list
    d: list
    dtypes: list
    refs: list
    n_factor: list = dataclasses.field(default_factory=lambda: [1])
    N: list | None = None
    dr: int | None = None                      # None: dr = d
    modes: list = dataclasses.field(default_factory=lambda: list(MODES))
    impls: list | None = None                  # None: the device's defaults
    memory: bool = True                        # CPU: measure memory (fresh processes) for this slice

    def columns(self, B):
        return [n for n in self.N if n >= B] if self.N else sorted({max(B, round(f * B)) for f in self.n_factor})


def preset_slices(name: str) -> list[Slice]:
    authors = ["authors"] if os.environ.get("DRRHO_AUTHORS_REPO") else []
    fb = ["forward_backward"]
    return {
        # every path on toy shapes; the last slice never runs: its predicted peak exceeds any RAM (the guard)
        "quick": [Slice("square", B=[32], d=[16], dtypes=["float32"], refs=[True]),
                  Slice("shard", B=[16], n_factor=[3], d=[16], dtypes=["bfloat16"], refs=[False], memory=False),
                  Slice("oom-guard", B=[1 << 20], d=[16], dtypes=["float32"], refs=[True], impls=["unfused"],
                        modes=["forward"])],
        "cpu-step": [Slice("cpu-step", B=[4096], d=[512], dtypes=["float32"], refs=[True], modes=fb,
                           impls=["gemm_floor", "unfused", "torch", "cpp"] + authors)],
        # bfloat16 on the CPU (issue 16): the step at B = 4096 beside float32 (one group), then B = 512 .. 16384
        "cpu-half": [Slice("step", B=[4096], d=[512], dtypes=["bfloat16"], refs=[True], modes=fb,
                           impls=["cpp", "gemm_floor", "unfused"], memory=False),
                     Slice("step", B=[4096], d=[512], dtypes=["float32"], refs=[True], modes=fb,
                           impls=["cpp", "gemm_floor"], memory=False),
                     Slice("sweep", B=[512, 1024, 2048, 8192, 16384], d=[512], dtypes=["bfloat16"], refs=[True],
                           modes=fb, impls=["cpp", "unfused"], memory=False)],
        # up to where the unfused loss fits 24 GB (B = 16384), 24576 (OOM by prediction), then slices
        "full-cpu": [Slice("main", B=[512, 1024, 2048, 4096, 8192, 16384], d=[512], dtypes=["float32"], refs=[True]),
                     Slice("main", B=[24576], d=[512], dtypes=["float32"], refs=[True], modes=fb,
                           impls=["torch", "cpp", "unfused", "gemm_floor"]),
                     Slice("width", B=[1024, 4096], d=[256, 1024], dtypes=["float32"], refs=[True]),
                     Slice("bf16", B=[1024, 4096], d=[512], dtypes=["bfloat16"], refs=[True]),
                     Slice("noref", B=[1024, 4096], d=[512], dtypes=["float32"], refs=[False]),
                     Slice("shard", B=[512, 1024, 2048], n_factor=[8], d=[512], dtypes=["float32"], refs=[True])],
        "full-cuda": [Slice("main", B=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], d=[512],
                            dtypes=["bfloat16"], refs=[True]),
                      Slice("fp32", B=[4096, 16384], d=[512], dtypes=["float32"], refs=[True]),
                      Slice("width", B=[4096, 16384], d=[256, 1024], dtypes=["bfloat16"], refs=[True]),
                      Slice("noref", B=[4096, 16384], d=[512], dtypes=["bfloat16"], refs=[False]),
                      Slice("shard", B=[1024, 4096], n_factor=[16], d=[512], dtypes=["bfloat16"], refs=[True])],
    }[name]


def expand(slices: list[Slice], device: str, impl_filter=None, mode_filter=None) -> list[dict]:
    """All points of the slices, in a stable order (small shapes first inside each slice)."""
    points, seen = [], set()
    for sl in slices:
        impls = [i for i in sl.impls if not impl_filter or i in impl_filter] if sl.impls else \
            list(impl_filter or DEFAULT_IMPLS[device])          # a slice's own list is only narrowed by --impls
        modes = [m for m in sl.modes if not mode_filter or m in mode_filter]
        for dtype, d, ref, B in itertools.product(sl.dtypes, sl.d, sl.refs, sorted(sl.B)):
            for N, impl, mode in itertools.product(sl.columns(B), impls, modes):
                r = None if impl in NO_REF else ref
                p = {"impl": impl, "mode": mode, "B": B, "N": N, "d": d, "dr": (sl.dr or d) if r else None,
                     "dtype": dtype, "ref": r, "slice": sl.name, "_memory": sl.memory}
                if tuple(p.values())[:8] not in seen:
                    seen.add(tuple(p.values())[:8])
                    points.append(p)
    return points


# [B, N] matrices alive at the peak (forward, with backward), measured: unfused 12-16, clip_ce ~5 / ~8.5,
# the floor up to 3 (B = 16384 and 24576), the dense reference backend (float64) ~20.
_BN_MATRICES = {"unfused": (16, 16), "clip_ce": (5, 9), "gemm_floor": (2, 3), "reference": (20, 24)}


def predict_peak_bytes(p: dict) -> int:
    """Upper estimate of the peak extra memory of a point's step (bytes), inputs and gradients included."""
    impl, B, N, d, dr, dtype, ref = (p[k] for k in ("impl", "B", "N", "d", "dr", "dtype", "ref"))
    size = steps.DTYPES[dtype].itemsize
    inputs = 4 * 2 * N * (d + ((dr or d) if ref else 0)) * size   # columns, rows, leaves, gradients
    if impl not in _BN_MATRICES:                       # fused: chunk temporaries only (~16 MiB each)
        return inputs + 8 * (16 << 20)
    count = 1 if impl == "gemm_floor" and not ref else _BN_MATRICES[impl][p["mode"] != "forward"]
    return inputs + count * B * N * (8 if impl == "reference" else size)


def ram_bytes() -> dict:
    try:
        with open("/proc/meminfo") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("MemTotal", "MemAvailable")}
    except OSError:
        return {}


def probe(impl: str, device: str) -> str | None:
    """None when ``impl`` can run on ``device`` here, else why it is skipped."""
    if impl not in IMPLS:
        return f"unknown impl {impl!r}"
    if impl in FUSED:
        import torch

        from drrho_kernels import backends
        try:
            backends.resolve(impl, torch.device(device))
        except RuntimeError as exc:                    # the backend's own explanation
            return str(exc)
    if impl == "inf_cl" and device != "cuda":
        return "inf_cl (Inf-CL) runs on CUDA only"
    if impl == "inf_cl" and importlib.util.find_spec("inf_cl") is None:
        return "inf_cl is not importable (optional; its PyPI package pins its own torch, so it is never installed here)"
    try:                                               # a smoke run: a half-written backend fails here
        n = 256 if impl == "inf_cl" else 16            # Inf-CL tiles rows and a 256-wide head
        steps.make_step(impl, n, n, n, n, "float32", True, device, "forward_backward")[0]()
    except Exception as exc:                           # noqa: BLE001
        return f"{impl} failed a smoke run ({harness.first_line(exc)})"
    return None


def skip_reason(p: dict) -> str | None:
    if p["impl"] in SQUARE_ONLY and p["N"] != p["B"]:
        return f"{p['impl']} is defined for one process only (N == B)"
    return "inf_cl needs d divisible by 16" if p["impl"] == "inf_cl" and p["d"] % 16 else None


def step_kwargs(p: dict, device: str) -> dict:
    return {"impl": p["impl"], "B": p["B"], "N": p["N"], "d": p["d"], "dr": p["dr"] or p["d"], "dtype": p["dtype"],
            "ref": bool(p["ref"]), "device": device, "mode": p["mode"]}


def _apply(row: dict, res: dict) -> None:
    err = res.get("error")
    if err:
        row.update(status="OOM" if err == "OOM" else "timeout" if err.startswith("timeout") else "error",
                   reason=None if err == "OOM" else err)
    row.update({k: v for k, v in res.items() if k != "error"})


def _fail(row: dict, exc: BaseException, when: str) -> None:
    row.update(status="OOM" if harness.is_oom(exc) else "error", reason=f"{when}: {harness.first_line(exc)}")


def measure_memory_cpu(row: dict, args) -> dict:
    try:
        return harness.peak_extra_rss("benchmarks.steps:make_step", step_kwargs(row, "cpu"), threads=args.threads,
                                      timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s"}


def timing_groups(rows: list[dict]) -> list[list[dict]]:
    """Rows timed together: same slice, shape and mode, every dtype (the baselines without reference join)."""
    out: dict = {}
    for r in rows:
        out.setdefault((r.get("slice"), r["B"], r["N"], r["d"], r["mode"]), []).append(r)
    return list(out.values())


def measure_group(group: list[dict], args, device: str) -> None:
    """Time the rows of one group interleaved; on CUDA first each one's memory, in process. A failure (out
    of memory included) is that row's result."""
    import torch
    built = {}
    for row in group:
        try:
            step, output_bytes = steps.make_step(**step_kwargs(row, device))
            if device == "cuda":
                step()                                 # compile / autotune outside the measurement
                _apply(row, harness.cuda_peak_extra(step, output_bytes))
            built[id(row)] = step
        except Exception as exc:                       # noqa: BLE001
            _fail(row, exc, "building")
    results = harness.time_steps(built, device=device, repeat=args.repeat, min_repeat=args.min_repeat,
                                 budget=args.point_budget)
    built.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    for row in group:
        res = results.get(id(row))
        if isinstance(res, BaseException):
            _fail(row, res, "while timing")
        elif res is not None:
            _apply(row, res)


def cpp_profile(row: dict) -> dict:
    """Thread CPU seconds per phase of one C++ step (the extension's ``set_profiling`` / ``read_profile``)."""
    from drrho_kernels.backends import cpp
    C, (step, _) = cpp.load(), steps.make_step(**step_kwargs(row, "cpu"))
    step()
    C.set_profiling(True)
    C.read_profile(True)
    try:
        c0 = time.process_time()
        step()
        total = time.process_time() - c0
        phases = dict(C.read_profile(True))
    finally:
        C.set_profiling(False)
    phases["other"] = max(total - sum(phases.values()), 0.0)
    gemm = phases.get("similarity_gemm", 0.0) + phases.get("weighted_gemm", 0.0)
    return {"process_cpu_s": total, "phases_cpu_s": phases, "gemm_share": gemm / total if total else None}


def add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_unfused`` = t_unfused / t and ``time_over_floor`` = t / t_floor (medians) against the rows
    of the same run, shape, dtype and mode (a baseline without reference against the reference run);
    ``time_over_floor_per_round_median``: the median over rounds of t / t_floor of the same round."""
    def match(impl, r) -> dict:
        same = [c for c in rows if c["impl"] == impl and c["status"] == "ok" and c["median_s"]
                and all(c[k] == r[k] for k in ("B", "N", "d", "dtype", "mode"))
                and (r["ref"] is None or (c["ref"], c["dr"]) == (r["ref"], r["dr"]))]
        return max(same, key=lambda c: bool(c["ref"]), default={})

    for r in rows:
        ok = r["status"] == "ok" and r["median_s"]
        unfused, floor = (match("unfused", r), match("gemm_floor", r)) if ok else ({}, {})
        u, f = unfused.get("median_s"), floor.get("median_s")
        r["speedup_vs_unfused"] = u / r["median_s"] if u else None
        r["time_over_floor"] = r["median_s"] / f if f else None
        mine, theirs = r.get("samples_s") or [], floor.get("samples_s") or []
        r["time_over_floor_per_round_median"] = (statistics.median(a / b for a, b in zip(mine, theirs))
                                                 if mine and len(mine) == len(theirs) else None)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0],
                                 epilog="See benchmarks/README.md.")
    preset = ap.add_mutually_exclusive_group()
    for flag, what in (("quick", "tiny shapes, every code path (Triton interpreter on the CPU), under a minute"),
                       ("cpu-step", "one CPU step, B = N = 4096, d = dr = 512, float32, forward + backward"),
                       ("cpu-half", "bfloat16 on the CPU against float32 and the unfused loss (issue 16)"),
                       ("full-cpu", "the committed CPU sweep"), ("full-cuda", "the GPU sweep")):
        preset.add_argument(f"--{flag}", dest="preset", action="store_const", const=flag, help=what)
    grid = ap.add_argument_group("grid (a custom slice; not with a preset)")
    grid.add_argument("--B", type=int, nargs="+", help="local batch sizes (rows); default 512 1024 2048")
    cols = grid.add_mutually_exclusive_group()
    cols.add_argument("--N-factor", type=float, nargs="+", help="columns N = factor * B; default 1 (one process)")
    cols.add_argument("--N", type=int, nargs="+", help="absolute column counts (points with N < B are dropped)")
    grid.add_argument("--d", type=int, nargs="+", help="embedding widths; default 512")
    grid.add_argument("--dr", type=int, help="reference width (default: dr = d)")
    grid.add_argument("--dtype", nargs="+", choices=sorted(steps.DTYPES), help="default float32")
    grid.add_argument("--ref", dest="refs", action="append_const", const=True, help="with the reference (default)")
    grid.add_argument("--no-ref", dest="refs", action="append_const", const=False, help="without the reference")
    ap.add_argument("--impls", nargs="+", help=f"of {' '.join(IMPLS)} (default: {DEFAULT_IMPLS})")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="default: all three, each measured")
    ap.add_argument("--memory-modes", nargs="+", choices=MODES, help="CPU: modes whose memory is measured in a "
                                                                     "fresh process (default forward_backward)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    for flag, kind, what in (
            ("repeat", int, "timed rounds per group (default 7; --quick 3, --cpu-half 5)"),
            ("min-repeat", int, "at least this many rounds (default 3; --quick, --cpu-half 1)"),
            ("point-budget", float, "seconds of rounds per group before --repeat is cut (default 20; 0: never)"),
            ("threads", int, "torch / OpenMP threads (default: torch's; --quick 1)"),
            ("ram-gb", float, "RAM guard in GiB (default 0.9 x MemAvailable)"),
            ("timeout", float, "seconds before a memory process is abandoned (default 1800)"),
            ("jobs", int, "CPU memory processes in parallel (default 1; --quick 2)"),
            ("wait-idle", float, "minutes to wait at most for a quiet machine (load average < 1) first"),
            ("out", str, "output .json file, or a folder (default benchmarks/results/)")):
        ap.add_argument(f"--{flag}", type=kind, help=what)
    for flag, what in (("no-memory", "CPU: no fresh-process memory runs"), ("no-progress", "no progress lines"),
                       ("profile", "C++ phase profile of the cpp rows (on in --cpu-step and --quick)")):
        ap.add_argument(f"--{flag}", action="store_true", default=None if flag == "profile" else False, help=what)
    args = ap.parse_args(argv)
    if args.preset and any(getattr(args, k) is not None for k in ("B", "N_factor", "N", "d", "dr", "dtype", "refs")):
        ap.error("grid flags define a custom slice: not with a preset (--impls and --modes narrow a preset)")
    for name, value in {**DEFAULTS, **PRESET_DEFAULTS.get(args.preset, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    import torch
    device = args.device
    if device == "auto":
        device = PRESET_DEVICE.get(args.preset) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (--full-cuda and --device cuda need one)")
    if device != PRESET_DEVICE.get(args.preset, device):
        raise SystemExit(f"--{args.preset} runs on {PRESET_DEVICE[args.preset]}, not {device}")
    if args.preset == "quick" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported, here and in the children
    if args.threads:
        torch.set_num_threads(args.threads)
    slices = preset_slices(args.preset) if args.preset else [Slice(
        "custom", B=args.B or [512, 1024, 2048], n_factor=args.N_factor or [1], N=args.N, d=args.d or [512],
        dr=args.dr, dtypes=args.dtype or ["float32"], refs=sorted(set(args.refs or [True]), reverse=True))]
    if args.preset == "quick" and device == "cpu" and not args.impls:
        for sl in slices:
            sl.impls = sl.impls or list(DEFAULT_IMPLS["cpu"]) + ["triton"]
    points = expand(slices, device, args.impls, args.modes)
    waited = time.perf_counter()
    while os.getloadavg()[0] >= 1.0 and time.perf_counter() - waited < 60 * args.wait_idle:
        time.sleep(15)
    meta = {**harness.machine_info(device), "waited_for_idle_s": round(time.perf_counter() - waited, 1)}
    ram = ram_bytes()
    ram_guard = (torch.cuda.get_device_properties(0).total_memory if device == "cuda" else
                 args.ram_gb * GIB if args.ram_gb else 0.9 * ram.get("MemAvailable", ram.get("MemTotal", 1 << 62)))
    tag = harness.slug(meta["gpu"]) if device == "cuda" else f"cpu-{harness.slug(meta['cpu'])}-{meta['torch_threads']}t"
    meta.update(ram_total_bytes=ram.get("MemTotal"), ram_available_bytes=ram.get("MemAvailable"), device_tag=tag)
    impls = sorted({p["impl"] for p in points}, key=IMPLS.index)
    unavailable = {i: why for i in impls if (why := probe(i, device))}
    for i, why in unavailable.items():
        print(f"skipping {i}: {why}", file=sys.stderr)
    suffix = "" if args.preset in ("full-cpu", "full-cuda") else f"_{args.preset or 'custom'}"
    path = Path(args.out) if args.out and args.out.endswith(".json") else \
        Path(args.out or harness.RESULTS_DIR) / f"sweep_{tag}_{meta['date'][:10]}{suffix}.json"
    config = {"argv": sys.argv[1:] if argv is None else list(argv), "preset": args.preset, "device": device,
              "slices": [dataclasses.asdict(s) for s in slices], "impls": impls, "repeat": args.repeat,
              "min_repeat": args.min_repeat, "point_budget_s": args.point_budget, "threads": args.threads,
              "ram_guard_bytes": int(ram_guard), "skipped_impls": unavailable, "memory": None if args.no_memory
              else "in process (CUDA) or a fresh process (CPU), gradients excluded: benchmarks.harness",
              "timing": "interleaved rounds after one warm-up each; backward alone: benchmarks.harness"}
    rows: list[dict] = []
    payload = {"meta": meta, "config": config, "rows": rows}
    started = time.perf_counter()
    todo = []
    for p in points:
        row = {**p, "device": device, "status": "ok", "reason": None, "median_s": None, "p20_s": None, "p80_s": None,
               "n_repeat": None, "peak_extra_bytes": None, "interpreter": device == "cpu" and p["impl"] == "triton",
               "predicted_peak_bytes": predict_peak_bytes(p), "oom_predicted": False}
        if p["impl"] == "gemm_floor":
            row["floor_gemms"] = steps.floor_gemm_count(p["B"], p["N"], bool(p["ref"]), p["mode"])
        why = unavailable.get(p["impl"]) or skip_reason(p)
        if why:
            row.update(status="skipped", reason=why)
        elif row["predicted_peak_bytes"] > ram_guard:
            row.update(status="OOM", oom_predicted=True, reason=f"predicted peak {row['predicted_peak_bytes'] / GIB:.1f}"
                                                                f" GiB > guard {ram_guard / GIB:.1f} GiB; not run")
        else:
            todo.append(row)
        rows.append(row)
    mem_todo = [] if device == "cuda" or args.no_memory else [
        r for r in todo if r["mode"] in args.memory_modes and r["_memory"]]
    for r in rows:
        del r["_memory"]
    count = iter(range(1, len(todo) + len(mem_todo) + 1))

    def progress(what, p):
        if not args.no_progress:
            print(f"[{next(count)}/{len(todo) + len(mem_todo)}] {what} {p['impl']} {p['mode']} B={p['B']} N={p['N']} "
                  f"d={p['d']} {p['dtype']} ref={p['ref']}", flush=True)
    if mem_todo:                                       # phase 1 (CPU): fresh-process memory, out of memory
        with ThreadPoolExecutor(args.jobs) as pool:
            for row, res in zip(mem_todo, pool.map(lambda r: measure_memory_cpu(r, args), mem_todo)):
                _apply(row, res)
                progress("memory", row)
        harness.write_json(path, payload)
    shape = lambda r: (r["impl"], r["B"], r["N"], r["d"], r["dr"], r["dtype"])                 # noqa: E731
    oom_shapes = {shape(r) for r in mem_todo if r["status"] == "OOM"}
    for group in timing_groups(todo):                  # phase 2: timing, in this process, interleaved
        for row in group:
            if row["status"] == "ok" and shape(row) in oom_shapes and row not in mem_todo:
                _apply(row, measure_memory_cpu(row, args))   # a sibling ran out: a fresh process first
        measure_group([r for r in group if r["status"] == "ok"], args, device)
        for row in group:
            if args.profile and row["impl"] == "cpp" and row["mode"] == "forward_backward" and row["status"] == "ok":
                row["cpp_profile"] = cpp_profile(row)
            progress("time", row)
        harness.write_json(path, payload)
    add_ratios(rows)
    meta.update(wall_s=round(time.perf_counter() - started, 1), load_average_after=os.getloadavg())
    harness.write_json(path, payload)
    summary(rows)
    print(f"wrote {path} ({meta['wall_s']:.0f} s)")
    return path


def summary(rows: list[dict]) -> None:
    """The forward + backward rows on stdout (milliseconds, MiB, ratios), and the C++ phase profiles."""
    def fmt(v, scale=1.0):
        return f"{v * scale:10.2f}" if isinstance(v, (int, float)) else f"{'-':>10}"
    print(f"{'impl':<11}{'B':>7}{'N':>7}{'d':>6} {'dtype':<9}{'ref':<6}{'status':<8}{'ms':>10}{'peak MiB':>10}"
          f"{'x unfused':>10}{'x floor':>10}")
    for r in (r for r in rows if r["mode"] == "forward_backward"):
        print(f"{r['impl']:<11}{r['B']:>7}{r['N']:>7}{r['d']:>6} {r['dtype']:<9}{str(r['ref']):<6}{r['status']:<8}"
              + "".join(fmt(r.get(k), sc) for k, sc in (("median_s", 1e3), ("peak_extra_bytes", 2 ** -20),
                                                        ("speedup_vs_unfused", 1), ("time_over_floor", 1))))
        if r.get("cpp_profile"):
            print("  cpp thread CPU s: " + "  ".join(f"{k} {v:.3f}" for k, v in r["cpp_profile"]["phases_cpu_s"].items()))


if __name__ == "__main__":
    main()
