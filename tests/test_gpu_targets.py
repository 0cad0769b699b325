"""GPU acceptance targets of the fused Triton loss (formerly ``benchmarks/gpu_bench.py``).

    pytest -m gpu tests/test_gpu_targets.py -rs          # on an H100 / H200

d = dr = 512, bfloat16, forward + backward with a reference model, measured by the benchmark code
(``benchmarks.sweep.measure_group``: memory in process, then the implementations of a shape timed
interleaved by ``benchmarks.harness``). A target whose baseline could not run (out of memory) is
skipped (N/A), never passed; one whose fused step could not run fails. Every measurement and verdict
goes to ``benchmarks/results/gpu_targets_<gpu>_<date>.json``. Skipped without CUDA and under
``TRITON_INTERPRET`` (the interpreter says nothing about GPU speed); :func:`test_verdicts_handle_oom`
checks the verdict logic anywhere.
"""
import datetime
import json
import os
import types

import pytest
import torch

MiB = 1 << 20
CONFIG = dict(d=512, dr=512, dtype="bfloat16", ref=True, mode="forward_backward")
SHAPES = {"square": (32768, 32768), "big": (262144, 262144), "rect": (4096, 65536)}
# label: (impl, shape); the "(info)" rows are recorded, not judged
POINTS = {"square/fused": ("triton", "square"), "square/floor": ("gemm_floor", "square"),
          "square/unfused": ("unfused", "square"), "square/clip_ce": ("clip_ce", "square"),
          "square/torch (info)": ("torch", "square"), "rect/fused": ("triton", "rect"),
          "rect/floor": ("gemm_floor", "rect"), "rect/unfused (info)": ("unfused", "rect"),
          "big/fused": ("triton", "big")}
TARGETS = {
    "T1": "B=N=32768: fused <= 1.5x the floor (6 GEMM-sized products: 2 similarities, their recomputation, "
          "2 weighted products)",
    "T2": "B=N=32768: fused >= 9x faster than the unfused loss",
    "T3": "B=N=32768: fused faster than plain CLIP cross-entropy",
    "T4": "B=N=32768: fused peak extra memory <= 64 MiB (gradients excluded)",
    "T5": "B=N=262144: fused runs",
    "T6": "B=4096, N=65536: fused <= 1.5x its floor (12 GEMM-sized products: 4 similarities of a shard, "
          "their recomputation, 4 weighted products)",
}
TIMING = types.SimpleNamespace(repeat=25, min_repeat=5, point_budget=10.0)


def verdicts(rows: dict) -> dict:
    """``{target: {description, value, threshold, verdict: PASS | FAIL | N/A, note}}`` from rows by label."""
    def t(label):
        r = rows.get(label)
        return r["median_s"] if r and r["status"] == "ok" else None

    def why(label):
        r = rows.get(label)
        return "not measured" if r is None else r["status"] + (f" ({r['reason']})" if r.get("reason") else "")

    out = {}

    def add(name, value, threshold, ok, note):
        out[name] = dict(description=TARGETS[name], value=value, threshold=threshold, note=note,
                         verdict="N/A" if ok is None else "PASS" if ok else "FAIL")

    def compare(name, fused, base, threshold, kind):
        tf, tb = t(fused), t(base)
        if tf is None:
            return add(name, None, threshold, False, f"fused step did not run: {why(fused)}")
        if tb is None:
            return add(name, None, threshold, None, f"{base} did not run: {why(base)}")
        value = tf / tb if kind == "over_floor" else tb / tf
        ok = value <= threshold if kind == "over_floor" else value >= threshold if kind == "speedup" else tf < tb
        add(name, value, threshold, ok, f"fused {tf * 1e3:.2f} ms vs {base} {tb * 1e3:.2f} ms")

    compare("T1", "square/fused", "square/floor", 1.5, "over_floor")
    compare("T2", "square/fused", "square/unfused", 9.0, "speedup")
    compare("T3", "square/fused", "square/clip_ce", 1.0, "faster")
    peak = rows["square/fused"].get("peak_extra_bytes") if t("square/fused") is not None else None
    add("T4", peak, 64 * MiB, peak is not None and peak <= 64 * MiB,
        f"peak extra {peak / MiB:.1f} MiB" if peak is not None else f"no measurement: {why('square/fused')}")
    add("T5", t("big/fused"), None, t("big/fused") is not None, why("big/fused"))
    compare("T6", "rect/fused", "rect/floor", 1.5, "over_floor")
    return out


def _on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


on_gpu = pytest.mark.skipif(not _on_gpu(), reason="needs CUDA and compiled Triton kernels (TRITON_INTERPRET unset)")


@pytest.fixture(scope="module")
def measured():
    from benchmarks import harness, steps, sweep
    rows = {}
    for shape, (B, N) in SHAPES.items():                 # the implementations of a shape interleaved
        group = [{"label": label, "impl": impl, "B": B, "N": N, **CONFIG, "status": "ok", "reason": None,
                  "median_s": None, "peak_extra_bytes": None} for label, (impl, s) in POINTS.items() if s == shape]
        for row in group:
            if row["impl"] == "gemm_floor":
                row["floor_gemms"] = steps.floor_gemm_count(B, N, True, CONFIG["mode"])
        sweep.measure_group(group, TIMING, "cuda")
        rows.update({row["label"]: row for row in group})
    result = verdicts(rows)
    meta = harness.machine_info("cuda")
    path = harness.RESULTS_DIR / f"gpu_targets_{harness.slug(meta['gpu'])}_{meta['date'][:10]}.json"
    path.write_text(json.dumps({"meta": meta, "config": {**CONFIG, "shapes": SHAPES, "timing": vars(TIMING)},
                                "measurements": list(rows.values()), "targets": result}, indent=1) + "\n")
    for name, v in result.items():
        print(f"{v['verdict']:<5} {name} {v['description']}: {v['note']}")
    print(f"wrote {path} ({datetime.datetime.now().isoformat(timespec='seconds')})")
    return result


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("target", list(TARGETS))
def test_target(measured, target):
    v = measured[target]
    if v["verdict"] == "N/A":
        pytest.skip(f"{target}: {v['note']}")
    assert v["verdict"] == "PASS", f"{target} ({v['description']}): {v['note']}"


def _row(status="ok", t=None, mem=None):
    return {"status": status, "reason": None if status == "ok" else "x", "median_s": t, "peak_extra_bytes": mem}


def test_verdicts_handle_oom():
    rows = {"square/fused": _row(t=0.020, mem=40 << 20), "square/floor": _row(t=0.015),
            "square/unfused": _row("OOM"), "square/clip_ce": _row(t=0.030), "big/fused": _row("OOM"),
            "rect/fused": _row(t=0.010), "rect/floor": _row(t=0.005)}
    v = {name: r["verdict"] for name, r in verdicts(rows).items()}
    assert v == {"T1": "PASS", "T2": "N/A", "T3": "PASS", "T4": "PASS", "T5": "FAIL", "T6": "FAIL"}
    rows["square/fused"] = _row("OOM")
    v = {name: r["verdict"] for name, r in verdicts(rows).items()}
    assert v["T1"] == v["T2"] == v["T3"] == v["T4"] == "FAIL"
    rows["square/fused"] = _row(t=0.001, mem=65 << 20)
    rows["square/unfused"] = _row(t=0.0089)
    v = verdicts(rows)
    assert v["T2"]["verdict"] == "FAIL" and v["T2"]["value"] == pytest.approx(8.9) and v["T4"]["verdict"] == "FAIL"
