"""GPU acceptance targets of the fused Triton loss: T1-T9 (part of the GPU command, docs/TESTING.md).

    python -m pytest -m gpu -rs          # on an H100 / H200: the correctness tests, then these

Measured by the benchmark code (``benchmarks.harness``: memory in process, then the implementations of a
target timed interleaved), autotuned (the correctness tests pin the tiles). A target whose baseline could
not run (out of memory) is N/A, never passed; one whose fused step could not run fails. Every measurement
and verdict goes to ``$DRRHO_KERNELS_RESULTS/gpu_targets_<gpu>_<date>.json`` (a temporary directory by
default), and the verdict table is printed at the end of the session. Skipped without CUDA and under
``TRITON_INTERPRET``; the verdict logic and the targets' shapes are checked anywhere.

T7-T9 are the step users run (SPEC part 3): float32 features under autocast (T7), the DRRho-CLIP paper's
per-rank step (T8: 640 anchors against 5120 columns, the gather_u fold, in one process) under the
authors' float16 autocast and under bfloat16, against the benchmarks' unfused stand-in of their
sequence under the same autocast (their SogCLRLoss in a group of one sees N = B; the stand-in is held
against their code in tests/test_baselines.py), and a whole CLIP training step (T9: a ViT-B/16 image
tower from timm and a 12-layer text tower from transformers, random weights, B = 256, AdamW, bf16
autocast) with our loss against the stand-in: step time no slower (2% of noise allowed), peak memory
no higher.
"""
import datetime
import types

import pytest
import torch

MiB = 1 << 20
CONFIG = dict(d=512, dr=512, dtype="bfloat16", ref=True, mode="forward_backward")
SHAPES = {"square": (32768, 32768), "big": (262144, 262144), "rect": (4096, 65536)}
RANK = (640, 5120)            # the paper's per-rank shape: 8 GPUs, global batch 5120
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
    "T7": "B=N=32768: float32 features under bf16 autocast <= 1.15x the same step on bf16 features",
    "T8": "B=640 vs N=5120 (the paper's rank, gather_u): fused faster than the authors' sequence under fp16 "
          "autocast and under bf16 autocast",
    "T9": "CLIP training step (ViT-B/16 + text transformer, B=256, AdamW, bf16 autocast): with our loss no "
          "slower (<= 1.02x) and no more peak memory than with the authors' sequence",
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
    compare("T7", "square/autocast", "square/fused", 1.15, "over_floor")
    sub = {}
    for dt in ("fp16", "bf16"):
        compare("T8", f"rank/{dt}/fused", f"rank/{dt}/unfused", 1.0, "faster")
        sub[dt] = out.pop("T8")
    bad = [s for s in sub.values() if s["verdict"] != "PASS"]
    worst = next((s for s in bad if s["verdict"] == "FAIL"), bad[0] if bad else sub["bf16"])
    add("T8", {dt: s["value"] for dt, s in sub.items()}, 1.0, None if worst["verdict"] == "N/A" else not bad,
        "; ".join(f"{dt}: {s['note']}" for dt, s in sub.items()))
    ours, theirs = rows.get("clip/ours"), rows.get("clip/authors")
    if t("clip/ours") is None:
        add("T9", None, 1.02, False, f"the step with our loss did not run: {why('clip/ours')}")
    elif t("clip/authors") is None:
        add("T9", None, 1.02, None, f"the step with the authors' sequence did not run: {why('clip/authors')}")
    else:
        ratio, mem = t("clip/ours") / t("clip/authors"), ours["peak_bytes"] - theirs["peak_bytes"]
        add("T9", ratio, 1.02, ratio <= 1.02 and mem <= 0,
            f"step {t('clip/ours') * 1e3:.1f} vs {t('clip/authors') * 1e3:.1f} ms, peak {ours['peak_bytes'] / MiB:.0f} "
            f"vs {theirs['peak_bytes'] / MiB:.0f} MiB")
    return out


def _on_gpu() -> bool:
    import os
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


on_gpu = pytest.mark.skipif(not _on_gpu(), reason="needs CUDA and compiled Triton kernels (TRITON_INTERPRET unset)")


# ------------------------------------------------------------------------------------------------
# The steps of T7-T9 (T1-T6 are benchmarks.steps' own).

class _Step:
    """A timed step for ``benchmarks.harness.time_steps``: ``prepare()`` returns what is timed."""

    def __init__(self, fn):
        self.fn = fn

    def prepare(self):
        return self.fn

    def __call__(self):
        self.fn()


def _features(B, N, d, dr, seed=0):
    """float32 unit features on the GPU, as CUDA autocast hands them over, with a reference model's."""
    import gpu_checks as gc
    return {k: v.float().cuda() if isinstance(v, torch.Tensor) else v
            for k, v in gc.training_inputs(B, N, d, dr, seed=seed).items()}


def autocast_step(B, dtype_of_features, autocast):
    """T7: one process at B = N, the features float32 under ``autocast`` or already ``dtype_of_features``."""
    import drrho_kernels as dk
    f = _features(B, None, 512, 512)
    f = {k: v.to(dtype_of_features) for k, v in f.items()}
    u = torch.zeros(B, device="cuda")

    def step():
        x, t = f["img"].detach().requires_grad_(), f["txt"].detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = dk.drrho_clip_loss(x, t, torch.tensor(14.0, device="cuda"), u, u, ref_img=f["ref_img"],
                                      ref_txt=f["ref_txt"], backend="triton")[0]
        loss.backward()
    return _Step(step)


def rank_step(impl, autocast):
    """T8: the per-rank step of the gather_u scheme in one process: this rank's 640 anchors against the 5120
    columns gathered without gradient, the fold's column anchors' weights as gathered (``fused``), or the
    authors' sequence (the unfused stand-in, under the same autocast)."""
    from benchmarks import baselines
    from drrho_kernels.loss.functional import fused_terms, loss_from_terms, resolved
    from drrho_kernels.loss.validate import check_options, validate
    B, N = RANK
    f = _features(B, N, 512, 512)
    u = torch.full((B,), -1.0, device="cuda")
    cols = {k: f[k] for k in ("img_all", "txt_all", "ref_img_all", "ref_txt_all")}
    s = torch.tensor(14.0, device="cuda", requires_grad=True)
    if impl == "fused":
        # the gathered columns' scale, normaliser and margin, as the fold receives them from every rank
        g = torch.Generator(device="cpu").manual_seed(1)
        fold = dict(col_scale=torch.full((2, N), 14.0, device="cuda"),
                    col_log_norm=(torch.rand(2, N, generator=g) - 1.5).cuda(),
                    col_margin=(0.3 * torch.rand(N, generator=g)).cuda())

        def step():
            x, t = f["img"].detach().requires_grad_(), f["txt"].detach().requires_grad_()
            with torch.autocast("cuda", dtype=autocast):
                p = resolved(validate(x, t, s, u, u, check_options(backend="triton"), ref_img=f["ref_img"],
                                      ref_txt=f["ref_txt"], **cols, offset=f["offset"]))
                terms = fused_terms(p)
                loss = loss_from_terms(p, terms, terms.weights(**fold))
            loss.backward()
    else:
        def step():
            x, t = f["img"].detach().requires_grad_(), f["txt"].detach().requires_grad_()
            with torch.autocast("cuda", dtype=autocast):
                loss = baselines.unfused_drrho_loss(x, t, s, u, u, f["ref_img"], f["ref_txt"], **cols,
                                                    offset=f["offset"])[0]
            loss.backward()
    return _Step(step)


class _CLIP(torch.nn.Module):
    """A ViT-B/16 image tower (timm) and a CLIP text tower (transformers, 12 layers, width 512), random
    weights, both projected to 512."""

    def __init__(self):
        super().__init__()
        import timm
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        self.visual = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=512)
        self.text = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                                                               num_hidden_layers=12, num_attention_heads=8,
                                                               max_position_embeddings=77, projection_dim=512))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.659))

    def forward(self, images, tokens):
        img = torch.nn.functional.normalize(self.visual(images), dim=-1)
        txt = torch.nn.functional.normalize(self.text(input_ids=tokens).text_embeds, dim=-1)
        return img.float(), txt.float(), self.logit_scale.exp()


def clip_step(loss_kind, B=256, data_size=100_000):
    """T9: forward, loss, backward and AdamW of a CLIP model under bf16 autocast; the reference model's
    features from a cache (random here), the dataset indices from the dataloader (CPU)."""
    import drrho_kernels as dk
    from benchmarks import baselines
    torch.manual_seed(0)
    model = _CLIP().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    images = torch.randn(B, 3, 224, 224, device="cuda")
    tokens = torch.randint(0, 49408, (B, 77), device="cuda")
    ref = torch.nn.functional.normalize(torch.randn(data_size, 2, 512), dim=-1).pin_memory()
    crit = dk.DRRhoCLIPLoss(data_size, backend="triton") if loss_kind == "ours" else None
    u = torch.zeros(2, data_size, device="cuda")
    state = {"step": 0}

    def step():
        index = torch.randperm(data_size)[:B]
        ref_img, ref_txt = (r.to("cuda", non_blocking=True) for r in ref[index].unbind(1))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            img, txt, scale = model(images, tokens)
            if crit is not None:
                loss = crit(img, txt, index, scale, ref_img=ref_img, ref_txt=ref_txt)
            else:
                idx = index.cuda(non_blocking=True)
                loss, u_img, u_txt = baselines.unfused_drrho_loss(img, txt, scale, u[0, idx], u[1, idx], ref_img,
                                                                  ref_txt)[:3]
                u[0, idx], u[1, idx] = u_img.detach(), u_txt.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
    return _Step(step), model


@pytest.fixture(scope="module")
def measured(request):
    from benchmarks import harness, steps, sweep
    rows = {}
    for shape, (B, N) in SHAPES.items():                 # T1-T6: the implementations of a shape interleaved
        group = [{"label": label, "impl": impl, "B": B, "N": N, **CONFIG, "status": "ok", "reason": None,
                  "median_s": None, "peak_extra_bytes": None} for label, (impl, s) in POINTS.items() if s == shape]
        for row in group:
            if row["impl"] == "gemm_floor":
                row["floor_gemms"] = steps.floor_gemm_count(B, N, True, CONFIG["mode"])
        sweep.measure_group(group, TIMING, "cuda")
        rows.update({row["label"]: row for row in group})
    extra = {"square/autocast": lambda: autocast_step(32768, torch.float32, True)}
    for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        extra[f"rank/{name}/fused"] = lambda dt=dt: rank_step("fused", dt)
        extra[f"rank/{name}/unfused"] = lambda dt=dt: rank_step("unfused", dt)
    _time_into(rows, extra, harness)
    _time_into(rows, {"clip/ours": lambda: clip_step("ours"), "clip/authors": lambda: clip_step("authors")},
               harness, repeat=8, memory=True)
    result = verdicts(rows)
    meta = harness.machine_info("cuda")
    out = harness.results_dir(_tmp())
    path = harness.write_json(out / f"gpu_targets_{harness.slug(meta['gpu'])}_{meta['date'][:10]}.json",
                              {"meta": meta, "config": {**CONFIG, "shapes": SHAPES, "rank": RANK, "timing": vars(TIMING)},
                               "measurements": list(rows.values()), "targets": result})
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"GPU targets ({meta['gpu']}, {datetime.datetime.now().isoformat(timespec='seconds')}):"]
    lines += [f"  {v['verdict']:<5} {name}  {v['note']}" for name, v in result.items()]
    lines.append(f"  results: {path}")
    if reporter is not None:
        for line in lines:
            reporter.write_line(line)
    return result


def _tmp():
    import tempfile
    from pathlib import Path
    return Path(tempfile.mkdtemp(prefix="drrho_gpu_targets_"))


def _time_into(rows, builders, harness, repeat=None, memory=False):
    """Build each step (a failure is its row's result), then time them interleaved (autotuned: the first
    run of each compiles and tunes outside the timing); ``memory``: each one's peak allocated bytes."""
    built = {}
    for label, build in builders.items():
        row = rows[label] = {"label": label, "status": "ok", "reason": None, "median_s": None}
        try:
            step = build()
            step = step[0] if isinstance(step, tuple) else step
            step()
            if memory:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["peak_bytes"] = torch.cuda.max_memory_allocated()
            built[label] = step
        except Exception as exc:                       # noqa: BLE001 (a failing step is a result)
            row.update(status="OOM" if harness.is_oom(exc) else "error", reason=harness.first_line(exc))
    results = harness.time_steps(built, device="cuda", repeat=repeat or TIMING.repeat, min_repeat=TIMING.min_repeat,
                                 budget=TIMING.point_budget)
    for label, res in results.items():
        if isinstance(res, BaseException):
            rows[label].update(status="error", reason=harness.first_line(res))
        else:
            rows[label].update(res)
    built.clear()
    torch.cuda.empty_cache()


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("target", list(TARGETS))
def test_target(measured, target):
    v = measured[target]
    if v["verdict"] == "N/A":
        pytest.skip(f"{target}: {v['note']}")
    assert v["verdict"] == "PASS", f"{target} ({v['description']}): {v['note']}"


# ------------------------------------------------------------------------------------------------
# Anywhere: the verdict logic, and the plan of the GPU command (its shapes are the ones counted).

def _row(status="ok", t=None, mem=None, peak=None):
    return {"status": status, "reason": None if status == "ok" else "x", "median_s": t, "peak_extra_bytes": mem,
            "peak_bytes": peak}


def _rows(**over):
    rows = {"square/fused": _row(t=0.020, mem=40 << 20), "square/floor": _row(t=0.015),
            "square/unfused": _row("OOM"), "square/clip_ce": _row(t=0.030), "big/fused": _row("OOM"),
            "rect/fused": _row(t=0.010), "rect/floor": _row(t=0.005), "square/autocast": _row(t=0.022),
            "rank/fp16/fused": _row(t=0.001), "rank/fp16/unfused": _row(t=0.002),
            "rank/bf16/fused": _row(t=0.001), "rank/bf16/unfused": _row(t=0.002),
            "clip/ours": _row(t=0.300, peak=30 << 30), "clip/authors": _row(t=0.301, peak=30 << 30)}
    rows.update(over)
    return rows


def test_verdicts_handle_oom_and_the_new_targets():
    v = {name: r["verdict"] for name, r in verdicts(_rows()).items()}
    assert v == {"T1": "PASS", "T2": "N/A", "T3": "PASS", "T4": "PASS", "T5": "FAIL", "T6": "FAIL", "T7": "PASS",
                 "T8": "PASS", "T9": "PASS"}
    v = {name: r["verdict"] for name, r in verdicts(_rows(**{"square/fused": _row("OOM")})).items()}
    assert v["T1"] == v["T2"] == v["T3"] == v["T4"] == "FAIL" and v["T7"] == "N/A"     # T7's baseline is that step
    r = verdicts(_rows(**{"square/fused": _row(t=0.001, mem=65 << 20), "square/unfused": _row(t=0.0089)}))
    assert r["T2"]["verdict"] == "FAIL" and r["T2"]["value"] == pytest.approx(8.9) and r["T4"]["verdict"] == "FAIL"
    assert verdicts(_rows(**{"square/autocast": _row(t=0.0231)}))["T7"]["verdict"] == "FAIL"      # 1.155x
    assert verdicts(_rows(**{"rank/fp16/fused": _row(t=0.003)}))["T8"]["verdict"] == "FAIL"       # one dtype slower
    assert verdicts(_rows(**{"rank/bf16/unfused": _row("OOM")}))["T8"]["verdict"] == "N/A"
    assert verdicts(_rows(**{"clip/ours": _row(t=0.31, peak=30 << 30)}))["T9"]["verdict"] == "FAIL"   # 1.03x
    assert verdicts(_rows(**{"clip/ours": _row(t=0.30, peak=(30 << 30) + 1)}))["T9"]["verdict"] == "FAIL"
    assert verdicts(_rows(**{"clip/authors": _row("error")}))["T9"]["verdict"] == "N/A"


def test_the_gpu_command_fits_its_compile_budget():
    """Counted in compiles (tests/gpu_plan.py): the targets' shapes are among the plan's, and the plan's
    distinct compiles on an H100 within its budget."""
    import gpu_plan
    planned = {(B, N) for B, N, *_ in gpu_plan.TARGETS}
    for B, N in [*SHAPES.values(), RANK]:
        assert (B, None if N == B else N) in planned, (B, N)
    count = gpu_plan.compiles()
    assert count["total"] <= gpu_plan.BUDGET_COMPILES, count["total"]
