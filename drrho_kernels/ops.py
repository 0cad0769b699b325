"""The fused loss as dispatcher ops: one schema, shared fake and autograd registrations.

Every fused backend (``torch``: row-chunked PyTorch, ``triton``: GPU kernels, ``cpp``: the C++
extension) provides one pair of ops with the schemas below, ``drrho::<backend>_fwd`` and
``drrho::<backend>_bwd``. The forward returns ``phi = sum_ij (w^I_ij d^I_ij + w^T_ij d^T_ij)`` (the
weights held constant), the new state and the per-row statistics the backward needs; the loss is
assembled from them in :func:`drrho_kernels._math.assemble_loss`. The backward returns
``d phi / d(img, txt[, img_all, txt_all])``; ``d phi / d s = phi / s`` needs no kernel.

Because the ops have fake (meta) implementations and registered autograd, ``torch.compile`` traces
them without graph breaks and ``torch.library.opcheck`` can check each of them.
"""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "drrho"

FWD_SCHEMA = (
    "(Tensor img, Tensor txt, Tensor img_all, Tensor txt_all, Tensor? ref_img, Tensor? ref_txt, "
    "Tensor? ref_img_all, Tensor? ref_txt_all, Tensor logit_scale, Tensor u_img, Tensor u_txt, "
    "int offset, float gamma, float eps, bool columns_are_rows) "
    "-> (Tensor phi, Tensor u_img_new, Tensor u_txt_new, Tensor margin, Tensor wsum_img, Tensor wsum_txt)"
)
BWD_SCHEMA = (
    "(Tensor grad_phi, Tensor img, Tensor txt, Tensor img_all, Tensor txt_all, Tensor? ref_img, "
    "Tensor? ref_txt, Tensor? ref_img_all, Tensor? ref_txt_all, Tensor logit_scale, Tensor u_img_new, "
    "Tensor u_txt_new, Tensor margin, Tensor wsum_img, Tensor wsum_txt, Tensor? col_u_img, "
    "Tensor? col_u_txt, Tensor? col_margin, int offset, bool columns_are_rows, bool column_grads) "
    "-> (Tensor d_img, Tensor d_txt, Tensor d_img_all, Tensor d_txt_all)"
)

_library = torch.library.Library(NAMESPACE, "FRAGMENT")
_registered: set[str] = set()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
              u_img, u_txt, offset, gamma, eps, columns_are_rows):
    acc = _acc(img.dtype)
    rows = img.shape[0]
    return (img.new_empty((), dtype=acc), *(img.new_empty(rows, dtype=acc) for _ in range(5)))


def _fake_bwd(grad_phi, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all,
              logit_scale, u_img_new, u_txt_new, margin, wsum_img, wsum_txt, col_u_img, col_u_txt,
              col_margin, offset, columns_are_rows, column_grads):
    if column_grads:
        cols = (torch.empty_like(img_all), torch.empty_like(txt_all))
    else:
        cols = (img.new_empty((0, img.shape[1])), txt.new_empty((0, txt.shape[1])))
    return torch.empty_like(img), torch.empty_like(txt), *cols


def no_column_grads(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a backward returns for ``d_img_all, d_txt_all`` when they were not asked for."""
    return img.new_empty((0, img.shape[1])), txt.new_empty((0, txt.shape[1]))


def _setup_context(ctx, inputs, output):
    (img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
     _u_img, _u_txt, offset, _gamma, _eps, columns_are_rows) = inputs
    phi, u_img_new, u_txt_new, margin, wsum_img, wsum_txt = output
    ctx.offset = offset
    ctx.columns_are_rows = columns_are_rows
    ctx.save_for_backward(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all,
                          logit_scale, phi, u_img_new, u_txt_new, margin, wsum_img, wsum_txt)


def _make_backward(bwd_op) -> Callable:
    def backward(ctx, grad_phi, *_unused):
        (img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale, phi,
         u_img_new, u_txt_new, margin, wsum_img, wsum_txt) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [None] * 15
        if grad_phi is None:
            return tuple(grads)
        if any(needs[:4]):
            fold = ctx.columns_are_rows   # single process: X = x, so the column terms go to img, txt
            column_grads = not fold and (needs[2] or needs[3])
            col = (u_img_new, u_txt_new, margin) if fold else (None, None, None)
            d_img, d_txt, d_img_all, d_txt_all = bwd_op(
                grad_phi, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all,
                logit_scale, u_img_new, u_txt_new, margin, wsum_img, wsum_txt, *col, ctx.offset,
                ctx.columns_are_rows, column_grads)
            grads[0], grads[1] = d_img, d_txt
            if column_grads:
                grads[2], grads[3] = d_img_all, d_txt_all
        if needs[8]:
            # phi = sum w * s * a with w constant, so d phi / d s = phi / s.
            grads[8] = (grad_phi * phi / logit_scale.to(phi.dtype)).to(logit_scale.dtype)
        return tuple(grads)
    return backward


def define_fused_ops(backend: str, fwd_impl: Callable | None, bwd_impl: Callable | None,
                     dispatch_keys=("CompositeExplicitAutograd",)):
    """Define ``drrho::<backend>_fwd`` / ``_bwd`` (unless a C++ library already did) and register
    their implementations (when given), fake implementations and autograd. Returns the two op handles."""
    fwd_name, bwd_name = f"{backend}_fwd", f"{backend}_bwd"
    if backend not in _registered:
        if not hasattr(getattr(torch.ops, NAMESPACE), fwd_name):
            _library.define(fwd_name + FWD_SCHEMA)
            _library.define(bwd_name + BWD_SCHEMA)
        for key in dispatch_keys:
            if fwd_impl is not None:
                _library.impl(fwd_name, fwd_impl, key)
            if bwd_impl is not None:
                _library.impl(bwd_name, bwd_impl, key)
        qualified_fwd, qualified_bwd = f"{NAMESPACE}::{fwd_name}", f"{NAMESPACE}::{bwd_name}"
        torch.library.register_fake(qualified_fwd, _fake_fwd, lib=_library)
        torch.library.register_fake(qualified_bwd, _fake_bwd, lib=_library)
        bwd_op = getattr(torch.ops.drrho, bwd_name).default
        torch.library.register_autograd(qualified_fwd, _make_backward(bwd_op),
                                        setup_context=_setup_context, lib=_library)
        _registered.add(backend)
    ns = getattr(torch.ops, NAMESPACE)
    return getattr(ns, fwd_name).default, getattr(ns, bwd_name).default


def _torch_fwd(*args):
    from .backends import torch_chunked
    return torch_chunked.forward(*args)


def _torch_bwd(*args):
    from .backends import torch_chunked
    d_img, d_txt, d_img_all, d_txt_all = torch_chunked.backward(*args)
    if d_img_all is None:
        d_img_all, d_txt_all = no_column_grads(d_img, d_txt)
    return d_img, d_txt, d_img_all, d_txt_all


torch_fwd, torch_bwd = define_fused_ops("torch", _torch_fwd, _torch_bwd)
