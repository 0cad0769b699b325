"""The family's costs on this machine, each against its own base form, in one interleaved run.

``python -m benchmarks.family temperatures``: one training step of the loss (forward + backward) through
``DRRhoCLIPLoss`` (state gathered and written back as in training) with a global temperature, per
direction (two scales) and per-sample temperatures (their own update included).

``python -m benchmarks.family distill``: the same step with and without the distillation term
(SPEC 2.2, ``distill_weight=1``, teacher scale 100).

``python -m benchmarks.family selection``: joint example selection from super-batches of 4096 and 16384
pairs: the authors' ``jointly_sample_batch_softmax`` (from ``DRRHO_AUTHORS_REPO``, in a gloo process
group of size 1, which it needs; skipped without a snapshot) against :func:`drrho_kernels.jest_select`.

Defaults: B = N = 4096, d = dr = 512, float32, the cpp backend, 2 threads, 7 interleaved rounds; peak
extra memory of each step in a fresh process (``harness.peak_extra_rss``). Writes
``benchmarks/results/family_<preset>_<date>.json``: device, versions, shapes, medians, ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import warnings

import torch

from . import authors, harness

PRESETS = ("temperatures", "distill", "selection")
FORMS = ("global", "per_direction", "individual")
SELECTION_SIZES = (4096, 16384)
JEST = dict(filter_ratio=0.8, n_chunks=2, topk=False)     # the function's defaults (train.py passes its args)


def _embeddings(n, d, dr, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda w: torch.nn.functional.normalize(torch.randn(n, w, generator=g), dim=1)  # noqa: E731
    return unit(d), unit(d), unit(dr), unit(dr)


def loss_step(form: str = "global", distill: bool = False, B: int = 4096, d: int = 512, dr: int = 512,
              backend: str = "cpp"):
    """``(step, output_bytes)``: one module step of ``form`` on fresh leaves (the gradients are the output)."""
    import drrho_kernels as dk
    img, txt, ref_img, ref_txt = _embeddings(B, d, dr)
    crit = dk.DRRhoCLIPLoss(B, gamma=0.8, backend=backend, temperature="individual" if form == "individual" else "global",
                            distill_weight=1.0 if distill else 0.0)
    crit.set_epoch(1)
    index = torch.arange(B)

    def step():
        x, t = img.detach().requires_grad_(), txt.detach().requires_grad_()
        scales = () if form == "individual" else (
            (torch.tensor(14.0, requires_grad=True),) if form == "global"
            else ((torch.tensor(14.0, requires_grad=True), torch.tensor(12.0, requires_grad=True)),))
        crit(x, t, index, *scales, ref_img=ref_img, ref_txt=ref_txt).backward()
    return step, 2 * B * d * 4


def selection_step(impl: str = "ours", b: int = 4096, d: int = 512, dr: int = 512, backend: str = "cpp"):
    """``(step, 0)``: one selection from a super-batch of ``b`` pairs; ``impl`` "ours" or "authors" (in a
    process group of size 1, opened here and kept for the process)."""
    img, txt, ref_img, ref_txt = _embeddings(b, d, dr)
    if impl == "ours":
        import drrho_kernels as dk
        g = torch.Generator().manual_seed(0)
        return (lambda: dk.jest_select(img, txt, ref_img, ref_txt, 14.0, ref_scale=100.0, generator=g,
                                       backend=backend, **JEST)), 0
    ns, where = authors.jest_namespace()
    if ns is None:
        raise RuntimeError(where)
    _process_group_of_one()

    def step():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # their torch.distributed.nn.all_gather
            ns["jointly_sample_batch_softmax"]([ref_img, ref_txt], [img, txt], {"t": 100.0}, {"t": 14.0}, **JEST)
    return step, 0


def _process_group_of_one():
    import torch.distributed as dist
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="family_pg_"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


class _Wrapped:
    """A plain callable as a harness step (``prepare`` returns it)."""

    def __init__(self, fn):
        self.fn = fn

    def prepare(self):
        return self.fn


def _cases(preset: str, args) -> dict:
    """``{name: ("module:function", kwargs)}`` of the preset, in the order of the interleaving."""
    shape = dict(B=args.B, d=args.d, dr=args.dr, backend=args.backend)
    if preset == "temperatures":
        return {f: ("benchmarks.family:loss_step", dict(shape, form=f)) for f in FORMS}
    if preset == "distill":
        return {name: ("benchmarks.family:loss_step", dict(shape, distill=flag))
                for name, flag in (("without", False), ("with_distill", True))}
    impls = ["ours"] + (["authors"] if authors.jest_namespace()[0] is not None else [])
    return {f"{impl}_b{b}": ("benchmarks.family:selection_step", dict(impl=impl, b=b, d=args.d, dr=args.dr,
                                                                      backend=args.backend))
            for b in args.sizes for impl in impls}


def run(preset: str, args) -> dict:
    cases = _cases(preset, args)
    memory = {}
    for name, (target, kwargs) in cases.items():
        print(f"[{preset}] memory of {name} (fresh process) ...", flush=True)
        memory[name] = harness.peak_extra_rss(target, kwargs, threads=args.threads)
        print(f"[{preset}]   {memory[name]}", flush=True)
    steps = {}
    for name, (target, kwargs) in cases.items():
        if "error" in memory[name]:
            continue                      # out of memory (or failed) in its own process: recorded, not timed
        module, fn = target.split(":")
        steps[name] = _Wrapped(getattr(__import__(module, fromlist=[fn]), fn)(**kwargs)[0])
    print(f"[{preset}] timing {list(steps)}, {args.repeat} interleaved rounds ...", flush=True)
    times = harness.time_steps(steps, repeat=args.repeat, min_repeat=args.repeat)
    results = {}
    for name in cases:
        t = times.get(name)
        results[name] = dict(memory=memory[name], **({"time": t} if isinstance(t, dict) else
                                                     {"time_error": harness.first_line(t) if t else "not timed"}))
    base = {"temperatures": "global", "distill": "without"}.get(preset)
    ratios = {}
    for name, r in results.items():
        if base and "time" in r and "time" in results[base]:
            ratios[f"{name}/{base}"] = r["time"]["median_s"] / results[base]["time"]["median_s"]
        if preset == "selection" and name.startswith("authors") and "time" in r:
            ours = results[name.replace("authors", "ours")]
            if "time" in ours:
                ratios[f"{name}/ours"] = r["time"]["median_s"] / ours["time"]["median_s"]
    return dict(preset=preset, meta=harness.machine_info(), shape=vars(args),
                jest=JEST if preset == "selection" else None, results=results, ratios=ratios)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=PRESETS)
    p.add_argument("--B", type=int, default=4096, help="batch (temperatures, distill)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SELECTION_SIZES), help="super-batches (selection)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dr", type=int, default=512)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/family_<preset>_<date>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rep = run(args.preset, args)
    out = args.out or harness.RESULTS_DIR / f"family_{args.preset}_{datetime.date.today().isoformat()}.json"
    with open(out, "w") as f:
        json.dump(rep, f, indent=1, default=str)
    for name, r in rep["results"].items():
        t = r.get("time", {}).get("median_s")
        mem = r["memory"].get("peak_extra_bytes")
        print(f"{name:<22} {'%.3f s' % t if t else r.get('time_error', ''):>10}  "
              f"{'%.1f MiB' % (mem / 2**20) if mem is not None else r['memory'].get('error')}")
    for k, v in rep["ratios"].items():
        print(f"{k:<32} {v:.3f}x")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
