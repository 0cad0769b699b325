"""The GPU acceptance benchmark: one command on an H100 / H200, PASS / FAIL per target.

    python -m benchmarks.gpu_bench                 # on the GPU box (torch + triton + pytest + matplotlib only)
    python -m benchmarks.gpu_bench --dry-run       # anywhere: the same logic on toy shapes on the CPU

DRRho-CLIP loss with a reference model, d = dr = 512, bfloat16, forward + backward (one training
step of the loss: a fresh forward, then ``loss.backward()``), all in one run:

==========  ==============================================================================
target      definition (``t``: median time of one step, do_bench quantiles)
==========  ==============================================================================
T1          B = N = 32768: t(triton) <= 1.5 x t(floor); floor = six [B, 512] x [512, B] cuBLAS
            products in bfloat16 (forward target and reference similarities, both recomputed
            in the backward, and the two weighted products): about 15 ms on an H100
T2          B = N = 32768: t(unfused) / t(triton) >= 9; unfused = the loss as the authors' code
            computes it (benchmarks.baselines.unfused_drrho_loss, ~13 [B, B] matrices, ~21+ GiB)
T3          B = N = 32768: t(triton) < t(clip_ce); clip_ce = open_clip's plain CLIP
            cross-entropy, which materializes the logits (no reference model)
T4          B = N = 32768: peak extra memory of the triton step <= 64 MiB (above the live inputs,
            gradients excluded; torch.cuda.max_memory_allocated)
T5          B = N = 262144: the triton step runs (time and memory reported)
T6          B = 4096, N = 65536 (one process of a 16-way distributed step): t(triton) <= 1.5 x
            t(floor_rect); floor_rect = twelve [4096, 512] x [512, 65536]-sized cuBLAS products:
            the four similarity products of a distributed shard (x T^T, t X^T, xr Tr^T, tr Xr^T;
            they are no longer transposes of one another), their recomputation in the backward
            (a fused kernel that never stores [B, N] must recompute them), and the four weighted
            products (d x, d t for the rows, d X, d T for the gathered columns)
==========  ==============================================================================

A comparison whose baseline could not run (out of memory) is ``N/A``, never PASS; a target whose
fused step could not run is FAIL. Out-of-memory never stops the run. Results:
``benchmarks/results/gpu_bench_<gpu>_<date>.json`` (device, versions, commit, shapes, dtype, every
measurement and every verdict). ``--strict`` exits with status 1 when a target fails.

``--dry-run`` (or ``--device cpu``) runs the same code on toy shapes on the CPU with the torch
backend (``--fused triton`` uses Triton's interpreter instead): it checks the logic, not the
targets. Works with torch >= 2.5 and triton >= 3.6; needs neither tqdm nor any network.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

MiB = 1 << 20

FULL = {"d": 512, "dr": 512, "dtype": "bfloat16", "square": 32768, "big": 262144, "rect": (4096, 65536)}
DRY = {"d": 64, "dr": 64, "dtype": "bfloat16", "square": 256, "big": 512, "rect": (64, 512)}

TARGETS = {
    "T1": "B=N={square}: fused <= 1.5x the floor (6 GEMM-sized products)",
    "T2": "B=N={square}: fused >= 9x faster than the unfused loss",
    "T3": "B=N={square}: fused faster than plain CLIP cross-entropy",
    "T4": "B=N={square}: fused peak extra memory <= 64 MiB",
    "T5": "B=N={big}: fused runs",
    "T6": "B={rect_b}, N={rect_n}: fused <= 1.5x its floor (12 GEMM-sized products)",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench",
                                 description="GPU acceptance benchmark of the fused DRRho-CLIP loss (PASS/FAIL).")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="cuda for the real run; cpu runs the dry path (toy shapes)")
    ap.add_argument("--dry-run", action="store_true", help="toy shapes on the CPU: checks the logic, not the targets")
    ap.add_argument("--fused", help="fused backend under test (default: triton on CUDA, torch on the CPU)")
    ap.add_argument("--skip-big", action="store_true", help="skip T5 (B = 262144)")
    ap.add_argument("--no-baseline-extras", action="store_true",
                    help="skip the informational rows (torch backend on the GPU, Inf-CL when importable)")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--out", help="output .json file or folder (default benchmarks/results/)")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when a target FAILs")
    return ap.parse_args(argv)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


class Bench:
    def __init__(self, args, device: str, shapes: dict, fused: str):
        self.args, self.device, self.shapes, self.fused = args, device, shapes, fused
        self.rows: list[dict] = []

    def measure(self, label: str, impl: str, B: int, N: int, *, memory: bool = True) -> dict:
        """One (impl, B, N) point: memory then time. OOM and errors are results, never exceptions."""
        import torch

        from . import harness
        from .steps import floor_gemm_count, make_step
        s = self.shapes
        row = {"label": label, "impl": impl, "B": B, "N": N, "d": s["d"], "dr": s["dr"], "dtype": s["dtype"],
               "ref": True, "mode": "forward_backward", "status": "ok", "reason": None, "median_s": None,
               "p20_s": None, "p80_s": None, "peak_extra_bytes": None}
        if impl == "gemm_floor":
            row["floor_gemms"] = floor_gemm_count(B, N, True, "forward_backward")
        kwargs = dict(impl=impl, B=B, N=N, d=s["d"], dr=s["dr"], dtype=s["dtype"], ref=True, device=self.device,
                      mode="forward_backward")
        print(f"  {label:<22} {impl:<11} B={B:<7} N={N:<7} ...", end="", flush=True)
        step = None
        try:
            if self.device == "cpu" and memory:             # fresh process, like the CPU sweep
                mem = harness.peak_extra_rss("benchmarks.steps:make_step", kwargs, timeout=600)
                if "error" in mem:
                    raise MemoryError(mem["error"]) if mem["error"] == "OOM" else RuntimeError(mem["error"])
                row["peak_extra_bytes"] = mem["peak_extra_bytes"]
            step, output_bytes = make_step(**kwargs)
            step()                                          # compile / autotune outside the measurement
            if self.device == "cuda":
                if memory:
                    row["peak_extra_bytes"] = harness.cuda_peak_extra(step, output_bytes)["peak_extra_bytes"]
                timing = harness.time_cuda(step, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms)
            else:
                timing = harness.time_cpu(step, warmup=0, repeat=3)
            row.update(median_s=timing["median_s"], p20_s=timing["p20_s"], p80_s=timing["p80_s"])
        except Exception as exc:                            # noqa: BLE001 (every failure is a result)
            row["status"] = "OOM" if _is_oom(exc) else "error"
            row["reason"] = _first_line(exc)
        finally:
            del step
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
        if row["status"] == "ok":
            mem = "" if row["peak_extra_bytes"] is None else f", peak extra {row['peak_extra_bytes'] / MiB:.1f} MiB"
            print(f" {row['median_s'] * 1e3:9.2f} ms{mem}")
        else:
            print(f" {row['status']} ({row['reason']})")
        self.rows.append(row)
        return row


def _time(row):
    return row["median_s"] if row and row["status"] == "ok" else None


def evaluate(rows: dict, shapes: dict, skip_big: bool = False) -> list[dict]:
    """Verdicts from the measured rows (keyed by label). Pure: tested on the CPU with made-up rows."""
    fmt = {"square": shapes["square"], "big": shapes["big"], "rect_b": shapes["rect"][0], "rect_n": shapes["rect"][1]}
    out = []

    def add(name, value, threshold, ok, note=""):
        verdict = "N/A" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "description": TARGETS[name].format(**fmt), "value": value,
                    "threshold": threshold, "verdict": verdict, "note": note})

    def compare(name, fused_label, base_label, threshold, kind):
        tf, tb = _time(rows.get(fused_label)), _time(rows.get(base_label))
        if tf is None:
            add(name, None, threshold, False, f"fused step did not run: {_why(rows.get(fused_label))}")
        elif tb is None:
            add(name, None, threshold, None, f"{base_label} did not run: {_why(rows.get(base_label))}")
        elif kind == "over_floor":
            add(name, tf / tb, threshold, tf / tb <= threshold,
                f"fused {tf * 1e3:.2f} ms vs {base_label} {tb * 1e3:.2f} ms (ratio fused / floor)")
        elif kind == "speedup":
            add(name, tb / tf, threshold, tb / tf >= threshold,
                f"fused {tf * 1e3:.2f} ms vs {base_label} {tb * 1e3:.2f} ms (speedup)")
        else:                                               # "faster"
            add(name, tb / tf, threshold, tf < tb,
                f"fused {tf * 1e3:.2f} ms vs {base_label} {tb * 1e3:.2f} ms (speedup)")

    compare("T1", "square/fused", "square/floor", 1.5, "over_floor")
    compare("T2", "square/fused", "square/unfused", 9.0, "speedup")
    compare("T3", "square/fused", "square/clip_ce", 1.0, "faster")
    fused = rows.get("square/fused")
    if fused is None or fused["status"] != "ok" or fused.get("peak_extra_bytes") is None:
        add("T4", None, 64 * MiB, False, f"no memory measurement: {_why(fused)}")
    else:
        peak = fused["peak_extra_bytes"]
        add("T4", peak, 64 * MiB, peak <= 64 * MiB, f"peak extra {peak / MiB:.1f} MiB")
    big = rows.get("big/fused")
    if skip_big:
        add("T5", None, None, None, "skipped (--skip-big)")
    elif big is None or big["status"] != "ok":
        add("T5", None, None, False, f"did not run: {_why(big)}")
    else:
        mem = big.get("peak_extra_bytes")
        add("T5", big["median_s"], None, True, f"{big['median_s'] * 1e3:.1f} ms"
            + ("" if mem is None else f", peak extra {mem / MiB:.1f} MiB"))
    compare("T6", "rect/fused", "rect/floor", 1.5, "over_floor")
    return out


def _why(row):
    if row is None:
        return "not measured"
    return row["status"] + (f" ({row['reason']})" if row.get("reason") else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.dry_run:
        device = "cpu"
    fused = args.fused
    if device in ("cpu",) and fused == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton / drrho_kernels are imported
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: --device cuda but no CUDA device; use --dry-run to check the logic on the CPU")
        return 2
    dry = device == "cpu"
    shapes = DRY if dry else FULL
    fused = fused or ("torch" if dry else "triton")

    from . import harness
    meta = harness.machine_info()
    meta["device"] = device
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta["gpu_memory_bytes"] = props.total_memory
    import drrho_kernels
    available = drrho_kernels.available_backends(device)
    print(f"gpu_bench on {meta.get('gpu', meta['cpu'])} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['commit']} | fused backend: {fused} | available: {', '.join(available)}")
    if dry:
        print("DRY RUN on the CPU with toy shapes: the verdicts below check the logic, not the targets.")
    bench = Bench(args, device, shapes, fused)
    B, (rb, rn), big = shapes["square"], shapes["rect"], shapes["big"]
    rows = {}
    if fused not in available:
        print(f"the {fused!r} backend is not available here; every target that needs it FAILs")
    else:
        rows["square/fused"] = bench.measure("square/fused", fused, B, B)
    rows["square/floor"] = bench.measure("square/floor", "gemm_floor", B, B, memory=not dry)
    rows["square/unfused"] = bench.measure("square/unfused", "unfused", B, B, memory=not dry)
    rows["square/clip_ce"] = bench.measure("square/clip_ce", "clip_ce", B, B, memory=not dry)
    if not args.no_baseline_extras and not dry:
        if fused != "torch":
            bench.measure("square/torch (info)", "torch", B, B)
        if importlib.util.find_spec("inf_cl") is not None:
            bench.measure("square/inf_cl (info)", "inf_cl", B, B)
        else:
            print("  inf_cl not importable: Inf-CL row skipped (informational only)")
    if fused in available:
        rows["rect/fused"] = bench.measure("rect/fused", fused, rb, rn, memory=not dry)
    rows["rect/floor"] = bench.measure("rect/floor", "gemm_floor", rb, rn, memory=not dry)
    if not dry and not args.no_baseline_extras:
        bench.measure("rect/unfused (info)", "unfused", rb, rn)
    if fused in available and not args.skip_big:
        rows["big/fused"] = bench.measure("big/fused", fused, big, big)

    verdicts = evaluate(rows, shapes, args.skip_big)
    print()
    for v in verdicts:
        print(f"{v['verdict']:<5} {v['target']}  {v['description']}: {v['note']}")
    failed = [v for v in verdicts if v["verdict"] == "FAIL"]

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tag = "cpu-dry-run" if dry else _slug(meta.get("gpu", "cuda"))
    if args.out and args.out.endswith(".json"):
        path = Path(args.out)
    else:
        path = (Path(args.out) if args.out else harness.RESULTS_DIR) / f"gpu_bench_{tag}_{date}.json"
    payload = {
        "meta": meta,
        "config": {"argv": sys.argv[1:] if argv is None else list(argv), "dry_run": dry, "fused": fused,
                   "d": shapes["d"], "dr": shapes["dr"], "dtype": shapes["dtype"], "ref": True,
                   "mode": "forward_backward",
                   "shapes": {"square": [B, B], "big": [big, big], "rect": [rb, rn]},
                   "floor": {"square": "6 products [B,d]x[d,N] through torch.matmul: 2 forward similarities "
                                       "(target, reference), their 2 recomputations, 2 weighted products",
                             "rect": "12 products [B,d]x[d,N] through torch.matmul: 4 forward similarities "
                                     "(x T^T, t X^T, xr Tr^T, tr Xr^T), their 4 recomputations, 4 weighted "
                                     "products (dx, dt, dX, dT)"},
                   "timing": "triton.testing.do_bench median (p20, p80)" if not dry else "CPU wall clock, 3 runs",
                   "memory": "torch.cuda.max_memory_allocated above the live inputs, gradients excluded"
                             if not dry else "fresh-process RSS (benchmarks.harness.peak_extra_rss)"},
        "measurements": bench.rows,
        "targets": verdicts,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\n{len(verdicts) - len(failed)}/{len(verdicts)} targets not failed; wrote {path}")
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
