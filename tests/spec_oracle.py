"""SPEC.md part 1, stated once: an independent float64 NumPy oracle, for the tests only.

It shares no code with the package (no import of ``drrho_kernels``): the loss, the new state and the
closed-form gradients of SPEC.md part 1, written from the formulas with dense ``[B, N]`` matrices. Every
backend, the package's dense ``reference`` backend included, is compared with it.

The pieces of part 1 are public, so that ``family_oracle`` (SPEC part 2) builds on them instead of
restating them:

- :class:`Case`, :func:`make_case`: the inputs of one evaluation (rows at ``offset`` among the columns;
  columns ``None``: one process, ``N = B``);
- :func:`columns`, :func:`margins`, :func:`negatives`: the float64 arrays, SPEC's margins ``a^I``, ``a^T``
  (RHO-shifted when the case has references) and the negatives' mask (the positive excluded by index);
- :func:`log_mean_exp_negatives` (``l = log(eps + g)``) and :func:`update_u` (the moving average);
- :func:`statistics`: per direction ``d = s a``, ``l``, new ``u``, ``w``, ``A = (1/(B(N-1))) sum w d``,
  ``U = mean u``, at one scale per direction (part 1: the same scale);
- :func:`margin_gradients`: the gradient of ``(1/(B(N-1))) sum_k kappa_k sum_ij w^k_ij a^k_ij`` with ``w``
  held constant (the embedding gradients of every global form), and :func:`pack`;
- :func:`oracle`: part 1's value, new ``u`` and gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Case:
    """Inputs of one evaluation as float64 tensors (columns None: single process)."""

    img: torch.Tensor
    txt: torch.Tensor
    logit_scale: float
    u_img: torch.Tensor
    u_txt: torch.Tensor
    ref_img: torch.Tensor | None = None
    ref_txt: torch.Tensor | None = None
    img_all: torch.Tensor | None = None
    txt_all: torch.Tensor | None = None
    ref_img_all: torch.Tensor | None = None
    ref_txt_all: torch.Tensor | None = None
    offset: int = 0
    gamma: float = 0.8
    eps: float = 1e-14
    rho: float = 8.0

    def kwargs(self, dtype=torch.float64, requires_grad=False):
        """Keyword arguments for drrho_clip_loss (embeddings cast to ``dtype``, leaves made fresh)."""
        def conv(x, grad):
            if x is None:
                return None
            y = x.detach().to(dtype).clone()
            return y.requires_grad_(grad)
        return dict(img=conv(self.img, requires_grad), txt=conv(self.txt, requires_grad),
                    ref_img=conv(self.ref_img, False), ref_txt=conv(self.ref_txt, False),
                    img_all=conv(self.img_all, requires_grad), txt_all=conv(self.txt_all, requires_grad),
                    ref_img_all=conv(self.ref_img_all, False), ref_txt_all=conv(self.ref_txt_all, False),
                    u_img=self.u_img.clone(), u_txt=self.u_txt.clone(), offset=self.offset,
                    gamma=self.gamma, eps=self.eps, rho=self.rho)


def make_case(B=6, N=None, d=5, dr=None, ref=True, offset=None, seed=0, scale=5.0, u="random",
              normalize=True, gamma=0.8, rho=8.0) -> Case:
    """Random inputs. ``N`` given (and != None): distributed shape with columns holding rows at ``offset``."""
    g = torch.Generator().manual_seed(seed)

    def emb(n, width):
        e = torch.randn(n, width, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(e, dim=1) if normalize else e

    dr = d if dr is None else dr
    if N is None:
        img, txt = emb(B, d), emb(B, d)
        cols = dict()
        rimg, rtxt = (emb(B, dr), emb(B, dr)) if ref else (None, None)
        off = 0
    else:
        off = (N - B) // 2 if offset is None else offset
        X, T = emb(N, d), emb(N, d)
        img, txt = X[off:off + B].clone(), T[off:off + B].clone()
        cols = dict(img_all=X, txt_all=T)
        if ref:
            Xr, Tr = emb(N, dr), emb(N, dr)
            rimg, rtxt = Xr[off:off + B].clone(), Tr[off:off + B].clone()
            cols.update(ref_img_all=Xr, ref_txt_all=Tr)
        else:
            rimg = rtxt = None
    if u == "random":
        u_img = torch.randn(B, generator=g, dtype=torch.float64).float()
        u_txt = torch.randn(B, generator=g, dtype=torch.float64).float()
    elif u == "unset":
        u_img, u_txt = torch.zeros(B), torch.zeros(B)
    else:
        u_img, u_txt = u
    return Case(img=img, txt=txt, logit_scale=scale, u_img=u_img, u_txt=u_txt, ref_img=rimg,
                ref_txt=rtxt, offset=off, gamma=gamma, rho=rho, **cols)


# ------------------------------------------------------------------------------------------ the pieces
def array(x):
    """A tensor (or array) as a float64 NumPy array; None stays None."""
    if x is None:
        return None
    if torch.is_tensor(x):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def columns(case: Case):
    """``(single, x, t, X, T, xr, tr, Xr, Tr)`` as float64 arrays: the rows, the columns (the rows themselves
    in one process) and their reference counterparts (None without a reference model)."""
    x, t = array(case.img), array(case.txt)
    single = case.img_all is None
    X = x if single else array(case.img_all)
    T = t if single else array(case.txt_all)
    if case.ref_img is None:
        return single, x, t, X, T, None, None, None, None
    xr, tr = array(case.ref_img), array(case.ref_txt)
    Xr = xr if single else array(case.ref_img_all)
    Tr = tr if single else array(case.ref_txt_all)
    return single, x, t, X, T, xr, tr, Xr, Tr


def margins(x, t, X, T, xr=None, tr=None, Xr=None, Tr=None):
    """SPEC's ``a^I_ij = (<x_i,T_j> - <x_i,t_i>) - (<xr_i,Tr_j> - <xr_i,tr_i>)`` and
    ``a^T_ij = (<t_i,X_j> - <x_i,t_i>) - (<tr_i,Xr_j> - <xr_i,tr_i>)`` (reference terms dropped without one)."""
    pos = np.einsum("id,id->i", x, t)
    aI = x @ T.T - pos[:, None]
    aT = t @ X.T - pos[:, None]
    if xr is not None:
        rpos = np.einsum("id,id->i", xr, tr)
        aI = aI - (xr @ Tr.T - rpos[:, None])
        aT = aT - (tr @ Xr.T - rpos[:, None])
    return aI, aT


def negatives(B: int, N: int, offset: int):
    """``[B, N]`` mask of the negatives: every column but the positive ``p(i) = offset + i`` (by index)."""
    neg = np.ones((B, N), dtype=bool)
    neg[np.arange(B), offset + np.arange(B)] = False
    return neg


def log_mean_exp_negatives(d, neg, eps):
    """``l_i = log(eps + (1/N) sum_{j != p(i)} exp(d_ij))``, in log space (running max), ``N = d.shape[1]``."""
    N = d.shape[1]
    dm = np.where(neg, d, -np.inf)
    m = dm.max(axis=1)
    lse = m + np.log(np.exp(dm - m[:, None]).sum(axis=1))
    return np.logaddexp(math.log(eps), lse - math.log(N))


def update_u(l, u_old, gamma):
    """The log-domain moving average: ``l`` where ``gamma == 1`` or ``u`` is unset (0, +-inf, NaN), else
    ``log((1 - gamma) e^u + gamma e^l)``."""
    u_old = array(u_old)
    out = np.empty_like(l)
    for i in range(len(l)):
        unset = u_old[i] == 0 or not math.isfinite(u_old[i])
        if gamma == 1.0 or unset:
            out[i] = l[i]
        else:
            out[i] = np.logaddexp(u_old[i] + math.log(1 - gamma), l[i] + math.log(gamma))
    return out


def statistics(case: Case, scale_img: float | None = None, scale_txt: float | None = None,
               frozen: dict | None = None) -> dict:
    """Per direction (``img``: image anchors, text negatives; ``txt``: the reverse), at the scales
    ``s_I = scale_img`` (default ``case.logit_scale``) and ``s_T = scale_txt`` (default ``s_I``):
    ``d^k = s_k a^k``, ``l^k``, the new ``u^k``, ``w^k = exp(d^k - u^k)`` off the positive,
    ``A_k = c sum_ij w^k_ij d^k_ij`` and ``U_k = mean_i u^k_i``, with ``c = 1/(B(N-1))``.

    ``frozen`` (``u_img``, ``u_txt``, ``w_img``, ``w_txt`` from an earlier call) holds ``u`` and ``w`` at
    their values, so that finite differences of a value built from ``A`` check the closed forms.
    Returns those (keys ``l_img``, ``u_img``, ``w_img``, ``A_img``, ``U_img``, ... and ``s_img``,
    ``s_txt``) and the arrays of :func:`columns` (``single``, ``x``, ``t``, ``X``, ``T``), ``B``, ``N``, ``c``.
    """
    single, x, t, X, T, xr, tr, Xr, Tr = columns(case)
    B, N = x.shape[0], X.shape[0]
    sI = float(case.logit_scale if scale_img is None else scale_img)
    sT = sI if scale_txt is None else float(scale_txt)
    aI, aT = margins(x, t, X, T, xr, tr, Xr, Tr)
    dI, dT = sI * aI, sT * aT
    neg = negatives(B, N, case.offset)
    lI, lT = log_mean_exp_negatives(dI, neg, case.eps), log_mean_exp_negatives(dT, neg, case.eps)
    if frozen is None:
        uI, uT = update_u(lI, case.u_img, case.gamma), update_u(lT, case.u_txt, case.gamma)
        wI, wT = np.exp(dI - uI[:, None]) * neg, np.exp(dT - uT[:, None]) * neg
    else:
        uI, uT, wI, wT = frozen["u_img"], frozen["u_txt"], frozen["w_img"], frozen["w_txt"]
    c = 1.0 / (B * (N - 1))
    return dict(single=single, x=x, t=t, X=X, T=T, B=B, N=N, c=c, s_img=sI, s_txt=sT,
                l_img=lI, l_txt=lT, u_img=uI, u_txt=uT, w_img=wI, w_txt=wT,
                A_img=c * (wI * dI).sum(), A_txt=c * (wT * dT).sum(), U_img=uI.mean(), U_txt=uT.mean())


def margin_gradients(st: dict, kappa_img: float = 1.0, kappa_txt: float = 1.0):
    """``(d_x, d_t, d_X, d_T)``: the gradient of ``c sum_k kappa_k sum_ij w^k_ij a^k_ij`` (``w`` constant)
    w.r.t. the rows and the columns, ``st`` from :func:`statistics`:

        d_x = c [kappa_I (sum_j w^I_ij T_j - (sum_j w^I_ij) t_i) - kappa_T (sum_j w^T_ij) t_i]
        d_t = c [kappa_T (sum_j w^T_ij X_j - (sum_j w^T_ij) x_i) - kappa_I (sum_j w^I_ij) x_i]
        d_X = c kappa_T sum_i w^T_ij t_i,   d_T = c kappa_I sum_i w^I_ij x_i
    """
    c, x, t, X, T, wI, wT = (st[k] for k in ("c", "x", "t", "X", "T", "w_img", "w_txt"))
    rI, rT = wI.sum(1)[:, None], wT.sum(1)[:, None]
    d_x = c * (kappa_img * (wI @ T - rI * t) - kappa_txt * rT * t)
    d_t = c * (kappa_txt * (wT @ X - rT * x) - kappa_img * rI * x)
    return d_x, d_t, c * kappa_txt * (wT.T @ t), c * kappa_img * (wI.T @ x)


def pack(out: dict, single: bool, d_x, d_t, d_X, d_T) -> dict:
    """Gradients into ``out``: one process -> ``d_img``/``d_txt`` hold rows and columns together;
    distributed shape -> ``d_img``/``d_txt`` the row terms, ``d_img_all``/``d_txt_all`` the column terms."""
    if single:
        out.update(d_img=d_x + d_X, d_txt=d_t + d_T)
    else:
        out.update(d_img=d_x, d_txt=d_t, d_img_all=d_X, d_txt_all=d_T)
    return out


# --------------------------------------------------------------------------------------------- part 1
def oracle(case: Case, frozen: dict | None = None) -> dict:
    """SPEC part 1: ``L = (A_I + A_T)/s_ + rho/s + (U_I + U_T)/(2s)`` (``s_`` the detached scale), the new
    ``u`` and the closed-form gradients (``w``, ``u`` constant), float64 NumPy:

        dL/ds = (A_I + A_T - rho - (U_I + U_T)/2) / s^2,   embeddings: :func:`margin_gradients` (kappa = 1)

    ``frozen`` (``u_img``, ``u_txt``, ``w_img``, ``w_txt``, ``s_img_`` from an earlier call) holds ``u``,
    ``w`` and the detached scale ``s_`` at their values (finite differences of ``loss``). Returns ``loss``,
    ``u_img``, ``u_txt``, the embedding gradients (:func:`pack`), ``d_s``, and the statistics ``l_*``,
    ``A_*``, ``U_*``, ``w_*`` and ``s_img_``, ``s_txt_`` (the detached scales).
    """
    st = statistics(case, frozen=frozen)
    s = st["s_img"]
    s_ = s if frozen is None else frozen["s_img_"]
    A, U = st["A_img"] + st["A_txt"], st["U_img"] + st["U_txt"]
    out = dict(loss=A / s_ + case.rho / s + U / (2 * s), u_img=st["u_img"], u_txt=st["u_txt"],
               d_s=(A - case.rho - U / 2) / s ** 2, s_img_=s, s_txt_=s)
    out.update({k: st[k] for k in ("l_img", "l_txt", "A_img", "A_txt", "U_img", "U_txt", "w_img", "w_txt")})
    return pack(out, st["single"], *margin_gradients(st))
