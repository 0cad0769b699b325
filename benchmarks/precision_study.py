"""Float32 dot precision per GPU target: what each Triton ``input_precision`` does to the DRRho loss.

Triton's interpreter ignores ``input_precision`` (its ``tl.dot`` is a float32 NumPy matmul), so the
precisions cannot be told apart by running the kernels as they are. Here the real kernels run in the
interpreter with its dot replaced by an emulation of each precision, built the way Triton lowers it
(the F32DotTC pass, shared by the NVIDIA and AMD backends), on float32 inputs:

    ieee     one float32 product (AMD: v_mfma_f32_*_f32; NVIDIA: CUDA-core FMAs)
    tf32     operands rounded to TF32 (10-bit mantissa), one product (AMD: CDNA3 only, *_xf32)
    tf32x3   a = big + small, big = TF32(a) (round to nearest, ties away), small = a - big read as
             TF32: small*big + big*small, then + big*big, then + acc (NVIDIA only)
    bf16x3   a = hi + mid, hi = bf16(a), mid = bf16(a - hi) (round to nearest even):
             mid*hi + hi*mid, then + hi*hi, then + acc
    bf16x6   a = hi + mid + lo: mid*mid + lo*hi + hi*lo + mid*hi + hi*mid, then + hi*hi, then + acc

Products of TF32 or bfloat16 parts are exact in float32 and every partial dot accumulates in float32,
as the tensor cores / matrix cores do (up to the order of the float32 additions). Every dot of the
kernels is emulated: the score tiles S = x T^T - xr Tr^T of the forward and the backward and the
backward's weighted products P T, at the kernels' K chunks (the interpreter runs with tiles of the
AMD tables' shape, BK = 32, instead of its usual 16 x 16).

Inputs: normalized embeddings with a shared component (negatives' cosine about 0.1, positives'
about 0.5, like CLIP's), a reference model of its own, d = dr = 512, s = 14.3 (CLIP's initial 1/0.07)
and 100 (its clamp); one process (B = N), the distributed shape (B rows against N gathered columns,
column gradients too), and one process with the distillation term (weight 1, teacher scale 100:
the reference tiles enter the loss on their own); the stored state from a previous step (gamma = 0.8). Truth: the
dense float64 reference on the same float32 inputs. Errors as the conformance tests measure them
(docs/SPEC.md, Appendix A): norm-wise relative on the loss, the new u and every gradient; dL/ds
against ``|dL/ds| + 1e-3 (|A| + rho + |U|) / s^2``.

Realistic inputs alone flatter the cheap splits (the score error of bf16x3 shrinks like 1 / sqrt(d)),
so ``conformance`` also runs the float32 cases of tests/test_conformance.py (d = 4..40 at s = 100,
eps-dominated pairs, special stored u) at each precision against the suite's own tolerance table.

The choice per target (``choose``): among the precisions the target's Triton backend accepts, those
whose worst error over every realistic case and quantity is at most ``TOLERANCE / MARGIN`` (SPEC's
1e-4 for float32, with a margin of ``MARGIN``) and that fail no conformance case; of those, the one
with the highest peak rate of float32-input products on the target (``PEAK_TFLOPS``: the vendor's
dense matrix figures divided by the number of products). NVIDIA keeps tf32x3
(``launch.FP32_PRECISION_NVIDIA``). The result must equal ``launch.FP32_PRECISION_AMD``;
tests/test_triton_aot.py checks the committed figures and that table.

    python -m benchmarks.precision_study            # writes benchmarks/results/precision_study.json

Runs on the CPU (sets TRITON_INTERPRET=1 itself); about 30 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3", "bf16x6")
TOLERANCE = 1e-4          # SPEC.md "Numerics": float32 inputs, loss and gradients against float64
MARGIN = 4.0              # a precision qualifies when its worst error is at most TOLERANCE / MARGIN
# Dense peak TFLOP/s of the matrix units per input format (vendor data sheets: MI250X, MI300X, MI355X;
# H100 SXM for reference) and the number of products each float32 precision costs.
PEAK_TFLOPS = {
    "gfx90a": {"fp32": 95.7, "tf32": None, "bf16": 383.0},
    "gfx942": {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4},
    "gfx950": {"fp32": 157.3, "tf32": None, "bf16": 2516.6},
    "sm_90": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
}
PRODUCTS = {"ieee": ("fp32", 1), "tf32": ("tf32", 1), "tf32x3": ("tf32", 3), "bf16x3": ("bf16", 3),
            "bf16x6": ("bf16", 6)}


# ----------------------------------------------------------------------------------------------
# The emulated dot

def _keep_bits(a: np.ndarray, drop: int, mode: str) -> np.ndarray:
    """``a`` (float32, finite) with its ``drop`` low mantissa bits cleared: rounded to nearest even
    ("rne"), to nearest with ties away from zero ("rna") or truncated ("rz")."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if mode == "rne":
        u = u + np.uint32((1 << (drop - 1)) - 1) + ((u >> np.uint32(drop)) & np.uint32(1))
    elif mode == "rna":
        u = u + np.uint32(1 << (drop - 1))
    mask = np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    return (u & mask).view(np.float32)


def bf16(a):
    return _keep_bits(a, 16, "rne")


def tf32(a, mode="rne"):
    return _keep_bits(a, 13, mode)


def _split(a: np.ndarray, n: int) -> list[np.ndarray]:
    """Triton's splitF32 into ``n`` bfloat16 parts: hi = bf16(a), mid = bf16(a - hi), lo = bf16(a - hi - mid)."""
    parts, rest = [], a
    for _ in range(n):
        p = bf16(rest)
        parts.append(p)
        rest = (rest - p).astype(np.float32)
    return parts


def _mm(a, b, c=None):
    """One tensor-core dot: exact products, float32 accumulation."""
    out = np.matmul(a, b, dtype=np.float32)
    return out if c is None else (out + c).astype(np.float32)


def emulated_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str) -> np.ndarray:
    """``acc + a @ b`` for float32 ``a`` [M, K], ``b`` [K, N] as Triton computes it at ``precision``."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if precision == "ieee":
        return _mm(a, b, acc)
    if precision == "tf32":
        return _mm(tf32(a), tf32(b), acc)
    if precision == "tf32x3":
        a_big, b_big = tf32(a, "rna"), tf32(b, "rna")
        a_small, b_small = tf32(a - a_big, "rz"), tf32(b - b_big, "rz")   # the MMA reads TF32 bits only
        small = _mm(a_big, b_small, _mm(a_small, b_big))
    elif precision == "bf16x3":
        (ah, am), (bh, bm) = _split(a, 2), _split(b, 2)
        small = _mm(ah, bm, _mm(am, bh))
        a_big, b_big = ah, bh
    elif precision == "bf16x6":
        (ah, am, al), (bh, bm, bl) = _split(a, 3), _split(b, 3)
        small = _mm(am, bm)
        for x, y in ((al, bh), (ah, bl), (am, bh), (ah, bm)):
            small = _mm(x, y, small)
        a_big, b_big = ah, bh
    else:
        raise ValueError(f"unknown precision {precision!r}")
    small = np.where(np.isnan(small), np.float32(0), small)
    return (_mm(a_big, b_big, small) + acc).astype(np.float32)


class _Emulation:
    """While active, the interpreter's float32 dots run ``emulated_dot`` at ``precision``."""

    precision: str | None = None
    calls = 0

    def __init__(self, precision: str):
        self.new = precision

    def __enter__(self):
        _install()
        self.old, _Emulation.precision, _Emulation.calls = _Emulation.precision, self.new, 0
        return self

    def __exit__(self, *exc):
        self.calls = _Emulation.calls
        _Emulation.precision = self.old


_INSTALLED = False


def _install():
    """Wrap the interpreter's ``create_dot`` (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from triton.runtime import interpreter
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if (_Emulation.precision is None or a.data.dtype != np.float32 or b.data.dtype != np.float32):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        _Emulation.calls += 1
        out = emulated_dot(a.data, b.data, d.data, _Emulation.precision)
        return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _INSTALLED = True


# ----------------------------------------------------------------------------------------------
# Cases and errors

def make_inputs(B: int, N: int | None, d: int = 512, dr: int = 512, scale: float = 100.0, seed: int = 0):
    """CLIP-like float32 inputs as float64 tensors (exactly float32 values) and the loss options.

    Embeddings: unit vectors g + 0.35 mu (mu a shared direction: negatives' cosine ~0.1), text =
    image + noise (positives' cosine ~0.5); the reference model's embeddings likewise, with their own
    shared direction and pairs half as close. N given: B rows of N columns at offset (N - B) // 2."""
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

    X, T = pairs(d, 0.55)
    Xr, Tr = pairs(dr, 0.3)
    off = 0 if N is None else (N - B) // 2
    rows = slice(off, off + B)
    kw = dict(img=X[rows], txt=T[rows], ref_img=Xr[rows], ref_txt=Tr[rows], offset=off, gamma=0.8,
              eps=1e-14, rho=8.0)
    if N is not None:
        kw.update(img_all=X, txt_all=T, ref_img_all=Xr, ref_txt_all=Tr)
    return kw, scale


def evaluate(kw: dict, scale: float, dtype, backend: str, u=None) -> dict:
    """Loss, new u, d_s and every embedding gradient (float64 NumPy) of one evaluation."""
    import torch
    import drrho_kernels as dk
    args = {k: (v.detach().to(dtype).clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    B = args["img"].shape[0]
    leaves = [k for k in ("img", "txt", "img_all", "txt_all") if k in args]
    for k in leaves:
        args[k].requires_grad_(True)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    if u is None:
        u = (torch.zeros(B), torch.zeros(B))
    s = torch.tensor(float(scale), dtype=state, requires_grad=True)
    loss, u_img, u_txt = dk.drrho_clip_loss(logit_scale=s, u_img=u[0].to(state).clone(),
                                            u_txt=u[1].to(state).clone(), backend=backend, **args)
    loss.backward()
    out = dict(loss=loss.item(), u=torch.cat([u_img, u_txt]).detach().double().numpy(), d_s=s.grad.item())
    for k in leaves:
        out["d_" + k] = args[k].grad.detach().double().numpy()
    return out


def _rel(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def errors(got: dict, want: dict, scale: float, rho: float, B: int) -> dict:
    """Norm-wise relative errors; dL/ds as in docs/SPEC.md, Appendix A."""
    out = {k: _rel(got[k], want[k]) for k in want if k != "d_s"}
    u_mean = float(np.sum(want["u"])) / (2 * B)
    weighted = scale * want["loss"] - rho - u_mean
    floor = 1e-3 * (abs(weighted) + rho + abs(u_mean)) / scale ** 2
    out["d_s"] = abs(got["d_s"] - want["d_s"]) / (abs(want["d_s"]) + floor)
    return out


CASES = {   # name: (B, N or None: one process, d = dr, distillation weight)
    "single-B256": (256, None, 512, 0.0),
    "dist-B128-N512": (128, 512, 512, 0.0),
    "single-B128-distill": (128, None, 512, 1.0),     # + the distillation term, teacher at t_d = 100
}
SCALES = (1 / 0.07, 100.0)
STUDY_TILES = dict(fwd=dict(BM=64, BN=64, BK=32, BKR=32), fwdt=dict(BM=64, BN=64, BK=32, BKR=32),
                   bwd=dict(BM=64, BN=64, BK=32, BKR=32, BD=128))


@contextlib.contextmanager
def _study_tiles():
    """Interpreter tiles of the AMD tables' shape (K chunks of 32) instead of the interpreter's 16 x 16,
    restored afterwards."""
    from dataclasses import replace

    from drrho_kernels.backends.triton import tiles
    saved = dict(tiles.INTERPRETER_TILES)
    try:
        for kernel, meta in STUDY_TILES.items():
            tiles.INTERPRETER_TILES[kernel] = replace(tiles.INTERPRETER_TILES[kernel], **meta)
        yield
    finally:
        tiles.INTERPRETER_TILES.update(saved)


def study(cases=tuple(CASES), scales=SCALES, precisions=PRECISIONS, seed=0, log=print) -> dict:
    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from drrho_kernels.backends.triton import launch
    if not launch.interpreting():
        raise RuntimeError("the precision study runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing triton (python -m benchmarks.precision_study does)")
    with _study_tiles():
        return dict(rows=[row for name in cases for row in _study_case(name, scales, precisions, seed, log)])


def _study_case(name, scales, precisions, seed, log):
    """The rows of one case: each scale, each precision, against the float64 reference."""
    import torch
    B, N, d, distill = CASES[name]
    rows = []
    for scale in scales:
        kw, s = make_inputs(B, N, d=d, dr=d, scale=scale, seed=seed)
        if distill:
            kw.update(distill_weight=distill, distill_scale=100.0)
        # the stored state: the true new u of a previous step on these inputs, unset before it
        prev = evaluate(kw, s, torch.float64, "reference")
        u = tuple(torch.from_numpy(prev["u"][i * B:(i + 1) * B]).float() for i in range(2))
        truth = evaluate(kw, s, torch.float64, "reference", u)
        for prec in precisions:
            t0 = time.perf_counter()
            with _Emulation(prec) as emu:
                got = evaluate(kw, s, torch.float32, "triton", u)
            if emu.calls == 0:
                raise RuntimeError("no dot went through the emulation")
            err = errors(got, truth, s, kw["rho"], B)
            grads = [v for k, v in err.items() if k.startswith("d_") and k != "d_s"]
            row = dict(case=name, B=B, N=N or B, d=d, dr=d, scale=round(s, 4), distill_weight=distill, precision=prec,
                       emulated_dots=emu.calls, errors={k: float(f"{v:.3e}") for k, v in err.items()},
                       worst=float(f"{max(err.values()):.3e}"), worst_grad=float(f"{max(grads):.3e}"),
                       seconds=round(time.perf_counter() - t0, 1))
            rows.append(row)
            log(f"{name:<16} s={s:<7.3f} {prec:<7} worst {row['worst']:.2e}  "
                + " ".join(f"{k}={v:.1e}" for k, v in err.items()) + f"  ({row['seconds']} s)")
    return rows


def conformance(precisions=PRECISIONS, log=print) -> dict:
    """The float32 cases of tests/test_conformance.py (tiny and adversarial: s = 100 at d = 4..40,
    eps-dominated separated pairs, stored u with NaN / inf / 0, distributed offsets) through the
    kernels at each emulated precision (the interpreter's 16 x 16 tiles, as in the tests), judged by
    the suite's own table (float32: loss and u 1e-5, gradients and dL/ds 1e-4). Per precision: the
    failures and, per quantity, the worst error and the worst error / bound."""
    import torch
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import test_conformance as tc
    tol = tc.TOLERANCES[torch.float32]
    out = {}
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
                worst[key] = max(worst.get(key, 0.0), e)
                ratio[key] = max(ratio.get(key, 0.0), e / bound)
                if e > bound:
                    failures.append(f"{name} {k}: {e:.2e} > {bound:.0e}")
        out[prec] = dict(cases=len(tc.CASES), failures=failures, emulated_dots=calls,
                         worst={k: float(f"{v:.3e}") for k, v in worst.items()},
                         worst_over_bound=float(f"{max(ratio.values()):.3g}"),
                         seconds=round(time.perf_counter() - t0, 1))
        log(f"conformance {prec:<7} {len(failures)} (case, quantity) failures in {len(tc.CASES)} cases, worst/bound "
            f"{out[prec]['worst_over_bound']}: " + "; ".join(failures[:4]))
    return out


def allowed_precisions(target: str) -> tuple[str, ...]:
    """The float32 ``input_precision`` values Triton's backend for ``target`` accepts ("sm_90", "gfx942")."""
    from triton.backends.compiler import GPUTarget
    if target.startswith("gfx"):
        from triton.backends.amd.compiler import HIPBackend
        options = HIPBackend(GPUTarget("hip", target, 64)).parse_options({"enable_fp_fusion": True})
    else:
        from triton.backends.nvidia.compiler import CUDABackend
        options = CUDABackend(GPUTarget("cuda", int(target[3:]), 32)).parse_options({"enable_fp_fusion": True})
    return tuple(p for p in options.allowed_dot_input_precisions if p in PRODUCTS)


def throughput(target: str, precision: str) -> float | None:
    kind, n = PRODUCTS[precision]
    peak = PEAK_TFLOPS[target][kind]
    return None if peak is None else round(peak / n, 1)


def choose(rows: list[dict], suite: dict | None = None, targets=("gfx90a", "gfx942", "gfx950")) -> dict:
    """Per target: every accepted precision with its worst error on the realistic cases, its
    conformance failures and peak rate, and the choice: the fastest precision that qualifies (worst
    realistic error <= TOLERANCE / MARGIN and, when ``suite`` is given, no conformance failure)."""
    worst = {}
    for r in rows:
        worst[r["precision"]] = max(worst.get(r["precision"], 0.0), r["worst"])
    suite = suite or {}

    def qualifies(p):
        return (worst.get(p) is not None and worst[p] <= TOLERANCE / MARGIN
                and (not suite or (p in suite and not suite[p]["failures"])))

    out = {}
    for target in targets:
        options = {p: dict(worst_error=worst.get(p), peak_tflops=throughput(target, p),
                           conformance_failures=len(suite[p]["failures"]) if p in suite else None,
                           qualifies=qualifies(p))
                   for p in allowed_precisions(target)}
        ok = [p for p, o in options.items() if o["qualifies"] and o["peak_tflops"] is not None]
        chosen = max(ok, key=lambda p: (options[p]["peak_tflops"], -options[p]["worst_error"])) if ok else None
        out[target] = dict(options=options, chosen=chosen)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "precision_study.json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":      # the kernels must be interpreter objects
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.precision_study", *(argv or sys.argv[1:])])
    import triton
    import torch
    t0 = time.perf_counter()
    result = study(tuple(args.cases), precisions=tuple(args.precisions), seed=args.seed)
    result["conformance"] = conformance(tuple(args.precisions))
    result["choice"] = choose(result["rows"], result["conformance"])
    from drrho_kernels.backends.triton import launch
    result.update(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                  tolerance=TOLERANCE, margin=MARGIN, wall_s=round(time.perf_counter() - t0, 1),
                  implemented=dict(launch.FP32_PRECISION_AMD, nvidia=launch.FP32_PRECISION_NVIDIA))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for target, c in result["choice"].items():
        opts = ", ".join(f"{p}: {o['worst_error']:.1e}, {o['conformance_failures']} conformance failures, "
                         f"{o['peak_tflops']} TF/s" for p, o in c["options"].items() if o["worst_error"] is not None)
        print(f"{target}: chosen {c['chosen']} (implemented {launch.FP32_PRECISION_AMD.get(target)}); {opts}")
    print(f"written {args.out}")
    mismatch = [t for t, c in result["choice"].items() if c["chosen"] != launch.FP32_PRECISION_AMD.get(t)]
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
