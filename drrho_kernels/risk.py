r"""DRRho risk for any per-sample loss: DRO over the RHO loss ``h_i = l(w, z_i) - l(w_ref, z_i)``.

DRRho risk minimization (arXiv 2505.06699) is not specific to CLIP: given per-sample losses of a
target model and of a frozen reference model, it minimizes a distributionally robust risk of the
RHO loss ``h = loss - ref_loss`` (the reference term carries no gradient). Four robust risks of
``n`` values ``h_i``:

.. math::

    \text{cvar:}\quad & F = \frac{1}{k}\,\text{(sum of the k largest } h_i)
        = \min_\mu\ \mu + \frac{1}{\alpha n}\sum_i [h_i - \mu]_+, \qquad k = \alpha n \\
    \text{kl:}\quad & F = \tau \log \tfrac{1}{n}\textstyle\sum_i e^{h_i/\tau}
        = \max_{p \in \Delta}\ \sum_i p_i h_i - \tau\,\mathrm{KL}(p, \tfrac{1}{n}) \\
    \text{kl\_constrained:}\quad & F = \max\{\textstyle\sum_i p_i h_i : \mathrm{KL}(p, \tfrac1n) \le r\}
        = \min_{\tau \ge 0}\ \tau \log \tfrac{1}{n}\textstyle\sum_i e^{h_i/\tau} + \tau r \\
    \text{chi2:}\quad & F = \max\{\textstyle\sum_i p_i h_i :
        \tfrac{1}{n}\sum_i \tfrac12 (n p_i - 1)^2 \le r\}
        = \min_\eta\ \eta + \sqrt{(1 + 2r)\,\tfrac{1}{n}\textstyle\sum_i [h_i - \eta]_+^2}

(``p`` in the simplex ``Delta``; the paper writes the radius of the divergence balls as
``r = rho / n``.) Each ``F`` is a maximum of ``sum_i p_i h_i`` over a convex set of weights, so its
gradient is ``sum_i p*_i grad l_i`` with ``p*`` the worst-case weights.

Two levels:

- :func:`drrho_risk`, the **exact** risk of one batch, a function of its ``h`` alone: top-k for
  ``cvar``, the closed form for ``kl``, a one-dimensional convex solve (bisection in float64, to
  machine precision) for ``kl_constrained`` (over ``tau``) and ``chi2`` (over ``eta``). Autograd gives
  ``d F / d loss = p*``.
- :class:`DRRhoRisk`, the **stochastic** forms for minibatch training, an ``nn.Module`` with a
  scalar state: ``mu`` (cvar), a log-domain moving average ``u`` of the inner mean (kl,
  kl_constrained, chi2), a learned ``tau`` (kl_constrained) or ``eta`` (chi2). With the whole
  dataset as the batch, ``gamma = 1`` and the scalar at its optimum, each equals the exact form.

See docs/RISK.md for when to pick which form.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .core.epilogue import ma_update
from .core.inputs import accumulation_dtype
from .loss.validate import _describe, check_finite, check_real, check_same_device, check_tensor

__all__ = ["FORMS", "drrho_risk", "DRRhoRisk"]

FORMS = ("cvar", "kl", "kl_constrained", "chi2")
_MAX_BISECTIONS = 200        # ample: an interval of width e shrinks to adjacent float64 numbers in ~60
_MAX_BRACKET_STEPS = 200     # e-fold steps of 1/tau when bracketing the KL-constrained optimum


# ------------------------------------------------------------------------------------------------
# Checks

def _rho_loss(loss, ref_loss) -> torch.Tensor:
    """Check the two ``[B]`` loss vectors; return ``h = loss - ref_loss.detach()`` in the accumulation dtype."""
    loss = check_tensor("loss", loss, ndim=1)
    if loss.shape[0] < 1:
        raise ValueError(f"loss: expected at least one sample, got {_describe(loss)}")
    check_finite("loss", loss)
    acc = accumulation_dtype(loss.dtype)
    if ref_loss is None:
        return loss.to(acc)
    ref_loss = check_tensor("ref_loss", ref_loss, ndim=1)
    if ref_loss.shape != loss.shape:
        raise ValueError(f"ref_loss: expected shape {tuple(loss.shape)} (the shape of loss), got {_describe(ref_loss)}")
    check_same_device("loss", loss, ref_loss=ref_loss)
    check_finite("ref_loss", ref_loss)
    return loss.to(acc) - ref_loss.detach().to(acc)


def _check_form(form) -> str:
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    return form


def _check_alpha(alpha) -> float:
    return check_real("alpha", alpha, low=0.0, high=1.0, low_open=True)


def _check_tau(tau, name="tau") -> float:
    return check_real(name, tau, low=0.0, low_open=True, high_open=True)


def _check_radius(radius) -> float:
    return check_real("radius", radius, low=0.0, low_open=False, high_open=True)


def _check_start(name: str, value) -> float:
    """An initial value of a learnable scalar: a finite real number (default 0)."""
    if value is None:
        return 0.0
    return check_real(name, value, low=-math.inf, low_open=True, high_open=True)


def _check_form_arguments(form: str, given: dict, required: str, optional=()) -> None:
    """``required`` must be given; every other argument of ``given`` must be None unless in ``optional``."""
    if given[required] is None:
        raise ValueError(f"{required}: required by form {form!r}, got None")
    for name, value in given.items():
        if value is not None and name != required and name not in optional:
            raise ValueError(f"{name}: not an argument of form {form!r} (it takes {required}"
                             f"{''.join(', ' + o for o in optional)}), got {value!r}")


def _top_fraction(alpha: float, n: int) -> float:
    """``k = alpha n``, snapped to the nearest integer when it is one up to rounding (0.7 * 90 -> 63, not 62.99...)."""
    k = alpha * n
    nearest = round(k)
    return float(nearest) if nearest >= 1 and abs(k - nearest) <= 1e-9 * k else k


# ------------------------------------------------------------------------------------------------
# Exact forms of a batch

def _cvar_objective(h: torch.Tensor, mu: torch.Tensor, k: float):
    r"""``mu + (1/k) sum_i theta_i (h_i - mu)``: the CVaR objective at ``mu``, with its weights ``theta / k``.

    ``theta_i = 1`` for ``h_i > mu``, ``0`` for ``h_i < mu``; the samples tied at ``mu`` (where
    ``[h - mu]_+`` has a kink) share what is left of the mass ``k``, clipped to ``[0, 1]``. The value is
    ``mu + (1/k) sum_i [h_i - mu]_+``; the gradient is ``theta / k`` in ``h`` and ``1 - sum(theta) / k`` in
    ``mu``: at the minimizing ``mu`` (the ``ceil(k)``-th largest ``h``) it is ``0`` in ``mu`` and the
    boundary sample enters with its fractional weight ``(k - #{h > mu}) / k``.
    """
    h_now, mu_now = h.detach(), mu.detach()
    above, tied = h_now > mu_now, h_now == mu_now
    n_above, n_tied = above.sum().to(h.dtype), tied.sum().to(h.dtype)
    tie_share = ((k - n_above) / n_tied.clamp_min(1.0)).clamp(0.0, 1.0)
    theta = above.to(h.dtype) + tied.to(h.dtype) * tie_share
    return mu + (theta * (h - mu)).sum() / k, theta / k


def _cvar_exact(h: torch.Tensor, alpha: float) -> torch.Tensor:
    k = _top_fraction(alpha, h.numel())
    boundary = torch.topk(h.detach(), math.ceil(k)).values[-1]        # the minimizing mu
    risk, _ = _cvar_objective(h, boundary, k)
    return risk


def _argmax_mean(h: torch.Tensor) -> torch.Tensor:
    """The maximum of ``h``, with the gradient spread evenly over the tied maximal samples."""
    at_max = (h.detach() == h.detach().max()).to(h.dtype)
    return (at_max * h).sum() / at_max.sum()


def _log_mean_exp(z: torch.Tensor) -> torch.Tensor:
    """``log((1/n) sum_i exp(z_i))`` for ``z <= 0``, accurate in relative terms; its gradient is ``softmax(z)``.

    When every ``z_i`` is in ``[-1, 0]`` (a large temperature), ``logsumexp(z) - log n`` would cancel:
    then ``log1p(mean(expm1(z)))``. Otherwise ``logsumexp`` (whose gradient stays accurate for tiny weights).
    """
    if float(z.detach().min()) >= -1.0:
        return torch.log1p(torch.expm1(z).mean())
    return torch.logsumexp(z, dim=0) - math.log(z.numel())


def _log_mean_exp_scaled(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``(1/beta) log((1/n) sum_i exp(beta h_i))``, centred at the (detached) maximum; gradient ``softmax(beta h)``."""
    top = h.detach().max()
    return top + _log_mean_exp(beta * (h - top)) / beta


def _bisect(increasing, lo: float, hi: float) -> float:
    """A root of an increasing function with ``increasing(lo) <= 0 < increasing(hi)``, to float64 precision.

    Only midpoints are evaluated (never ``lo`` or ``hi``).
    """
    for _ in range(_MAX_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if increasing(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def _kl_to_uniform(centered: torch.Tensor, beta: float) -> float:
    """``KL(p, 1/n) = E_p[z] - log mean exp(z)`` of ``p = softmax(z)``, ``z = beta (h - max h)``."""
    z = beta * centered
    return float((torch.softmax(z, dim=0) * z).sum() - _log_mean_exp(z))


def _kl_ball_inverse_temperature(h64: torch.Tensor, radius: float) -> float:
    r"""``beta* = 1 / tau*`` of the KL-constrained dual: ``0`` for the mean, ``inf`` for the maximum.

    ``dG/dtau = r - KL(softmax(h / tau), 1/n)`` and the KL of the softmax grows with ``1/tau`` from 0
    (uniform) to ``log(n / m)`` (uniform over the ``m`` maximal samples), so the optimum is the root of
    ``KL(softmax(beta h)) = r`` in ``log beta``; ``r = 0`` or all ``h`` equal give ``tau* = inf``
    (the mean), ``r >= log(n / m)`` gives ``tau* = 0`` (the maximum: the constraint is inactive).
    """
    n = h64.numel()
    top = h64.max()
    n_top = int((h64 == top).sum())
    if radius == 0.0 or n_top == n:
        return 0.0
    if radius >= math.log(n / n_top):
        return math.inf
    centered = h64 - top
    excess_kl = lambda log_beta: _kl_to_uniform(centered, math.exp(log_beta)) - radius  # noqa: E731
    lo = hi = -math.log(-float(centered.min()))                       # beta = 1 / spread of h
    for _ in range(_MAX_BRACKET_STEPS):
        if excess_kl(lo) <= 0:
            break
        lo -= 1.0
    else:
        return 0.0                        # a radius float64 cannot resolve from 0: the mean
    for _ in range(_MAX_BRACKET_STEPS):
        if excess_kl(hi) > 0:
            break
        hi += 1.0
    else:
        return math.inf                   # a radius float64 cannot resolve from log(n / m): the maximum
    return math.exp(_bisect(excess_kl, lo, hi))


def _kl_constrained_exact(h: torch.Tensor, radius: float) -> torch.Tensor:
    beta = _kl_ball_inverse_temperature(h.detach().to("cpu", torch.float64), radius)
    if beta == 0.0:
        return h.mean()
    if beta == math.inf:
        return _argmax_mean(h)
    # tau* (log mean exp(h / tau*) + r) with tau* = 1 / beta held constant: gradient softmax(h / tau*).
    return _log_mean_exp_scaled(h, beta) + radius / beta


def _chi2_slope(h64: torch.Tensor, eta: float, radius: float) -> float:
    """``d/deta [eta + sqrt((1 + 2r) mean([h - eta]_+^2))]`` for ``eta < max h`` (scale-free form)."""
    excess = (h64 - eta).clamp_min(0.0)
    excess = excess / excess.max()
    return 1.0 - math.sqrt(1.0 + 2.0 * radius) * float(excess.mean()) / math.sqrt(float(excess.square().mean()))


def _chi2_ball_threshold(h64: torch.Tensor, radius: float) -> float:
    r"""``eta*`` of the chi-square dual: ``-inf`` for the mean, ``max h`` when the constraint is inactive.

    ``eta + sqrt((1 + 2r) mean([h - eta]_+^2))`` is convex in ``eta``. When every sample is above
    ``eta`` its minimizer is ``mean(h) - std(h) / sqrt(2r)`` (value ``mean + sqrt(2 r var)``), valid if
    that is ``<= min h``; otherwise it lies in ``(min h, max h)``, where the slope is bisected. ``r = 0``
    or all ``h`` equal give the mean; ``r >= (n - m) / (2m)`` (the divergence of the uniform weights on
    the ``m`` maximal samples) gives the maximum.
    """
    n = h64.numel()
    top = float(h64.max())
    n_top = int((h64 == top).sum())
    if radius == 0.0 or n_top == n:
        return -math.inf
    if radius >= (n - n_top) / (2.0 * n_top):
        return top
    mean = float(h64.mean())
    std = math.sqrt(float((h64 - mean).square().mean()))
    all_above = mean - std / math.sqrt(2.0 * radius)
    bottom = float(h64.min())
    if all_above <= bottom:
        return all_above
    return _bisect(lambda eta: _chi2_slope(h64, eta, radius), bottom, top)


def _chi2_exact(h: torch.Tensor, radius: float) -> torch.Tensor:
    eta = _chi2_ball_threshold(h.detach().to("cpu", torch.float64), radius)
    if eta == -math.inf:
        return h.mean()
    if eta >= float(h.detach().max()):
        return _argmax_mean(h)
    excess = (h - eta).clamp_min(0.0)
    scale = excess.detach().max()                     # sqrt(mean(e^2)) = scale sqrt(mean((e / scale)^2)), no overflow
    if not scale > 0:                                 # eta rounded up to max h in float32: the maximum
        return _argmax_mean(h)
    root_mean_square = scale * (excess / scale).square().mean().sqrt()
    return eta + math.sqrt(1.0 + 2.0 * radius) * root_mean_square


def drrho_risk(loss, ref_loss, form, *, alpha=None, tau=None, radius=None) -> torch.Tensor:
    r"""The exact DRRho risk of one batch: a robust mean of the RHO losses ``h = loss - ref_loss``.

    .. math::

        F = \max_{p \in P}\ \sum_i p_i h_i, \qquad h_i = \ell(w, z_i) - \ell(w_{ref}, z_i)

    with the set of weights ``P`` of the form (``n = B``; see the module docstring for the duals):

    - ``"cvar"``: ``p_i <= 1 / (alpha n)``: the average of the ``k = alpha n`` largest ``h_i``; a
      fractional ``k`` takes the boundary sample with weight ``(k - floor(k)) / k``; ties at the
      boundary share its weight evenly.
    - ``"kl"``: the KL-regularized risk ``tau log((1/n) sum_i exp(h_i / tau))`` (closed form, weights
      ``softmax(h / tau)``).
    - ``"kl_constrained"``: ``KL(p, 1/n) <= radius``; dual ``min_{tau >= 0} tau log mean exp(h / tau) +
      tau radius`` solved for ``tau``. ``radius = 0`` gives the mean, ``radius >= log(n / m)`` the
      maximum (``m`` tied maximal samples).
    - ``"chi2"``: ``(1/n) sum_i (1/2)(n p_i - 1)^2 <= radius``; dual ``min_eta eta + sqrt((1 + 2 radius)
      mean([h - eta]_+^2))`` solved for ``eta``. ``radius = 0`` gives the mean, ``radius >= (n - m) / (2m)``
      the maximum. The paper's radius ``rho / n`` is ``radius = rho / n`` for both balls.

    The one-dimensional solves run in float64 on the CPU on the detached ``h`` (one device
    synchronisation on accelerators); the risk is then computed with autograd from the optimal
    scalar held constant, so ``d F / d loss_i = p*_i``, the worst-case weights (they sum to 1). When
    they are not unique (ties, all ``h`` equal) the symmetric choice is made: the tied samples share.

    Args:
        loss: ``[B]`` per-sample losses of the target model (any floating dtype; may require grad).
        ref_loss: ``[B]`` per-sample losses of the reference model on the same samples, or None (plain
            DRO of ``loss``). Detached: it never receives a gradient. Cast to the accumulation dtype.
        form: ``"cvar"``, ``"kl"``, ``"kl_constrained"`` or ``"chi2"``.
        alpha: CVaR fraction in (0, 1] (``"cvar"`` only). tau: KL temperature > 0 (``"kl"`` only).
        radius: divergence radius >= 0 (``"kl_constrained"`` and ``"chi2"`` only).

    Returns:
        0-dim risk ``F``, float64 for float64 losses and float32 otherwise, differentiable in ``loss``.

    Raises:
        TypeError, ValueError: naming the argument: an unknown form, a missing or foreign parameter,
            ``alpha`` outside (0, 1], ``tau <= 0``, a negative radius, non-numbers, losses that are not
            ``[B]`` floating tensors of one shape and device, non-finite losses (checked on CPU tensors;
            elsewhere a NaN propagates).

    Example::

        >>> import torch, drrho_kernels as dk
        >>> loss = torch.tensor([2.0, 0.5, 1.0, 3.0], requires_grad=True)
        >>> ref_loss = torch.tensor([0.5, 0.5, 0.5, 0.5])
        >>> risk = dk.drrho_risk(loss, ref_loss, form="cvar", alpha=0.5)   # mean of the 2 largest h
        >>> risk.backward()
        >>> risk.item(), loss.grad.tolist()
        (2.0, [0.5, 0.0, 0.0, 0.5])
    """
    form = _check_form(form)
    given = dict(alpha=alpha, tau=tau, radius=radius)
    required = {"cvar": "alpha", "kl": "tau", "kl_constrained": "radius", "chi2": "radius"}[form]
    _check_form_arguments(form, given, required)
    h = _rho_loss(loss, ref_loss)
    if form == "cvar":
        return _cvar_exact(h, _check_alpha(alpha))
    if form == "kl":
        return _log_mean_exp_scaled(h, 1.0 / _check_tau(tau))
    if form == "kl_constrained":
        return _kl_constrained_exact(h, _check_radius(radius))
    return _chi2_exact(h, _check_radius(radius))


# ------------------------------------------------------------------------------------------------
# Stochastic forms

def _value_with_gradient(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A scalar with the value of ``value`` and the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


class DRRhoRisk(nn.Module):
    r"""Stochastic DRRho risk for minibatch training: the forms of :func:`drrho_risk` with a scalar state.

    Each call takes a batch of ``[B]`` target and reference losses and returns a 0-dim objective:
    its value is the current estimate of the risk and its gradient is the stochastic estimate of the
    risk's gradient, ``sum_i weights_i grad loss_i`` plus the gradient in the form's learnable scalar.
    With ``h = loss - ref_loss`` (``l_t = log`` of the batch's inner mean, ``u`` its moving average by
    the log-domain rule of the CLIP state: ``u <- l_t`` if ``gamma == 1`` or ``u`` is unset (0, +-inf,
    NaN), else ``u <- log((1 - gamma) e^u + gamma e^{l_t})``):

    - ``"cvar"``: ``mu + (1/(alpha B)) sum_i [h_i - mu]_+`` with a learnable ``mu`` (weights
      ``1[h_i > mu] / (alpha B)``; samples tied at ``mu`` share the remaining mass). No ``u``.
    - ``"kl"``: ``l_t = log mean exp(h / tau)``; value ``tau u``, weights ``exp(h_i / tau - u) / B``.
    - ``"kl_constrained"``: the same with a learned ``tau`` (kept ``>= tau_floor``); value
      ``tau (u + radius)``, gradient in ``tau``: ``u - (sum_i weights_i h_i) / tau + radius``.
    - ``"chi2"``: ``l_t = log mean [h - eta]_+^2`` with a learnable ``eta``; value
      ``eta + sqrt((1 + 2 radius) e^u)``, weights ``sqrt(1 + 2 radius) [h_i - eta]_+ / (B e^{u/2})``,
      gradient in ``eta``: ``1 - sum_i weights_i``.

    The weights use the updated ``u`` and are constants for autograd. With the whole dataset as the
    batch, ``gamma = 1`` and the scalar at its optimum, the value and the gradients equal those of
    :func:`drrho_risk` (and the gradient in the scalar is 0).

    **Learnable scalars.** ``mu``, ``tau`` and ``eta`` are 0-dim ``nn.Parameter`` s: pass
    ``risk.parameters()`` to the optimizer with the model's (they are in loss units; they need a
    learning rate that can follow the scale of ``h``). ``tau`` is kept above ``tau_floor`` by
    projection: each call first clamps it in place to ``[tau_floor, inf)`` (projected gradient
    descent, whatever the optimizer), so between an optimizer step and the next call it may sit
    below the floor; :meth:`project_` applies the projection on demand.

    **State and checkpointing.** ``u`` is a float64 0-dim buffer (it stays float64 under ``.half()``
    or ``.float()``), starting at 0 (unset). ``u`` and the scalars are in ``state_dict``, so a
    checkpoint of the module resumes exactly. A call changes them only once its inputs passed every
    check; a call that raises leaves them bit-identical. ``weights`` (not saved) holds the last
    batch's weights.

    Args:
        form: ``"cvar"``, ``"kl"``, ``"kl_constrained"`` or ``"chi2"``.
        alpha: CVaR fraction in (0, 1] (``"cvar"``).
        tau: the fixed temperature > 0 (``"kl"``), or the initial learned temperature, >= ``tau_floor``
            (``"kl_constrained"``, default 1.0).
        radius: divergence radius >= 0 (``"kl_constrained"``, ``"chi2"``).
        gamma: moving-average rate in (0, 1] (not used by ``"cvar"``).
        mu: initial ``mu`` (``"cvar"``, default 0.0). eta: initial ``eta`` (``"chi2"``, default 0.0).
        tau_floor: lower bound > 0 of the learned ``tau`` (``"kl_constrained"``, default 0.01).

    Shape:
        ``loss``, ``ref_loss``: ``[B]`` (``ref_loss`` may be None); output: 0-dim, float64 for float64
        losses and float32 otherwise; ``weights``: ``[B]``.

    Raises:
        TypeError, ValueError: at construction for a bad form or parameter (as :func:`drrho_risk`, plus
        ``gamma`` outside (0, 1], ``tau_floor <= 0``, an initial ``tau`` below the floor); at a call for
        bad losses.

    Example::

        >>> import torch, drrho_kernels as dk
        >>> risk = dk.DRRhoRisk("kl_constrained", radius=0.5, gamma=0.9)
        >>> loss = torch.tensor([2.0, 0.5, 1.0, 3.0], requires_grad=True)
        >>> objective = risk(loss, torch.full((4,), 0.5))
        >>> objective.backward()                      # grads: loss and risk.tau
        >>> torch.allclose(loss.grad, risk.weights), sorted(risk.state_dict())
        (True, ['tau', 'u'])
    """

    def __init__(self, form, *, alpha=None, tau=None, radius=None, gamma=0.9, mu=None, eta=None,
                 tau_floor=None):
        super().__init__()
        self.form = _check_form(form)
        given = dict(alpha=alpha, tau=tau, radius=radius, mu=mu, eta=eta, tau_floor=tau_floor)
        required, optional = {"cvar": ("alpha", ("mu",)), "kl": ("tau", ()),
                              "kl_constrained": ("radius", ("tau", "tau_floor")),
                              "chi2": ("radius", ("eta",))}[self.form]
        _check_form_arguments(self.form, given, required, optional)
        self.gamma = check_real("gamma", gamma, low=0.0, high=1.0, low_open=True)
        self._weights = None
        if self.form == "cvar":
            self.alpha = _check_alpha(alpha)
            self.mu = nn.Parameter(torch.tensor(_check_start("mu", mu)))
            return
        self.register_buffer("u", torch.zeros((), dtype=torch.float64))          # 0 = unset
        if self.form == "kl":
            self.tau = _check_tau(tau)
        elif self.form == "kl_constrained":
            self.radius = _check_radius(radius)
            self.tau_floor = _check_tau(0.01 if tau_floor is None else tau_floor, "tau_floor")
            start = _check_tau(1.0 if tau is None else tau)
            if start < self.tau_floor:
                raise ValueError(f"tau: expected an initial temperature >= tau_floor = {self.tau_floor}, got {start!r}")
            self.tau = nn.Parameter(torch.tensor(start))
        else:
            self.radius = _check_radius(radius)
            self.eta = nn.Parameter(torch.tensor(_check_start("eta", eta)))

    @property
    def weights(self):
        """``[B]`` detached weights of the last batch: the objective's gradient in ``loss`` (None before a call)."""
        return self._weights

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the learned ``tau`` to ``[tau_floor, inf)`` in place (``"kl_constrained"``; else nothing)."""
        if self.form == "kl_constrained":
            self.tau.clamp_(min=self.tau_floor)

    def _apply(self, fn, recurse=True):
        # u is a scalar kept in float64 (a .half() or .float() must not round it); it follows the device.
        u = getattr(self, "u", None)
        super()._apply(fn, recurse)
        if u is not None and self.u.dtype != torch.float64:
            self.u = u.to(device=self.u.device)
        return self

    def forward(self, loss, ref_loss=None) -> torch.Tensor:
        """One step: the objective of the batch, with ``u`` and ``weights`` updated.

        Args:
            loss: ``[B]`` per-sample losses of the target (with gradient).
            ref_loss: ``[B]`` per-sample losses of the reference on the same samples (detached inside), or None.

        Returns:
            0-dim objective: value the risk estimate, gradient the stochastic estimate (in ``loss`` and the
            learnable scalar).
        """
        h = _rho_loss(loss, ref_loss)              # every check first: a call that raises changes nothing
        self.project_()
        step = {"cvar": self._cvar, "kl": self._kl, "kl_constrained": self._kl_constrained, "chi2": self._chi2}
        objective, weights, u_new = step[self.form](h)
        if u_new is not None:
            with torch.no_grad():
                self.u.copy_(u_new)
        self._weights = weights.detach()
        return objective

    def _cvar(self, h):
        mu = self.mu.to(h.dtype)
        objective, weights = _cvar_objective(h, mu, _top_fraction(self.alpha, h.numel()))
        return objective, weights, None

    def _log_inner(self, h_over_tau):
        """``log mean exp(h / tau)`` of the batch and its moving average ``u``."""
        log_inner = torch.logsumexp(h_over_tau, dim=0) - math.log(h_over_tau.numel())
        return ma_update(self.u, log_inner, self.gamma)

    def _kl(self, h):
        h_over_tau = h.detach() / self.tau
        u_new = self._log_inner(h_over_tau)
        weights = torch.exp(h_over_tau - u_new) / h.numel()
        return _value_with_gradient(self.tau * u_new, (weights * h).sum()), weights, u_new

    def _kl_constrained(self, h):
        tau = self.tau.detach().to(h.dtype)
        h_over_tau = h.detach() / tau
        u_new = self._log_inner(h_over_tau)
        weights = torch.exp(h_over_tau - u_new) / h.numel()
        grad_tau = u_new + self.radius - (weights * h.detach()).sum() / tau
        surrogate = (weights * h).sum() + grad_tau * self.tau.to(h.dtype)
        return _value_with_gradient(tau * (u_new + self.radius), surrogate), weights, u_new

    def _chi2(self, h):
        eta = self.eta.detach().to(h.dtype)
        excess = (h.detach() - eta).clamp_min(0.0)
        log_inner = torch.logsumexp(2.0 * torch.log(excess), dim=0) - math.log(h.numel())  # log mean excess^2
        u_new = ma_update(self.u, log_inner, self.gamma)
        root_inner = torch.exp(0.5 * u_new)                              # sqrt of the estimated mean
        inv_root = torch.where(root_inner > 0, 1.0 / root_inner, torch.zeros_like(root_inner))
        scale = math.sqrt(1.0 + 2.0 * self.radius)
        weights = scale * excess * inv_root / h.numel()
        surrogate = (weights * h).sum() + (1.0 - weights.sum()) * self.eta.to(h.dtype)
        return _value_with_gradient(eta + scale * root_inner, surrogate), weights, u_new

    def extra_repr(self) -> str:
        if self.form == "cvar":
            return f"form='cvar', alpha={self.alpha}, mu={self.mu.item():.6g}"
        u = float(self.u)
        state = f"u={u:.6g}" + (" (unset)" if u == 0 or not math.isfinite(u) else "")
        if self.form == "kl":
            return f"form='kl', tau={self.tau}, gamma={self.gamma}, {state}"
        if self.form == "kl_constrained":
            return (f"form='kl_constrained', radius={self.radius}, gamma={self.gamma}, "
                    f"tau={self.tau.item():.6g}, tau_floor={self.tau_floor}, {state}")
        return f"form='chi2', radius={self.radius}, gamma={self.gamma}, eta={self.eta.item():.6g}, {state}"
