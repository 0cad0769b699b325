"""The checks of the GPU tests, written once for any device: training-like inputs, the weighted products
with the partner term separated, and the comparisons with their tolerances.

Why the partner term is separated: a row's gradient is ``d_img_i = sum_j P_ij T_j - partner_i t_i`` (the
backward op's contract, core/ops.py). At s = 14 on random unit vectors the partner term is about 96% of
its norm, so a weighted product that is half wrong changes ``d_img`` by 2% and passes a 2e-2 norm-wise
test. The checks here compare the weighted products themselves, ``W_i = d_img_i + partner_i t_i`` (the
partner coefficient ``sum_k gain_ki wsum_ki`` is an input of the op, known exactly), norm-wise and row by
row. tests/test_gpu_checks.py proves both on planted data: a half-wrong weighted product from the real
kernels (the interpreter) and float64 data where the partner term dominates.

The truth at training sizes is the float64 torch backend on the same (rounded) inputs: it shares no kernel
code with the Triton backend, and the conformance suite checks it against the oracle at small sizes.
"""
from __future__ import annotations

import torch

import drrho_kernels as dk
from drrho_kernels.core import ops
from drrho_kernels.loss.functional import fused_terms, resolved
from drrho_kernels.loss.validate import check_options, validate
from helpers import detached
from test_conformance import scale_grad_error

# (norm-wise relative, the largest per-row relative error) per input dtype: SPEC "Numerics" (float32 1e-4,
# half 2e-2 on gradients); rows: a few rounding steps of the dtype.
TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 6e-2), torch.float16: (2e-2, 6e-2)}
S_TRAIN = 100.0            # the logit scale of a trained CLIP (open_clip clamps s at 100)


def training_inputs(B, N, d, dr, *, seed=0, device="cpu", correlation=1.0):
    """float64 unit embeddings as a trained pair of models gives them: each text near its image (cosine
    about 0.7 at ``correlation`` 1), the reference model's pairs likewise; columns ``N`` (None: one process)
    with the rows at ``offset``."""
    g = torch.Generator().manual_seed(seed)
    n = B if N is None else N

    def pairs(width):
        a = torch.randn(n, width, generator=g, dtype=torch.float64)
        b = a + correlation * torch.randn(n, width, generator=g, dtype=torch.float64)
        return (torch.nn.functional.normalize(a, dim=1).to(device), torch.nn.functional.normalize(b, dim=1).to(device))

    X, T = pairs(d)
    Xr, Tr = pairs(dr)
    off = 0 if N is None else (N - B) // 3
    out = dict(img=X[off:off + B], txt=T[off:off + B], ref_img=Xr[off:off + B], ref_txt=Tr[off:off + B])
    if N is not None:
        out.update(img_all=X, txt_all=T, ref_img_all=Xr, ref_txt_all=Tr, offset=off)
    return out


def rounded(inputs: dict, dtype) -> dict:
    """The inputs rounded to ``dtype`` and back to float64 (the truth sees what the kernels see)."""
    return {k: v.to(dtype).double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def problem(inputs: dict, dtype, backend: str, *, scale=S_TRAIN, scale_txt=None, u=-1.0, **options):
    """The checked problem of ``inputs`` at ``dtype`` (``scale_txt``: per-direction temperatures)."""
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    device = kw["img"].device
    B = kw["img"].shape[0]
    s = torch.tensor(scale, dtype=acc, device=device)
    logit_scale = s if scale_txt is None else (s, torch.tensor(scale_txt, dtype=acc, device=device))
    state = torch.full((B,), u, dtype=acc, device=device)
    p = validate(kw.pop("img"), kw.pop("txt"), logit_scale, state, state.clone(),
                 check_options(**{"backend": backend, "gamma": 0.9, **options}), **kw)
    return resolved(p)


def weighted_products(p, column_grads: bool = False, fold_from=None) -> dict:
    """The backward op's weighted products of problem ``p`` with the partner term added back:
    ``{"img": W_img [B, d], "txt": W_txt [B, d]}`` and, with ``column_grads``, the column gradients (no
    partner term there). Gains: those of the loss (an upstream gradient of 1); distillation gains likewise
    when ``p`` distils. ``fold_from``: a one-process problem of all N columns whose anchors fold into the rows
    (the gather_u scheme's columns)."""
    terms = fused_terms(p)
    cols = {}
    if fold_from is not None:
        full = fused_terms(fold_from)
        cols = dict(col_scale=fold_from.tiles.scale, col_log_norm=full.log_norm, col_margin=full.margin)
        if terms.distill:
            cols.update(col_lse_q=full.extras["lse_q"], col_lse_p=full.extras["lse_p"])
    weights = terms.weights(**cols)
    # the gains of the authors' loss form: d L / d phi = 1 / (B (N - 1) s) per direction, times s
    gain = torch.full_like(p.tiles.scale.to(p.acc_dtype), 1.0 / (p.batch * (p.n_columns - 1)))
    col_gain = None if "col_scale" not in cols else torch.full_like(cols["col_scale"].to(p.acc_dtype), gain[0, 0])
    gains = (gain, col_gain, gain if terms.distill else None, col_gain if terms.distill else None)
    d_img, d_txt, d_img_all, d_txt_all = ops.backward(p.backend, gains, detached(p.tiles), weights, column_grads)
    partner = (gain * weights.wsum.to(p.acc_dtype)).sum(0)[:, None]
    acc = p.acc_dtype
    out = dict(img=d_img.to(acc) + partner * p.tiles.txt.to(acc), txt=d_txt.to(acc) + partner * p.tiles.img.to(acc))
    if column_grads:
        out.update(img_all=d_img_all.to(acc), txt_all=d_txt_all.to(acc))
    return out


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(norm-wise relative error, the largest of the rows' relative errors; rows of ``want`` below 1e-3 of
    its largest row count against that instead)."""
    got, want = got.double().cpu(), want.double().cpu()
    norm = float(want.norm())
    if want.dim() < 2:
        return float((got - want).norm()) / max(norm, 1e-300), 0.0
    rows = want.norm(dim=1)
    floor = 1e-3 * float(rows.max())
    per_row = (got - want).norm(dim=1) / rows.clamp_min(max(floor, 1e-300))
    return float((got - want).norm()) / max(norm, 1e-300), float(per_row.max())


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> tuple[float, float]:
    """``got`` within the tolerances of ``dtype`` of ``want``, norm-wise and row by row."""
    whole, rows = errors(got, want)
    tol_whole, tol_rows = TOL[dtype]
    assert whole <= tol_whole and rows <= tol_rows, (
        f"{what}: norm-wise {whole:.2e} (tolerance {tol_whole:.0e}), worst row {rows:.2e} "
        f"(tolerance {tol_rows:.0e})")
    return whole, rows


def check_weighted_products(inputs: dict, dtype, *, column_grads=False, fold=False, **form) -> dict:
    """The Triton weighted products against the float64 torch backend's on the same rounded inputs."""
    device = inputs["img"].device
    truth_inputs = rounded(inputs, dtype)
    got_p, want_p = problem(inputs, dtype, "triton", **form), problem(truth_inputs, torch.float64, "torch", **form)
    fold_got = fold_want = None
    if fold:
        full = {k.replace("_all", ""): v for k, v in inputs.items() if k.endswith("_all")}
        fold_got = problem(full, dtype, "triton", **form)
        fold_want = problem(rounded(full, dtype), torch.float64, "torch", **form)
    got = weighted_products(got_p, column_grads, fold_got)
    want = weighted_products(want_p, column_grads, fold_want)
    assert set(got) == set(want) and all(v.device == device for v in got.values())
    return {k: assert_close(got[k], want[k], dtype, f"weighted product {k}") for k in want}


def check_step(inputs: dict, dtype, *, autocast=None, scale_txt=None, **kw) -> dict:
    """A whole functional step (loss, new state, every gradient, dL/ds) against the float64 torch backend.
    ``autocast``: the features float32, the call inside ``torch.autocast(device, autocast)``: the truth is
    then the float64 call on the features rounded to the autocast dtype. ``scale_txt``: per-direction
    temperatures (the text anchors' scale); ``kw``: more options (``return_per_sample``, ``distill_weight``)."""
    device = inputs["img"].device.type
    kernel_dtype = autocast or dtype

    def run(values, run_dtype, backend, enabled):
        leaves = {k: values[k].to(run_dtype).requires_grad_() for k in ("img", "txt", "img_all", "txt_all")
                  if k in values}
        args = {k: leaves.get(k, v.to(run_dtype) if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        acc = torch.float64 if run_dtype == torch.float64 else torch.float32
        s = torch.tensor(S_TRAIN, dtype=acc, device=values["img"].device, requires_grad=True)
        scales = [s] if scale_txt is None else [s, torch.tensor(scale_txt, dtype=acc, device=s.device,
                                                                  requires_grad=True)]
        u = torch.full((args["img"].shape[0],), -1.0, dtype=acc, device=s.device)
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=enabled):
            out = dk.drrho_clip_loss(args.pop("img"), args.pop("txt"), scales[0] if scale_txt is None else tuple(scales),
                                     u, u.clone(), backend=backend, **args, **kw)
        grads = torch.autograd.grad(out[0], [*leaves.values(), *scales])
        result = dict(loss=out[0].detach(), u_img=out[1], u_txt=out[2], **dict(zip(leaves, grads)))
        result.update(zip(("d_s", "d_s_txt"), grads[len(leaves):]))
        if kw.get("return_per_sample"):
            result.update({f"per_sample.{k}": v for k, v in out.per_sample._asdict().items() if v is not None})
        return result

    got = run(inputs, torch.float32 if autocast else dtype, "triton", autocast is not None)
    want = run(rounded(inputs, kernel_dtype), torch.float64, "torch", False)
    if autocast is not None:
        assert all(got[k].dtype == torch.float32 for k in ("img", "txt")), "gradients not in the features' dtype"
    # loss and state: 1e-4 (float32) or 1e-3 (half); dL/ds with the metric of docs/SPEC.md, Appendix A
    value_tol = 1e-4 if kernel_dtype == torch.float32 else 1e-3
    out = {}
    for k in want:
        if k in ("loss", "u_img", "u_txt") or k.startswith("per_sample."):
            out[k] = errors(got[k].reshape(-1), want[k].reshape(-1))[0]
            assert out[k] <= value_tol, f"{k}: {out[k]:.2e} > {value_tol:.0e}"
        elif k == "d_s_txt" or (k == "d_s" and scale_txt is not None):      # per direction: plain relative
            out[k] = errors(got[k].reshape(1), want[k].reshape(1))[0]
            assert out[k] <= value_tol * 10, f"{k}: {out[k]:.2e}"
        elif k == "d_s":
            truth = {n: want[n].double().cpu().numpy() for n in ("loss", "u_img", "u_txt", "d_s")}
            out[k] = scale_grad_error(float(got[k]), truth, scale=S_TRAIN, rho=kw.get("rho", 8.0))
            assert out[k] <= value_tol * 10, f"d_s: {out[k]:.2e}"
        else:
            out[k] = assert_close(got[k], want[k], kernel_dtype, f"gradient {k}")
    return out
