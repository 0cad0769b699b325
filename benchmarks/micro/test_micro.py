"""pytest-benchmark microbenchmarks of every available backend and the baselines.

    pytest benchmarks/micro --benchmark-only                          # CPU (or CUDA when present)
    DRRHO_BENCH_DEVICE=cuda pytest benchmarks/micro --benchmark-only --benchmark-json=micro.json
    pytest benchmarks/micro --benchmark-only -k "medium and forward_backward"

Shapes: small and medium single-process batches (``N == B``) with a reference model, forward and
forward + backward, float32 on the CPU and bfloat16 on CUDA; one pytest-benchmark group per
(shape, mode), so each table compares the implementations at equal work. Fused backends are
discovered at run time (``drrho_kernels.available_backends``) and smoke-tested; a missing or
broken one is skipped with the reason. The Triton interpreter (CPU) is never timed here.
"""
import importlib.util
import os
import warnings

import pytest
import torch

from benchmarks.steps import make_step

DEVICE = os.environ.get("DRRHO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
# name: (B = N, d = dr, rounds)
SHAPES = {"cpu": {"small": (256, 128, 30), "medium": (2048, 512, 5)},
          "cuda": {"small": (4096, 512, 50), "medium": (16384, 512, 20)}}[DEVICE]
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
MODES = ("forward", "forward_backward")
FUSED = ("triton", "cpp", "torch")
BASELINES = ("unfused", "clip_ce", "gemm_floor", "inf_cl")


def _skip_reason(impl):
    if impl in FUSED:
        import drrho_kernels as dk
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if impl not in dk.available_backends(DEVICE):
                return f"backend {impl!r} not available on {DEVICE}"
        if impl == "triton" and DEVICE == "cpu":
            return "the Triton interpreter is not benchmarked"
    if impl == "inf_cl" and (DEVICE != "cuda" or importlib.util.find_spec("inf_cl") is None):
        return "inf_cl: CUDA and an importable inf_cl package needed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step, _ = make_step(impl, 16, 16, 16, 16, "float32", True, DEVICE, "forward_backward")
            step()
    except Exception as exc:                             # a half-written backend
        return f"{impl} failed a smoke run: {type(exc).__name__}: {exc}"
    return None


_REASONS = {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", FUSED + BASELINES)
def test_step(benchmark, impl, shape, mode):
    if impl not in _REASONS:
        _REASONS[impl] = _skip_reason(impl)
    if _REASONS[impl]:
        pytest.skip(_REASONS[impl])
    B, d, rounds = SHAPES[shape]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step, _ = make_step(impl, B, B, d, d, DTYPE, True, DEVICE, mode)
    if DEVICE == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.group = f"{shape} B=N={B} d=dr={d} {DTYPE} {mode}"
    benchmark.extra_info.update(B=B, N=B, d=d, dr=d, dtype=DTYPE, ref=True, mode=mode, device=DEVICE,
                                threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
