"""``drrho::triton_fwd`` / ``drrho::triton_bwd``: the op pair of docs/DESIGN.md on the Triton kernels.

Inputs of float16, bfloat16 or float32 run the kernels of ``kernels.py`` (float32 accumulation,
gradients returned in the input dtype). Float64 inputs have no Triton kernel (no float64 tensor-core
path worth having, and the ops must return float64 statistics for float64 inputs): the op computes
them with the row-chunked torch backend's algorithm on the same device, so ``backend="triton"`` and
``backend="auto"`` still give float64 results for float64 inputs.

Devices: CUDA (or ROCm) tensors; CPU tensors only when the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first ``backend="triton"`` call), as
``drrho_kernels.backends.resolve`` already requires.
"""
from __future__ import annotations

import torch

from ... import ops as _ops
from .. import torch_chunked
from . import launch


def _check_device(name: str, img: torch.Tensor) -> None:
    if img.device.type == "cpu" and not launch.interpreting():
        raise RuntimeError(
            f"drrho::{name}: the tensors are on cpu: the Triton kernels need CUDA (or ROCm) tensors, or CPU "
            "tensors with TRITON_INTERPRET=1 set before the first backend='triton' call. "
            "Use backend='auto' or 'torch'.")


def _fwd_impl(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
              u_img, u_txt, offset, gamma, eps, columns_are_rows):
    if img.dtype == torch.float64:
        return torch_chunked.forward(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all,
                                     logit_scale, u_img, u_txt, offset, gamma, eps, columns_are_rows)
    _check_device("triton_fwd", img)
    return launch.forward(img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
                          u_img, u_txt, offset, gamma, eps, columns_are_rows)


def _bwd_impl(grad_phi, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
              u_img_new, u_txt_new, margin, wsum_img, wsum_txt, col_u_img, col_u_txt, col_margin, offset,
              columns_are_rows, column_grads):
    if img.dtype == torch.float64:
        d_img, d_txt, d_img_all, d_txt_all = torch_chunked.backward(
            grad_phi, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
            u_img_new, u_txt_new, margin, wsum_img, wsum_txt, col_u_img, col_u_txt, col_margin, offset,
            columns_are_rows, column_grads)
    else:
        _check_device("triton_bwd", img)
        d_img, d_txt, d_img_all, d_txt_all = launch.backward(
            grad_phi, img, txt, img_all, txt_all, ref_img, ref_txt, ref_img_all, ref_txt_all, logit_scale,
            u_img_new, u_txt_new, margin, wsum_img, wsum_txt, col_u_img, col_u_txt, col_margin, offset,
            column_grads)
    if d_img_all is None:
        d_img_all, d_txt_all = _ops.no_column_grads(d_img, d_txt)
    return d_img, d_txt, d_img_all, d_txt_all


# Registered when this module is imported (the first time backend "triton" is resolved), not inside a
# function: Dynamo runs imports for real but traces function bodies, so a registration reached for the
# first time inside torch.compile would be traced (and fail) rather than run.
_FUSED_OPS = _ops.define_fused_ops("triton", _fwd_impl, _bwd_impl, dispatch_keys=("CUDA", "CPU"))


def fused_ops():
    """The ``(drrho::triton_fwd, drrho::triton_bwd)`` op handles, with fake implementations and autograd."""
    return _FUSED_OPS
