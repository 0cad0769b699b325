"""Microbenchmarks (pytest-benchmark) at small shapes, a group per shape, dtype and mode: --benchmark-compare."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import steps, sweep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ((256, 128), (1024, 256))                # B = N (one process), d = dr, with a reference model
IMPLS = ("cpp", "torch", "triton", "unfused", "gemm_floor")
UNAVAILABLE = {i: "triton is benchmarked on CUDA only (the interpreter says nothing about speed)" if i == "triton"
               and DEVICE != "cuda" else sweep.probe(i, DEVICE) for i in IMPLS}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ("forward", "forward_backward"))
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("B, d", SHAPES, ids=[f"B{b}-d{d}" for b, d in SHAPES])
def test_loss(benchmark, B, d, dtype, mode, impl):
    if UNAVAILABLE[impl]:
        pytest.skip(UNAVAILABLE[impl])
    step, _ = steps.make_step(impl, B, B, d, d, dtype, True, DEVICE, mode)
    benchmark.group = f"B=N={B} d={d} {dtype} {mode}"
    benchmark.extra_info.update(B=B, d=d, dtype=dtype, mode=mode, impl=impl, device=DEVICE,
                                threads=torch.get_num_threads())
    benchmark(lambda: (step(), DEVICE == "cuda" and torch.cuda.synchronize()))
