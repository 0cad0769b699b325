"""Float32 dot precision per GPU target: what each Triton ``input_precision`` does to the DRRho loss.

Triton's interpreter ignores ``input_precision``; here the real kernels run in it with the dot replaced
by an emulation of each precision, built the way Triton lowers it (the F32DotTC pass): ``ieee`` one
float32 product; ``tf32`` operands rounded to TF32; ``tf32x3`` a = big + small (TF32 parts), small*big +
big*small + big*big; ``bf16x3`` / ``bf16x6`` a = hi + mid (+ lo) in bfloat16 parts, 3 / 6 products. Every
product of parts is exact in float32 and accumulates in float32, as the matrix units do. Inputs: CLIP-like
embeddings (``make_inputs``), d = dr = 512, s = 14.3 and 100, one process, a shard and distillation;
truth: the float64 reference; errors as the conformance tests measure them (docs/SPEC.md, Appendix A).
``conformance`` also runs the float32 cases of tests/test_conformance.py at each precision.

Choice per target (``choose``): among the precisions its Triton backend accepts, those with a worst
error <= ``TOLERANCE / MARGIN`` that fail no conformance case; of those the fastest (``kernels.HW``
peaks over ``kernels.PRODUCTS``). It must equal ``launch.FP32_PRECISION_AMD`` (tests/test_triton_aot.py).

    python -m benchmarks.precision_study      # -> results/precision_study.json, ~30 min on 2 cores
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import harness
from . import kernels as K

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3", "bf16x6")
TOLERANCE = 1e-4          # SPEC.md "Numerics": float32 inputs, loss and gradients against float64
MARGIN = 4.0              # a precision qualifies when its worst error is at most TOLERANCE / MARGIN


def _keep_bits(a: np.ndarray, drop: int, mode: str) -> np.ndarray:
    """``a`` (float32, finite) with its ``drop`` low mantissa bits cleared: rounded to nearest even
    ("rne"), to nearest with ties away from zero ("rna") or truncated ("rz")."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if mode == "rne":
        u = u + np.uint32((1 << (drop - 1)) - 1) + ((u >> np.uint32(drop)) & np.uint32(1))
    elif mode == "rna":
        u = u + np.uint32(1 << (drop - 1))
    return (u & np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)).view(np.float32)


def bf16(a):
    return _keep_bits(a, 16, "rne")


def tf32(a, mode="rne"):
    return _keep_bits(a, 13, mode)


def _split(a: np.ndarray, n: int) -> list[np.ndarray]:
    """Triton's splitF32 into ``n`` bfloat16 parts: hi = bf16(a), mid = bf16(a - hi), lo = bf16(a - hi - mid)."""
    parts = []
    for _ in range(n):
        parts.append(bf16(a))
        a = (a - parts[-1]).astype(np.float32)
    return parts


def _mm(a, b, c=None):
    """One tensor-core dot: exact products, float32 accumulation."""
    out = np.matmul(a, b, dtype=np.float32)
    return out if c is None else (out + c).astype(np.float32)


def emulated_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str) -> np.ndarray:
    """``acc + a @ b`` for float32 ``a`` [M, K], ``b`` [K, N] as Triton computes it at ``precision``."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if precision in ("ieee", "tf32"):
        return _mm(a, b, acc) if precision == "ieee" else _mm(tf32(a), tf32(b), acc)
    if precision == "tf32x3":
        a_big, b_big = tf32(a, "rna"), tf32(b, "rna")
        small = _mm(a_big, tf32(b - b_big, "rz"), _mm(tf32(a - a_big, "rz"), b_big))   # the MMA reads TF32 bits
    elif precision == "bf16x3":
        (a_big, am), (b_big, bm) = _split(a, 2), _split(b, 2)
        small = _mm(a_big, bm, _mm(am, b_big))
    elif precision == "bf16x6":
        (a_big, am, al), (b_big, bm, bl) = _split(a, 3), _split(b, 3)
        small = _mm(am, bm)
        for x, y in ((al, b_big), (a_big, bl), (am, b_big), (a_big, bm)):
            small = _mm(x, y, small)
    else:
        raise ValueError(f"unknown precision {precision!r}")
    small = np.where(np.isnan(small), np.float32(0), small)
    return (_mm(a_big, b_big, small) + acc).astype(np.float32)


class _Emulation:
    """While active, the interpreter's float32 dots run ``emulated_dot`` at ``precision`` (``calls`` counts)."""
    precision: str | None = None
    calls = 0

    def __init__(self, precision: str):
        self.new = precision

    def __enter__(self):
        from triton.runtime import interpreter
        if not hasattr(interpreter.InterpreterBuilder, "_drrho_original_dot"):      # wrap once per process
            original = interpreter.InterpreterBuilder._drrho_original_dot = interpreter.InterpreterBuilder.create_dot

            def create_dot(builder, a, b, d, input_precision, max_num_imprecise_acc):
                if _Emulation.precision is None or a.data.dtype != np.float32 or b.data.dtype != np.float32:
                    return original(builder, a, b, d, input_precision, max_num_imprecise_acc)
                _Emulation.calls += 1
                out = emulated_dot(a.data, b.data, d.data, _Emulation.precision)
                return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)
            interpreter.InterpreterBuilder.create_dot = create_dot
        self.old, _Emulation.precision, _Emulation.calls = _Emulation.precision, self.new, 0
        return self

    def __exit__(self, *exc):
        self.calls, _Emulation.precision = _Emulation.calls, self.old


def make_inputs(B: int, N: int | None, d: int = 512, dr: int = 512, scale: float = 100.0, seed: int = 0):
    """CLIP-like float32 inputs as float64 tensors and the loss options: unit vectors g + 0.35 mu (negatives'
    cosine ~0.1), text = image + noise (positives' ~0.5); the reference's likewise, pairs half as close.
    N given: B rows of N columns at offset (N - B) // 2."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    n = B if N is None else N

    def unit(x):
        return torch.nn.functional.normalize(x, dim=1)

    def pairs(width, closeness):
        mu = unit(torch.randn(1, width, generator=gen, dtype=torch.float64))
        img = unit(unit(torch.randn(n, width, generator=gen, dtype=torch.float64)) + 0.35 * mu)
        noise = unit(torch.randn(n, width, generator=gen, dtype=torch.float64))
        txt = unit(closeness * img + math.sqrt(1 - closeness ** 2) * noise + 0.35 * mu)
        return img.float().double(), txt.float().double()

    (X, T), (Xr, Tr) = pairs(d, 0.55), pairs(dr, 0.3)
    off = 0 if N is None else (N - B) // 2
    rows = slice(off, off + B)
    kw = dict(img=X[rows], txt=T[rows], ref_img=Xr[rows], ref_txt=Tr[rows], offset=off, gamma=0.8, eps=1e-14, rho=8.0)
    if N is not None:
        kw.update(img_all=X, txt_all=T, ref_img_all=Xr, ref_txt_all=Tr)
    return kw, scale


def evaluate(kw: dict, scale: float, dtype, backend: str, u=None) -> dict:
    """Loss, new u, d_s and every embedding gradient (float64 NumPy) of one evaluation."""
    import torch

    import drrho_kernels as dk
    args = {k: (v.detach().to(dtype).clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    B, state = args["img"].shape[0], torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [k for k in ("img", "txt", "img_all", "txt_all") if k in args]
    for k in leaves:
        args[k].requires_grad_(True)
    u = u or (torch.zeros(B), torch.zeros(B))
    s = torch.tensor(float(scale), dtype=state, requires_grad=True)
    loss, u_img, u_txt = dk.drrho_clip_loss(logit_scale=s, u_img=u[0].to(state).clone(), u_txt=u[1].to(state).clone(),
                                            backend=backend, **args)
    loss.backward()
    return dict(loss=loss.item(), u=torch.cat([u_img, u_txt]).detach().double().numpy(), d_s=s.grad.item(),
                **{"d_" + k: args[k].grad.detach().double().numpy() for k in leaves})


def errors(got: dict, want: dict, scale: float, rho: float, B: int) -> dict:
    """Norm-wise relative errors; dL/ds against ``|dL/ds| + 1e-3 (|A| + rho + |U|) / s^2`` (SPEC, Appendix A)."""
    out = {k: float(np.linalg.norm(np.asarray(got[k], dtype=np.float64) - want[k])
                    / max(np.linalg.norm(want[k]), 1e-300)) for k in want if k != "d_s"}
    u_mean = float(np.sum(want["u"])) / (2 * B)
    floor = 1e-3 * (abs(scale * want["loss"] - rho - u_mean) + rho + abs(u_mean)) / scale ** 2
    out["d_s"] = abs(got["d_s"] - want["d_s"]) / (abs(want["d_s"]) + floor)
    return out


CASES = {   # name: (B, N or None: one process, d = dr, distillation weight; teacher at t_d = 100)
    "single-B256": (256, None, 512, 0.0),
    "dist-B128-N512": (128, 512, 512, 0.0),
    "single-B128-distill": (128, None, 512, 1.0),
}
SCALES = (1 / 0.07, 100.0)
# interpreter tiles of the AMD tables' shape (K chunks of 32) instead of its 16 x 16
STUDY_TILES = dict(fwd=dict(BM=64, BN=64, BK=32, BKR=32), fwdt=dict(BM=64, BN=64, BK=32, BKR=32),
                   bwd=dict(BM=64, BN=64, BK=32, BKR=32, BD=128))


@contextlib.contextmanager
def _study_tiles():
    from dataclasses import replace
    saved = dict(K.tiles.INTERPRETER_TILES)
    try:
        for kernel, meta in STUDY_TILES.items():
            K.tiles.INTERPRETER_TILES[kernel] = replace(K.tiles.INTERPRETER_TILES[kernel], **meta)
        yield
    finally:
        K.tiles.INTERPRETER_TILES.update(saved)


def study(cases=tuple(CASES), scales=SCALES, precisions=PRECISIONS, seed=0, log=print) -> dict:
    """Per case, scale and precision: the errors against the float64 reference, from the stored state of a
    previous step (the true new u of one step on these inputs)."""
    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if not K.launch.interpreting():
        raise RuntimeError("the precision study runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing triton (python -m benchmarks.precision_study does)")
    rows = []
    with _study_tiles():
        for name, scale, prec in ((n, s, p) for n in cases for s in scales for p in (None, *precisions)):
            B, N, d, distill = CASES[name]
            if prec is None:            # the inputs and the truth of this case and scale
                kw, s = make_inputs(B, N, d=d, dr=d, scale=scale, seed=seed)
                kw.update(dict(distill_weight=distill, distill_scale=100.0) if distill else {})
                prev = evaluate(kw, s, torch.float64, "reference")
                u = tuple(torch.from_numpy(prev["u"][i * B:(i + 1) * B]).float() for i in range(2))
                truth = evaluate(kw, s, torch.float64, "reference", u)
                continue
            t0 = time.perf_counter()
            with _Emulation(prec) as emu:
                got = evaluate(kw, s, torch.float32, "triton", u)
            if emu.calls == 0:
                raise RuntimeError("no dot went through the emulation")
            err = errors(got, truth, s, kw["rho"], B)
            rows.append(dict(case=name, B=B, N=N or B, d=d, dr=d, scale=round(s, 4), distill_weight=distill,
                             precision=prec, emulated_dots=emu.calls, errors={k: float(f"{v:.3e}") for k, v in err.items()},
                             worst=float(f"{max(err.values()):.3e}"),
                             worst_grad=float(f"{max(v for k, v in err.items() if k.startswith('d_') and k != 'd_s'):.3e}"),
                             seconds=round(time.perf_counter() - t0, 1)))
            log(f"{name:<16} s={s:<7.3f} {prec:<7} worst {rows[-1]['worst']:.2e}  "
                + " ".join(f"{k}={v:.1e}" for k, v in err.items()) + f"  ({rows[-1]['seconds']} s)")
    return dict(rows=rows)


def conformance(precisions=PRECISIONS, log=print) -> dict:
    """The float32 cases of tests/test_conformance.py through the kernels at each emulated precision (the
    interpreter's tiles, as in the tests), judged by the suite's own table: per precision the failures and,
    per quantity, the worst error and the worst error / bound."""
    import torch
    sys.path.insert(0, str(harness.REPO_ROOT / "tests"))
    import test_conformance as tc
    tol, out = tc.TOLERANCES[torch.float32], {}
    for prec in precisions:
        t0 = time.perf_counter()
        worst, ratio, failures, calls = {}, {}, [], 0
        for name, make in tc.CASES.items():
            case = make()
            with _Emulation(prec) as emu:
                got = tc.run(case, "triton", torch.float32)
            calls += emu.calls
            want = tc.oracle(case)
            err = {k: tc.rel_err(got[k], want[k]) for k in want if k in got and k != "d_s"}
            err["d_s"] = tc.scale_grad_error(got["d_s"], want, case)
            for k, e in err.items():
                key = "u" if k.startswith("u_") else "grad" if k.startswith("d_") and k != "d_s" else k
                bound = {"loss": tol.loss, "d_s": tol.scale, "u": tol.state}.get(key, tol.grad)
                worst[key], ratio[key] = max(worst.get(key, 0.0), e), max(ratio.get(key, 0.0), e / bound)
                if e > bound:
                    failures.append(f"{name} {k}: {e:.2e} > {bound:.0e}")
        out[prec] = dict(cases=len(tc.CASES), failures=failures, emulated_dots=calls,
                         worst={k: float(f"{v:.3e}") for k, v in worst.items()},
                         worst_over_bound=float(f"{max(ratio.values()):.3g}"), seconds=round(time.perf_counter() - t0, 1))
        log(f"conformance {prec:<7} {len(failures)} (case, quantity) failures in {len(tc.CASES)} cases, worst/bound "
            f"{out[prec]['worst_over_bound']}: " + "; ".join(failures[:4]))
    return out


def allowed_precisions(target: str) -> tuple[str, ...]:
    """The float32 ``input_precision`` values Triton's backend for ``target`` accepts ("sm_90", "gfx942")."""
    arch = K.parse_arch(target)
    if K.HW[arch].amd:
        from triton.backends.amd.compiler import HIPBackend as Backend
    else:
        from triton.backends.nvidia.compiler import CUDABackend as Backend
    options = Backend(K.target(arch)).parse_options({"enable_fp_fusion": True})
    return tuple(p for p in options.allowed_dot_input_precisions if p in K.PRODUCTS)


def choose(rows: list[dict], suite: dict | None = None, targets=K.FAMILIES["amd"]) -> dict:
    """Per target: every accepted precision with its worst realistic error, conformance failures and peak
    rate, and the fastest that qualifies (worst error <= TOLERANCE / MARGIN, no conformance failure)."""
    worst, suite = {}, suite or {}
    for r in rows:
        worst[r["precision"]] = max(worst.get(r["precision"], 0.0), r["worst"])
    out = {}
    for target in targets:
        options = {}
        for p in allowed_precisions(target):
            peak = K.fp32_dot_flops(K.parse_arch(target), p)
            options[p] = dict(worst_error=worst.get(p), peak_tflops=None if peak is None else round(peak / 1e12, 1),
                              conformance_failures=len(suite[p]["failures"]) if p in suite else None,
                              qualifies=worst.get(p) is not None and worst[p] <= TOLERANCE / MARGIN
                              and (not suite or (p in suite and not suite[p]["failures"])))
        ok = [p for p, o in options.items() if o["qualifies"] and o["peak_tflops"] is not None]
        out[target] = dict(options=options, chosen=max(ok, key=lambda p: (options[p]["peak_tflops"],
                                                                          -options[p]["worst_error"]), default=None))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "precision_study.json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":      # the kernels must be interpreter objects
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.precision_study", *(argv or sys.argv[1:])])
    t0 = time.perf_counter()
    result = study(tuple(args.cases), precisions=tuple(args.precisions), seed=args.seed)
    result["conformance"] = conformance(tuple(args.precisions))
    result["choice"] = choose(result["rows"], result["conformance"])
    amd = K.launch.FP32_PRECISION_AMD
    result.update(meta=harness.machine_info(None), tolerance=TOLERANCE, margin=MARGIN,
                  wall_s=round(time.perf_counter() - t0, 1), implemented=dict(amd, nvidia=K.launch.FP32_PRECISION_NVIDIA))
    for target, c in result["choice"].items():
        print(f"{target}: chosen {c['chosen']} (implemented {amd.get(target)}); " + ", ".join(
            f"{p}: {o['worst_error']:.1e}, {o['conformance_failures']} conformance failures, {o['peak_tflops']} TF/s"
            for p, o in c["options"].items() if o["worst_error"] is not None))
    print(f"written {harness.write_json(args.out, result)}")
    return int(any(c["chosen"] != amd.get(t) for t, c in result["choice"].items()))


if __name__ == "__main__":
    sys.exit(main())
