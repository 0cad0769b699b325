"""SPEC.md part 2, stated once: an independent float64 oracle of the rest of the family, for the tests only.

Written from SPEC's formulas with dense ``[B, N]`` NumPy matrices and closed-form gradients; it shares no
code with the package (no import of ``drrho_kernels``). It builds on part 1's pieces in ``spec_oracle``
instead of restating them: the inputs are the same :class:`spec_oracle.Case` (rows ``img``/``txt`` at
``offset`` among the columns ``img_all``/``txt_all``; columns ``None`` means one process, ``N = B``), built
with :func:`spec_oracle.make_case`; the margins, the negatives, ``l = log(eps + g)``, the moving average,
the per-direction statistics ``A``, ``U``, ``w`` and the weighted-margin gradients are part 1's.
Gradients are returned as ``spec_oracle.pack`` does: one process -> ``d_img``/``d_txt`` hold rows and
columns together; distributed shape -> ``d_img``/``d_txt`` are the row terms and ``d_img_all``/``d_txt_all``
the column terms (what an all-gather with gradient would send back to the owners), unless a function
says otherwise.

Contents
--------
- 2.1 :func:`global_oracle`: the global-temperature forms (``multiply_tau`` is part 1 itself:
  :func:`spec_oracle.oracle`; ``no_multiply_tau``; ``per_direction``), value, new ``u`` and gradients;
  :func:`sogclr_gamma`, the authors' gamma schedule.
- 2.1 :func:`individual_oracle`: one step of per-sample temperatures (iSogCLR / FastCLIP-v2), exactly as
  fast_clip's ``FastCLIPLossIndividual.local()`` + ``forward()`` driven by fast_clip's ``train.py`` in
  an initialised process group (see its docstring for every rule, and where SPEC's text differs).
- 2.2 :func:`distill_oracle` and :func:`sogclr_oracle` (the authors' ``SogCLRLoss`` total: contrastive
  part + ``lambda * D`` [``/ s_``]).
- 2.3 :func:`per_sample_oracle` (per-anchor outputs) and :func:`jest_oracle` (the authors'
  ``jointly_sample_batch_softmax`` as plain dense code).
- 2.4 DRRho risk: independent solvers of the primal problems (:func:`primal_cvar`, :func:`primal_ball`,
  scipy's ``linprog`` and SLSQP, imported when called), the divergences, the duals and their minimisers
  (:func:`kl_dual_minimizer`, :func:`chi2_dual_minimizer`), never the package's formulas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from spec_oracle import (Case, array, columns, log_mean_exp_negatives, margin_gradients, margins, negatives, oracle,
                         pack, statistics)

FORMS = ("multiply_tau", "no_multiply_tau", "per_direction")


def sogclr_gamma(epoch: int, gamma: float, schedule: str = "cosine", decay_epochs: int = 10) -> float:
    """The authors' ``adjust_gamma`` (SogCLRLoss and fast_clip alike): 1 in epoch 0, then gamma, or a cosine
    from 1 down to gamma over ``decay_epochs`` epochs."""
    if epoch == 0:
        return 1.0
    if epoch >= decay_epochs or schedule != "cosine":
        return gamma
    return 0.5 * (1 + math.cos(math.pi * epoch / decay_epochs)) * (1 - gamma) + gamma


# ------------------------------------------------------------------------------- 2.1 global temperatures
def global_oracle(case: Case, form: str = "multiply_tau", scale_txt: float | None = None,
                  frozen: dict | None = None) -> dict:
    """SPEC 2.1, global temperature: value, new ``u`` and gradients (w and the new u held constant).

    ``form``:
      - ``"multiply_tau"``: part 1, ``L = (A_I + A_T)/s_ + rho/s + (U_I + U_T)/(2s)``: :func:`spec_oracle.oracle`.
      - ``"no_multiply_tau"``: ``SogCLRLoss(multiply_tau=False)``: ``L = A_I + A_T``; ``rho`` unused.
      - ``"per_direction"``: ``L = sum_k [A_k/s_k_ + U_k/s_k + rho/s_k]`` with ``s_I = case.logit_scale``,
        ``s_T = scale_txt`` (default ``s_I``); ``d^k = s_k a^k``; ``u^k`` from its own ``d^k``.

    ``A_k = (1/(B(N-1))) sum_ij w^k_ij d^k_ij``, ``U_k = mean_i u^k_i`` (new u), ``w^k = exp(d^k - u^k)``
    off the positive (:func:`spec_oracle.statistics`). Embedding gradients: :func:`spec_oracle.margin_gradients`
    with ``kappa_k = s_k`` for ``no_multiply_tau``, else 1. Scale gradients:

        dL/ds   = (A_I + A_T - rho - (U_I + U_T)/2) / s^2      multiply_tau
                = (A_I + A_T) / s                              no_multiply_tau
        dL/ds_k = (A_k - U_k - rho) / s_k^2                    per_direction (d_s = their sum: one tensor)

    ``frozen`` (``{"u_img", "u_txt", "w_img", "w_txt", "s_img_", "s_txt_"}`` from an earlier call) holds u,
    w and the detached scales fixed, so that finite differences of ``loss`` check the gradients.
    Returns float64 NumPy: ``loss``, ``u_img``, ``u_txt`` (new), ``l_img``, ``l_txt`` (log(eps + g)),
    ``A_img``, ``A_txt``, ``U_img``, ``U_txt``, ``w_img``, ``w_txt``, ``s_img_``, ``s_txt_``, the embedding
    gradients, ``d_s`` and (per_direction) ``d_s_img``, ``d_s_txt``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if scale_txt is not None and form != "per_direction":
        raise ValueError("scale_txt is only defined for form='per_direction'")
    if form == "multiply_tau":
        return oracle(case, frozen)                                    # part 1 itself
    st = statistics(case, scale_txt=scale_txt, frozen=frozen)
    sI, sT = st["s_img"], st["s_txt"]
    AI, AT, UI, UT = st["A_img"], st["A_txt"], st["U_img"], st["U_txt"]
    out = {k: st[k] for k in ("u_img", "u_txt", "l_img", "l_txt", "A_img", "A_txt", "U_img", "U_txt", "w_img",
                              "w_txt")}
    out.update(s_img_=sI, s_txt_=sT)
    kappa = 1.0
    if form == "no_multiply_tau":
        out["loss"] = AI + AT
        out["d_s"] = (AI + AT) / sI
        kappa = sI
    else:
        # the detached scales s_ (frozen: held at the base point, like w and u)
        sI_, sT_ = (sI, sT) if frozen is None else (frozen["s_img_"], frozen["s_txt_"])
        rho = case.rho
        out["loss"] = (AI / sI_ + (UI + rho) / sI) + (AT / sT_ + (UT + rho) / sT)
        out["d_s_img"] = (AI - UI - rho) / sI ** 2
        out["d_s_txt"] = (AT - UT - rho) / sT ** 2
        out["d_s"] = out["d_s_img"] + out["d_s_txt"]
    return pack(out, st["single"], *margin_gradients(st, kappa, kappa))


# ------------------------------------------------------------------------------------ 2.2 distillation
def _log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))


def distill_oracle(case: Case, teacher_scale: float = 100.0, student_scale: float | None = None) -> dict:
    """SPEC 2.2: ``D = 1/2 [mean_i H(p^I_i, q^I_i) + mean_i H(p^T_i, q^T_i)]`` over all N columns.

    ``q^I_i = softmax_j(s <x_i, T_j>)`` (student: the target embeddings, ``s = student_scale`` or
    ``case.logit_scale``, gets a gradient), ``p^I_i = softmax_j(t_d <xr_i, Tr_j>)`` (teacher: the case's
    reference embeddings, ``t_d`` constant); the text direction swaps the roles. Closed forms with
    ``G^k = s (q^k - p^k) / (2B)`` and ``z^I = x T^T``, ``z^T = t X^T``:

        dD/dx_i = sum_j G^I_ij T_j,   dD/dt_i = sum_j G^T_ij X_j
        dD/dT_j = sum_i G^I_ij x_i,   dD/dX_j = sum_i G^T_ij t_i
        dD/ds   = (1/(2B)) sum_ij [(q^I - p^I) z^I + (q^T - p^T) z^T]_ij

    Returns ``loss`` (= D), ``ce_img``, ``ce_txt`` (per-anchor cross-entropies), the gradients (packed as
    everywhere in this module) and ``d_s``.
    """
    if case.ref_img is None:
        raise ValueError("distillation needs the reference (teacher) embeddings ref_img/ref_txt")
    single, x, t, X, T, xr, tr, Xr, Tr = columns(case)
    B = x.shape[0]
    s = float(case.logit_scale if student_scale is None else student_scale)
    zI, zT = x @ T.T, t @ X.T
    pI = np.exp(_log_softmax(teacher_scale * (xr @ Tr.T)))
    pT = np.exp(_log_softmax(teacher_scale * (tr @ Xr.T)))
    lqI, lqT = _log_softmax(s * zI), _log_softmax(s * zT)
    ceI, ceT = -(pI * lqI).sum(1), -(pT * lqT).sum(1)
    qI, qT = np.exp(lqI), np.exp(lqT)
    GI, GT = s * (qI - pI) / (2 * B), s * (qT - pT) / (2 * B)
    out = dict(loss=0.5 * (ceI.mean() + ceT.mean()), ce_img=ceI, ce_txt=ceT,
               d_s=(((qI - pI) * zI).sum() + ((qT - pT) * zT).sum()) / (2 * B))
    return pack(out, single, GI @ T, GT @ X, GT.T @ t, GI.T @ x)


def sogclr_oracle(case: Case, multiply_tau: bool = True, distill_weight: float | None = None,
                  teacher_scale: float = 100.0, student_scale: float | None = None,
                  loss_weight: float = 1.0) -> dict:
    """What the authors' ``SogCLRLoss.forward`` returns, as train.py sums it.

    ``contrastive = loss_weight * L`` (``L`` of :func:`global_oracle`, form multiply_tau or no_multiply_tau,
    scale ``case.logit_scale``); with ``distill_weight`` (lambda) set, ``distill = lambda * D / s_``
    (multiply_tau, ``s_`` = the *contrastive* scale detached) or ``lambda * D``, ``D`` of
    :func:`distill_oracle` with the student scale ``student_scale`` (default: the contrastive scale: the
    same tensor) and the teacher's ``teacher_scale`` (train.py: ``--distill_logit_scale``, default 100).
    ``total = contrastive + distill``. Gradients are those of ``total``; ``d_s`` is w.r.t. the contrastive
    scale tensor (plus the student's when they are the same tensor), ``d_s_student`` w.r.t. a separate
    student scale. New ``u`` as in part 1.
    """
    form = "multiply_tau" if multiply_tau else "no_multiply_tau"
    g = global_oracle(case, form)
    out = dict(contrastive=loss_weight * g["loss"], u_img=g["u_img"], u_txt=g["u_txt"])
    keys = [k for k in ("d_img", "d_txt", "d_img_all", "d_txt_all") if k in g]
    for k in keys:
        out[k] = loss_weight * g[k]
    out["d_s"] = loss_weight * g["d_s"]
    if distill_weight is None:
        out["distill"] = 0.0
    else:
        D = distill_oracle(case, teacher_scale, student_scale)
        f = distill_weight / (float(case.logit_scale) if multiply_tau else 1.0)
        out["distill"] = f * D["loss"]
        out["D"] = D["loss"]
        for k in keys:
            out[k] = out[k] + f * D[k]
        if student_scale is None:
            out["d_s"] = out["d_s"] + f * D["d_s"]
        else:
            out["d_s_student"] = f * D["d_s"]
    out["total"] = out["contrastive"] + out["distill"]
    return out


# ------------------------------------------------------------------------ 2.1 individual temperatures
@dataclass
class TauState:
    """Per-sample state of one direction, one entry per sample of the global batch (float64 arrays)."""

    tau: np.ndarray
    u: np.ndarray
    b: np.ndarray
    m: np.ndarray
    v: np.ndarray

    @staticmethod
    def fresh(n: int, tau_init: float = 0.07) -> "TauState":
        """fast_clip's initial tables: tau = tau_init, u = b = m = v = 0."""
        z = np.zeros(n)
        return TauState(np.full(n, float(tau_init)), z.copy(), z.copy(), z.copy(), z.copy())

    def take(self, idx) -> "TauState":
        idx = np.asarray(idx)
        return TauState(self.tau[idx].copy(), self.u[idx].copy(), self.b[idx].copy(), self.m[idx].copy(),
                        self.v[idx].copy())

    def put(self, idx, other: "TauState") -> None:
        idx = np.asarray(idx)
        for name in ("tau", "u", "b", "m", "v"):
            getattr(self, name)[idx] = getattr(other, name)


def _individual_step(a, st: TauState, *, gamma, eps, rho, epoch, beta1, beta2, lr_tau, eps_tau,
                     tau_min, tau_max, grad_clamp):
    """fast_clip ``local()`` for one direction, every anchor of the global batch ([N, N] margins ``a``)."""
    N = a.shape[0]
    neg = negatives(N, N, 0)
    s = 1.0 / st.tau
    d = s[:, None] * a
    b_new = np.maximum(st.b, d.max(axis=1))               # all columns, the positive (a ~ 0) included
    e = np.exp(d - b_new[:, None]) * neg
    g = e.sum(1) / (N - 1)
    u = (1.0 - gamma) * st.u * np.exp(st.b - b_new) + gamma * g
    if gamma < 1.0:
        bad = (st.u < 1e-35) | ~np.isfinite(st.u)
        u = np.where(bad, g, u)
    grad = -(e * d).sum(1) / (u + eps) / (N - 1) + np.log(u + eps) + b_new + rho
    grad = np.clip(grad, -grad_clamp, grad_clamp)
    b1, b2 = (0.0, 0.0) if epoch == 0 else (beta1, beta2)
    m = b1 * st.m + (1.0 - b1) * grad
    v = b2 * st.v + (1.0 - b2) * grad ** 2
    m_hat = m / (1.0 - b1 ** (epoch + 1))
    v_hat = v / (1.0 - b2 ** (epoch + 1))
    tau = np.clip(st.tau - lr_tau * m_hat / (np.sqrt(v_hat) + eps_tau), tau_min, tau_max)
    return dict(s=s, e=e, g=g, state=TauState(tau, u, b_new, m, v), grad=grad)


def _individual_value(x, t, X, T, xr, tr, Xr, Tr, offset, sI, sT, bI, bT, uI, uT, eps):
    """fast_clip's returned loss for the rows at ``offset``, with its autograd dependencies:
    rows (x, t) variable; gathered columns (X, T, references) constant; scales (old tau), new bounds and
    new u constant. Returns the value and the closed-form gradients w.r.t. x and t."""
    B, N = x.shape[0], X.shape[0]
    rows = offset + np.arange(B)
    # loss1: the rows as anchors against the gathered columns.
    aI, aT = margins(x, t, X, T, xr, tr, Xr, Tr)
    neg = negatives(B, N, offset)
    PI = np.exp(sI[rows, None] * aI - bI[rows, None]) * neg / (uI[rows, None] + eps)
    PT = np.exp(sT[rows, None] * aT - bT[rows, None]) * neg / (uT[rows, None] + eps)
    loss1 = (PI.sum() + PT.sum()) / (N - 1) / B
    # loss2: every column of the global batch as an anchor (its own old tau, new bound, new u) against the
    # rows as negatives; the rows enter only through <X_j, t_i> / <T_j, x_i> (the anchors' diagonal terms
    # come from the gathered copies).
    posN = np.einsum("jd,jd->j", X, T)
    cI = X @ t.T - posN[:, None]                           # [N, B]: image anchor j, text negative i
    cT = T @ x.T - posN[:, None]
    if xr is not None:
        rposN = np.einsum("jd,jd->j", Xr, Tr)
        cI = cI - (Xr @ tr.T - rposN[:, None])
        cT = cT - (Tr @ xr.T - rposN[:, None])
    negc = neg.T
    QI = np.exp(sI[:, None] * cI - bI[:, None]) * negc / (uI[:, None] + eps)
    QT = np.exp(sT[:, None] * cT - bT[:, None]) * negc / (uT[:, None] + eps)
    loss2 = (QI.sum() + QT.sum()) / (B * (N - 1))
    value = 0.5 * (loss1 + loss2)
    c = 1.0 / (2 * B * (N - 1))
    WI, WT = PI * sI[rows, None], PT * sT[rows, None]
    VI, VT = QI * sI[:, None], QT * sT[:, None]
    d_x = c * (WI @ T - WI.sum(1)[:, None] * t - WT.sum(1)[:, None] * t + VT.T @ T)
    d_t = c * (WT @ X - WT.sum(1)[:, None] * x - WI.sum(1)[:, None] * x + VI.T @ X)
    return value, d_x, d_t


def individual_oracle(case: Case, state_img: TauState, state_txt: TauState, *, epoch: int, lr_tau: float,
                      beta1: float = 0.9, beta2: float = 0.999, eps_tau: float = 1e-8, tau_min: float = 0.01,
                      tau_max: float = 1.0, grad_clamp: float = 5.0, frozen: dict | None = None) -> dict:
    """One step of per-sample temperatures (SPEC 2.1 "individual"), exactly as fast_clip computes it.

    Authority: Optimization-AI/fast_clip ``FastCLIPLossIndividual`` (``local()`` then ``forward()``) driven
    by its ``train.py`` in an initialised process group. ``gamma``, ``eps``, ``rho`` and the embeddings come
    from ``case`` (``case.u_img``/``u_txt`` and ``logit_scale`` are not used: this loss keeps its own
    linear-domain ``u``); ``state_img`` / ``state_txt`` hold the tables' entries of the N samples of the
    global batch (the columns, in column order; one process: the B rows) before the step, per direction
    (image anchors, text anchors). Every anchor ``n`` of the global batch, direction k:

        s_n   = 1 / tau_n                                                     (tau before this step)
        d_nj  = s_n a_nj                   (a: SPEC's margin, RHO-shifted when the case has references)
        b'_n  = max(b_n, max_j d_nj)       all N columns, the positive (d ~ 0) included: b' >= 0 from b = 0
        e_nj  = exp(d_nj - b'_n) for j != n,  g_n = (1/(N-1)) sum_j e_nj
        u'_n  = (1 - gamma) u_n exp(b_n - b'_n) + gamma g_n;  if gamma < 1 and (u_n < 1e-35 or u_n not
                finite): u'_n = g_n   (no reset when gamma == 1: a non-finite u then gives NaN, 0 * inf)
        grad_n = clamp(-(1/(N-1)) sum_j e_nj d_nj / (u'_n + eps) + log(u'_n + eps) + b'_n + rho, +-grad_clamp)
        betas = (0, 0) in epoch 0, else (beta1, beta2);   m' = beta1 m + (1 - beta1) grad,
        v' = beta2 v + (1 - beta2) grad^2;   m_hat = m' / (1 - beta1^(epoch+1)),  v_hat likewise
        tau'_n = clamp(tau_n - lr_tau m_hat / (sqrt(v_hat) + eps_tau), tau_min, tau_max)

    (the bias correction counts epochs, not steps; u, b are updated before the gradient of tau, which uses
    the new u and b'). The loss value the process returns, for its rows R at ``offset`` (B of them):

        L_R = 1/2 [ (1/B) sum_{i in R} (g^I_i/(u'^I_i + eps) + g^T_i/(u'^T_i + eps))
                  + (1/(B(N-1))) sum_{n in N} sum_{i in R, i != n} (e^I_{n,i}/(u'^I_n + eps)
                                                                     + e^T_{n,i}/(u'^T_n + eps)) ]

    the second half being "the same sums seen from the columns": column anchors with *their* old tau,
    new b' and new u' (gathered), against this process's rows. No rho and no tau factor in the value.
    Gradients (returned ``d_img``, ``d_txt``: w.r.t. the rows only) are fast_clip's: the first half
    differentiates through the rows as anchors (x_i, and t_i in <x_i, t_i>), the second only through the
    rows as negatives (<X_n, t_i>, <T_n, x_i>); gathered columns, b', u', tau are constants. With
    ``W = N/B`` processes the data-parallel mean gradient is therefore *half* the gradient of the value
    (mean over processes) w.r.t. all embeddings. Without an initialised process group fast_clip's gather
    returns the features themselves, with their gradient: one process then gets exactly twice ``d_img``.

    Returns ``loss``, ``d_img``, ``d_txt`` and, per direction ``img``/``txt`` for all N samples:
    ``tau_*``, ``u_*``, ``b_*``, ``m_*``, ``v_*`` (new), ``grad_tau_*``, ``g_*``; ``frozen`` (pass it back
    to hold scales, b' and u' fixed for finite differences of ``loss``).
    """
    single, x, t, X, T, xr, tr, Xr, Tr = columns(case)
    N = X.shape[0]
    if len(state_img.tau) != N or len(state_txt.tau) != N:
        raise ValueError(f"states must have one entry per column (N = {N})")
    kw = dict(gamma=case.gamma, eps=case.eps, rho=case.rho, epoch=epoch, beta1=beta1, beta2=beta2,
              lr_tau=lr_tau, eps_tau=eps_tau, tau_min=tau_min, tau_max=tau_max, grad_clamp=grad_clamp)
    if frozen is None:
        aI, aT = margins(X, T, X, T, Xr, Tr, Xr, Tr)          # every sample of the global batch as an anchor
        stI, stT = _individual_step(aI, state_img, **kw), _individual_step(aT, state_txt, **kw)
        frozen = dict(sI=stI["s"], sT=stT["s"], bI=stI["state"].b, bT=stT["state"].b, uI=stI["state"].u,
                      uT=stT["state"].u)
    else:
        stI = stT = None
    value, d_x, d_t = _individual_value(x, t, X, T, xr, tr, Xr, Tr, case.offset, eps=case.eps, **frozen)
    out = dict(loss=value, d_img=d_x, d_txt=d_t, frozen=frozen)
    for k, st in (("img", stI), ("txt", stT)):
        if st is not None:
            new = st["state"]
            out.update({f"tau_{k}": new.tau, f"u_{k}": new.u, f"b_{k}": new.b, f"m_{k}": new.m,
                        f"v_{k}": new.v, f"grad_tau_{k}": st["grad"], f"g_{k}": st["g"], f"state_{k}": new})
    return out


# ---------------------------------------------------------------------------- 2.3 per-sample outputs
def per_sample_oracle(case: Case, teacher_scale: float = 100.0, ref_scale: float | None = None) -> dict:
    """SPEC 2.3's per-anchor values, as this module defines them (float64 arrays of length B):

    - ``l_img``, ``l_txt``: ``log(eps + g^k_i)`` of the RHO-shifted margins at scale s (not tau-multiplied);
    - ``u_img``, ``u_txt``: the new u (part 1's update);
    - ``target_img``, ``target_txt``: ``(1/s) log(eps + (1/N) sum_{j != p(i)} exp(s a^target_ij))``,
      the target model's own contrastive loss of anchor i (margins without the reference terms);
    - ``ref_img``, ``ref_txt``: the same for the reference model's margins at ``ref_scale`` (default s, the
      scale at which the shift uses them), ``(1/ref_scale) log(eps + ...)``; no reference: absent;
    - ``ce_img``, ``ce_txt``: the distillation cross-entropies ``H(p^k_i, q^k_i)`` (teacher at
      ``teacher_scale``), when the case has references.

    Note that ``l`` is not ``(target - ref) * s``: the shift is inside the exponent, pair by pair.
    """
    single, x, t, X, T, xr, tr, Xr, Tr = columns(case)
    B, N = x.shape[0], X.shape[0]
    s = float(case.logit_scale)
    neg = negatives(B, N, case.offset)
    g = statistics(case)
    out = dict(l_img=g["l_img"], l_txt=g["l_txt"], u_img=g["u_img"], u_txt=g["u_txt"])
    aI, aT = margins(x, t, X, T)
    out["target_img"] = log_mean_exp_negatives(s * aI, neg, case.eps) / s
    out["target_txt"] = log_mean_exp_negatives(s * aT, neg, case.eps) / s
    if xr is not None:
        sr = s if ref_scale is None else float(ref_scale)
        rI, rT = margins(xr, tr, Xr, Tr)
        out["ref_img"] = log_mean_exp_negatives(sr * rI, neg, case.eps) / sr
        out["ref_txt"] = log_mean_exp_negatives(sr * rT, neg, case.eps) / sr
        D = distill_oracle(case, teacher_scale)
        out.update(ce_img=D["ce_img"], ce_txt=D["ce_txt"])
    return out


# ------------------------------------------------------------------------------ 2.3 JEST selection
def jest_draws(b: int, n_chunks: int, filter_ratio: float) -> int:
    """Pairs drawn per chunk: the authors' ``int(b * (100 - filter_ratio * 100) / 100 / n_chunks)`` (floors;
    ``n_chunks * draws`` can fall short of train.py's ``int(b * (100 - filter_ratio * 100) / 100)``)."""
    return int(b * (100 - filter_ratio * 100) / 100 / n_chunks)


def _masked_lse(z, cols):
    zm = np.where(cols[None, :], z, -np.inf)
    m = zm.max(axis=1)
    return m + np.log(np.exp(zm - m[:, None]).sum(axis=1))


def jest_oracle(ref_img, ref_txt, img, txt, *, learner_scale: float, ref_scale: float = 100.0,
                world_size: int = 1, n_chunks: int = 2, filter_ratio: float = 0.8, topk: bool = False,
                generators=None) -> list[dict]:
    """The authors' ``jointly_sample_batch_softmax`` (DRRho-CLIP train.py; arXiv 2406.17711), dense.

    Inputs: the global batch's reference and learner embeddings ``[N, d]`` (rank r's local batch is rows
    ``r*b .. (r+1)*b``, ``b = N / world_size``), learner scale ``t_l`` (train.py: the model's logit_scale),
    reference scale ``t_r`` (train.py: 100.0), and one ``torch.Generator`` per rank (the authors draw from
    the global RNG: a generator seeded like ``torch.manual_seed`` replays it). Per rank, with i local:

        n     = int(b (100 - 100 f) / 100 / n_chunks)                              draws per chunk
        s_ii  = t_r <xr_i, tr_i> - t_l <x_i, t_i>        the diagonal of the score matrix ("learnability")
        chunk 1: multinomial without replacement, n draws, weights s_ii - min_i s_ii (always sampled,
                 even with topk; the minimum has weight 0)
        chunk c > 1, S = the pairs drawn so far by *all* ranks (global columns), sampled_i = i drawn here:
            lse^I_l(i) = log sum_{j in S} exp(t_l <x_i, T_j>),   lse^T_l(i) = log sum_{j in S} exp(t_l <t_i, X_j>)
            (reference alike with t_r), cond_i = s_ii + (lse^I_l + lse^T_l)/2 - (lse^I_r + lse^T_r)/2
            cond_i = -inf where sampled_i (the authors subtract 1e8)
            topk: the n largest cond (descending); else multinomial(exp(cond), n) without replacement
        returns the local indices, chunk by chunk (length n_chunks * n).

    Returns per rank ``dict(inds, diag, cond, n_draws)`` (``cond``: one array per later chunk).
    """
    R, Rt, X, T = (array(a) for a in (ref_img, ref_txt, img, txt))
    N = X.shape[0]
    if N % world_size:
        raise ValueError(f"N = {N} is not a multiple of world_size = {world_size}")
    b = N // world_size
    n = jest_draws(b, n_chunks, filter_ratio)
    if n <= 0:
        raise ValueError(f"b = {b}, filter_ratio = {filter_ratio}, n_chunks = {n_chunks} give {n} draws per chunk")
    if generators is None:
        generators = [torch.Generator().manual_seed(r) for r in range(world_size)]
    tl, tr_ = float(learner_scale), float(ref_scale)
    ranks = []
    for r in range(world_size):
        sl = slice(r * b, (r + 1) * b)
        diag = tr_ * np.einsum("id,id->i", R[sl], Rt[sl]) - tl * np.einsum("id,id->i", X[sl], T[sl])
        w = torch.from_numpy(diag - diag.min())
        inds = torch.multinomial(w, n, generator=generators[r]).numpy()
        ranks.append(dict(sl=sl, diag=diag, inds=[inds], cond=[]))
    for _ in range(n_chunks - 1):
        S = np.zeros(N, dtype=bool)
        for r, st in enumerate(ranks):
            S[r * b + np.concatenate(st["inds"])] = True
        for r, st in enumerate(ranks):
            sl = st["sl"]
            learner = 0.5 * (_masked_lse(tl * X[sl] @ T.T, S) + _masked_lse(tl * T[sl] @ X.T, S))
            ref = 0.5 * (_masked_lse(tr_ * R[sl] @ Rt.T, S) + _masked_lse(tr_ * Rt[sl] @ R.T, S))
            cond = st["diag"] + learner - ref
            cond[S[sl]] = -np.inf
            st["cond"].append(cond)
            ct = torch.from_numpy(cond)
            if topk:
                new = torch.topk(ct, n).indices.numpy()
            else:
                new = torch.multinomial(torch.exp(ct - ct.max()), n, generator=generators[r]).numpy()
            st["new"] = new
        for st in ranks:
            st["inds"].append(st.pop("new"))
    return [dict(inds=np.concatenate(st["inds"]), diag=st["diag"], cond=st["cond"], n_draws=n) for st in ranks]


# ------------------------------------------------------------------------------ 2.4 DRRho risk
# Independent solvers of the primal problems max_p sum_i p_i h_i over the form's set of weights (scipy's
# linprog for CVaR, SLSQP for the divergence balls), and the duals minimised by root finding: never the
# package's formulas. scipy is imported when they are called.

def kl_to_uniform(p) -> float:
    """``KL(p, 1/n) = sum_i p_i log(n p_i)``."""
    from scipy import special
    return float(special.xlogy(p, len(p) * p).sum())


def chi2_to_uniform(p) -> float:
    """``(1/n) sum_i (1/2)(n p_i - 1)^2``."""
    n = len(p)
    return float(np.mean(0.5 * (n * p - 1.0) ** 2))


def primal_cvar(h, alpha):
    """``max p.h`` over ``sum p = 1``, ``0 <= p <= 1 / (alpha n)``: a linear program. ``(value, p)``."""
    from scipy import optimize
    n = len(h)
    res = optimize.linprog(-h, A_eq=np.ones((1, n)), b_eq=[1.0], bounds=[(0.0, 1.0 / (alpha * n))] * n,
                           method="highs")
    assert res.status == 0, res.message
    return -res.fun, res.x


def primal_ball(h, radius, divergence):
    """``max p.h`` over the simplex with ``divergence(p) <= radius`` (``"kl"`` or ``"chi2"``), by SLSQP from the
    uniform weights. ``(value, p)``."""
    from scipy import optimize
    n = len(h)
    if divergence == "kl":
        div, div_grad, low = kl_to_uniform, (lambda p: np.log(n * p) + 1.0), 1e-12
    else:
        div, div_grad, low = chi2_to_uniform, (lambda p: n * p - 1.0), 0.0
    constraints = [dict(type="eq", fun=lambda p: p.sum() - 1.0, jac=lambda p: np.ones(n)),
                   dict(type="ineq", fun=lambda p: radius - div(p), jac=lambda p: -div_grad(p))]
    res = optimize.minimize(lambda p: -p @ h, np.full(n, 1.0 / n), jac=lambda p: -h, method="SLSQP",
                            bounds=[(low, 1.0)] * n, constraints=constraints, options=dict(ftol=1e-14, maxiter=2000))
    # status 8 ("positive directional derivative for linesearch"): SLSQP cannot improve at ftol = 1e-14 (seen
    # with scipy 1.17 at a tied maximum); accepted only where the point is feasible to 1e-10
    feasible = abs(res.x.sum() - 1.0) < 1e-10 and radius - div(res.x) > -1e-10 and res.x.min() >= low - 1e-12
    assert res.success or (res.status == 8 and feasible), res.message
    return float(res.x @ h), res.x


def kl_regularized(h, tau) -> float:
    """The KL-regularized form ``tau log((1/n) sum_i exp(h_i / tau))``."""
    from scipy import special
    return tau * (special.logsumexp(h / tau) - math.log(len(h)))


def kl_dual(h, radius, tau) -> float:
    """``tau log mean exp(h / tau) + tau r``: the KL-constrained dual at one temperature (weak duality bound)."""
    return kl_regularized(h, tau) + tau * radius


def kl_dual_minimizer(h, radius) -> float:
    """The temperature where the dual's derivative ``log mean e^(h/tau) - E_softmax[h] / tau + r`` vanishes.

    A root of the derivative (brentq, to machine precision), not a minimisation (only sqrt(eps)-precise).
    """
    from scipy import optimize, special

    def derivative(log_tau):
        tau = math.exp(log_tau)
        return special.logsumexp(h / tau) - math.log(len(h)) - special.softmax(h / tau) @ h / tau + radius
    return math.exp(optimize.brentq(derivative, -12, 12, xtol=1e-15, rtol=1e-15, maxiter=500))


def chi2_dual(h, radius, eta) -> float:
    """``eta + sqrt((1 + 2r) mean([h - eta]_+^2))``: the chi-square dual at one ``eta``."""
    return eta + math.sqrt((1 + 2 * radius) * np.mean(np.maximum(h - eta, 0.0) ** 2))


def chi2_dual_minimizer(h, radius) -> float:
    """The root of the dual's derivative ``1 - sqrt(1 + 2r) mean([h - eta]_+) / sqrt(mean([h - eta]_+^2))``."""
    from scipy import optimize

    def derivative(eta):
        excess = np.maximum(h - eta, 0.0)
        return 1.0 - math.sqrt(1 + 2 * radius) * excess.mean() / math.sqrt(np.mean(excess ** 2))
    top = h.max()
    return optimize.brentq(derivative, h.min() - 100.0, top - 1e-9 * max(1.0, abs(top)), xtol=1e-15, rtol=1e-15,
                           maxiter=500)


def risk_optimum_scalar(form, h, kw):
    """The optimal scalar of a stochastic risk form on ``h`` (CVaR's ``mu``: the ceil(k)-th largest ``h``;
    KL-constrained ``tau``, chi-square ``eta``: the duals' minimisers); None for the KL-regularized form."""
    if form == "cvar":
        k = kw["alpha"] * len(h)
        return np.sort(h)[::-1][math.ceil(k) - 1]
    if form == "kl_constrained":
        return kl_dual_minimizer(h, kw["radius"])
    if form == "chi2":
        return chi2_dual_minimizer(h, kw["radius"])
    return None
