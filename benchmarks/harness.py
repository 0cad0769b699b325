"""What the benchmarks share: interleaved timing, peak memory, the run's metadata and JSON."""

import contextlib
import datetime
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS_DIR.parent.parent
LONG_STEP_S = 2.0     # a CPU step this long is warm after its first run: the warm-up is kept as a sample
_L2_FLUSH = {}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def is_oom(error, returncode: int = 0) -> bool:
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or returncode in (-9, 137)
            or any(s in str(error).lower() for s in ("out of memory", "memoryerror", "allocate memory")))


def git_commit() -> str:
    try:                    # the short hash, "-dirty" with uncommitted changes to tracked files
        return subprocess.run(["git", "describe", "--always", "--dirty", "--exclude", "*"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: str | None = "cpu") -> dict:
    """Date, commit, versions, CPU, threads, load; the C++ build (CPU) or the GPU (CUDA); None: neither."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
        simd = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni", "fma", "f16c"))
    except (OSError, StopIteration):
        cpu, simd = platform.processor() or platform.machine(), None
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": None, "cpu": cpu,
            "cpu_simd_flags": simd, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, "load_average": os.getloadavg(), "triton_interpreter": os.environ.get("TRITON_INTERPRET")}
    with contextlib.suppress(ImportError):
        info["triton"] = importlib.import_module("triton").__version__
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    elif device == "cpu":
        from drrho_kernels.backends import cpp
        info["cpp_build"] = {k: v for k, v in cpp.build_info().items() if k != "parallel"}
        if cpp.load() is not None:
            info["half_gemm"] = {str(dt)[6:]: cpp.half_gemm(dt) for dt in (torch.bfloat16, torch.float16)}
    return info


def write_json(path, payload: dict) -> Path:
    """``payload`` to ``path`` through a temporary file renamed over it (never half-written)."""
    (tmp := Path(path).with_suffix(".json.tmp")).parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return tmp.replace(path)


def results_dir(fallback: Path, name: str = "") -> Path:
    """Where a test writes its outputs: ``$DRRHO_KERNELS_RESULTS/<name>`` if set, else ``fallback``."""
    out = Path(root) / name if (root := os.environ.get("DRRHO_KERNELS_RESULTS")) else Path(fallback)
    out.mkdir(parents=True, exist_ok=True)
    return out


def summarize(samples) -> dict:
    p20, _, _, p80 = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else [samples[0]] * 4
    return {"median_s": statistics.median(samples), "p20_s": p20, "p80_s": p80, "n_repeat": len(samples),
            "samples_s": [float(t) for t in samples]}


def timed(step, device: str = "cpu") -> float:
    """Seconds of what ``step.prepare()`` (untimed; on CUDA then an L2 flush) returns."""
    fn, t0 = step.prepare(), time.perf_counter()
    if device != "cuda":
        fn()
        return time.perf_counter() - t0
    _L2_FLUSH.setdefault("buf", torch.empty(256 << 20, dtype=torch.int8, device="cuda")).zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_steps(steps: dict, *, device: str = "cpu", repeat: int = 7, min_repeat: int = 3,
               budget: float | None = None) -> dict:
    """``{key: summary | exception}`` of ``steps`` interleaved: a warm-up each, then rounds (fewer past ``budget``)."""
    first, samples, failed = {}, {}, {}
    for r in range(-1, repeat):                        # round -1: the warm-up runs
        for key, step in steps.items():
            if key in failed or len(samples.get(key, ())) >= repeat:
                continue
            try:
                t = timed(step, device)
            except Exception as exc:                   # noqa: BLE001 (a failing step is a result)
                failed[key] = exc
                continue
            first.setdefault(key, t)
            if r >= 0 or (device == "cpu" and t >= LONG_STEP_S):       # a long warm-up is a sample
                samples.setdefault(key, []).append(t)
        if r < 0 and budget and first and max(first.values()) * repeat > budget:
            repeat = max(min_repeat, int(budget / max(max(first.values()), 1e-9)))
    return {**{k: {**summarize(samples[k]), "first_run_counted": first[k] >= LONG_STEP_S and device == "cpu"}
               for k in first if k not in failed}, **failed}


def _status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def _extra(raw: int, output_bytes: int) -> dict:
    return {"peak_raw_bytes": raw, "output_bytes": output_bytes, "peak_extra_bytes": max(raw - output_bytes, 0)}


def _measure_here(target: str, kwargs: dict) -> dict:
    """In the fresh process: the step runs, the high-water mark is reset, the step runs again."""
    module, name = target.split(":")
    step, output_bytes = getattr(importlib.import_module(module), name)(**kwargs)
    step()
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")      # the high-water mark reset
    step()
    return _extra((_status_kib("VmHWM") - before) * 1024, output_bytes)


def peak_extra_rss(target: str, kwargs: dict, *, threads: int | None = None, timeout: float = 1800) -> dict:
    """Peak extra RSS of the step ``target`` (``"module:function"``) builds in a fresh process, or ``{"error"}``."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"),
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", target, json.dumps(kwargs)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"error": "OOM" if is_oom(proc.stderr or "", proc.returncode) else tail[0]}


def cuda_peak_extra(step, output_bytes: int) -> dict:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return _extra(torch.cuda.max_memory_allocated() - before, output_bytes)


if __name__ == "__main__":
    with contextlib.suppress(OSError):      # this measurement process is the OOM killer's first choice, not a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    print(json.dumps(_measure_here(sys.argv[1], json.loads(sys.argv[2]))))
