"""An independent float64 NumPy statement of SPEC.md, for the tests only.

It shares no code with the package: loss, new state and the closed-form gradients of SPEC.md,
written from the formulas with dense matrices. Every backend is compared with it.
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


def _np(x):
    return None if x is None else x.detach().double().cpu().numpy()


def oracle(case: Case) -> dict:
    """Loss, new u and the SPEC.md closed-form gradients, all float64 NumPy."""
    x, t = _np(case.img), _np(case.txt)
    single = case.img_all is None
    X = x if single else _np(case.img_all)
    T = t if single else _np(case.txt_all)
    B, N = x.shape[0], X.shape[0]
    s = float(case.logit_scale)
    pos = np.einsum("id,id->i", x, t)
    aI = x @ T.T - pos[:, None]
    aT = t @ X.T - pos[:, None]
    if case.ref_img is not None:
        xr, tr = _np(case.ref_img), _np(case.ref_txt)
        Xr = xr if single else _np(case.ref_img_all)
        Tr = tr if single else _np(case.ref_txt_all)
        rpos = np.einsum("id,id->i", xr, tr)
        aI -= xr @ Tr.T - rpos[:, None]
        aT -= tr @ Xr.T - rpos[:, None]
    dI, dT = s * aI, s * aT
    neg = np.ones((B, N), dtype=bool)
    neg[np.arange(B), case.offset + np.arange(B)] = False

    def new_u(d, u_old):
        g = np.array([np.exp(d[i][neg[i]]).sum() / N for i in range(B)])  # fine at test scales
        l = np.log(case.eps + g)
        u_old = u_old.double().numpy()
        out = np.empty(B)
        for i in range(B):
            unset = u_old[i] == 0 or not math.isfinite(u_old[i])
            if case.gamma == 1.0 or unset:
                out[i] = l[i]
            else:
                out[i] = np.logaddexp(u_old[i] + math.log(1 - case.gamma), l[i] + math.log(case.gamma))
        return out

    uI, uT = new_u(dI, case.u_img), new_u(dT, case.u_txt)
    wI = np.exp(dI - uI[:, None]) * neg
    wT = np.exp(dT - uT[:, None]) * neg
    c = 1.0 / (B * (N - 1))
    wd = (wI * dI).sum() + (wT * dT).sum()
    loss = c * wd / s + case.rho / s + (uI + uT).sum() / (2 * B) / s
    d_s = (c * wd - case.rho - (uI + uT).sum() / (2 * B)) / s ** 2
    d_x = c * (wI @ T - wI.sum(1)[:, None] * t - wT.sum(1)[:, None] * t)
    d_t = c * (wT @ X - wT.sum(1)[:, None] * x - wI.sum(1)[:, None] * x)
    d_X = c * wT.T @ t
    d_T = c * wI.T @ x
    out = dict(loss=loss, u_img=uI, u_txt=uT, d_s=d_s)
    if single:
        out.update(d_img=d_x + d_X, d_txt=d_t + d_T)
    else:
        out.update(d_img=d_x, d_txt=d_t, d_img_all=d_X, d_txt_all=d_T)
    return out
