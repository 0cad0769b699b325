"""The benchmark sweep: implementations over B, N, d, dtype, reference, mode and autocast, by preset or a custom
grid -> ``benchmarks/results/sweep_<device-tag>_<date>[_<preset>].json`` (docs/RESULTS.md, "How the benchmarks
measure")."""

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import harness, steps
from .steps import MODES

DEFAULT_IMPLS = {"cpu": ["torch", "cpp", "unfused", "clip_ce", "gemm_floor"],
                 "cuda": ["triton", "torch", "unfused", "clip_ce", "gemm_floor"]}
GIB = 1 << 30
DEFAULTS = dict(repeat=7, min_repeat=3, point_budget=20.0, threads=None, timeout=1800.0, memory_modes=[MODES[2]])


# A slice of points: the cartesian product of its lists (N: absolute column counts, else round(n_factor * B); dr
# None: d; impls None: the device's defaults; memory: the CPU's fresh-process memory runs; autocast: of the forward)
SLICE = dict(d=[512], dtypes=["float32"], refs=[True], n_factor=[1], N=None, dr=None, modes=list(MODES), impls=None,
             memory=True, autocast=None)


def grid(name: str, B: list, **kw) -> dict:
    return {**SLICE, "name": name, "B": B, **kw}


def presets() -> dict:
    """``{name: (device, option defaults, what, slices)}``."""
    theirs, fb, bf = ["authors"] * bool(os.environ.get("DRRHO_AUTHORS_REPO")), ["forward_backward"], ["bfloat16"]
    ac, one, every_round = ["cpp", "torch", "unfused", "gemm_floor"], dict(modes=fb, memory=False), dict(point_budget=0)
    family, toy = ["torch/module", "torch/per_direction", "torch/individual", "torch/distill"], dict(B=[32], d=[16])
    return {
        "quick": (None, dict(repeat=3, min_repeat=1, point_budget=2.0, threads=1), "toy shapes, every code path", [
            grid("square", **toy), grid("shard", B=[16], n_factor=[3], d=[16], dtypes=bf, refs=[False], memory=False),
            grid("autocast", **toy, impls=ac, autocast="bfloat16", **one), grid("family", **toy, impls=family, **one),
            grid("selection", **toy, modes=["forward"], impls=["torch/jest"], memory=False),
            grid("oom-guard", B=[1 << 20], d=[16], impls=["unfused"], modes=["forward"])]),   # never runs
        "cpu-step": ("cpu", every_round, "one CPU step, B = N = 4096, float32", [
            grid("cpu-step", B=[4096], modes=fb, impls=["gemm_floor", "unfused", "torch", "cpp"] + theirs)]),
        # B = N = 4096, then the paper's per-rank shape (the unfused loss standing in for the authors' SogCLRLoss)
        "cpu-autocast": ("cpu", every_round, "float32 features under bfloat16 autocast (issue 21)", [
            grid("step", B=[4096], impls=ac + theirs, autocast="bfloat16", **one),
            grid("per-rank", B=[640], N=[5120], impls=ac, autocast="bfloat16", **one)]),
        "temperatures": ("cpu", every_round, "DRRhoCLIPLoss: one scale, one per direction, per-sample", [
            grid("temperatures", B=[4096], modes=fb, impls=["cpp/module", "cpp/per_direction", "cpp/individual"])]),
        "distill": ("cpu", every_round, "DRRhoCLIPLoss with and without distillation", [
            grid("distill", B=[4096], modes=fb, impls=["cpp/module", "cpp/distill"])]),
        "selection": ("cpu", every_round, "dk.jest_select against the authors' selection", [
            grid("selection", B=[4096, 16384], modes=["forward"], impls=["cpp/jest"] + [f"{a}/jest" for a in theirs])]),
        "full-cuda": ("cuda", {}, "the GPU sweep", [
            grid("main", B=[1024 << k for k in range(8)], dtypes=bf), grid("fp32", B=[4096, 16384]),
            grid("width", B=[4096, 16384], d=[256, 1024], dtypes=bf),
            grid("noref", B=[4096, 16384], dtypes=bf, refs=[False]),
            grid("shard", B=[1024, 4096], n_factor=[16], dtypes=bf)])}


def expand(slices: list[dict], device: str, impl_filter=None, mode_filter=None) -> list[dict]:
    """All points of the slices, small shapes first in each; ``impl_filter`` narrows a slice's own impls."""
    points = {}                                        # the first of equal points
    for sl in slices:
        impls = [i for i in sl["impls"] if not impl_filter or i in impl_filter] if sl["impls"] else \
            list(impl_filter or DEFAULT_IMPLS[device])
        for dtype, d, ref, B in itertools.product(sl["dtypes"], sl["d"], sl["refs"], sorted(sl["B"])):
            cols = [n for n in sl["N"] if n >= B] if sl["N"] else sorted({max(B, round(f * B)) for f in sl["n_factor"]})
            modes = [m for m in sl["modes"] if not mode_filter or m in mode_filter]
            for N, impl, mode in itertools.product(cols, impls, modes):
                r = None if impl in steps.NO_REF else ref
                p = {"impl": impl, "mode": mode, "B": B, "N": N, "d": d, "dr": (sl["dr"] or d) if r else None,
                     "dtype": dtype, "ref": r, "autocast": sl["autocast"], "slice": sl["name"], "_memory": sl["memory"]}
                points.setdefault(tuple(p.values())[:9], p)
    return list(points.values())


# [B, N] matrices alive at the peak (forward, with backward), bounding the measured ones
_BN_MATRICES = {"unfused": (16, 16), "authors": (16, 16), "authors/jest": (10, 10), "clip_ce": (5, 9),
                "gemm_floor": (2, 3), "reference": (20, 24)}


def predict_peak_bytes(p: dict) -> int:
    """Upper estimate of the peak extra memory of a point's step (bytes), inputs and gradients included."""
    impl, B, N, d, dr, dtype, ref = (p[k] for k in ("impl", "B", "N", "d", "dr", "dtype", "ref"))
    size = steps.DTYPES[dtype].itemsize
    inputs = 4 * 2 * N * (d + ((dr or d) if ref else 0)) * size   # columns, rows, leaves, gradients
    if impl not in _BN_MATRICES:                       # fused: chunk temporaries only (~16 MiB each)
        return inputs + 8 * (16 << 20)
    count = 1 if impl == "gemm_floor" and not ref else _BN_MATRICES[impl][p["mode"] != "forward"]
    return inputs + count * B * N * (8 if impl == "reference" else size)


def probe(impl: str, device: str) -> str | None:
    """None when ``impl`` passes a smoke run on ``device`` here (an unknown one fails it), else why not."""
    try:
        with steps.process_group_of_one():
            steps.make_step(impl, 16, 16, 16, 16, "float32", True, device, MODES[0 if "jest" in impl else 2])[0]()
    except Exception as exc:                           # noqa: BLE001 (a backend's own explanation)
        return f"{impl} failed a smoke run ({harness.first_line(exc)})"


def step_kwargs(p: dict, device: str) -> dict:
    return {"impl": p["impl"], "B": p["B"], "N": p["N"], "d": p["d"], "dr": p["dr"] or p["d"], "dtype": p["dtype"],
            "ref": bool(p["ref"]), "device": device, "mode": p["mode"], "autocast": p.get("autocast")}


def _apply(row: dict, res, when: str = "") -> None:
    """A measurement's result (a dict; ``error``: a failure) or exception (raised ``when``) into ``row``."""
    if isinstance(res, BaseException):
        return row.update(status="OOM" if harness.is_oom(res) else "error", reason=f"{when}: {harness.first_line(res)}")
    if err := res.get("error"):
        row.update(status="OOM" if err == "OOM" else "timeout" if err.startswith("timeout") else "error",
                   reason=None if err == "OOM" else err)
    row.update({k: v for k, v in res.items() if k != "error"})


def measure_memory_cpu(row: dict, args) -> dict:
    return harness.peak_extra_rss("benchmarks.steps:make_step", step_kwargs(row, "cpu"), threads=args.threads,
                                  timeout=args.timeout)


def timing_groups(rows: list[dict]) -> list[list[dict]]:
    """Rows timed together: same slice, shape and mode, every dtype (the baselines without reference join)."""
    out: dict = {}
    for r in rows:
        out.setdefault((r.get("slice"), r["B"], r["N"], r["d"], r["mode"]), []).append(r)
    return list(out.values())


def measure_group(group: list[dict], args, device: str) -> None:
    """Time the rows of one group interleaved (on CUDA each one's memory first); a failure is that row's result."""
    built = {}
    with steps.process_group_of_one():
        for row in group:
            try:
                step, output_bytes = steps.make_step(**step_kwargs(row, device))
                if device == "cuda":
                    step()                             # compile / autotune outside the measurement
                    _apply(row, harness.cuda_peak_extra(step, output_bytes))
                built[id(row)] = step
            except Exception as exc:                   # noqa: BLE001
                _apply(row, exc, "building")
        results = harness.time_steps(built, device=device, repeat=args.repeat, min_repeat=args.min_repeat,
                                     budget=args.point_budget)
        built.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    for row in (r for r in group if id(r) in results):
        _apply(row, results[id(row)], "while timing")


def add_ratios(rows: list[dict]) -> None:
    """Ratios to the rows of the same slice, shape, dtype, autocast and mode (``time_over``: to each impl)."""
    ok = [c for c in rows if c["status"] == "ok" and c["median_s"]]
    for r in rows:
        same = sorted((c for c in ok if r in ok and c is not r and all(c.get(k) == r.get(k) for k in (
            "slice", "B", "N", "d", "dtype", "mode", "autocast")) and (r["ref"] is None or (c["ref"], c["dr"]) == (
                r["ref"], r["dr"]))), key=lambda c: bool(c["ref"]))
        base = {c["impl"]: c for c in same}            # the run with reference last: it wins
        r["time_over"] = {i: r["median_s"] / c["median_s"] for i, c in base.items()}
        unfused, floor = base.get("unfused", {}), base.get("gemm_floor", {})
        r["speedup_vs_unfused"] = unfused["median_s"] / r["median_s"] if unfused else None
        r["time_over_floor"] = r["time_over"].get("gemm_floor")
        mine, theirs = r.get("samples_s") or [], floor.get("samples_s") or []
        r["time_over_floor_per_round_median"] = (statistics.median(a / b for a, b in zip(mine, theirs))
                                                 if mine and len(mine) == len(theirs) else None)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n")[0])
    preset = ap.add_mutually_exclusive_group()
    for flag, (_, _, what, _) in presets().items():
        preset.add_argument(f"--{flag}", dest="preset", action="store_const", const=flag, help=what)
    grid = ap.add_argument_group("grid (a custom slice; not with a preset)")
    cols, many = grid.add_mutually_exclusive_group(), dict(nargs="+")
    for group, flag, kw in (
            (grid, "B", dict(type=int, **many, help="local batch sizes (rows); default 512 1024 2048")),
            (cols, "N-factor", dict(type=float, **many, help="columns N = factor * B; default 1 (one process)")),
            (cols, "N", dict(type=int, **many, help="absolute column counts (points with N < B are dropped)")),
            (grid, "d", dict(type=int, **many, help="embedding widths; default 512")),
            (grid, "dtype", dict(choices=sorted(steps.DTYPES), **many, help="default float32")),
            (grid, "dr", dict(type=int, help="reference width (default: dr = d)")),
            (grid, "ref", dict(dest="refs", action="append_const", const=True, help="with the reference (default)")),
            (grid, "no-ref", dict(dest="refs", action="append_const", const=False, help="without the reference")),
            (grid, "autocast", dict(choices=("bfloat16", "float16"), help="the forward under torch.autocast")),
            (ap, "impls", dict(**many, help=f"of {' '.join(steps.IMPLS)}, <backend>/<{'|'.join(steps.VARIANTS)}> "
                                            f"(default: {DEFAULT_IMPLS})")),
            (ap, "modes", dict(choices=MODES, **many, help="default: all three, each measured")),
            (ap, "memory-modes", dict(choices=MODES, **many, help="CPU: modes whose memory is measured")),
            (ap, "device", dict(choices=("auto", "cpu", "cuda"), default="auto")),
            (ap, "repeat", dict(type=int, help="timed rounds per group (default 7; --quick 3)")),
            (ap, "min-repeat", dict(type=int, help="at least this many rounds (default 3; --quick 1)")),
            (ap, "point-budget", dict(type=float, help="seconds of rounds per group, then fewer (0: never)")),
            (ap, "threads", dict(type=int, help="torch / OpenMP threads (default: torch's; --quick 1)")),
            (ap, "ram-gb", dict(type=float, help="RAM guard in GiB (default 0.9 x MemAvailable)")),
            (ap, "out", dict(help="output .json file, or a folder (default benchmarks/results/)")),
            (ap, "no-memory", dict(action="store_true", help="CPU: no fresh-process memory runs")),
            (ap, "no-progress", dict(action="store_true", help="no progress lines"))):
        group.add_argument(f"--{flag}", **kw)
    args = ap.parse_args(argv)
    if args.preset and any(getattr(args, k) is not None for k in ("B", "N_factor", "N", "d", "dr", "dtype", "refs",
                                                                   "autocast")):
        ap.error("grid flags define a custom slice: not with a preset (--impls and --modes narrow a preset)")
    for name, value in {**DEFAULTS, **(presets()[args.preset][1] if args.preset else {})}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> Path | None:
    """Per group of points (slice, shape, mode): memory in fresh processes (CPU), then the times, interleaved."""
    args = parse_args(argv)
    want = presets()[args.preset][0] if args.preset else None
    device = args.device if args.device != "auto" else want or ("cuda" if torch.cuda.is_available() else "cpu")
    if (device == "cuda" and not torch.cuda.is_available()) or (want and device != want):
        raise SystemExit(f"no {device} run here: --{args.preset} needs {want}, --device cuda a CUDA device")
    if args.preset == "quick" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported, here and in the children
    if args.threads:
        torch.set_num_threads(args.threads)
    slices = presets()[args.preset][3] if args.preset else [grid(
        "custom", B=args.B or [512, 1024, 2048], n_factor=args.N_factor or [1], N=args.N, d=args.d or [512], dr=args.dr,
        dtypes=args.dtype or ["float32"], refs=sorted(set(args.refs or [True]), reverse=True), autocast=args.autocast)]
    for sl in slices if args.preset == "quick" and device == "cpu" and not args.impls else ():
        sl["impls"] = sl["impls"] or DEFAULT_IMPLS["cpu"] + ["triton"]
    points, meta = expand(slices, device, args.impls, args.modes), harness.machine_info(device)
    ram = {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in Path("/proc/meminfo").open())}
    ram_guard = (torch.cuda.get_device_properties(0).total_memory if device == "cuda" else
                 args.ram_gb * GIB if args.ram_gb else 0.9 * ram.get("MemAvailable", ram.get("MemTotal", 1 << 62)))
    tag = harness.slug(meta["gpu"]) if device == "cuda" else f"cpu-{harness.slug(meta['cpu'])}-{meta['torch_threads']}t"
    meta.update(ram_total_bytes=ram.get("MemTotal"), ram_available_bytes=ram.get("MemAvailable"), device_tag=tag)
    impls = list(dict.fromkeys(p["impl"] for p in points))
    if unavailable := {i: why for i in impls if (why := probe(i, device))}:
        print("\n".join(f"skipping {i}: {why}" for i, why in unavailable.items()), file=sys.stderr)
    suffix = "" if args.preset == "full-cuda" else f"_{args.preset or 'custom'}"
    path = Path(args.out) if args.out and args.out.endswith(".json") else \
        Path(args.out or harness.RESULTS_DIR) / f"sweep_{tag}_{meta['date'][:10]}{suffix}.json"
    config = {**vars(args), "argv": sys.argv[1:] if argv is None else list(argv), "device": device, "slices": slices,
              "impls": impls, "ram_guard_bytes": int(ram_guard), "skipped_impls": unavailable}
    rows, started = [], time.perf_counter()
    payload = {"meta": meta, "config": config, "rows": rows}
    for p in points:
        row = {**p, **dict.fromkeys(("reason", "median_s", "p20_s", "p80_s", "n_repeat", "peak_extra_bytes")),
               "device": device, "status": "ok", "interpreter": device == "cpu" and p["impl"] == "triton",
               "predicted_peak_bytes": predict_peak_bytes(p), "oom_predicted": False}
        if p["impl"] == "gemm_floor":
            row["floor_gemms"] = steps.floor_gemm_count(p["B"], p["N"], bool(p["ref"]), p["mode"])
        if why := unavailable.get(p["impl"]) or (steps.square_only(p["impl"]) and p["N"] != p["B"] and
                                                 f"{p['impl']} is defined for one process only (N == B)"):
            row.update(status="skipped", reason=why)
        elif row["predicted_peak_bytes"] > ram_guard:
            row.update(status="OOM", oom_predicted=True, reason=f"predicted peak {predict_peak_bytes(p) / GIB:.1f} GiB "
                                                                f"> guard {ram_guard / GIB:.1f} GiB; not run")
        rows.append(row)
    todo = [r for r in rows if r["status"] == "ok"]
    mem_todo = [r for r in rows if r.pop("_memory") and r["status"] == "ok" and r["mode"] in args.memory_modes
                and device == "cpu" and not args.no_memory]
    count, total = iter(range(1, len(todo) + len(mem_todo) + 1)), len(todo) + len(mem_todo)
    progress = (lambda what, p: None) if args.no_progress else lambda what, p: print(f"[{next(count)}/{total}]", *(
        f"{k}={p[k]}" for k in ("impl", "mode", "B", "N", "d", "dtype", "ref", "autocast", "status", what)), flush=True)
    for row in mem_todo:                               # phase 1 (CPU): fresh-process memory, out of memory
        _apply(row, measure_memory_cpu(row, args))
        progress("peak_extra_bytes", row)
    shape = lambda r: (r["impl"], r["B"], r["N"], r["d"], r["dr"], r["dtype"])                 # noqa: E731
    oom_shapes = {shape(r) for r in mem_todo if r["status"] == "OOM"}
    for group in timing_groups(todo):                  # phase 2: timing, in this process, interleaved
        harness.write_json(path, payload)
        for row in group:
            if row["status"] == "ok" and shape(row) in oom_shapes and row not in mem_todo:
                _apply(row, measure_memory_cpu(row, args))   # a sibling ran out: a fresh process first
        measure_group([r for r in group if r["status"] == "ok"], args, device)
        for row in group:
            progress("median_s", row)
    add_ratios(rows)
    meta.update(wall_s=round(time.perf_counter() - started, 1), load_average_after=os.getloadavg())
    harness.write_json(path, payload)
    print(f"wrote {path} ({meta['wall_s']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
