"""DRRho risk for any per-sample loss (drrho_kernels.risk): exact forms against independent primal solvers,
closed forms and limits; the stochastic forms against the exact ones; state, numerics and bad input.

The independent solvers work on the primal problems ``max_p sum_i p_i h_i`` over the form's set of weights
(scipy's linprog for CVaR, SLSQP for the divergence balls) or on the duals minimised by scipy, never on
the package's formulas.
"""
from __future__ import annotations

import copy
import doctest
import math

import numpy as np
import pytest
import torch

import drrho_kernels as dk
from drrho_kernels import risk as risk_module

pytest.importorskip("scipy.optimize")
special = pytest.importorskip("scipy.special")

# The truth: SPEC 2.4's independent solvers in the part-2 oracle (tests/family_oracle.py)
from family_oracle import (chi2_dual, chi2_dual_minimizer, chi2_to_uniform, kl_dual, kl_dual_minimizer,  # noqa: E402
                           kl_regularized, kl_to_uniform, primal_ball, primal_cvar, risk_optimum_scalar)
from spec_oracle import update_u  # noqa: E402  (part 1's moving average, for the risk's u)


# ------------------------------------------------------------------------------------------------
# Helpers

def sample_h(n, seed=0, scale=1.0):
    return np.random.default_rng(seed).normal(size=n) * scale


def exact(h, form, dtype=torch.float64, **kw):
    """``drrho_risk`` of ``loss = h + ref``: returns (value, weights = d F / d loss).

    ``ref`` holds small multiples of 1/4, so that ``(h + ref) - ref`` keeps the ties of dyadic ``h``.
    """
    ref = torch.tensor(np.random.default_rng(99).integers(-8, 8, size=len(h)) / 4.0, dtype=dtype)
    loss = (torch.tensor(h, dtype=dtype) + ref).detach().requires_grad_()
    value = dk.drrho_risk(loss, ref, form, **kw)
    value.backward()
    return value.item(), loss.grad.double().numpy()


# ------------------------------------------------------------------------------------------------
# Exact forms

@pytest.mark.parametrize("n,alpha", [(10, 0.2), (10, 0.25), (7, 0.3), (9, 0.5), (8, 1.0), (5, 0.1), (6, 0.7)])
def test_cvar_matches_linear_program(n, alpha):
    h = sample_h(n, seed=n)
    value, weights = exact(h, "cvar", alpha=alpha)
    want_value, want_weights = primal_cvar(h, alpha)
    assert value == pytest.approx(want_value, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(weights, want_weights, atol=1e-12)          # unique: distinct h
    k = alpha * n
    top = np.sort(h)[::-1]
    want_topk = (top[:int(k)].sum() + (k - int(k)) * (top[int(k)] if k < n else 0.0)) / k
    assert value == pytest.approx(want_topk, rel=1e-12)


def test_cvar_fractional_boundary_sample_enters_partly():
    h = np.array([4.0, 3.0, 2.0, 1.0, 0.0])
    value, weights = exact(h, "cvar", alpha=0.5)                              # k = 2.5
    assert value == pytest.approx((4 + 3 + 0.5 * 2) / 2.5, rel=1e-14)
    np.testing.assert_allclose(weights, [0.4, 0.4, 0.2, 0.0, 0.0], atol=1e-15)


def test_cvar_integer_k_up_to_rounding_is_an_integer():
    h = sample_h(90, seed=2)
    assert 0.7 * 90 != 63                                              # 62.99999999999999
    value, weights = exact(h, "cvar", alpha=0.7)
    order = np.argsort(-h)
    assert (weights[order[:63]] == 1 / 63).all() and (weights[order[63:]] == 0).all()
    assert value == pytest.approx(np.sort(h)[::-1][:63].mean(), rel=1e-14)


def test_cvar_ties_at_the_boundary_share_its_weight():
    h = np.array([3.0, 1.0, 1.0, 0.0, 1.0])
    value, weights = exact(h, "cvar", alpha=0.4)                              # k = 2: one of three tied 1s
    assert value == pytest.approx(2.0, rel=1e-14)
    assert value == pytest.approx(primal_cvar(h, 0.4)[0], rel=1e-12)
    np.testing.assert_allclose(weights, [0.5, 1 / 6, 1 / 6, 0.0, 1 / 6], atol=1e-15)


def test_cvar_alpha_one_is_the_mean_and_small_alpha_the_max():
    h = sample_h(11, seed=3)
    value, weights = exact(h, "cvar", alpha=1.0)
    assert value == pytest.approx(h.mean(), rel=1e-13)
    np.testing.assert_allclose(weights, np.full(11, 1 / 11), atol=1e-15)
    value, weights = exact(h, "cvar", alpha=0.01)                             # k = 0.11 < 1
    assert value == pytest.approx(h.max(), rel=1e-14)
    np.testing.assert_allclose(weights, np.eye(11)[h.argmax()], atol=1e-15)


@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_kl_regularized_closed_form_and_gibbs_principle(tau):
    h = sample_h(9, seed=4)
    value, weights = exact(h, "kl", tau=tau)
    assert value == pytest.approx(kl_regularized(h, tau), rel=1e-13)
    np.testing.assert_allclose(weights, special.softmax(h / tau), rtol=1e-12)
    # The softmax weights attain max_p p.h - tau KL(p, 1/n), and no other weights do better.
    assert weights @ h - tau * kl_to_uniform(weights) == pytest.approx(value, rel=1e-12)
    for seed in range(5):
        p = np.random.default_rng(seed).dirichlet(np.ones(9))
        assert p @ h - tau * kl_to_uniform(p) <= value + 1e-12


def test_kl_regularized_temperature_limits():
    h = sample_h(8, seed=5)
    assert exact(h, "kl", tau=1e7)[0] == pytest.approx(h.mean(), abs=1e-6)
    # A large temperature without cancellation: tau log mean exp(h / tau) = mean + var / (2 tau) + O(tau^-2).
    assert exact(h, "kl", tau=1e7)[0] == pytest.approx(h.mean() + h.var() / 2e7, abs=1e-14)
    value, weights = exact(h, "kl", tau=1e-4)
    assert value == pytest.approx(h.max() - 1e-4 * math.log(8), abs=1e-12)     # -> max, from below
    np.testing.assert_allclose(weights, np.eye(8)[h.argmax()], atol=1e-12)


@pytest.mark.parametrize("radius", [0.001, 0.05, 0.3, 1.0, 1.7])
def test_kl_constrained_dual_equals_primal(radius):
    n = 7
    h = sample_h(n, seed=6)
    assert radius < math.log(n)
    value, weights = exact(h, "kl_constrained", radius=radius)
    want_value, want_weights = primal_ball(h, radius, "kl")
    assert value == pytest.approx(want_value, rel=1e-8, abs=1e-8)
    np.testing.assert_allclose(weights, want_weights, atol=2e-5)
    # A certificate: p* is feasible, attains F, and F is below the dual at every temperature.
    assert weights.sum() == pytest.approx(1.0, abs=1e-13) and weights.min() > 0
    assert kl_to_uniform(weights) == pytest.approx(radius, rel=1e-9)      # active constraint
    assert weights @ h == pytest.approx(value, rel=1e-12, abs=1e-13)
    assert value == pytest.approx(kl_dual(h, radius, kl_dual_minimizer(h, radius)), rel=1e-11, abs=1e-12)
    for tau in np.geomspace(1e-3, 1e3, 40):
        assert value <= kl_dual(h, radius, tau) + 1e-12


def test_kl_constrained_limits():
    h = np.array([2.0, -1.0, 2.0, 0.5, 0.0, 1.0])                  # two tied maxima: log(n / m) = log 3
    value, weights = exact(h, "kl_constrained", radius=0.0)
    assert value == pytest.approx(h.mean(), rel=1e-14)
    np.testing.assert_allclose(weights, np.full(6, 1 / 6), atol=1e-15)
    for radius in (math.log(3.0), 2.0, 50.0):                       # inactive constraint: the maximum
        value, weights = exact(h, "kl_constrained", radius=radius)
        assert value == pytest.approx(2.0, rel=1e-15)
        np.testing.assert_allclose(weights, [0.5, 0, 0.5, 0, 0, 0], atol=1e-15)
    value, weights = exact(h, "kl_constrained", radius=math.log(3.0) - 1e-6)   # just below: tau* small
    assert value == pytest.approx(2.0, abs=1e-5) and value < 2.0
    assert kl_to_uniform(weights) == pytest.approx(math.log(3.0) - 1e-6, rel=1e-7)
    for form, radius in (("kl_constrained", 0.3), ("chi2", 0.3)):  # all h equal: any p is optimal, uniform
        value, weights = exact(np.full(5, 1.25), form, radius=radius)
        assert value == pytest.approx(1.25, rel=1e-15)
        np.testing.assert_allclose(weights, np.full(5, 0.2), atol=1e-15)


@pytest.mark.parametrize("radius", [0.001, 0.05, 0.3, 1.0, 2.5])
def test_chi2_dual_equals_primal(radius):
    n = 8
    h = sample_h(n, seed=7)
    assert radius < (n - 1) / 2
    value, weights = exact(h, "chi2", radius=radius)
    want_value, want_weights = primal_ball(h, radius, "chi2")
    assert value == pytest.approx(want_value, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(weights, want_weights, atol=1e-6)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12) and weights.min() >= 0
    assert chi2_to_uniform(weights) == pytest.approx(radius, rel=1e-9)    # active constraint
    assert weights @ h == pytest.approx(value, rel=1e-12, abs=1e-13)
    assert value == pytest.approx(chi2_dual(h, radius, chi2_dual_minimizer(h, radius)), rel=1e-12, abs=1e-12)


def test_chi2_small_radius_is_mean_plus_root_of_variance():
    h = sample_h(10, seed=8)
    radius = 1e-3                                                    # every sample keeps a positive weight
    value, weights = exact(h, "chi2", radius=radius)
    assert value == pytest.approx(h.mean() + math.sqrt(2 * radius * h.var()), rel=1e-13)
    assert weights.min() > 0


def test_chi2_limits():
    h = np.array([0.5, 3.0, -1.0, 1.0, 3.0, 2.0])                   # m = 2 tied maxima: (n - m) / (2m) = 1
    value, weights = exact(h, "chi2", radius=0.0)
    assert value == pytest.approx(h.mean(), rel=1e-14)
    np.testing.assert_allclose(weights, np.full(6, 1 / 6), atol=1e-15)
    for radius in (1.0, 2.5, 100.0):                                  # inactive: all mass on the maxima
        value, weights = exact(h, "chi2", radius=radius)
        assert value == 3.0
        np.testing.assert_allclose(weights, [0, 0.5, 0, 0, 0.5, 0], atol=1e-15)
    value, weights = exact(h, "chi2", radius=0.999)                   # just below: still active, nearly the max
    assert value == pytest.approx(primal_ball(h, 0.999, "chi2")[0], abs=1e-8) and value < 3.0
    h = sample_h(6, seed=9)                                           # distinct h: one-hot from (n - 1) / 2
    value, weights = exact(h, "chi2", radius=2.5)
    assert value == h.max()
    np.testing.assert_allclose(weights, np.eye(6)[h.argmax()], atol=1e-15)


@pytest.mark.parametrize("form,kw", [("cvar", dict(alpha=0.3)), ("cvar", dict(alpha=0.5)), ("kl", dict(tau=0.7)),
                                     ("kl_constrained", dict(radius=0.2)), ("chi2", dict(radius=0.4)),
                                     ("chi2", dict(radius=0.01))])
def test_gradcheck(form, kw):
    ref = torch.randn(7, dtype=torch.float64)
    loss = (torch.randn(7, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: dk.drrho_risk(x, ref, form, **kw), (loss,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("form,kw", [("cvar", dict(alpha=0.3)), ("kl", dict(tau=0.7)),
                                     ("kl_constrained", dict(radius=0.2)), ("chi2", dict(radius=0.4))])
def test_float32_matches_float64(form, kw):
    h = sample_h(33, seed=10)
    value32, weights32 = exact(h, form, dtype=torch.float32, **kw)
    value64, weights64 = exact(h, form, **kw)
    assert value32 == pytest.approx(value64, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(weights32, weights64, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_h_over_tau_stays_finite(dtype):
    h = np.array([1000.0, 999.0, 990.0, 0.0])                          # h / tau = 1000 at tau = 1
    value, weights = exact(h, "kl", dtype=dtype, tau=1.0)
    want = kl_regularized(h, 1.0)                                     # 1000 + log mean e^(h - 1000)
    assert value == pytest.approx(want, rel=1e-6 if dtype == torch.float32 else 1e-14)
    np.testing.assert_allclose(weights, special.softmax(h), atol=1e-6)
    for form, kw in (("kl_constrained", dict(radius=0.5)), ("chi2", dict(radius=0.5)), ("cvar", dict(alpha=0.5))):
        value, weights = exact(h, form, dtype=dtype, **kw)
        assert math.isfinite(value) and np.isfinite(weights).all() and weights.sum() == pytest.approx(1, abs=1e-5)
    risk = dk.DRRhoRisk("kl", tau=1.0, gamma=0.5)
    for _ in range(2):
        loss = torch.tensor(h, dtype=dtype, requires_grad=True)
        risk(loss).backward()
        assert torch.isfinite(loss.grad).all() and torch.isfinite(risk.u)


@pytest.mark.parametrize("form,kw", [("cvar", dict(alpha=0.2)), ("kl", dict(tau=0.5)),
                                     ("kl_constrained", dict(radius=0.5)), ("chi2", dict(radius=0.5))])
def test_single_sample_is_its_rho_loss(form, kw):
    value, weights = exact(np.array([0.7]), form, **kw)
    assert value == pytest.approx(0.7, rel=1e-15) and weights.tolist() == [1.0]


@pytest.mark.parametrize("form,kw", [("cvar", dict(alpha=0.4)), ("kl", dict(tau=0.5)),
                                     ("kl_constrained", dict(radius=0.3)), ("chi2", dict(radius=0.3))])
def test_reference_loss_is_detached(form, kw):
    loss = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(6, dtype=torch.float64, requires_grad=True)
    value = dk.drrho_risk(loss, ref, form, **kw)
    value.backward()
    assert ref.grad is None
    assert loss.grad.sum().item() == pytest.approx(1.0, abs=1e-12)
    plain = dk.drrho_risk((loss - ref).detach(), None, form, **kw)       # no reference: DRO of h itself
    assert value.item() == pytest.approx(plain.item(), rel=1e-14)
    risk = dk.DRRhoRisk(form, **kw).double()
    risk(loss, ref).backward()
    assert ref.grad is None


L4 = torch.ones(4)
BAD = [
    # (id, call kwargs, exception, words the message must contain)
    ("form-unknown", dict(form="cvarr", alpha=0.2), ValueError, ["form", "cvar", "'cvarr'"]),
    ("alpha-missing", dict(form="cvar"), ValueError, ["alpha", "required", "cvar"]),
    ("alpha-zero", dict(form="cvar", alpha=0.0), ValueError, ["alpha", "(0.0, 1.0]", "0.0"]),
    ("alpha-above-one", dict(form="cvar", alpha=1.5), ValueError, ["alpha", "1.5"]),
    ("alpha-nan", dict(form="cvar", alpha=math.nan), ValueError, ["alpha", "nan"]),
    ("alpha-str", dict(form="cvar", alpha="0.2"), TypeError, ["alpha", "real number", "str"]),
    ("alpha-foreign", dict(form="kl", tau=1.0, alpha=0.2), ValueError, ["alpha", "not an argument", "'kl'"]),
    ("tau-zero", dict(form="kl", tau=0.0), ValueError, ["tau", "0.0"]),
    ("tau-negative", dict(form="kl", tau=-1.0), ValueError, ["tau", "-1.0"]),
    ("tau-inf", dict(form="kl", tau=math.inf), ValueError, ["tau", "inf"]),
    ("tau-bool", dict(form="kl", tau=True), TypeError, ["tau", "bool"]),
    ("radius-negative", dict(form="kl_constrained", radius=-0.1), ValueError, ["radius", "[0.0", "-0.1"]),
    ("radius-negative-chi2", dict(form="chi2", radius=-1e-9), ValueError, ["radius", "-1e-09"]),
    ("radius-missing", dict(form="chi2"), ValueError, ["radius", "required", "chi2"]),
    ("radius-foreign", dict(form="cvar", alpha=0.5, radius=0.1), ValueError, ["radius", "not an argument"]),
    ("loss-list", dict(loss=[1.0, 2.0]), TypeError, ["loss", "torch.Tensor", "list"]),
    ("loss-2d", dict(loss=torch.ones(4, 1)), ValueError, ["loss", "1-D", "(4, 1)"]),
    ("loss-int", dict(loss=torch.ones(4, dtype=torch.int64)), TypeError, ["loss", "dtype", "int64"]),
    ("loss-empty", dict(loss=torch.ones(0), ref_loss=torch.ones(0)), ValueError, ["loss", "at least one", "(0,)"]),
    ("loss-nan", dict(loss=torch.tensor([1.0, math.nan, 0.0, 2.0])), ValueError, ["loss", "finite", "1 non-finite"]),
    ("loss-inf", dict(loss=torch.tensor([1.0, 0.0, math.inf, 2.0])), ValueError, ["loss", "finite"]),
    ("ref-shape", dict(ref_loss=torch.ones(5)), ValueError, ["ref_loss", "(4,)", "(5,)"]),
    ("ref-2d", dict(ref_loss=torch.ones(4, 1)), ValueError, ["ref_loss", "1-D"]),
    ("ref-nan", dict(ref_loss=torch.tensor([1.0, 0.0, 0.0, math.nan])), ValueError, ["ref_loss", "finite"]),
    ("ref-array", dict(ref_loss=np.ones(4)), TypeError, ["ref_loss", "torch.Tensor", "ndarray"]),
]


@pytest.mark.parametrize("case,kwargs,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(case, kwargs, exc, words):
    call = dict(loss=L4, ref_loss=L4, form="cvar", alpha=0.5)
    if "form" in kwargs:
        call = dict(loss=L4, ref_loss=L4)
    call.update(kwargs)
    with pytest.raises(exc) as info:
        dk.drrho_risk(call.pop("loss"), call.pop("ref_loss"), **call)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


MODULE_BAD = [
    ("gamma-zero", dict(form="kl", tau=1.0, gamma=0.0), ValueError, ["gamma", "0.0"]),
    ("gamma-above-one", dict(form="chi2", radius=0.1, gamma=1.5), ValueError, ["gamma", "1.5"]),
    ("tau-floor-zero", dict(form="kl_constrained", radius=0.1, tau_floor=0.0), ValueError, ["tau_floor", "0.0"]),
    ("tau-below-floor", dict(form="kl_constrained", radius=0.1, tau=0.01, tau_floor=0.1), ValueError,
     ["tau", "tau_floor = 0.1", "0.01"]),
    ("mu-foreign", dict(form="kl", tau=1.0, mu=0.0), ValueError, ["mu", "not an argument", "'kl'"]),
    ("eta-nan", dict(form="chi2", radius=0.1, eta=math.nan), ValueError, ["eta", "nan"]),
    ("form-unknown", dict(form="dro"), ValueError, ["form", "'dro'"]),
    ("alpha-missing", dict(form="cvar"), ValueError, ["alpha", "required"]),
]


@pytest.mark.parametrize("case,kwargs,exc,words", MODULE_BAD, ids=[b[0] for b in MODULE_BAD])
def test_module_bad_arguments(case, kwargs, exc, words):
    kwargs = dict(kwargs)
    with pytest.raises(exc) as info:
        dk.DRRhoRisk(kwargs.pop("form"), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# ------------------------------------------------------------------------------------------------
# Stochastic forms

SCALAR = {"cvar": "mu", "kl_constrained": "tau", "chi2": "eta"}
REDUCTIONS = [("cvar", dict(alpha=0.3)), ("cvar", dict(alpha=0.5)), ("kl", dict(tau=0.6)),
              ("kl_constrained", dict(radius=0.25)), ("chi2", dict(radius=0.3)), ("chi2", dict(radius=1e-3))]


@pytest.mark.parametrize("form,kw", REDUCTIONS)
def test_stochastic_form_reduces_to_the_exact_form(form, kw):
    """Whole dataset as the batch, gamma = 1, the scalar at its optimum: value, weights and gradients agree."""
    n = 9
    ref = torch.tensor(np.random.default_rng(12).normal(size=n))
    loss = torch.tensor(sample_h(n, seed=11)) + ref
    h = (loss - ref).numpy()                                          # the RHO losses exactly as computed
    want_value, want_weights = exact(h, form, **kw)
    risk = dk.DRRhoRisk(form, gamma=1.0, **kw).double()
    risk.u.fill_(123.0) if hasattr(risk, "u") else None             # a stale estimate: gamma = 1 replaces it
    scalar = risk_optimum_scalar(form, h, kw)
    if scalar is not None:
        with torch.no_grad():
            getattr(risk, SCALAR[form]).fill_(scalar)
    loss.requires_grad_()
    objective = risk(loss, ref)
    objective.backward()
    assert objective.item() == pytest.approx(want_value, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(loss.grad.numpy(), want_weights, atol=1e-9)
    np.testing.assert_allclose(risk.weights.numpy(), loss.grad.numpy(), rtol=1e-15, atol=1e-17)
    if scalar is not None:
        assert getattr(risk, SCALAR[form]).grad.item() == pytest.approx(0.0, abs=1e-8)


def test_kl_moving_average_follows_the_log_domain_rule():
    tau, gamma = 0.5, 0.7
    risk = dk.DRRhoRisk("kl", tau=tau, gamma=gamma).double()
    assert risk.u.item() == 0.0                                       # unset
    rng = np.random.default_rng(13)
    u = None
    for step in range(3):
        h = rng.normal(size=6)
        loss = torch.tensor(h, requires_grad=True)
        objective = risk(loss)
        objective.backward()
        log_inner = kl_regularized(h, tau) / tau
        u = update_u(np.array([log_inner]), np.array([0.0 if u is None else u]), gamma)[0]   # part 1's rule
        assert risk.u.item() == pytest.approx(u, rel=1e-13)
        assert objective.item() == pytest.approx(tau * u, rel=1e-13)
        np.testing.assert_allclose(loss.grad.numpy(), np.exp(h / tau - u) / 6, rtol=1e-12)


def test_kl_constrained_gradient_in_tau_is_the_dual_derivative():
    h = sample_h(7, seed=14)
    radius, tau = 0.2, 0.8
    risk = dk.DRRhoRisk("kl_constrained", radius=radius, gamma=1.0).double()
    with torch.no_grad():
        risk.tau.fill_(tau)
    loss = torch.tensor(h, requires_grad=True)
    objective = risk(loss)
    objective.backward()
    step = 1e-6
    numeric = (kl_dual(h, radius, tau + step) - kl_dual(h, radius, tau - step)) / (2 * step)
    assert risk.tau.grad.item() == pytest.approx(numeric, rel=1e-7, abs=1e-9)
    assert objective.item() == pytest.approx(kl_dual(h, radius, tau), rel=1e-13)
    np.testing.assert_allclose(loss.grad.numpy(), special.softmax(h / tau), rtol=1e-12)


def test_chi2_gradient_in_eta_is_the_dual_derivative_and_no_excess_is_safe():
    h = sample_h(7, seed=15)
    radius, eta = 0.4, -0.2
    risk = dk.DRRhoRisk("chi2", radius=radius, gamma=1.0).double()
    with torch.no_grad():
        risk.eta.fill_(eta)
    loss = torch.tensor(h, requires_grad=True)
    objective = risk(loss)
    objective.backward()
    step = 1e-6
    numeric = (chi2_dual(h, radius, eta + step) - chi2_dual(h, radius, eta - step)) / (2 * step)
    assert risk.eta.grad.item() == pytest.approx(numeric, rel=1e-7)
    assert objective.item() == pytest.approx(chi2_dual(h, radius, eta), rel=1e-13)
    excess = np.maximum(h - eta, 0)
    want = math.sqrt(1 + 2 * radius) * excess / (7 * np.sqrt(np.mean(excess ** 2)))
    np.testing.assert_allclose(loss.grad.numpy(), want, rtol=1e-12)
    with torch.no_grad():                                             # eta above every h: no excess, no NaN
        risk.eta.fill_(h.max() + 1)
    risk.eta.grad = None
    loss = torch.tensor(h, requires_grad=True)
    objective = risk(loss)
    objective.backward()
    assert objective.item() == pytest.approx(h.max() + 1) and loss.grad.abs().max() == 0
    assert risk.eta.grad.item() == 1.0


def test_cvar_stochastic_gradients():
    h = np.array([0.5, -1.0, 2.0, 0.1, 1.5, -0.3])
    risk = dk.DRRhoRisk("cvar", alpha=0.5).double()
    with torch.no_grad():
        risk.mu.fill_(0.3)
    loss = torch.tensor(h, requires_grad=True)
    objective = risk(loss)
    objective.backward()
    above = (h > 0.3).astype(float)
    assert objective.item() == pytest.approx(0.3 + np.maximum(h - 0.3, 0).sum() / 3, rel=1e-14)
    np.testing.assert_allclose(loss.grad.numpy(), above / 3, rtol=1e-15)
    assert risk.mu.grad.item() == pytest.approx(1 - above.sum() / 3, abs=1e-15)


def _run_steps(risk, batches):
    """SGD steps on the risk's learnable scalar (if any), one per batch of RHO losses; the objective values."""
    params = list(risk.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1) if params else None
    values = []
    for h in batches:
        objective = risk(torch.tensor(h, requires_grad=True))
        if optimizer is not None:
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
        values.append(objective.item())
    return values


@pytest.mark.parametrize("form,kw", [("cvar", dict(alpha=0.3)), ("kl", dict(tau=0.5)),
                                     ("kl_constrained", dict(radius=0.3)), ("chi2", dict(radius=0.3))])
def test_checkpoint_resumes_exactly(form, kw):
    rng = np.random.default_rng(16)
    batches = [rng.normal(size=8) for _ in range(6)]
    risk = dk.DRRhoRisk(form, gamma=0.8, **kw).double()
    _run_steps(risk, batches[:3])
    saved = copy.deepcopy(risk.state_dict())
    want = _run_steps(risk, batches[3:])
    resumed = dk.DRRhoRisk(form, gamma=0.8, **kw).double()
    resumed.load_state_dict(saved)
    assert _run_steps(resumed, batches[3:]) == want
    assert set(saved) == ({"u"} if form != "cvar" else set()) | ({SCALAR[form]} if form in SCALAR else set())


@pytest.mark.parametrize("form,kw", [("cvar", dict(alpha=0.3)), ("kl", dict(tau=0.5)),
                                     ("kl_constrained", dict(radius=0.3, tau_floor=0.1)), ("chi2", dict(radius=0.3))])
def test_failed_call_leaves_the_state_unchanged(form, kw):
    risk = dk.DRRhoRisk(form, gamma=0.8, **kw)
    risk(torch.randn(5, requires_grad=True), torch.randn(5)).backward()
    if form == "kl_constrained":
        with torch.no_grad():
            risk.tau.fill_(0.05)                                     # an optimizer step below the floor
    before = copy.deepcopy(risk.state_dict())
    weights_before = risk.weights.clone()
    for loss, ref in ((torch.randn(5), torch.randn(4)), (torch.tensor([1.0, math.nan]), torch.zeros(2)),
                      (torch.ones(3), torch.tensor([0.0, math.inf, 0.0])), (torch.ones(2, 2), None)):
        with pytest.raises(ValueError):
            risk(loss, ref)
    after = risk.state_dict()
    assert set(after) == set(before)
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert torch.equal(risk.weights, weights_before)


def test_tau_is_projected_above_its_floor():
    risk = dk.DRRhoRisk("kl_constrained", radius=5.0, tau=0.5, tau_floor=0.2, gamma=1.0)
    opt = torch.optim.SGD(risk.parameters(), lr=10.0)
    h = torch.tensor([1.0, -1.0, 0.5])                               # radius > log 3: tau* = 0, tau pushed down
    for _ in range(3):
        objective = risk(h.clone().requires_grad_())
        opt.zero_grad()
        objective.backward()
        assert risk.tau.grad.item() > 0
        opt.step()
        assert risk.tau.item() < 0.2                                 # the optimizer left the feasible set
        risk(h.clone())                                              # the next call projects before use
        assert risk.tau.item() == pytest.approx(0.2)
    risk.tau.data.fill_(-3.0)
    risk.project_()
    assert risk.tau.item() == pytest.approx(0.2)


def test_module_repr_dtype_and_weights():
    risk = dk.DRRhoRisk("kl_constrained", radius=0.1, tau=0.5, gamma=0.9)
    text = repr(risk)
    for word in ("kl_constrained", "radius=0.1", "gamma=0.9", "tau=0.5", "tau_floor=0.01", "u=0 (unset)"):
        assert word in text, text
    assert risk.weights is None
    risk.half()
    assert risk.u.dtype == torch.float64 and risk.tau.dtype == torch.float16
    risk.float()
    loss = torch.randn(6, requires_grad=True)
    objective = risk(loss, torch.zeros(6))
    assert objective.dtype == torch.float32 and objective.dim() == 0
    assert risk.weights.shape == (6,) and not risk.weights.requires_grad
    assert risk.u.item() != 0 and "(unset)" not in repr(risk)
    assert "alpha=0.2" in repr(dk.DRRhoRisk("cvar", alpha=0.2)) and "mu=0" in repr(dk.DRRhoRisk("cvar", alpha=0.2))
    assert "eta=1.5" in repr(dk.DRRhoRisk("chi2", radius=0.3, eta=1.5))
    assert "tau=2.0" in repr(dk.DRRhoRisk("kl", tau=2.0))


def test_docstring_examples():
    result = doctest.testmod(risk_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
