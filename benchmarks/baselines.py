"""The baselines: the authors' ``SogCLRLoss`` sequence of operations (rewritten, no code copied), open_clip's loss."""

import math

import torch
import torch.nn.functional as F


def unfused_drrho_loss(img, txt, logit_scale, u_img, u_txt, ref_img=None, ref_txt=None, *, img_all=None,
                       txt_all=None, ref_img_all=None, ref_txt_all=None, offset=0, gamma=0.8, eps=1e-14,
                       rho=8.0):
    """``(loss, u_img_new, u_txt_new)`` as ``SogCLRLoss`` with ``multiply_tau``; the columns default to the rows."""
    img_all, txt_all, ref_img_all, ref_txt_all = (a if b is None else b for a, b in (
        (img, img_all), (txt, txt_all), (ref_img, ref_img_all), (ref_txt, ref_txt_all)))
    B, N = img.shape[0], img_all.shape[0]
    sim_image, sim_text = img @ txt_all.T, txt @ img_all.T
    diag_sim = (img * txt).sum(-1, keepdim=True)
    diff_image, diff_text = (sim_image - diag_sim) * logit_scale, (sim_text - diag_sim) * logit_scale
    if ref_img is not None:
        ref_sim_image, ref_sim_text = ref_img @ ref_txt_all.T, ref_txt @ ref_img_all.T
        ref_diag = (ref_img * ref_txt).sum(-1, keepdim=True)
        diff_image = diff_image - (ref_sim_image - ref_diag) * logit_scale
        diff_text = diff_text - (ref_sim_text - ref_diag) * logit_scale
    u_img, u_txt = u_img.reshape(-1, 1).to(diff_image.dtype), u_txt.reshape(-1, 1).to(diff_image.dtype)
    with torch.no_grad():
        mask_inv = F.one_hot(torch.arange(B, device=img.device) + offset, N).to(diff_image.dtype)
        mask, shift = 1 - mask_inv, math.log(eps * N)
        lse_image = torch.logsumexp(diff_image + mask_inv * shift - shift, dim=-1, keepdim=True) + math.log(eps)
        lse_text = torch.logsumexp(diff_text + mask_inv * shift - shift, dim=-1, keepdim=True) + math.log(eps)
    if gamma == 1.0:
        u_img, u_txt = lse_image, lse_text
    else:
        def update(u, lse):
            unset = (u == 0) | u.isinf() | u.isnan()
            gap = u + math.log(1 - gamma) - (lse + math.log(gamma))
            new = torch.where(gap > 0, u + math.log(1 - gamma) + torch.log(1 + torch.exp(-gap)),
                              lse + math.log(gamma) + torch.log(1 + torch.exp(gap)))
            return torch.where(unset, lse, new)
        u_img, u_txt = update(u_img, lse_image), update(u_txt, lse_text)
    with torch.no_grad():
        weight_image, weight_text = torch.exp(diff_image - u_img), torch.exp(diff_text - u_txt)
    loss_image = (diff_image * weight_image * mask).sum(-1, keepdim=True) / (N - 1)
    loss_text = (diff_text * weight_text * mask).sum(-1, keepdim=True) / (N - 1)
    loss = (loss_image + loss_text).mean()
    loss = loss / logit_scale.detach() + rho / logit_scale + (u_img + u_txt).mean() / 2 / logit_scale
    return loss, u_img.reshape(-1), u_txt.reshape(-1)


def clip_cross_entropy(img, txt, logit_scale):
    """open_clip's ClipLoss in one process."""
    logits = logit_scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

