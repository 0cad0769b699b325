"""``drrho_clip_loss``: the functional API, and the one path every fused evaluation takes.

    options (``validate.check_options``) -> tensors (``validate.validate``) -> backend (``backends.resolve``)
      ->  forward op: per-anchor statistics (``core.ops.forward``)
      ->  epilogue: new u, weights (``core.epilogue.finish``)
      ->  loss op: the loss with its closed-form backward (``core.ops.loss``)  ->  the new state in the caller's dtype

The distributed scheme that gathers ``u`` takes the same path (:func:`fused_terms`, then
:func:`loss_from_terms` with the gathered columns' weights).
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ..backends import resolve
from ..backends.reference import reference_loss
from ..core import ops
from ..core.epilogue import finish, finish_extras, finish_individual, log_eps_plus_mean_exp
from ..core.inputs import LossInputs, TauOptions, TauState, Weights
from .validate import check_options, validate


class PerSample(NamedTuple):
    """Per-anchor values of one evaluation (SPEC 2.3), ``[B]`` each, detached, in the accumulation dtype;
    ``*_img`` for the image anchors (against the text columns), ``*_txt`` for the text anchors. The
    reference fields are None without a reference model."""

    l_img: torch.Tensor              # log(eps + g_i): the RHO-shifted log-mean-exp over the anchor's negatives
    l_txt: torch.Tensor
    u_img: torch.Tensor              # the new moving average u_i
    u_txt: torch.Tensor
    target_img: torch.Tensor         # (1/s) log(eps + (1/N) sum_{j != p(i)} exp(s (y_ij - y_ii))): the target alone
    target_txt: torch.Tensor
    ref_img: torch.Tensor | None     # the same with the reference's similarities (at the same s)
    ref_txt: torch.Tensor | None
    distill_img: torch.Tensor | None  # H(p_i, q_i): the distillation cross-entropy (teacher at distill_scale)
    distill_txt: torch.Tensor | None


class LossOutput(NamedTuple):
    """What :func:`drrho_clip_loss` returns with ``return_per_sample=True``.

    Example::

        >>> import torch, drrho_kernels as dk
        >>> x = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
        >>> y = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
        >>> out = dk.drrho_clip_loss(x, y, 10.0, torch.zeros(6), torch.zeros(6), ref_img=y, ref_txt=x,
        ...                          backend="torch", return_per_sample=True)
        >>> loss, u_img, u_txt, per_sample = out
        >>> torch.equal(per_sample.u_img, u_img), per_sample.l_img.shape, per_sample.ref_img is not None
        (True, torch.Size([6]), True)
    """

    loss: torch.Tensor
    u_img: torch.Tensor
    u_txt: torch.Tensor
    per_sample: PerSample


def drrho_clip_loss(img, txt, logit_scale, u_img, u_txt, *, ref_img=None, ref_txt=None, img_all=None,
                    txt_all=None, ref_img_all=None, ref_txt_all=None, offset=0, gamma=0.8, eps=1e-14,
                    rho=8.0, backend="auto", multiply_tau=True, distill_weight=0.0, distill_scale=100.0,
                    return_per_sample=False):
    r"""DRRho-CLIP loss (arXiv 2505.06699) of one batch, with the moving-average update of ``u``.

    .. math::

        L = \frac{1}{s_\perp B}\sum_i \frac{1}{N-1}\sum_{j \ne p(i)} (w^I_{ij} d^I_{ij} + w^T_{ij} d^T_{ij})
            + \frac{\rho}{s} + \frac{1}{2Bs}\sum_i (u^I_i + u^T_i),
        \quad w_{ij} = e^{d_{ij} - u_i},\ d_{ij} = s\,a_{ij}

    with ``a`` the RHO-shifted similarity margins (target minus reference) and ``u`` the updated
    log-domain moving averages of ``log(eps + mean_j exp(d_ij))``: see SPEC.md. Without a reference
    model it is the SogCLR / FastCLIP global contrastive loss with a global temperature.

    The temperature forms of SPEC 2.1, with ``A_k = (1/(B(N-1))) sum_ij w^k_ij d^k_ij`` and
    ``U_k = mean_i u^k_i`` (``k``: image anchors I, text anchors T):

    - one ``logit_scale``, ``multiply_tau=True`` (default): the loss above (the authors' ``SogCLRLoss``);
    - a pair ``(s_img, s_txt)``: per-direction temperatures, ``L = sum_k [A_k / s_k_ + U_k / s_k + rho / s_k]``
      (the seed's objective; ``d^k = s_k a^k``). The same tensor twice ties them: the embedding
      gradients are the single scale's, its gradient the seed's (the released code halves the ``U`` and
      ``rho`` terms; docs/TEMPERATURES.md);
    - ``multiply_tau=False``: ``L = A_I + A_T`` (FastCLIP-v0; ``SogCLRLoss(multiply_tau=False)``).

    Per-sample temperatures (FastCLIP-v2) have their own state and update: :class:`DRRhoCLIPLoss`
    with ``temperature="individual"``, or :func:`individual_clip_loss`.

    Args:
        img, txt: ``[B, d]`` target embeddings of this step's pairs (the anchors), float16, bfloat16,
            float32 or float64, same dtype and device.
        logit_scale: ``s = 1/tau > 0``, a Python float or a 1-element tensor (may require grad); or a
            pair ``(s_img, s_txt)`` of them (per-direction temperatures).
        u_img, u_txt: ``[B]`` float32 (or float64) state of the B anchors before the step; an entry that
            is 0, +-inf or NaN is unset. Not modified.
        ref_img, ref_txt: ``[B, dr]`` reference embeddings of the same pairs (both or neither; no grad;
            cast to the dtype of ``img``).
        img_all, txt_all: ``[N, d]`` columns, the global batch (default: ``img``, ``txt``, N = B). With
            gradient, they receive the column terms of this process's anchors.
        ref_img_all, ref_txt_all: ``[N, dr]`` reference columns (required with ``img_all`` and a reference).
        offset: row ``i`` is column ``offset + i`` of the global batch (``0 <= offset <= N - B``).
        gamma: moving-average rate in (0, 1]. eps: floor inside the log (> 0). rho: DRO term (>= 0).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"reference"`` (dense, for checking).
        multiply_tau: the authors' loss form (default) or ``A_I + A_T`` (False).
        distill_weight: ``lambda >= 0`` of the distillation term (SPEC 2.2; needs a reference model, the
            teacher): the loss adds ``lambda D / s_`` (``multiply_tau``) or ``lambda D``, ``D`` the mean
            cross-entropy of the student's softmax over all columns (``s <x_i, T_j>``) against the teacher's
            (``distill_scale <xr_i, Tr_j>``). Computed in the same passes: no extra matrix product.
        distill_scale: the teacher's logit scale ``t_d > 0`` (the authors use 100).
        return_per_sample: return a :class:`LossOutput` with the per-anchor values (:class:`PerSample`).

    Returns:
        ``(loss, u_img_new, u_txt_new)``: a 0-dim loss (float64 for float64 inputs, else float32) with
        gradients to ``img``, ``txt``, ``img_all``/``txt_all`` and ``logit_scale``; the ``[B]`` new state
        in the dtype of ``u_img``/``u_txt``. With ``return_per_sample``: a :class:`LossOutput`, the same
        three and ``per_sample``.

    Raises:
        TypeError, ValueError: on any bad argument (see SPEC.md, "Bad input"), before any computation.
        RuntimeError: the named backend cannot run here (not installed, not built, or the wrong device).

    Example::

        >>> import torch, drrho_kernels as dk
        >>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        >>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        >>> u = torch.zeros(8)
        >>> loss, u_img, u_txt = dk.drrho_clip_loss(img, txt, 10.0, u, u, backend="torch")
        >>> loss.backward()
        >>> img.grad.shape, u_img.shape
        (torch.Size([8, 16]), torch.Size([8]))
    """
    options = check_options(gamma=gamma, eps=eps, rho=rho, multiply_tau=multiply_tau, distill_weight=distill_weight,
                            distill_scale=distill_scale, per_sample=return_per_sample, backend=backend)
    p = resolved(validate(img, txt, logit_scale, u_img, u_txt, options, ref_img=ref_img, ref_txt=ref_txt,
                          img_all=img_all, txt_all=txt_all, ref_img_all=ref_img_all, ref_txt_all=ref_txt_all,
                          offset=offset))
    if return_per_sample:
        loss, state, per_sample = compute_loss(p, per_sample=True)
        return LossOutput(loss, *state_out(p, state["u"]), per_sample)
    loss, state = compute_loss(p)
    return loss, *state_out(p, state["u"])


def individual_clip_loss(img, txt, u_img, u_txt, tau_state: TauState, tau_options: TauOptions, *, ref_img=None,
                         ref_txt=None, img_all=None, txt_all=None, ref_img_all=None, ref_txt_all=None, offset=0,
                         gamma=0.8, eps=1e-14, rho=8.0, backend="auto"):
    r"""The DRRho-CLIP loss with per-sample temperatures (SPEC 2.1 "individual"; FastCLIP-v2 / iSogCLR).

    ``tau_state`` holds the B anchors' temperatures, bounds and Adam moments (``[2, B]``: image anchors,
    text anchors); ``u_img``, ``u_txt`` their linear-domain moving averages. The loss value is fast_clip's
    ``FastCLIPLossIndividual``'s, its embedding gradients are fast_clip's (both halves, anchors and
    negatives), and the temperatures take one step of their own update (``core.epilogue.finish_individual``).
    :class:`DRRhoCLIPLoss` with ``temperature="individual"`` keeps this state for a whole dataset.

    Returns:
        ``(loss, u_img_new, u_txt_new, tau_state_new)``: the new state in the input state's dtypes.
    """
    options = check_options(gamma=gamma, eps=eps, rho=rho, backend=backend, tau=tau_options)
    p = resolved(validate(img, txt, None, u_img, u_txt, options, ref_img=ref_img, ref_txt=ref_txt, img_all=img_all,
                          txt_all=txt_all, ref_img_all=ref_img_all, ref_txt_all=ref_txt_all, offset=offset,
                          tau_state=tau_state))
    loss, state = compute_loss(p)
    return (loss, *state_out(p, state["u"]), tau_state_out(p, state))


def resolved(p: LossInputs) -> LossInputs:
    """``p`` with the backend that runs for its options on its tensors (``backends.resolve``)."""
    return LossInputs(p.tiles, p.temperature, p.u_img, p.u_txt, p.options,
                      resolve(p.options.backend, p.device, p.tiles.img.dtype))


def compute_loss(p: LossInputs, per_sample: bool = False):
    """Run the problem's backend; returns ``(loss, new_state)``, the state a dict of ``[2, B]`` tensors in
    the accumulation dtype: ``"u"`` and, for per-sample temperatures, ``"tau"``, ``"bound"``, ``"m"``, ``"v"``;
    with ``per_sample`` also the :class:`PerSample` values."""
    if p.backend == "reference":
        # not an op: the embeddings are cast here as the ops' autocast implementation casts them
        p = replace(p, tiles=ops.autocast_tiles(p.tiles))
        with torch.autocast(p.device.type, enabled=False):
            loss, u_new, values = reference_loss(p)
        return (loss, {"u": u_new}) + ((PerSample(**values),) if per_sample else ())
    terms = fused_terms(p)
    loss = loss_from_terms(p, terms)
    return (loss, terms.state) + ((terms.per_sample(p),) if per_sample else ())


def state_out(p: LossInputs, u_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The new state ``[2, B]`` as ``(u_img_new, u_txt_new)``, detached, in the dtypes of ``u_img``/``u_txt``."""
    u_new = u_new.detach()
    return u_new[0].to(p.u_img.dtype), u_new[1].to(p.u_txt.dtype)


def tau_state_out(p: LossInputs, state: dict) -> TauState:
    """The new temperature state in the dtypes of the one given."""
    old = p.temperature.state
    return TauState(*(state[k].detach().to(getattr(old, k).dtype) for k in ("tau", "bound", "m", "v")))


class FusedTerms:
    """What the forward op and the epilogue give: the new state and the backward's weights.

    ``state``: dict of ``[2, B]`` (``"u"``, and for per-sample temperatures ``"tau"``, ``"bound"``, ``"m"``,
    ``"v"``); ``log_norm``, ``wsum``, ``wdsum`` ``[2, B]``; ``margin`` ``[B]``.
    """

    def __init__(self, state, log_norm, wsum, wdsum, margin, l=None, extras=None, distill=False):
        self.state, self.log_norm, self.wsum, self.wdsum, self.margin = state, log_norm, wsum, wdsum, margin
        self.l, self.extras, self.distill = l, extras, distill

    @property
    def u_new(self) -> torch.Tensor:
        return self.state["u"]

    def weights(self, **cols) -> Weights:
        """The backward's weights: in one process the fold uses the rows' own; ``cols`` give a fold's columns
        (``col_scale``, ``col_log_norm``, ``col_margin``; with distillation ``col_lse_q``, ``col_lse_p``)."""
        distill = self.extras if self.distill else {}
        return Weights(self.log_norm, self.wsum, self.margin, cols.get("col_scale"), cols.get("col_log_norm"),
                       cols.get("col_margin"), distill.get("lse_q"), distill.get("lse_p"), cols.get("col_lse_q"),
                       cols.get("col_lse_p"))

    def per_sample(self, p: LossInputs) -> PerSample:
        """The per-anchor values (SPEC 2.3) of this evaluation."""
        e = self.extras
        ref = p.tiles.has_ref
        pick = lambda v: (v[0].detach(), v[1].detach()) if v is not None and ref else (None, None)  # noqa: E731
        return PerSample(*self.l.detach(), *self.u_new.detach(), *e["target"].detach(), *pick(e["reference"]),
                         *pick(e["h"]))


def fused_terms(p: LossInputs) -> FusedTerms:
    """Forward op on the detached tiles, then the epilogue of the temperature form."""
    tiles = p.tiles
    with torch.no_grad():               # the forward op has no autograd: the statistics are constants
        stats, margin, positives = ops.forward(p.backend, tiles)
    extras = None
    o = p.options
    if tiles.with_distill or tiles.with_alone:
        extras = finish_extras(stats, positives, tiles.scale.detach(), tiles.distill_scale, p.n_columns, o.eps)
    l = log_eps_plus_mean_exp(stats[:, 0], stats[:, 1], p.n_columns, o.eps) if o.per_sample else None
    t = p.temperature
    if t.kind == "individual":
        r = finish_individual(stats, p.u_old, t.state.tau, t.state.bound, t.state.m, t.state.v, p.n_columns,
                              o.eps, o.gamma, o.rho, o.tau)
        state = {k: r[k] for k in ("u", "tau", "bound", "m", "v")}
        return FusedTerms(state, r["log_norm"], r["wsum"], r["wdsum"], margin, l, extras)
    u_new, wsum, wdsum = finish(stats, p.u_old, p.n_columns, o.eps, o.gamma)
    return FusedTerms({"u": u_new}, u_new, wsum, wdsum, margin, l, extras, distill=o.distill_weight > 0)


def loss_from_terms(p: LossInputs, terms: FusedTerms, weights: Weights | None = None) -> torch.Tensor:
    """The loss, differentiable in the embeddings and the scales (weights held constant)."""
    h = dict(h=terms.extras["h"], h_ds=terms.extras["h_ds"]) if terms.distill else {}
    return ops.loss(p.backend, terms.wdsum, p.tiles, weights if weights is not None else terms.weights(),
                    u_new=terms.u_new, temperature=p.temperature, rho=p.options.rho,
                    distill_weight=p.options.distill_weight, wsum=terms.wsum, **h)
