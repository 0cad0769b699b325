"""What the fused backends (and the selection, which runs their forward op) share outside a kernel."""
from __future__ import annotations

import torch

from ..core.inputs import accumulation_dtype


def positive_similarities(img: torch.Tensor, txt: torch.Tensor, ref_img: torch.Tensor | None,
                          ref_txt: torch.Tensor | None, chunk_rows: int = 4096) -> torch.Tensor:
    """``[2, B]``: the pairs' own similarities ``<x_i, t_i>`` and ``<xr_i, tr_i>`` (0 without a reference),
    accumulated in float32 (float64 for float64); the margin is their difference. Rows are processed in
    chunks so that half inputs never need a full float32 copy. Detached."""
    acc = accumulation_dtype(img.dtype)
    out = torch.zeros(2, img.shape[0], dtype=acc, device=img.device)
    with torch.no_grad():
        for r0 in range(0, img.shape[0], chunk_rows):
            r1 = min(r0 + chunk_rows, img.shape[0])
            out[0, r0:r1] = (img[r0:r1].to(acc) * txt[r0:r1].to(acc)).sum(-1)
            if ref_img is not None:
                out[1, r0:r1] = (ref_img[r0:r1].to(acc) * ref_txt[r0:r1].to(acc)).sum(-1)
    return out
