"""Measurement helpers shared by every benchmark: timing, peak memory, run metadata, JSON output.

Timing: on the CPU, wall-clock of repeated runs after warm-up, reported as median and 20th/80th
percentiles; on CUDA, ``triton.testing.do_bench`` (which synchronises and flushes the L2).

Peak extra memory on the CPU is read from the kernel's resident-set high-water mark in a fresh
process: the step is built and run once (warm-up), then the high-water mark is reset
(``/proc/self/clear_refs``), the step runs again and ``VmHWM - VmRSS_before`` is its peak above
what was live before (inputs, warmed-up thread pools). The gradients every implementation must
return are subtracted (``output_bytes``), so "extra" is the working memory of the loss itself.
The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps every large block
separately and unmaps it when freed, so RSS follows live memory. Without it glibc's dynamic
threshold moves freed multi-MiB blocks into its heap and keeps them resident, and a loss that
allocates many 16 MiB chunk temporaries shows several times its live working set (measured here:
559 MiB instead of 64 MiB for the torch backend at B = N = 8192, d = 16).
On CUDA the same quantity comes from ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Who measured what where: device, threads, versions, commit, date."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def time_cpu(fn, *, warmup: int = 1, repeat: int = 5, min_time: float = 0.0) -> dict:
    """Median and 20/80 percentiles (seconds) of ``repeat`` runs (more until ``min_time`` is spent)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def time_interleaved(steps: dict, rounds: int, *, wall: dict | None = None, on_round=None) -> dict:
    """``rounds`` rounds in which every step runs once, in order, so that a slow spell of a shared
    machine hits all of them alike. Returns ``{"wall": {key: [s]}, "cpu": {key: [s]}, "errors":
    {key: exception}}`` (process CPU time beside the wall clock). A step that raises is dropped from
    later rounds and its exception recorded. ``wall`` seeds samples (e.g. a warm-up run kept as one);
    a step that already has ``rounds`` samples is not run again. ``on_round(r, wall)`` after each round."""
    steps = dict(steps)
    wall = {key: list((wall or {}).get(key, [])) for key in steps}
    cpu: dict = {key: [] for key in steps}
    errors: dict = {}
    for r in range(rounds):
        for key, step in list(steps.items()):
            if len(wall[key]) >= rounds:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                step()
            except Exception as exc:                   # noqa: BLE001 (the caller decides what a failure means)
                del steps[key]
                errors[key] = exc
                continue
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
        if on_round is not None:
            on_round(r, wall)
    return {"wall": wall, "cpu": cpu, "errors": errors}


def summarize(samples) -> dict:
    samples = sorted(samples)
    def pct(q):
        k = (len(samples) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(samples) - 1)
        return samples[lo] + (samples[hi] - samples[lo]) * (k - lo)
    return {"median_s": statistics.median(samples), "p20_s": pct(0.2), "p80_s": pct(0.8), "n": len(samples)}


def time_cuda(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    from triton.testing import do_bench
    p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_s": p50 / 1e3, "p20_s": p20 / 1e3, "p80_s": p80 / 1e3}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _prefer_oom_kill() -> None:
    """Make this (measurement) process the kernel OOM killer's first choice, not a neighbour's."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _measure_here(target: str, kwargs: dict) -> dict:
    """Run inside the fresh process: ``target(**kwargs)`` returns ``(step, output_bytes)``."""
    step, output_bytes = _resolve(target)(**kwargs)
    step()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                     # reset VmHWM to the current RSS
    step()
    peak = _status_kib("VmHWM")
    raw = (peak - before) * 1024
    return {"peak_raw_bytes": raw, "output_bytes": output_bytes, "peak_extra_bytes": max(raw - output_bytes, 0)}


def _is_oom(returncode: int, stderr: str) -> bool:
    text = stderr.lower()
    return (returncode in (-9, 137) or "out of memory" in text or "memoryerror" in text
            or "can't allocate memory" in text or "cannot allocate memory" in text)


def peak_extra_rss(target: str, kwargs: dict, *, threads: int | None = None, timeout: float = 1800) -> dict:
    """Peak extra resident memory of one step, measured in a fresh Python process.

    ``target`` is ``"module:function"``; the function takes ``kwargs`` and returns ``(step, output_bytes)``.
    Returns ``{"peak_extra_bytes", "peak_raw_bytes", "output_bytes"}`` or ``{"error": "OOM" | message}``
    (a process killed by the OOM killer or failing to allocate is "OOM"). Raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "benchmarks.harness", target, json.dumps(kwargs)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": "OOM" if _is_oom(proc.returncode, proc.stderr or "") else tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_peak_extra(step, output_bytes: int) -> dict:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    raw = torch.cuda.max_memory_allocated() - before
    return {"peak_raw_bytes": raw, "output_bytes": output_bytes, "peak_extra_bytes": max(raw - output_bytes, 0)}


def save_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


if __name__ == "__main__":
    _prefer_oom_kill()
    print(json.dumps(_measure_here(sys.argv[1], json.loads(sys.argv[2]))))
