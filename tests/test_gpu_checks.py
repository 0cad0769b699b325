"""The GPU tests' checks can fail (tests/gpu_checks.py), proven here without a GPU.

- On planted float64 data: a gradient whose partner term is 96% of its norm and whose weighted product is
  half wrong passes a 2e-2 norm-wise comparison of the whole gradient (what the GPU tests used to do)
  and fails the comparison of the weighted products.
- On the real kernels, in Triton's interpreter: the same checks the GPU tests run, at small shapes,
  pass; with the backward's weighted product halved (planted around the launch), they fail, at the GPU
  tests' tolerances, for every dtype.
- The GPU command's compiles are counted from its plan (tests/gpu_plan.py) and held to its budget.
"""
from __future__ import annotations

import pytest
import torch

import drrho_kernels as dk
import gpu_checks as gc

pytestmark = pytest.mark.skipif("triton" not in dk.available_backends("cpu"),
                                reason="Triton's interpreter is not on (TRITON_INTERPRET=1)")


def test_planted_float64_data_fails_the_weighted_product_check_and_not_the_old_one():
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=1)
    weighted = 0.04 * torch.nn.functional.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=1)
    partner = 1.0 + torch.rand(64, 1, generator=g, dtype=torch.float64)
    want = weighted - partner * t                     # d_img: the partner term is ~96% of its norm
    got = 0.5 * weighted - partner * t                # a weighted product half wrong
    assert gc.errors(got, want)[0] < 2e-2             # the whole gradient's norm-wise error hides it
    with pytest.raises(AssertionError, match="weighted product"):
        gc.assert_close(got + partner * t, want + partner * t, torch.bfloat16, "weighted product img")
    gc.assert_close(want + partner * t, want + partner * t, torch.float32, "weighted product img")
    # one bad row out of 64: the norm-wise error is diluted, the worst row's is not
    bad = weighted.clone()
    bad[7] *= 3.0
    assert gc.errors(bad, weighted)[0] < 0.4 and gc.errors(bad, weighted)[1] >= 1.0


@pytest.fixture
def half_wrong_weighted_product(monkeypatch):
    """The row backward's weighted product halved: ``d_img = W / 2 - partner t`` instead of ``W - partner t``."""
    from drrho_kernels.backends.triton import backward
    real = backward._launch_split

    def planted(tensors, scalars, like_img, like_txt, n_out, n_in, flags):
        d_img, d_txt = real(tensors, scalars, like_img, like_txt, n_out, n_in, flags)
        if not flags["IS_ROW"]:
            return d_img, d_txt
        x, t, gain, wsum = tensors[0], tensors[1], tensors[10], tensors[11]
        partner = (gain * wsum).sum(0)[:, None]
        halve = lambda d, v: (0.5 * (d.float() + partner * v.float()) - partner * v.float()).to(d.dtype)  # noqa: E731
        return halve(d_img, t), halve(d_txt, x)

    monkeypatch.setattr(backward, "_launch_split", planted)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]
SMALL = dict(B=24, N=70, d=40, dr=24)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_checks_pass_on_the_kernels(dtype):
    one = gc.training_inputs(SMALL["B"], None, SMALL["d"], SMALL["dr"])
    shard = gc.training_inputs(**SMALL)
    gc.check_weighted_products(one, dtype)
    gc.check_weighted_products(shard, dtype, fold=True)
    gc.check_step(one, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_a_half_wrong_weighted_product_fails_the_checks(dtype, half_wrong_weighted_product):
    one = gc.training_inputs(SMALL["B"], None, SMALL["d"], SMALL["dr"])
    with pytest.raises(AssertionError, match="weighted product img"):
        gc.check_weighted_products(one, dtype)
    with pytest.raises(AssertionError, match="weighted product"):
        gc.check_weighted_products(gc.training_inputs(**SMALL), dtype, fold=True)
    with pytest.raises(AssertionError, match="gradient"):
        gc.check_step(one, dtype)
