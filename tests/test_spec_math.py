"""Independent truth below the conformance suite: a hand-computed 2x2 case, closed forms of the
moving-average rule, the log-sum-exp epilogue and the gamma schedule, and the torch backend's chunking
(chunks of every size against the float64 oracle). (Every backend and dtype against the float64 oracle:
tests/test_conformance.py.)"""
import math

import numpy as np
import pytest
import torch

import drrho_kernels as dk
from drrho_kernels.core import epilogue as _math
from drrho_kernels.loss.schedule import gamma_at_epoch
from drrho_kernels.backends import torch_chunked
from helpers import run_backend
from spec_oracle import make_case, oracle

CASES = {
    "single-ref": dict(),
    "dist-ref": dict(B=4, N=11, d=5, dr=7),
    "dist-noref-last": dict(B=5, N=9, ref=False, offset=4),
}


@pytest.mark.parametrize("backend", ["reference", "torch"] + (["cpp"] if "cpp" in dk.available_backends() else []))
def test_hand_computed_2x2(backend):
    # x1=(1,0) x2=(0,1) t1=(1,0) t2=(.6,.8), s=2, no reference, u unset, rho=.5:
    # d^I_12=-.8 d^I_21=-1.6 d^T_12=-2 d^T_21=-.4; u = d - log 2; every weight = 2.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    u0 = torch.zeros(2, dtype=torch.float64)
    loss, u_img, u_txt = dk.drrho_clip_loss(img, txt, s, u0, u0, rho=0.5, gamma=0.3, backend=backend)
    g_img, g_txt, g_s = torch.autograd.grad(loss, [img, txt, s])
    tol = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(loss.item(), -3.0965735902799727, **tol)
    torch.testing.assert_close(u_img, torch.tensor([-1.4931471805599454, -2.2931471805599454], dtype=torch.float64), **tol)
    torch.testing.assert_close(u_txt, torch.tensor([-2.6931471805599454, -1.0931471805599454], dtype=torch.float64), **tol)
    torch.testing.assert_close(g_img, torch.tensor([[-0.8, 1.6], [0.8, -1.6]], dtype=torch.float64), **tol)
    torch.testing.assert_close(g_txt, torch.tensor([[-2.0, 2.0], [2.0, -2.0]], dtype=torch.float64), **tol)
    torch.testing.assert_close(g_s.item(), -0.8517132048600137, **tol)


def test_moving_average_rule():
    l = torch.tensor([0.5, -1.0, 2.0, 3.0, -4.0, 1.5], dtype=torch.float64)
    u_old = torch.tensor([1.0, 0.0, math.inf, -math.inf, math.nan, -2.0], dtype=torch.float64)
    # gamma = 1: u = l whatever u was.
    torch.testing.assert_close(_math.ma_update(u_old, l, 1.0), l, rtol=0, atol=0)
    # gamma = .25: unset entries (0, +-inf, NaN) take l; set ones blend in the exp domain.
    got = _math.ma_update(u_old, l, 0.25)
    want = [math.log(0.75 * math.e ** 1.0 + 0.25 * math.e ** 0.5), -1.0, 2.0, 3.0, -4.0,
            math.log(0.75 * math.exp(-2.0) + 0.25 * math.exp(1.5))]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    # Stable far outside exp's range: log(.5 e^800 + .5 e^-800) = 800 + log .5.
    big = _math.ma_update(torch.tensor([800.0]), torch.tensor([-800.0]), 0.5)
    torch.testing.assert_close(big, torch.tensor([800.0 + math.log(0.5)]), rtol=0, atol=1e-4)
    # set: every finite nonzero value, a subnormal and the extremes included; unset: +-0, +-inf, NaN
    for dtype, tiny, huge in ((torch.float64, 5e-324, 1.7e308), (torch.float32, 1e-45, 3.4e38)):
        u = torch.tensor([-0.0, tiny, -tiny, huge, -huge, 2.0, math.inf, math.nan], dtype=dtype)
        assert _math.is_unset(u).tolist() == [True, False, False, False, False, False, True, True]


def test_log_eps_plus_mean_exp_is_stable():
    # (1/N) sum exp(d) with max 300 and sumexp 3: l = 300 + log(3/4); eps only matters at the bottom.
    top, sumexp = torch.tensor([300.0, -400.0]), torch.tensor([3.0, 1.0])
    got = _math.log_eps_plus_mean_exp(top, sumexp, 4, 1e-14)
    torch.testing.assert_close(got, torch.tensor([300.0 + math.log(0.75), math.log(1e-14)]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("epoch,cosine", [(0, 1.0), (1, 0.9951056516295154), (5, 0.9), (10, 0.8), (20, 0.8)])
def test_gamma_schedule_values(epoch, cosine):
    # gamma = .8 decayed over 10 epochs: .5 (1 + cos(pi e / 10)) (1 - .8) + .8 for 0 < e < 10.
    assert gamma_at_epoch(epoch, 0.8, "cosine", 10) == pytest.approx(cosine, abs=1e-15)
    assert gamma_at_epoch(epoch, 0.8, "constant", 10) == 0.8


@pytest.mark.parametrize("name", ["single-ref", "dist-ref", "dist-noref-last"])
def test_chunked_matches_the_oracle(monkeypatch, name):
    """Chunks of one row and of several rows (with a ragged last chunk) give the oracle's answer."""
    case = make_case(**CASES[name], seed=7)
    want = oracle(case)
    keys = {"loss", "u_img", "u_txt", "d_img", "d_txt", "d_s"} | ({"d_img_all", "d_txt_all"} if case.img_all is not None
                                                                  else set())
    for elements in (1, 3 * (case.img_all.shape[0] if case.img_all is not None else case.img.shape[0])):
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", elements)
        chunked = run_backend(case, "torch")
        assert keys <= set(chunked)
        for key in keys:
            np.testing.assert_allclose(chunked[key], want[key], rtol=1e-11, atol=1e-13, err_msg=key)
