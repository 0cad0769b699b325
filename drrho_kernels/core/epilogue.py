"""The epilogue: what follows the kernels, per anchor, written once for every backend (SPEC.md).

Everything here works on per-row vectors ``[B]`` or scalars, never on a ``[B, N]``
matrix: the moving-average rule for ``u`` (also the DRRho risk's), the ``log(eps + g)``
from online log-sum-exp statistics, the epilogue that turns the kernels' per-anchor
statistics into the new state and the backward's weights (:func:`finish`,
:func:`finish_extras`, :func:`finish_individual`), and the scalar loss with its slopes
(:func:`loss_and_slopes`).

The fused kernels (torch, Triton, C++) only reduce tiles: they return each anchor's
online statistics over its negatives. Everything per anchor that follows is
written once, here, for every backend.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "is_unset",
    "ma_update",
    "log_eps_plus_mean_exp",
    "finish",
    "finish_extras",
    "finish_individual",
    "loss_and_slopes",
]


def is_unset(u: torch.Tensor) -> torch.Tensor:
    """A stored ``u_i`` is unset when it is exactly 0, +-inf or NaN (the authors' state starts at 0):
    ``u / u`` is exactly 1 for a finite nonzero ``u`` (a correctly rounded division) and NaN otherwise, so
    this is ``u == 0 or not finite`` in two ops (a subnormal ``u`` under flush-to-zero counts as 0)."""
    return u / u != 1


def ma_update(u_old: torch.Tensor, l_new: torch.Tensor, gamma: float) -> torch.Tensor:
    """Log-domain moving average of SPEC.md.

    ``u <- l`` if ``gamma == 1`` or ``u`` is unset, else
    ``u <- log((1 - gamma) exp(u) + gamma exp(l))`` computed with ``logaddexp``.
    ``u_old`` is cast to the dtype of ``l_new`` (the accumulation dtype).
    """
    u_old = u_old.to(l_new.dtype)
    if gamma == 1.0:
        return l_new.clone()
    blended = torch.logaddexp(u_old + math.log1p(-gamma), l_new + math.log(gamma))
    return torch.where(is_unset(u_old), l_new, blended)


def log_eps_plus_mean_exp(row_max: torch.Tensor, row_sumexp: torch.Tensor, n_columns: int,
                          eps: float) -> torch.Tensor:
    """``l = log(eps + (1/N) sum_j exp(d_j))`` from online statistics.

    ``row_max`` is the running maximum of the ``d_j`` and ``row_sumexp = sum_j exp(d_j - row_max)``,
    so ``(1/N) sum_j exp(d_j) = exp(row_max + log(row_sumexp) - log(N))``; adding ``eps`` is a
    ``logaddexp`` with ``log(eps)``. No exponential of an unshifted number is formed.
    """
    log_mean = torch.log(row_sumexp).add_(row_max).sub_(math.log(n_columns))
    return torch.logaddexp(log_mean, torch.full_like(log_mean, math.log(eps)))


def finish(stats: torch.Tensor, u_old: torch.Tensor, n_columns: int, eps: float, gamma: float):
    """The epilogue of every fused backend, from the kernels' statistics ``[2, 3, B]``.

    ``stats[k]`` holds, for each anchor of direction ``k`` (0: image anchors, 1: text anchors), the
    online statistics over its negatives of ``d_j = s (S_j - m)``: ``M = max_j d_j``,
    ``E = sum_j exp(d_j - M)`` and ``F = sum_j exp(d_j - M) d_j``. With ``u_old`` ``[2, B]``::

        l     = log(eps + (1/N) sum_j exp(d_j))      u_new = MA(u_old, l)
        wsum  = sum_j w_j   = exp(M - u_new) E       with w_j = exp(d_j - u_new)
        wdsum = sum_j w_j d_j = exp(M - u_new) F

    Returns ``(u_new, wsum, wdsum)``, each ``[2, B]`` in the dtype of ``stats``.
    """
    top, sumexp, sumexp_d = stats[:, :3].unbind(1)
    u_new = ma_update(u_old, log_eps_plus_mean_exp(top, sumexp, n_columns, eps), gamma)
    scale = torch.exp(top - u_new)
    return u_new, scale * sumexp, scale * sumexp_d


def finish_extras(stats: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor, distill_scale: float,
                  n_columns: int, eps: float) -> dict:
    """Distillation terms and per-anchor losses from the statistics' rows 3.. (``_inputs.STATS``).

    With ``y``, ``z`` the target's and the reference's similarities, ``y_i``, ``z_i`` the pair's own
    (``positives``), ``s`` the anchor's scale and ``t_d`` the teacher's (SPEC 2.2, 2.3), per direction:

        lse_q = log sum_j exp(s y_j)            (all columns: the negatives' statistics plus the positive)
        lse_p = log sum_j exp(t_d z_j)          q = exp(s y - lse_q), p = exp(t_d z - lse_p)
        h     = H(p, q) = lse_q - s sum_j p_j y_j                     (the distillation cross-entropy)
        h_ds  = d h / d s = sum_j (q_j - p_j) y_j
        target = (1/s) log(eps + (1/N) sum_{j != p(i)} exp(s (y_j - y_i)))    (the target alone)
        reference = (1/s) log(eps + (1/N) sum_{j != p(i)} exp(s (z_j - z_i)))  (the reference alone)

    Returns a dict of ``[2, B]`` tensors (``lse_q``, ``lse_p``, ``h``, ``h_ds``, ``target``, ``reference``).
    """
    mt, et, ft, mp, ep, gp, mr, er, _ = stats[:, 3:12].unbind(1)
    y, z = positives[0], positives[1]
    s = scale.to(stats.dtype)
    # d = s (y_j - y_i) over the negatives; the positive adds exp(0) at the same shift.
    neg_t = mt + torch.log(et)
    lse_q = s * y + torch.logaddexp(neg_t, torch.zeros_like(neg_t))
    q_y = torch.exp(neg_t + s * y - lse_q) * (ft / et / s + y) + torch.exp(s * y - lse_q) * y
    neg_p = mp + torch.log(ep)
    lse_p = distill_scale * z + torch.logaddexp(neg_p, torch.zeros_like(neg_p))
    p_y = torch.exp(mp + distill_scale * z - lse_p) * gp + torch.exp(distill_scale * z - lse_p) * y
    return dict(lse_q=lse_q, lse_p=lse_p, h=lse_q - s * p_y, h_ds=q_y - p_y,
                target=log_eps_plus_mean_exp(mt, et, n_columns, eps) / s,
                reference=log_eps_plus_mean_exp(mr, er, n_columns, eps) / s)


RESET_BELOW = 1e-35      # the individual form restarts a linear-domain u below this (fast_clip's rule)


def finish_individual(stats: torch.Tensor, u_old: torch.Tensor, tau: torch.Tensor, bound: torch.Tensor,
                      m: torch.Tensor, v: torch.Tensor, n_columns: int, eps: float, gamma: float, rho: float,
                      options) -> dict:
    """The epilogue of per-sample temperatures (SPEC 2.1 "individual", fast_clip's FastCLIPLossIndividual).

    From the kernels' statistics of ``d_j = s_i a_ij`` (``s_i = 1/tau_i``, the temperature before the step)
    and the anchors' state ``[2, B]`` (linear-domain ``u``, bound ``b``, Adam moments ``m``, ``v``)::

        b'    = max(b, max_j d_j, 0)                (all columns: the positive's d = 0 counts)
        e_j   = exp(d_j - b'),  g = (1/(N-1)) sum_j e_j
        u'    = (1 - gamma) u exp(b - b') + gamma g   (u' = g if gamma == 1, or if u < 1e-35 or not finite)
        grad  = clamp(-(1/(N-1)) sum_j e_j d_j / (u' + eps) + log(u' + eps) + b' + rho, +-grad_clamp)
        Adam on tau with grad: betas 0 in epoch 0; bias correction 1 - beta^(epoch + 1)
        tau'  = clamp(tau - lr m_hat / (sqrt(v_hat) + eps_tau), tau_min, tau_max)

    The backward's weights are ``w_j = e_j / (u' + eps) = exp(d_j - log_norm)``, ``log_norm = b' + log(u' + eps)``.
    Returns ``u``, ``bound``, ``tau``, ``m``, ``v`` (new), ``log_norm``, ``wsum = sum_j w_j`` and
    ``wdsum = sum_j w_j d_j``, each ``[2, B]``.
    """
    top, sumexp, sumexp_d = stats.unbind(1)
    acc = stats.dtype
    u_old, bound, tau, m, v = (x.to(acc) for x in (u_old, bound, tau, m, v))
    new_bound = torch.maximum(bound, top.clamp_min(0.0))
    shift = torch.exp(top - new_bound)
    e_sum, ed_sum = sumexp * shift, sumexp_d * shift
    g = e_sum / (n_columns - 1)
    blend = (1.0 - gamma) * u_old * torch.exp(bound - new_bound) + gamma * g
    reset = ~torch.isfinite(u_old) | (u_old < RESET_BELOW)
    u_new = g.clone() if gamma == 1.0 else torch.where(reset, g, blend)
    denom = u_new + eps
    grad = (-(ed_sum / (n_columns - 1)) / denom + torch.log(denom) + new_bound + rho).clamp(
        -options.grad_clamp, options.grad_clamp)
    beta1, beta2 = (0.0, 0.0) if options.epoch == 0 else (options.beta1, options.beta2)
    m_new = beta1 * m + (1.0 - beta1) * grad
    v_new = beta2 * v + (1.0 - beta2) * grad * grad
    m_hat = m_new / (1.0 - beta1 ** (options.epoch + 1))
    v_hat = v_new / (1.0 - beta2 ** (options.epoch + 1))
    tau_new = (tau - options.lr * m_hat / (torch.sqrt(v_hat) + options.eps)).clamp(options.tau_min, options.tau_max)
    return dict(u=u_new, bound=new_bound, tau=tau_new, m=m_new, v=v_new, log_norm=new_bound + torch.log(denom),
                wsum=e_sum / denom, wdsum=ed_sum / denom)


def loss_and_slopes(kind: str, multiply_tau: bool, s_img, s_txt, wdsum: torch.Tensor, u_new: torch.Tensor,
                    rho: float, n_columns: int, h: torch.Tensor | None = None, wsum: torch.Tensor | None = None,
                    distill_weight: float = 0.0):
    """The scalar loss of the temperature form (SPEC 2.1) and its slopes, the weights and ``u`` held constant
    (SPEC: "gradients ... with w and the new u held constant"): ``(loss, dL/dphi, dL/dH, direct)``.

    ``phi_k = sum_i wdsum[k, i] = sum_ij w^k_ij d^k_ij`` and ``H_k = sum_i h[k, i]`` (the distillation
    cross-entropies; ``h`` None: none). With ``A_k = phi_k / (B (N-1))``, ``D_k = H_k / (2B)``,
    ``U_k = mean_i u^k_i`` and ``s_k`` the direction's scale (``s_img``, ``s_txt``: 0-d; the global form's
    ``s_txt`` is None; the per-sample temperatures have none)::

        form                 loss                                           dL/dphi_k, dL/dH_k          direct dL/ds_k
        global, multiply     (A_I + A_T + lambda (D_I + D_T) + rho + (U_I + U_T)/2) / s
                                                                            (1/(B(N-1)), lambda/(2B))/s  -(rho + (U_I+U_T)/2)/s^2
        per direction, mult. sum_k (A_k + lambda D_k + U_k + rho) / s_k     (1/(B(N-1)), lambda/(2B))/s_k  -(U_k + rho)/s_k^2
        no multiply_tau      A_I + A_T + lambda (D_I + D_T)                 (1/(B(N-1)), lambda/(2B))    none
        individual           (1/(B(N-1))) sum_ki wsum_ki                    (1/(2 B(N-1)), 0)            none

    The slopes are numbers, 0-d tensors or ``[2, 1]`` columns (per direction); ``direct`` is None, a 0-d tensor
    (global: the derivative in ``s``) or ``[2]``. ``phi``'s own dependence on the scales (``d = s a``) is the
    loss op's business (``core/ops.py``). Individual: fast_clip's gradient, both halves (anchors and
    negatives) each half of the full derivative. The global form's first term divides by a detached ``s``,
    as the authors' loss does. No tensor is made from host data (this runs in every step: no wait on the
    device); a handful of ops, as a small step's host time is their count.
    """
    batch = u_new.shape[-1]
    per_pair = 1.0 / (batch * (n_columns - 1))
    distill = distill_weight / (2 * batch) if h is not None else 0.0
    if kind == "individual":
        return wsum.sum() * per_pair, 0.5 * per_pair, 0.0, None
    if kind == "global" or not multiply_tau:
        terms = wdsum.sum() * per_pair
        if distill:
            terms = terms.add_(h.sum(), alpha=distill)
        if not multiply_tau:
            return terms, per_pair, distill, None
        inv = s_img.to(terms.dtype).reciprocal()
        rest = u_new.sum().mul_(0.5 / batch).add_(rho)                     # rho + (U_I + U_T) / 2
        return (terms + rest) * inv, inv * per_pair, inv * distill if distill else 0.0, rest.mul_(inv).mul_(inv).neg_()
    terms = wdsum.sum(-1).mul_(per_pair)
    if distill:
        terms = terms.add_(h.sum(-1), alpha=distill)
    inv = torch.stack([s_img, s_txt]).to(terms.dtype).reciprocal_()
    rest = u_new.mean(-1).add_(rho)                                         # U_k + rho
    slope = inv[:, None]
    return (((terms + rest) * inv).sum(), slope * per_pair, slope * distill if distill else 0.0,
            rest.mul_(inv).mul_(inv).neg_())
