"""Half precision on the CPU (issue 16): the C++ step in bfloat16 against torch's bfloat16 products.

    python -m benchmarks.cpu_half                      # ~40 min on 2 cores; -> results/cpu_half_<tag>_<date>.json
    python -m benchmarks.cpu_half --B 512 1024 --skip-step --out x.json      # a quick look

One run, interleaved per shape (``harness.time_steps``), forward + backward, with a reference model:

1. B = N = 4096, d = dr = 512: ``cpp`` in bfloat16 with the tile-product path this CPU chose (``auto``,
   ``drrho_kernels.backends.cpp.half_gemm``) and with a half-input path forced (``on``, when one runs
   here), ``cpp`` in float32, six bfloat16 products through torch (``gemm_floor`` bfloat16), the unfused
   loss in bfloat16 (``benchmarks.baselines``) and the float32 six-product floor.
2. ``cpp`` bfloat16 against the unfused bfloat16 loss for B from 512 to 16384 (B = 4096 from part 1). A
   group whose warm-up already exceeds the budget keeps that one sample; an unfused point predicted
   (B^2 d extrapolation of the measured points) beyond ``--isolated-after`` seconds runs once in a fresh
   process with a timeout, and a timeout is recorded as a lower bound (``status: "timeout"``).

The issue's targets (cpp <= 1.2x six bfloat16 products; faster than the unfused bfloat16 loss at every
B; float32 unchanged) are evaluated and written with the figures; the JSON names the CPU flags, the
chosen path and why, the versions and the shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import harness, steps, sweep

D = 512
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in FLAGS_OF_INTEREST if f in flags]


class WithHalfMode:
    """A cpp step run with ``DRRHO_KERNELS_CPU_HALF_GEMM=mode`` (decided again, untimed, before each sample)."""

    def __init__(self, step, dtype, mode):
        self.step, self.dtype, self.mode = step, dtype, mode

    def prepare(self):
        from drrho_kernels.backends import cpp
        cpp._redecide_half_gemm(self.dtype, self.mode)
        return self.step.prepare()

    def __call__(self):
        self.prepare()()


def isolated_once(impl: str, B: int, dtype: str, timeout: float) -> dict:
    """One step in a fresh process (its first run: a long CPU step is warm then), with a timeout."""
    code = ("import sys, time, json; sys.path.insert(0, %r)\n"
            "from benchmarks import steps\n"
            "step, _ = steps.make_step(%r, %d, %d, %d, %d, %r, True, 'cpu', 'forward_backward')\n"
            "t0 = time.perf_counter(); step(); print(json.dumps({'s': time.perf_counter() - t0}))\n"
            % (str(harness.REPO_ROOT), impl, B, B, D, D, dtype))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=harness.REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"did not finish one step in {timeout:.0f} s (a fresh process)",
                "lower_bound_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        err = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"status": "OOM" if harness.is_oom(proc.stderr or "", proc.returncode) else "error", "reason": err[0]}
    s = json.loads(proc.stdout.strip().splitlines()[-1])["s"]
    return {"status": "ok", "median_s": s, "p20_s": s, "p80_s": s, "n_repeat": 1, "first_run_counted": True,
            "isolated": True}


def time_group(named: dict, repeat: int, min_repeat: int, budget: float | None) -> dict:
    results = harness.time_steps(named, repeat=repeat, min_repeat=min_repeat, budget=budget)
    out = {}
    for key in named:
        res = results.get(key)
        if isinstance(res, BaseException):
            out[key] = {"status": "OOM" if harness.is_oom(res) else "error", "reason": harness.first_line(res)}
        else:
            out[key] = {"status": "ok", **res}
    return out


def ratio(a: dict, b: dict):
    if a.get("status") == b.get("status") == "ok":
        return a["median_s"] / b["median_s"]
    return None


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_half", description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--step-B", type=int, default=4096, help="the shape of part 1 (default 4096)")
    ap.add_argument("--skip-step", action="store_true", help="no part 1")
    ap.add_argument("--repeat", type=int, default=3, help="samples per point in part 1 (default 3)")
    ap.add_argument("--sweep-repeat", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="part 2: seconds of rounds per group (default 60)")
    ap.add_argument("--isolated-after", type=float, default=900.0,
                    help="part 2: an unfused point predicted above this runs once, isolated, with this timeout")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="minutes to wait at most for a quiet machine (1-minute load average < 1) before starting")
    ap.add_argument("--out", type=str)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from drrho_kernels.backends import cpp
    if cpp.load() is None:
        raise SystemExit(f"the C++ extension is not loaded ({cpp.load_error()})")
    waited = time.perf_counter()
    while args.wait_idle and os.getloadavg()[0] >= 1.0 and time.perf_counter() - waited < 60 * args.wait_idle:
        time.sleep(15)
    waited = time.perf_counter() - waited
    started = time.perf_counter()
    meta = harness.machine_info("cpu")
    meta["waited_for_idle_s"] = round(waited, 1)
    meta["cpu_flags"] = cpu_flags()
    meta["device_tag"] = f"cpu-{harness.slug(meta['cpu'])}-{meta['torch_threads']}t"
    meta["half_gemm"] = {name: cpp.half_gemm(dt) for name, dt in (("bfloat16", torch.bfloat16),
                                                                   ("float16", torch.float16))}
    env_mode = os.environ.get(cpp.HALF_GEMM_ENV, "auto")
    forced = cpp._redecide_half_gemm(torch.bfloat16, "on")
    cpp._redecide_half_gemm(torch.bfloat16, "")
    config = {"argv": sys.argv[1:] if argv is None else list(argv), "d": D, "dr": D, "ref": True,
              "mode": "forward_backward", "half_gemm_env": env_mode, "forced_half_path": forced,
              "timing": "interleaved rounds per shape after one warm-up each (a step >= 2 s keeps its warm-up "
                        "as a sample): benchmarks.harness.time_steps"}
    payload = {"meta": meta, "config": config, "step": None, "sweep": [], "targets": None}
    path = Path(args.out) if args.out else (harness.RESULTS_DIR / f"cpu_half_{meta['device_tag']}_"
                                                                  f"{meta['date'][:10]}.json")

    def save():
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        meta["load_average_after"] = os.getloadavg()
        sweep.save(path, payload)

    def build(impl, B, dtype):
        return steps.make_step(impl, B, B, D, D, dtype, True, "cpu", "forward_backward")[0]

    # ---------------------------------------------------------------- part 1
    if not args.skip_step:
        B = args.step_B
        named = {"cpp/bfloat16": WithHalfMode(build("cpp", B, "bfloat16"), torch.bfloat16, env_mode)}
        if not forced["error"] and forced["path"] != meta["half_gemm"]["bfloat16"]["path"]:
            named[f"cpp/bfloat16/{forced['path']}"] = WithHalfMode(build("cpp", B, "bfloat16"), torch.bfloat16, "on")
        named.update({"cpp/float32": build("cpp", B, "float32"),
                      "gemm_floor/bfloat16": build("gemm_floor", B, "bfloat16"),
                      "gemm_floor/float32": build("gemm_floor", B, "float32"),
                      "unfused/bfloat16": build("unfused", B, "bfloat16")})
        print(f"part 1: B = N = {B}: {', '.join(named)} ({args.repeat} samples each)", flush=True)
        res = time_group(named, args.repeat, args.repeat, None)
        named.clear()
        cpp._redecide_half_gemm(torch.bfloat16, "")
        r = {k: ratio(res["cpp/bfloat16"], res[k]) for k in res if k != "cpp/bfloat16"}
        r["cpp/float32 : gemm_floor/float32"] = ratio(res["cpp/float32"], res["gemm_floor/float32"])
        r["gemm_floor/bfloat16 : gemm_floor/float32"] = ratio(res["gemm_floor/bfloat16"], res["gemm_floor/float32"])
        gflops = {k: 6 * 2 * B * B * D / res[k]["median_s"] / 1e9 for k in ("gemm_floor/bfloat16", "gemm_floor/float32")
                  if res[k].get("status") == "ok"}
        payload["step"] = {"B": B, "N": B, "results": res, "cpp_bfloat16_over": r,
                           "floor_gflop_per_s": gflops}
        for k, v in res.items():
            print(f"  {k:<24} {v.get('median_s', float('nan')):9.3f} s  {v.get('status')}", flush=True)
        save()

    # ---------------------------------------------------------------- part 2
    measured = []                                      # (B, unfused seconds): the extrapolation's points
    for B in sorted(args.B):
        if payload["step"] and B == payload["step"]["B"]:
            res = payload["step"]["results"]
            row = {"B": B, "cpp": res["cpp/bfloat16"], "unfused": res["unfused/bfloat16"], "from": "part 1"}
        else:
            predicted = None
            if measured:
                b0, t0 = measured[-1]
                predicted = t0 * (B / b0) ** 2.5       # measured here: x5.5 per doubling at B = 512 .. 1024
            named = {"cpp": build("cpp", B, "bfloat16")}
            isolated = predicted is not None and predicted > args.isolated_after
            if not isolated:
                named["unfused"] = build("unfused", B, "bfloat16")
            print(f"part 2: B = {B}: {', '.join(named)}" + (f" (unfused isolated: predicted {predicted:.0f} s)"
                                                           if isolated else ""), flush=True)
            res = time_group(named, args.sweep_repeat, 1, args.budget)
            named.clear()
            row = {"B": B, "cpp": res["cpp"]}
            if isolated:
                row["unfused"] = {**isolated_once("unfused", B, "bfloat16", args.isolated_after),
                                  "predicted_s": predicted}
            else:
                row["unfused"] = res["unfused"]
        if row["unfused"].get("status") == "ok":
            measured.append((B, row["unfused"]["median_s"]))
        row["unfused_over_cpp"] = ratio(row["unfused"], row["cpp"])
        if row["unfused"].get("status") == "timeout":
            row["unfused_over_cpp_lower_bound"] = row["unfused"]["lower_bound_s"] / row["cpp"]["median_s"]
        payload["sweep"].append(row)
        print(f"  cpp {row['cpp'].get('median_s', float('nan')):.3f} s, unfused "
              f"{row['unfused'].get('median_s', float('nan')):.3f} s ({row['unfused'].get('status')})", flush=True)
        save()

    # ---------------------------------------------------------------- targets
    targets = {}
    if payload["step"]:
        r = payload["step"]["cpp_bfloat16_over"]
        v = r.get("gemm_floor/bfloat16")
        targets[f"cpp <= 1.2x six bfloat16 products (B = {payload['step']['B']})"] = {"value": v, "threshold": 1.2,
                                                                   "met": v is not None and v <= 1.2}
        v = r.get("gemm_floor/float32")
        targets["(here) cpp bfloat16 over the float32 six-product floor"] = {"value": v, "threshold": None,
                                                                            "met": None}
        v = r.get("cpp/float32 : gemm_floor/float32")
        targets["float32 unchanged: cpp float32 over the float32 floor"] = {"value": v, "threshold": None, "met": None}
    faster = [(row["B"], row["unfused_over_cpp"] or row.get("unfused_over_cpp_lower_bound")) for row in payload["sweep"]]
    targets["cpp faster than the unfused bfloat16 loss at every B"] = {
        "value": dict(faster), "threshold": 1.0, "met": bool(faster) and all(v is not None and v > 1 for _, v in faster)}
    payload["targets"] = targets
    save()
    print(json.dumps(targets, indent=1))
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    return path


if __name__ == "__main__":
    main()
