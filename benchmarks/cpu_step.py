"""One CPU training step of the DRRho-CLIP loss: the C++ backend against the torch backend, the
authors' unfused loss and the GEMM floor, all in one run.

    python -m benchmarks.cpu_step                       # B = N = 4096, d = dr = 512, float32, reference
    python -m benchmarks.cpu_step --rounds 9 --threads 2
    python -m benchmarks.cpu_step --help

Each implementation runs forward + backward (:func:`benchmarks.steps.make_step`):

- ``gemm_floor``: the six ``[B, d] x [d, N]`` products a step cannot avoid (:func:`benchmarks.baselines.gemm_floor`);
- ``unfused``: the loss as the authors' code computes it (a dozen ``[B, N]`` matrices, autograd);
- ``torch``: ``drrho_clip_loss(backend="torch")``, the row-chunked PyTorch backend;
- ``cpp``: ``drrho_clip_loss(backend="cpp")``, the C++ extension.

Time: after one warm-up each, ``--rounds`` rounds that run every implementation once, in turn
(interleaved, so that on a shared machine a burst of load hits all of them alike). Per
implementation: median and 20th/80th percentiles of the wall-clock samples
(:func:`benchmarks.harness.time_cpu` per sample, :func:`benchmarks.harness.summarize` over them) and
the median process CPU time. Ratios are given twice: of the medians, and the median of the
per-round ratios (the more robust one when the load drifts).

Memory: peak extra resident memory of one step of each implementation in a fresh process
(:func:`benchmarks.harness.peak_extra_rss`; the gradients every implementation returns are
subtracted). Profile: thread CPU seconds per phase of the C++ kernels (similarity GEMMs, forward
and backward exp passes, weighted GEMMs) over one step.

Output: ``benchmarks/results/cpu_step_<date>.json`` (machine, threads, versions, commit, load
average before and after, configuration, samples, summaries, ratios, memory, profile, targets).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

from . import harness
from .steps import make_step

IMPLS = ("gemm_floor", "unfused", "torch", "cpp")
OPTIONAL_IMPLS = ("authors",)   # the authors' own SogCLRLoss, from a local snapshot (benchmarks/authors.py)
# (numerator, denominator): the ratios the report asks for.
RATIOS = (("cpp", "gemm_floor"), ("torch", "cpp"), ("unfused", "cpp"), ("torch", "unfused"), ("torch", "gemm_floor"),
          ("authors", "unfused"), ("authors", "cpp"))
TARGETS = {"cpp_over_floor_max": 1.5, "torch_over_cpp_min": 2.0, "cpp_peak_extra_mib_max": 16.0}
MIB = float(1 << 20)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", "-B", type=int, default=4096, help="B = N (single process), default 4096")
    p.add_argument("--dim", "-d", type=int, default=512, help="embedding width d, default 512")
    p.add_argument("--ref-dim", type=int, default=512, help="reference width dr, default 512")
    p.add_argument("--no-ref", action="store_true", help="without the reference model")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + OPTIONAL_IMPLS,
                   help="implementations to run (default: the first four; 'authors' adds the authors' released "
                        "SogCLRLoss read from DRRHO_AUTHORS_REPO)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every implementation once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each implementation first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak memory runs")
    p.add_argument("--no-profile", action="store_true", help="skip the C++ phase profile")
    p.add_argument("--out", default=None, help="result file name in benchmarks/results/ "
                                                "(default cpu_step_<date>.json); 'none' to not save")
    return p.parse_args(argv)


def _cpp_extension():
    from drrho_kernels.backends import cpp
    return cpp.load(), cpp.load_error()


def time_rounds(steps: dict, rounds: int, warmup: int) -> dict:
    """Wall and process-CPU samples of every step, ``rounds`` interleaved rounds after ``warmup`` runs each."""
    for step in steps.values():
        for _ in range(warmup):
            step()

    def report(r, wall):
        line = "  ".join(f"{name} {wall[name][-1]:.3f}s" for name in steps)
        print(f"round {r + 1}/{rounds}: {line}", flush=True)

    result = harness.time_interleaved(steps, rounds, on_round=report)
    for exc in result.pop("errors").values():
        raise exc
    return result


def ratios(samples: dict) -> dict:
    out = {}
    for num, den in RATIOS:
        if num in samples and den in samples:
            a, b = samples[num], samples[den]
            out[f"{num}/{den}"] = {"of_medians": statistics.median(a) / statistics.median(b),
                                   "median_of_round_ratios": statistics.median(x / y for x, y in zip(a, b))}
    return out


def cpp_profile(config: dict) -> dict | None:
    """Thread CPU seconds per phase of one C++ step (and the step's process CPU time)."""
    C, _ = _cpp_extension()
    if C is None:
        return None
    step, _ = make_step("cpp", **config)
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
    return {"process_cpu_s": total, "phases_cpu_s": phases,
            "gemm_share": (phases["similarity_gemm"] + phases["weighted_gemm"]) / total if total else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    config = dict(B=args.batch, N=args.batch, d=args.dim, dr=args.ref_dim, dtype=args.dtype, ref=not args.no_ref,
                  device="cpu", mode="forward_backward")
    C, why = _cpp_extension()
    impls = [i for i in args.impls if i != "cpp" or C is not None]
    skipped = {} if "cpp" in impls or "cpp" not in args.impls else {"cpp": f"C++ extension not available ({why})"}
    if "authors" in impls:
        from .authors import load_module
        module, where = load_module()
        if module is None:
            impls.remove("authors")
            skipped["authors"] = where
    load_before = os.getloadavg()
    print(f"B = N = {args.batch}, d = {args.dim}, dr = {args.ref_dim}, {args.dtype}, "
          f"{'no reference' if args.no_ref else 'reference'}, forward + backward, {threads} threads; "
          f"load average {load_before[0]:.2f}", flush=True)
    if skipped:
        print(f"skipped: {skipped}")

    steps = {name: make_step(name, **config)[0] for name in impls}
    samples = time_rounds(steps, args.rounds, args.warmup)
    del steps
    times = {name: {**harness.summarize(samples["wall"][name]),
                    "cpu_median_s": statistics.median(samples["cpu"][name])} for name in impls}

    memory = {}
    if not args.no_memory:
        for name in impls:
            memory[name] = harness.peak_extra_rss("benchmarks.steps:make_step", {"impl": name, **config},
                                                  threads=threads)
            if "peak_extra_bytes" in memory[name]:
                memory[name]["peak_extra_mib"] = memory[name]["peak_extra_bytes"] / MIB

    profile = None if args.no_profile or "cpp" not in impls else cpp_profile(config)
    load_after = os.getloadavg()

    wall_ratios = ratios(samples["wall"])
    cpu_ratios = ratios(samples["cpu"])
    targets = {}
    if "cpp/gemm_floor" in wall_ratios:
        targets["cpp_over_floor"] = {"value": wall_ratios["cpp/gemm_floor"]["of_medians"],
                                     "max": TARGETS["cpp_over_floor_max"]}
    if "torch/cpp" in wall_ratios:
        targets["torch_over_cpp"] = {"value": wall_ratios["torch/cpp"]["of_medians"],
                                     "min": TARGETS["torch_over_cpp_min"]}
    if "peak_extra_mib" in memory.get("cpp", {}):
        targets["cpp_peak_extra_mib"] = {"value": memory["cpp"]["peak_extra_mib"],
                                         "max": TARGETS["cpp_peak_extra_mib_max"]}
    for t in targets.values():
        t["pass"] = t["value"] <= t["max"] if "max" in t else t["value"] >= t["min"]

    payload = {
        "benchmark": "cpu_step",
        "machine": harness.machine_info(),
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "config": {**config, "rounds": args.rounds, "warmup": args.warmup, "schedule": "interleaved"},
        "cpp_build": dict(C.build_info()) if C is not None else None,
        "skipped": skipped,
        "time": times,
        "samples_s": samples,
        "ratios_wall": wall_ratios,
        "ratios_cpu": cpu_ratios,
        "memory": memory,
        "cpp_profile": profile,
        "targets": targets,
    }
    if payload["cpp_build"] is not None:
        payload["cpp_build"].pop("parallel", None)

    print("\nimpl         median   p20     p80     cpu-median  peak-extra")
    for name in impls:
        t = times[name]
        mem = memory.get(name, {})
        peak = f"{mem['peak_extra_mib']:.1f} MiB" if "peak_extra_mib" in mem else mem.get("error", "-")
        print(f"{name:12s} {t['median_s']:6.3f}s {t['p20_s']:6.3f}s {t['p80_s']:6.3f}s {t['cpu_median_s']:8.3f}s   {peak}")
    print("\nratio             of medians   median of round ratios   (CPU time, of medians)")
    for key, r in wall_ratios.items():
        print(f"{key:17s} {r['of_medians']:8.2f}x   {r['median_of_round_ratios']:8.2f}x"
              f"                 {cpu_ratios[key]['of_medians']:6.2f}x")
    if profile:
        phases = "  ".join(f"{k} {v:.3f}s" for k, v in profile["phases_cpu_s"].items())
        print(f"\ncpp profile (thread CPU s per step): {phases}; GEMM share {profile['gemm_share']:.1%}")
    for key, t in targets.items():
        bound = f"<= {t['max']}" if "max" in t else f">= {t['min']}"
        print(f"target {key}: {t['value']:.2f} ({bound}) {'PASS' if t['pass'] else 'FAIL'}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"(on a shared machine the times swing; the ratios of interleaved rounds are steadier)")

    if (args.out or "").lower() != "none":
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        path = harness.save_json(args.out or f"cpu_step_{date}.json", payload)
        print(f"saved {path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
