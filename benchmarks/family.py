"""The family's costs on this machine, each against its own base form, in one interleaved run.

    python -m benchmarks.family temperatures | distill | selection

``temperatures``: one training step (forward + backward) through ``DRRhoCLIPLoss`` with a global scale,
one per direction and per-sample temperatures; ``distill``: the step with and without the distillation
term (``distill_weight=1``, teacher scale 100); ``selection``: ``dk.jest_select`` against the authors'
``jointly_sample_batch_softmax`` (from ``DRRHO_AUTHORS_REPO``, in a gloo group of one process, which it
needs, in an in-memory store) on super-batches of 4096 and 16384. Memory of each case in a fresh process, then the times
interleaved; writes ``benchmarks/results/family_<preset>_<date>.json``."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import types
import warnings

import torch

from . import authors, harness, steps

PRESETS = ("temperatures", "distill", "selection")
FORMS = ("global", "per_direction", "individual")
JEST = dict(filter_ratio=0.8, n_chunks=2, topk=False)     # the function's defaults (train.py passes its args)
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _embeddings(n, d, dr):
    """Unit rows: image, text, reference image, reference text (``steps.make_inputs``, seed 0)."""
    return list(steps.make_inputs(n, n, d, dr, torch.float32, True, "cpu")[0].values())


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
        scales = {"global": (torch.tensor(14.0, requires_grad=True),), "individual": (),
                  "per_direction": ((torch.tensor(14.0, requires_grad=True), torch.tensor(12.0, requires_grad=True)),)}
        crit(x, t, index, *scales[form], ref_img=ref_img, ref_txt=ref_txt).backward()
    return step, 2 * B * d * 4


def selection_step(impl: str = "ours", b: int = 4096, d: int = 512, dr: int = 512, backend: str = "cpp"):
    """``(step, 0)``: one selection from a super-batch of ``b`` pairs, "ours" or "authors" (needs a process
    group: in a fresh process one of size 1 is opened here; :func:`process_group_of_one` closes it)."""
    img, txt, ref_img, ref_txt = _embeddings(b, d, dr)
    if impl == "ours":
        import drrho_kernels as dk
        g = torch.Generator().manual_seed(0)
        return (lambda: dk.jest_select(img, txt, ref_img, ref_txt, 14.0, ref_scale=100.0, generator=g,
                                       backend=backend, **JEST)), 0
    ns, where = authors.jest_namespace()
    if ns is None:
        raise RuntimeError(where)
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def step():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # their torch.distributed.nn.all_gather
            ns["jointly_sample_batch_softmax"]([ref_img, ref_txt], [img, txt], {"t": 100.0}, {"t": 14.0}, **JEST)
    return step, 0


@contextlib.contextmanager
def process_group_of_one():
    """Whatever process group the body opens is destroyed on the way out, and the environment variables
    of torch.distributed are left as they were."""
    import torch.distributed as dist
    env, had = {k: os.environ.get(k) for k in _DIST_ENV}, dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not had and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    cases, memory, built = _cases(preset, args), {}, {}
    for name, (target, kwargs) in cases.items():
        print(f"[{preset}] memory of {name} (fresh process) ...", flush=True)
        memory[name] = harness.peak_extra_rss(target, kwargs, threads=args.threads)
        print(f"[{preset}]   {memory[name]}", flush=True)
    print(f"[{preset}] timing, {args.repeat} interleaved rounds ...", flush=True)
    with process_group_of_one():
        for name, (target, kwargs) in cases.items():
            if "error" not in memory[name]:    # out of memory (or failed) in its own process: recorded, not timed
                module, fn = target.split(":")
                step = getattr(importlib.import_module(module), fn)(**kwargs)[0]
                built[name] = types.SimpleNamespace(prepare=lambda step=step: step)     # a harness step
        times = harness.time_steps(built, repeat=args.repeat, min_repeat=args.repeat)
        built.clear()
    results = {name: dict(memory=memory[name], **({"time": t} if isinstance(t := times.get(name), dict) else
                                                   {"time_error": harness.first_line(t) if t else "not timed"}))
               for name in cases}
    base = {"temperatures": "global", "distill": "without"}.get(preset)
    median = {name: r["time"]["median_s"] for name, r in results.items() if "time" in r}
    ratios = {f"{name}/{base}": t / median[base] for name, t in median.items() if base in median}
    ratios.update({f"{name}/ours": t / median[name.replace("authors", "ours")] for name, t in median.items()
                   if name.startswith("authors") and name.replace("authors", "ours") in median})
    return dict(preset=preset, meta=harness.machine_info(), shape=vars(args),
                jest=JEST if preset == "selection" else None, results=results, ratios=ratios)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=PRESETS)
    p.add_argument("--B", type=int, default=4096, help="batch (temperatures, distill)")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="super-batches (selection)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dr", type=int, default=512)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/family_<preset>_<date>.json)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rep = run(args.preset, args)
    finally:
        torch.set_num_threads(threads)
    out = harness.write_json(args.out or harness.RESULTS_DIR / f"family_{args.preset}_{rep['meta']['date'][:10]}.json", rep)
    for name, r in rep["results"].items():
        t, mem = r.get("time", {}).get("median_s"), r["memory"].get("peak_extra_bytes")
        print(f"{name:<22} {'%.3f s' % t if t else r.get('time_error', ''):>10}  "
              f"{'%.1f MiB' % (mem / 2**20) if mem is not None else r['memory'].get('error')}")
    for k, v in rep["ratios"].items():
        print(f"{k:<32} {v:.3f}x")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
