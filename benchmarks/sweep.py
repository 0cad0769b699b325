"""The benchmark sweep: fused backends against the baselines over B, N, d, dtype and reference.

One command per machine (see benchmarks/README.md)::

    python -m benchmarks.sweep --full-cpu          # the committed CPU sweep (35-40 min on 2 quiet cores)
    python -m benchmarks.sweep --full-cuda         # the same grid shape on a GPU
    python -m benchmarks.sweep --quick             # smoke run of every code path, under a minute
    python -m benchmarks.sweep --B 512 1024 --N-factor 1 4 --d 512 --dtype float32 bfloat16 --ref --no-ref

Every point is one ``(impl, mode, B, N, d, dr, dtype, ref)``. ``impl`` is a fused backend of
``drrho_kernels`` (``torch``, ``cpp``, ``triton``; discovered at run time, skipped with the reason
when missing) or a baseline of :mod:`benchmarks.steps` (``unfused``: the loss as the authors' code
computes it, ``clip_ce``: open_clip's plain CLIP cross-entropy, ``gemm_floor``: the GEMM-sized
products a step cannot avoid, ``inf_cl``: Inf-CL on CUDA when importable). ``N != B`` is one process
of a distributed run: B local rows against N gathered columns.

Modes: ``forward`` and ``forward_backward`` are measured; ``backward`` is *derived* (median of
forward + backward minus median of forward, no percentiles) and flagged ``"derived": true``.

Measurement (benchmarks/harness.py):

- CPU, memory: each forward + backward point (``--memory-modes``) runs in a fresh Python process
  (``harness.peak_extra_rss``): peak resident memory above what was live before the step, minus
  the gradients it must return. A point whose process dies of memory is ``"OOM"``; its forward
  sibling then gets a fresh-process run too before it is timed. Points whose *predicted* peak (from the dozen
  ``[B, N]`` matrices of the unfused loss, see :func:`predict_peak_bytes`) exceeds the RAM guard
  are not run and are ``"OOM"`` with ``"oom_predicted": true``.
- CPU, time: in this process, after the fresh-process run showed the point fits, the
  implementations of one shape and mode interleaved (:func:`time_cpu_group`): one warm-up each,
  then ``--repeat`` rounds in which each runs once (fewer, but at least ``--min-repeat``, when the
  slowest takes longer than ``--point-budget / --repeat`` seconds); median, 20th and 80th
  percentiles. Interleaving makes a slow spell of a shared machine hit every implementation of a
  shape alike. A step longer
  than ``LONG_STEP_S`` (2 s) keeps its warm-up run as a sample (``"first_run_counted": true``).
- CUDA: in process, ``triton.testing.do_bench`` quantiles and ``torch.cuda.max_memory_allocated``;
  ``torch.cuda.OutOfMemoryError`` is recorded as ``"OOM"``.

Output: ``benchmarks/results/sweep_<device-tag>_<date>[_<preset>].json`` (machine, versions,
commit, full configuration, one row per point, ratios against the unfused loss and the floor of
the same run) and a tidy CSV beside it (Liger's columns). The JSON is rewritten after every point,
so an interrupted sweep keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

from . import harness

MODES = ("forward", "forward_backward")
FUSED = ("torch", "cpp", "triton", "reference")
BASELINES = ("unfused", "clip_ce", "gemm_floor", "inf_cl")
NO_REF_IMPLS = ("clip_ce", "inf_cl")          # they ignore the reference model: measured once, ref = None
SQUARE_ONLY = ("clip_ce", "inf_cl")           # defined for one process only (N == B)
DEFAULT_IMPLS = {"cpu": ("torch", "cpp", "unfused", "clip_ce", "gemm_floor"),
                 "cuda": ("triton", "torch", "unfused", "clip_ce", "gemm_floor", "inf_cl")}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

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
        if self.N is not None:
            return [n for n in self.N if n >= B]
        return sorted({max(B, int(round(f * B))) for f in self.n_factor})


def preset_slices(name: str, device: str) -> list[Slice]:
    if name == "quick":
        # Tiny shapes, every path: square and a distributed shard, with and without reference,
        # float32 and bfloat16. Each point costs a fresh process (~2 s), so keep the count small.
        # The last slice is never run: its predicted peak (B = 2^20) exceeds any RAM, so it exercises
        # the OOM guard and the OOM markers of the plots.
        # (The Triton interpreter costs ~0.1 s per step at B = 16 but seconds at B = 64.)
        return [Slice("square", B=[32], d=[16], dtypes=["float32"], refs=[True]),
                Slice("shard", B=[16], n_factor=[3], d=[16], dtypes=["bfloat16"], refs=[False], memory=False),
                Slice("oom-guard", B=[1 << 20], d=[16], dtypes=["float32"], refs=[True], impls=["unfused"],
                      modes=["forward"])]
    if name == "full-cpu":
        # Main slice: d = 512 float32 with reference, B = 512 .. 16384, where the unfused loss still fits
        # a 24 GB machine (~13 [B, B] float32 matrices: 14 GB at 16384); "beyond": B = 24576 (31 GB for
        # the unfused loss, OOM by prediction) for the fused paths and the floor, forward + backward
        # only. Then smaller slices across d, dtype, reference and a distributed shard (N = 8 B).
        # Estimated 35-40 min on 2 quiet cores (python -m benchmarks.sweep --full-cpu --estimate).
        return [Slice("main", B=[512, 1024, 2048, 4096, 8192, 16384], d=[512], dtypes=["float32"], refs=[True]),
                Slice("main", B=[24576], d=[512], dtypes=["float32"], refs=[True], modes=["forward_backward"],
                      impls=["torch", "cpp", "unfused", "gemm_floor"]),
                Slice("width", B=[1024, 4096], d=[256, 1024], dtypes=["float32"], refs=[True]),
                Slice("bf16", B=[1024, 4096], d=[512], dtypes=["bfloat16"], refs=[True]),
                Slice("noref", B=[1024, 4096], d=[512], dtypes=["float32"], refs=[False]),
                Slice("shard", B=[512, 1024, 2048], n_factor=[8], d=[512], dtypes=["float32"], refs=[True])]
    if name == "full-cuda":
        return [Slice("main", B=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], d=[512],
                      dtypes=["bfloat16"], refs=[True]),
                Slice("fp32", B=[4096, 16384], d=[512], dtypes=["float32"], refs=[True]),
                Slice("width", B=[4096, 16384], d=[256, 1024], dtypes=["bfloat16"], refs=[True]),
                Slice("noref", B=[4096, 16384], d=[512], dtypes=["bfloat16"], refs=[False]),
                Slice("shard", B=[1024, 4096], n_factor=[16], d=[512], dtypes=["bfloat16"], refs=[True])]
    raise ValueError(f"unknown preset {name!r}")


def expand(slices: list[Slice], device: str, impl_filter=None, mode_filter=None) -> list[dict]:
    """All points of the slices, in a stable order (small shapes first inside each slice)."""
    points, seen = [], set()
    for sl in slices:
        if sl.impls:                                   # a slice's own list is only narrowed by --impls
            impls = [i for i in sl.impls if not impl_filter or i in impl_filter]
        else:
            impls = list(impl_filter or DEFAULT_IMPLS[device])
        modes = [m for m in sl.modes if not mode_filter or m in mode_filter]
        for dtype in sl.dtypes:
            for d in sl.d:
                for ref in sl.refs:
                    for B in sorted(sl.B):
                        for N in sl.columns(B):
                            for impl in impls:
                                for mode in modes:
                                    r = None if impl in NO_REF_IMPLS else ref
                                    dr = (sl.dr or d) if r else None
                                    p = {"impl": impl, "mode": mode, "B": B, "N": N, "d": d, "dr": dr,
                                         "dtype": dtype, "ref": r, "slice": sl.name, "_memory": sl.memory}
                                    key = point_key(p) + (impl, mode)
                                    if key not in seen:
                                        seen.add(key)
                                        points.append(p)
    return points


def point_key(p: dict) -> tuple:
    """What must match for two rows to be compared (ref None matches both)."""
    return (p["B"], p["N"], p["d"], p["dr"] if p["ref"] else None, p["dtype"], p["ref"])


# ----------------------------------------------------------------------------------------------
# Memory prediction and the OOM guard
# ----------------------------------------------------------------------------------------------

# [B, N] matrices alive at the peak, measured at B = 1024..2048 (benchmarks/README.md):
# unfused 12-16 (forward and forward + backward), clip_ce ~5 / ~8.5, the floor 1-2 similarity matrices.
_BN_MATRICES = {"unfused": (16, 16), "clip_ce": (5, 9), "gemm_floor": (2, 2), "reference": (20, 24)}


def predict_peak_bytes(impl: str, mode: str, B: int, N: int, d: int, dr: int | None, dtype: str,
                       ref: bool | None) -> int:
    """Upper estimate of the peak extra memory of one step (bytes), inputs and gradients included."""
    elem = ELEMENT_BYTES[dtype]
    width = d + ((dr or d) if ref else 0)
    inputs = 4 * 2 * N * width * elem                  # columns, row copies, fresh leaves, gradients
    matrices = _BN_MATRICES.get(impl)
    if matrices is None:                               # fused: chunk temporaries only (~16 MiB each)
        return inputs + 8 * (16 << 20)
    count = matrices[0] if mode == "forward" else matrices[1]
    if impl == "gemm_floor" and not ref:
        count = 1
    if impl == "reference":
        elem = 8
    return inputs + count * B * N * elem


def ram_bytes() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------

def probe(impl: str, device: str) -> str | None:
    """None when ``impl`` can run on ``device`` here, else the reason it is skipped."""
    if impl in FUSED:
        import drrho_kernels as dk
        from drrho_kernels import backends
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if impl not in dk.available_backends(device):
                try:
                    backends.resolve(impl, __import__("torch").device(device))
                except Exception as exc:               # the backend's own explanation
                    return str(exc)
                return f"backend {impl!r} is not available on {device}"
    elif impl == "inf_cl":
        if device != "cuda":
            return "inf_cl (Inf-CL) runs on CUDA only"
        if importlib.util.find_spec("inf_cl") is None:
            return ("inf_cl is not importable (optional; its PyPI package pins its own torch, so it is "
                    "never installed by this project)")
    elif impl not in BASELINES:
        return f"unknown impl {impl!r}"
    from .steps import make_step
    try:                                               # a smoke run: a half-written backend fails here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n, d = (256, 256) if impl == "inf_cl" else (16, 16)   # Inf-CL tiles rows and a 256-wide head
            step, _ = make_step(impl, n, n, d, d, "float32", True, device, "forward_backward")
            step()
    except Exception as exc:
        return f"{impl} failed a smoke run ({_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def skip_reason(p: dict) -> str | None:
    if p["impl"] in SQUARE_ONLY and p["N"] != p["B"]:
        return f"{p['impl']} is defined for one process only (N == B)"
    if p["impl"] == "inf_cl" and p["d"] % 16:
        return "inf_cl needs d divisible by 16"
    return None


# ----------------------------------------------------------------------------------------------
# Measuring one point
# ----------------------------------------------------------------------------------------------

def step_kwargs(p: dict, device: str) -> dict:
    return {"impl": p["impl"], "B": p["B"], "N": p["N"], "d": p["d"], "dr": p["dr"] or p["d"],
            "dtype": p["dtype"], "ref": bool(p["ref"]), "device": device, "mode": p["mode"]}


def _empty_row(p: dict, device: str) -> dict:
    row = dict(p)
    row.update(device=device, status="ok", reason=None, median_s=None, p20_s=None, p80_s=None, n_repeat=None,
               peak_extra_bytes=None, peak_raw_bytes=None, output_bytes=None, derived=False)
    return row


def measure_memory_cpu(p: dict, args) -> dict:
    """Fresh-process peak memory; ``{"error": ...}`` on failure (``"OOM"`` when it ran out)."""
    try:
        return harness.peak_extra_rss("benchmarks.steps:make_step", step_kwargs(p, "cpu"), threads=args.threads,
                                      timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s"}


LONG_STEP_S = 2.0     # a step this long is warm from its first run: one-off costs are milliseconds


def time_cpu_group(group: list[dict], args) -> dict:
    """Time the implementations of one shape and mode *interleaved*: one warm-up run each (which
    also sizes the repeat count), then rounds in which every implementation runs once, so that a
    slow spell of a shared machine hits all of them alike and the ratios of the same run stay
    meaningful. For a step longer than LONG_STEP_S the warm-up run is kept as a sample
    (``"first_run_counted": true``). Returns ``{id(row): result}``; a failure is that row's result."""
    from .steps import make_step
    steps, first, results = {}, {}, {}
    for row in group:
        try:
            steps[id(row)] = make_step(**step_kwargs(row, "cpu"))[0]
            t0 = time.perf_counter()
            steps[id(row)]()
            first[id(row)] = time.perf_counter() - t0
        except Exception as exc:                       # noqa: BLE001 (a failing step is a result)
            steps.pop(id(row), None)
            results[id(row)] = exc
    repeat = args.repeat
    if args.point_budget and first:
        slowest = max(first.values())
        if slowest * repeat > args.point_budget:
            repeat = max(args.min_repeat, int(args.point_budget / max(slowest, 1e-9)))
    timed = harness.time_interleaved(steps, repeat, wall={k: [t] for k, t in first.items() if t >= LONG_STEP_S})
    results.update(timed["errors"])
    steps.clear()
    gc.collect()
    for key, times in timed["wall"].items():
        if key not in results:
            results[key] = {**harness.summarize(times), "first_run_counted": first[key] >= LONG_STEP_S}
    return results


def timing_groups(rows: list[dict]) -> list[list[dict]]:
    """Rows timed together: same slice, shape and mode (baselines without a reference join the group)."""
    out: dict = {}
    for r in rows:
        out.setdefault((r.get("slice"), r["B"], r["N"], r["d"], r["dtype"], r["mode"]), []).append(r)
    return list(out.values())


def measure_cuda_point(p: dict, args) -> dict:
    """Memory then time, in process; OOM and other failures are results."""
    import torch
    from .steps import make_step
    step = None
    try:
        step, output_bytes = make_step(**step_kwargs(p, "cuda"))
        step()                                         # compile / autotune outside the measurement
        mem = harness.cuda_peak_extra(step, output_bytes)
        tim = harness.time_cuda(step, warmup_ms=args.cuda_warmup_ms, rep_ms=args.cuda_rep_ms)
        return {**mem, **tim}
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as exc:                           # noqa: BLE001 (e.g. cuBLAS allocation failures)
        if harness._is_oom(0, str(exc)):
            return {"error": "OOM"}
        return {"error": _first_line(exc)}
    finally:
        del step
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Derived rows and ratios
# ----------------------------------------------------------------------------------------------

def derive_backward(rows: list[dict]) -> list[dict]:
    """``backward = forward_backward - forward`` (medians) for every (impl, point) that has both."""
    index = {(r["impl"], point_key(r), r["mode"]): r for r in rows if not r.get("derived")}
    out = []
    for (impl, key, mode), fb in index.items():
        if mode != "forward_backward":
            continue
        fw = index.get((impl, key, "forward"))
        if fw is None:
            continue
        row = dict(fb)
        row.update(mode="backward", derived=True, p20_s=None, p80_s=None, n_repeat=None, peak_extra_bytes=None,
                   peak_raw_bytes=None, output_bytes=None, oom_predicted=fb.get("oom_predicted", False))
        if fb.get("floor_gemms") and fw.get("floor_gemms"):
            row["floor_gemms"] = fb["floor_gemms"] - fw["floor_gemms"]
        if fb["status"] == "ok" and fw["status"] == "ok":
            diff = fb["median_s"] - fw["median_s"]
            row["median_s"] = diff if diff > 0 else None
            row["reason"] = ("derived: median(forward_backward) - median(forward)" if diff > 0 else
                             "derived backward not positive (forward + backward median <= forward median): "
                             "timing noise, no value")
        else:
            bad = fb if fb["status"] != "ok" else fw
            row.update(status=bad["status"], reason=bad.get("reason"), median_s=None)
        out.append(row)
    return out


def add_ratios(rows: list[dict]) -> None:
    """Per row: ``speedup_vs_unfused`` = t_unfused / t, ``time_over_floor`` = t / t_floor,
    ``memory_vs_unfused`` = peak / peak_unfused, all against rows of the same run and shape."""
    def lookup(impl):
        table: dict = {}
        for r in rows:
            if r["impl"] == impl and r["status"] == "ok":
                table.setdefault((r["B"], r["N"], r["d"], r["dtype"], r["mode"]), []).append(r)
        return table
    unfused, floor = lookup("unfused"), lookup("gemm_floor")

    def match(table, r):
        candidates = table.get((r["B"], r["N"], r["d"], r["dtype"], r["mode"]), [])
        if r["ref"] is None:                           # ref-free baselines: compare with the ref run first
            candidates = sorted(candidates, key=lambda c: not c["ref"])
            return candidates[0] if candidates else None
        return next((c for c in candidates if c["ref"] == r["ref"] and c["dr"] == r["dr"]), None)

    for r in rows:
        r["speedup_vs_unfused"] = r["time_over_floor"] = r["memory_vs_unfused"] = None
        if r["status"] != "ok" or r["median_s"] is None:
            continue
        u, f = match(unfused, r), match(floor, r)
        # A derived backward can have no time (median_s None): no ratio against it, either way.
        if u is not None and u["median_s"] and r["median_s"] > 0:
            r["speedup_vs_unfused"] = u["median_s"] / r["median_s"]
        if u is not None and u.get("peak_extra_bytes") and r.get("peak_extra_bytes") is not None:
            r["memory_vs_unfused"] = r["peak_extra_bytes"] / u["peak_extra_bytes"]
        if f is not None and f["median_s"]:
            r["time_over_floor"] = r["median_s"] / f["median_s"]


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def device_tag(device: str, meta: dict) -> str:
    if device == "cuda":
        return slug(meta.get("gpu", "cuda"))
    return f"cpu-{slug(meta.get('cpu', 'cpu'))}-{meta.get('torch_threads')}t"


CSV_COLUMNS = ("provider", "mode", "metric", "x_name", "x_value", "y_value_50", "y_value_20", "y_value_80",
               "extra_benchmark_config_str", "status", "gpu_name", "timestamp", "kernel_operation_name",
               "version")


def write_csv(path: Path, payload: dict) -> None:
    """Liger's tidy layout: one line per (provider, mode, metric, x)."""
    import csv
    meta = payload["meta"]
    device_name = meta.get("gpu") or f"{meta.get('cpu')} ({meta.get('torch_threads')} threads)"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in payload["rows"]:
            config = json.dumps({k: r[k] for k in ("N", "d", "dr", "dtype", "ref", "slice", "derived")})
            metrics = [("time_s", r["median_s"], r["p20_s"], r["p80_s"])]
            if not r.get("derived"):
                metrics.append(("peak_extra_bytes", r["peak_extra_bytes"], None, None))
            for metric, y50, y20, y80 in metrics:
                w.writerow([r["impl"], r["mode"], metric, "B", r["B"], y50, y20, y80, config, r["status"],
                            device_name, meta["date"], "drrho_clip_loss", meta["commit"]])


def output_path(args, device: str, meta: dict) -> Path:
    if args.out and args.out.endswith(".json"):
        return Path(args.out)
    folder = Path(args.out) if args.out else harness.RESULTS_DIR
    suffix = {"full-cpu": "", "full-cuda": ""}.get(args.preset, f"_{args.preset or 'custom'}")
    return folder / f"sweep_{device_tag(device, meta)}_{meta['date'][:10]}{suffix}.json"


def save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Runtime estimate
# ----------------------------------------------------------------------------------------------

SUBPROCESS_OVERHEAD_S = 2.5                             # python + torch import of a memory process


def estimate(points: list[dict], args, ram_guard: float) -> tuple[float, list[str]]:
    """Seconds the CPU sweep will take, from a calibration run of each (impl, dtype, mode) at
    B = N = 1024, d = dr = 512, scaled by B * N * (d + dr) (twice for a distributed shard, whose two
    directions are distinct products). Calibrates here, so it is as noisy as this machine."""
    from .steps import make_step
    cal, lines = {}, []
    for p in points:
        key = (p["impl"], p["dtype"], p["mode"])
        if key in cal or skip_reason(p) or p["impl"] == "triton":   # no interpreter calibration at B = 1024
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step, _ = make_step(p["impl"], 1024, 1024, 512, 512, p["dtype"], True, "cpu", p["mode"])
                cal[key] = harness.time_cpu(step, warmup=1, repeat=2)["median_s"]
        except Exception:
            cal[key] = None
    total = 0.0
    per_slice: dict = {}
    for p in points:
        t_cal = cal.get((p["impl"], p["dtype"], p["mode"]))
        if t_cal is None or skip_reason(p):
            continue
        if predict_peak_bytes(p["impl"], p["mode"], p["B"], p["N"], p["d"], p["dr"], p["dtype"], p["ref"]) > ram_guard:
            continue
        width = p["d"] + (p["dr"] or 0)
        scale = p["B"] * p["N"] * width / (1024 * 1024 * 1024)
        if p["N"] != p["B"] and p["impl"] not in ("unfused",):
            scale *= 2
        t = t_cal * scale
        repeat = args.repeat
        if args.point_budget and t * repeat > args.point_budget:
            repeat = max(args.min_repeat, int(args.point_budget / t))
        memory = not args.no_memory and p["_memory"] and p["mode"] in args.memory_modes
        runs = repeat if t >= LONG_STEP_S else 1 + repeat
        cost = runs * t + ((2 * t + SUBPROCESS_OVERHEAD_S) if memory else 0)
        total += cost
        per_slice[p["slice"]] = per_slice.get(p["slice"], 0.0) + cost
    for name, cost in per_slice.items():
        lines.append(f"  slice {name}: {cost / 60:.1f} min")
    lines.append("  calibration (s per step at B = N = 1024, d = dr = 512): "
                 + ", ".join(f"{k[0]}/{k[1]}/{k[2]}={v:.3f}" for k, v in cal.items() if v is not None))
    return total, lines


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep",
        description="Benchmark sweep of the DRRho-CLIP loss: fused backends vs the unfused loss, plain CLIP "
                    "cross-entropy, the GEMM floor and Inf-CL. Writes JSON + CSV to benchmarks/results/.",
        epilog="backward is derived: median(forward_backward) - median(forward). See benchmarks/README.md.")
    preset = ap.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="tiny shapes through every path (fresh-process memory, OOM guard, Triton interpreter "
                             "on CPU when the triton backend exists); under a minute")
    preset.add_argument("--full-cpu", dest="preset", action="store_const", const="full-cpu",
                        help="the committed CPU sweep: d=512 float32 with reference, B=512..16384 and 24576 "
                             "(beyond where the unfused loss fits in 24 GB), plus d=256/1024, bfloat16, "
                             "no-reference and distributed-shard (N=8B) slices")
    preset.add_argument("--full-cuda", dest="preset", action="store_const", const="full-cuda",
                        help="the GPU sweep: bfloat16 d=512 B=1024..131072 plus float32, width, no-ref, shard slices")
    grid = ap.add_argument_group("grid (a custom slice; not with a preset)")
    grid.add_argument("--B", type=int, nargs="+", help="local batch sizes (rows); default 512 1024 2048")
    cols = grid.add_mutually_exclusive_group()
    cols.add_argument("--N-factor", type=float, nargs="+", help="columns N = factor * B (1: one process); default 1")
    cols.add_argument("--N", type=int, nargs="+", help="absolute column counts (points with N < B are dropped)")
    grid.add_argument("--d", type=int, nargs="+", help="embedding width(s) d; default 512")
    grid.add_argument("--dr", type=int, help="reference width (default: dr = d)")
    grid.add_argument("--dtype", nargs="+", choices=sorted(ELEMENT_BYTES), help="default float32")
    grid.add_argument("--ref", dest="refs", action="append_const", const=True,
                      help="with the reference model (default); give --ref --no-ref for both")
    grid.add_argument("--no-ref", dest="refs", action="append_const", const=False, help="without the reference model")
    ap.add_argument("--impls", nargs="+", help=f"implementations (default cpu: {' '.join(DEFAULT_IMPLS['cpu'])}; "
                                               f"cuda: {' '.join(DEFAULT_IMPLS['cuda'])}; also: reference)")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="measured modes (default both; backward is derived)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--repeat", type=int, help="timed runs per CPU point (default 7; --quick 3)")
    ap.add_argument("--min-repeat", type=int, help="at least this many timed runs (default 3; --quick 1)")
    ap.add_argument("--point-budget", type=float,
                    help="seconds of timed runs per CPU point before --repeat is cut down (default 20; --quick 2)")
    ap.add_argument("--threads", type=int,
                    help="torch / OpenMP threads on the CPU (default: torch's default, all cores; --quick 1)")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the fresh-process memory runs")
    ap.add_argument("--memory-modes", nargs="+", choices=MODES,
                    help="CPU: modes whose memory is measured in a fresh process (default forward_backward)")
    ap.add_argument("--ram-gb", type=float,
                    help="RAM guard in GiB: points predicted to need more are OOM without running "
                         "(default: 0.9 x MemAvailable at start; e.g. --ram-gb 20 to emulate a 24 GB machine)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a memory process is abandoned")
    ap.add_argument("--jobs", type=int,
                    help="memory processes run in parallel (CPU; default 1, --quick 2; they never overlap timing)")
    ap.add_argument("--cuda-warmup-ms", type=int, default=25)
    ap.add_argument("--cuda-rep-ms", type=int, default=100)
    ap.add_argument("--out", help="output .json file, or a folder (default benchmarks/results/)")
    ap.add_argument("--estimate", action="store_true",
                    help="print the points and an estimated CPU runtime (calibrated here), then exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    grid_given = any(getattr(args, k) is not None for k in ("B", "N_factor", "N", "d", "dr", "dtype", "refs"))
    if args.preset and grid_given:
        ap.error("grid flags (--B, --N, --N-factor, --d, --dr, --dtype, --ref/--no-ref) define a custom slice; "
                 "they cannot be combined with a preset (--impls and --modes can)")
    return args


def custom_slices(args) -> list[Slice]:
    return [Slice("custom", B=args.B or [512, 1024, 2048], n_factor=args.N_factor or [1], N=args.N,
                  d=args.d or [512], dr=args.dr, dtypes=args.dtype or ["float32"],
                  refs=sorted(set(args.refs), reverse=True) if args.refs else [True])]


class _Progress:
    """tqdm when installed (the GPU box may lack it), plain lines otherwise."""

    def __init__(self, total, disable):
        self.bar = None
        self.total, self.count, self.disable = total, 0, disable
        if not disable:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="pt", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label):
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif not self.disable:
            print(f"[{self.count}/{self.total}] {label}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _label(p):
    ref = {True: "ref", False: "noref", None: "-"}[p["ref"]]
    return f"{p['impl']} {p['mode']} B={p['B']} N={p['N']} d={p['d']} {p['dtype']} {ref}"


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.preset == "full-cuda" and device != "cuda":
        raise SystemExit("--full-cuda needs a CUDA device (use --full-cpu or --quick here)")
    if args.preset == "full-cpu" and device != "cpu":
        raise SystemExit("--full-cpu runs on the CPU: add --device cpu")
    if args.preset == "quick" and device == "cpu":
        # Triton's interpreter runs the kernels on CPU tensors; it must be set before triton (and
        # drrho_kernels) are imported, in this process and in the memory processes it starts.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    quick = args.preset == "quick"
    # --quick: one thread per process (tiny ops on a busy machine stall on thread hand-offs), two
    # memory processes at once, few repeats.
    for name, default, quick_default in (("jobs", 1, 2), ("repeat", 7, 3), ("min_repeat", 3, 1),
                                         ("point_budget", 20.0, 2.0), ("threads", None, 1),
                                         ("memory_modes", ["forward_backward"], ["forward_backward"])):
        if getattr(args, name) is None:
            setattr(args, name, quick_default if quick else default)
    if args.threads:
        torch.set_num_threads(args.threads)
    slices = preset_slices(args.preset, device) if args.preset else custom_slices(args)
    if args.preset == "quick" and device == "cpu" and not args.impls:
        for sl in slices:
            sl.impls = sl.impls or list(DEFAULT_IMPLS["cpu"]) + ["triton"]
    points = expand(slices, device, args.impls, args.modes)

    meta = harness.machine_info()
    ram = ram_bytes()
    if device == "cuda":
        ram_guard = torch.cuda.get_device_properties(0).total_memory
    elif args.ram_gb:
        ram_guard = args.ram_gb * GIB
    else:
        ram_guard = 0.9 * ram.get("MemAvailable", ram.get("MemTotal", 1 << 62))
    meta.update(device=device, device_tag=None, ram_total_bytes=ram.get("MemTotal"),
                ram_available_bytes=ram.get("MemAvailable"), triton_interpreter=os.environ.get("TRITON_INTERPRET"))
    meta["device_tag"] = device_tag(device, meta)

    impls = sorted({p["impl"] for p in points}, key=lambda i: (FUSED + BASELINES).index(i)
                   if i in FUSED + BASELINES else 99)
    unavailable = {i: probe(i, device) for i in impls}
    unavailable = {i: why for i, why in unavailable.items() if why}
    for i, why in unavailable.items():
        print(f"skipping {i}: {why}", file=sys.stderr)

    if args.estimate:
        if device != "cpu":
            raise SystemExit("--estimate calibrates CPU sweeps only")
        runnable = [p for p in points if p["impl"] not in unavailable]
        total, lines = estimate(runnable, args, ram_guard)
        print(f"{len(points)} points ({len(runnable)} runnable) on {device}; estimated {total / 60:.1f} min "
              f"with memory processes" + ("" if not args.no_memory else " (no memory runs)"))
        print("\n".join(lines))
        return None

    path = output_path(args, device, meta)
    config = {"argv": sys.argv[1:] if argv is None else list(argv), "preset": args.preset, "device": device,
              "slices": [dataclasses.asdict(s) for s in slices], "impls": impls, "repeat": args.repeat,
              "min_repeat": args.min_repeat, "point_budget_s": args.point_budget, "threads": args.threads,
              "ram_guard_bytes": int(ram_guard), "memory": None if args.no_memory and device == "cpu" else
              ("torch.cuda.max_memory_allocated" if device == "cuda" else
               "fresh process, VmHWM - VmRSS before the step, minus gradient bytes (harness.peak_extra_rss)"),
              "timing": "triton.testing.do_bench quantiles" if device == "cuda" else
              "in-process wall clock after one warm-up (harness.time_cpu)",
              "backward": "derived: median(forward_backward) - median(forward)",
              "skipped_impls": unavailable}
    payload = {"meta": meta, "config": config, "rows": []}
    rows: list[dict] = []
    started = time.perf_counter()

    def flush(final=False):
        payload["rows"] = rows + (derive_backward(rows) if final else [])
        if final:
            add_ratios(payload["rows"])
            meta["wall_s"] = round(time.perf_counter() - started, 1)
        save(path, payload)

    # Decide every point that does not need a measurement.
    todo = []
    for p in points:
        row = _empty_row(p, device)
        row["interpreter"] = bool(device == "cpu" and p["impl"] == "triton")
        row["predicted_peak_bytes"] = predict_peak_bytes(p["impl"], p["mode"], p["B"], p["N"], p["d"], p["dr"],
                                                         p["dtype"], p["ref"])
        row["oom_predicted"] = False
        if p["impl"] == "gemm_floor":
            from .steps import floor_gemm_count
            row["floor_gemms"] = floor_gemm_count(p["B"], p["N"], bool(p["ref"]), p["mode"])
        why = unavailable.get(p["impl"]) or skip_reason(p)
        if why:
            row.update(status="skipped", reason=why)
        elif row["predicted_peak_bytes"] > ram_guard:
            row.update(status="OOM", oom_predicted=True,
                       reason=f"predicted peak {row['predicted_peak_bytes'] / GIB:.1f} GiB > guard "
                              f"{ram_guard / GIB:.1f} GiB; not run")
        else:
            todo.append(row)
        rows.append(row)

    mem_todo = [] if device == "cuda" or args.no_memory else [r for r in todo if r["mode"] in args.memory_modes
                                                              and r["_memory"]]
    for r in rows:
        del r["_memory"]
    progress = _Progress(len(todo) + len(mem_todo), args.no_progress)
    if device == "cuda":
        for row in todo:
            res = measure_cuda_point(row, args)
            _apply(row, res)
            progress.update(_label(row))
            flush()
    else:
        if not args.no_memory:                         # phase 1: fresh-process memory (and OOM) runs
            if args.jobs > 1:
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(args.jobs) as pool:
                    for row, res in zip(mem_todo, pool.map(lambda r: measure_memory_cpu(r, args), mem_todo)):
                        _apply(row, res)
                        progress.update("memory " + _label(row))
            else:
                for row in mem_todo:
                    _apply(row, measure_memory_cpu(row, args))
                    progress.update("memory " + _label(row))
                    flush()
        measured = {id(r) for r in mem_todo}
        oom_shapes = {(r["impl"], point_key(r)) for r in mem_todo if r["status"] == "OOM"}
        for group in timing_groups(todo):              # phase 2: timing, in this process, interleaved
            for row in group:
                if (row["status"] == "ok" and id(row) not in measured and not args.no_memory
                        and (row["impl"], point_key(row)) in oom_shapes):
                    _apply(row, measure_memory_cpu(row, args))   # its sibling ran out: check in a fresh process
            runnable = [r for r in group if r["status"] == "ok"]
            results = time_cpu_group(runnable, args) if runnable else {}
            for row in group:
                res = results.get(id(row))
                if isinstance(res, MemoryError):
                    row.update(status="OOM", reason="MemoryError while timing")
                elif isinstance(res, Exception):
                    oom = harness._is_oom(0, str(res))
                    row.update(status="OOM" if oom else "error", reason=f"while timing: {_first_line(res)}")
                elif res is not None:
                    _apply(row, res)
                progress.update("time " + _label(row))
            flush()
    progress.close()
    flush(final=True)
    write_csv(path.with_suffix(".csv"), payload)
    summary(payload["rows"])
    print(f"wrote {path} and {path.with_suffix('.csv').name} ({meta['wall_s']:.0f} s)")
    return path


def _apply(row: dict, res: dict) -> None:
    if "error" in res:
        err = res["error"]
        row.update(status="OOM" if err == "OOM" else ("timeout" if err.startswith("timeout") else "error"),
                   reason=None if err == "OOM" else err)
        return
    for k in ("median_s", "p20_s", "p80_s", "peak_extra_bytes", "peak_raw_bytes", "output_bytes"):
        if k in res:
            row[k] = res[k]
    if "n" in res:
        row["n_repeat"] = res["n"]
    if "first_run_counted" in res:
        row["first_run_counted"] = res["first_run_counted"]


def summary(rows: list[dict]) -> None:
    """A short table of forward + backward results on stdout."""
    sel = [r for r in rows if r["mode"] == "forward_backward"]
    if not sel:
        return
    print(f"{'impl':<11}{'B':>7}{'N':>7}{'d':>6} {'dtype':<9}{'ref':<6}{'status':<8}{'median ms':>11}"
          f"{'peak MiB':>10}{'x unfused':>10}{'x floor':>9}")
    for r in sel:
        def fmt(v, spec):
            width = int(spec.split(".")[0])
            return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)
        ms = r["median_s"] * 1e3 if r["median_s"] is not None else None
        mib = r["peak_extra_bytes"] / 2**20 if r.get("peak_extra_bytes") is not None else None
        print(f"{r['impl']:<11}{r['B']:>7}{r['N']:>7}{r['d']:>6} {r['dtype']:<9}{str(r['ref']):<6}{r['status']:<8}"
              f"{fmt(ms, '11.2f')}{fmt(mib, '10.1f')}{fmt(r.get('speedup_vs_unfused'), '10.2f')}"
              f"{fmt(r.get('time_over_floor'), '9.2f')}")


if __name__ == "__main__":
    main()
