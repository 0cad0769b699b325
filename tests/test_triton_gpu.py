"""The compiled Triton kernels on a CUDA GPU, at training sizes.

On a CUDA machine ``python -m pytest`` runs them (conftest turns the interpreter on only without a
GPU); ``python -m pytest -m gpu`` runs only these. References: the torch backend in float64 on the
same GPU for the large shapes (it shares no kernel code with the Triton backend), the float64 NumPy
oracle where the dense [B, N] matrices are small enough. Tolerances as SPEC.md and the conformance
suite: float32 1e-4, half 2e-2 on gradients (norm-wise) and 1e-3 on the loss and state; dL/ds with
the metric of docs/SPEC.md, Appendix A.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import drrho_kernels as dk
from drrho_kernels.loss.validate import check_options, validate
from helpers import detached
from spec_oracle import make_case, oracle
from test_conformance import scale_grad_error

triton = pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True, scope="module")
def _compiled_kernels():
    from drrho_kernels.backends.triton import launch
    if launch.interpreting():
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test the compiled kernels")


TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 1e-3), torch.float16: (2e-2, 1e-3)}
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _inputs(B, N, d, dr, dtype, seed=0, ref=True):
    """Unit-norm embeddings on the GPU (rounded to ``dtype``); N is None for one process."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def emb(n, w):
        return torch.nn.functional.normalize(torch.randn(n, w, generator=g), dim=1).to("cuda", dtype)

    n = B if N is None else N
    X, T = emb(n, d), emb(n, d)
    Xr, Tr = (emb(n, dr), emb(n, dr)) if ref else (None, None)
    off = 0 if N is None else (N - B) // 3
    kw = dict(img=X[off:off + B].clone(), txt=T[off:off + B].clone())
    if ref:
        kw.update(ref_img=Xr[off:off + B].clone(), ref_txt=Tr[off:off + B].clone())
    if N is not None:
        kw.update(img_all=X, txt_all=T, offset=off)
        if ref:
            kw.update(ref_img_all=Xr, ref_txt_all=Tr)
    u = torch.randn(B, generator=g).to("cuda")
    kw.update(u_img=u, u_txt=u.flip(0).clone())
    return kw


def _run(kw, dtype, backend, s=14.0):
    leaves = [k for k in ("img", "txt", "img_all", "txt_all") if k in kw]
    args = dict(kw)
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and k not in ("u_img", "u_txt"):
            args[k] = v.detach().to(dtype).requires_grad_(k in leaves)
    scale = torch.tensor(s, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         requires_grad=True)
    loss, u_img, u_txt = dk.drrho_clip_loss(logit_scale=scale, backend=backend, **args)
    loss.backward()
    out = dict(loss=loss.detach().double(), u_img=u_img.double(), u_txt=u_txt.double(), d_s=scale.grad.double())
    out.update({"d_" + k: args[k].grad.double() for k in leaves})
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _ds_err(got, want, s, rho=8.0):
    values = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in want.items()}
    return scale_grad_error(float(got["d_s"]), values, scale=s, rho=rho)


def _rounded(case, dtype):
    """The case with its embeddings rounded to ``dtype`` (float64 values), so the oracle sees the same inputs."""
    names = ("img", "txt", "ref_img", "ref_txt", "img_all", "txt_all", "ref_img_all", "ref_txt_all")
    return dataclasses.replace(case, **{k: getattr(case, k).to(dtype).double() for k in names
                                        if getattr(case, k) is not None})


SHAPES = {
    "single-B4096-d512": (4096, None, 512, 512),
    "dist-B4096-N16384-d768": (4096, 16384, 768, 768),
    "single-B2048-d1024-dr768": (2048, None, 1024, 768),
    "dist-odd-B1000-N3001-d1000-dr333": (1000, 3001, 1000, 333),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=lambda d: IDS[d])
@pytest.mark.parametrize("name", list(SHAPES))
def test_large_vs_torch_float64(name, dtype):
    B, N, d, dr = SHAPES[name]
    kw = _inputs(B, N, d, dr, dtype)
    got = _run(kw, dtype, "triton")
    want = _run(kw, torch.float64, "torch")          # the same rounded inputs, computed in float64
    grad_tol, val_tol = TOL[dtype]
    for k in want:
        tol = grad_tol if k.startswith("d_") and k != "d_s" else val_tol
        if k == "d_s":
            err = _ds_err(got, want, 14.0)
        else:
            err = _rel(got[k], want[k])
        assert err <= tol, f"{name} {IDS[dtype]} {k}: {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: IDS[d])
def test_vs_oracle(dtype):
    case = _rounded(make_case(B=384, N=1100, d=512, dr=384, scale=30.0, seed=5), dtype)
    want = oracle(case)
    kw = case.kwargs(dtype=dtype)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    for k in ("img", "txt", "img_all", "txt_all"):
        kw[k].requires_grad_()
    loss, u_img, _ = dk.drrho_clip_loss(logit_scale=case.logit_scale, backend="triton", **kw)
    loss.backward()
    grad_tol, val_tol = TOL[dtype]
    assert _rel(u_img.double().cpu(), torch.as_tensor(want["u_img"])) <= val_tol
    for k in ("img", "txt", "img_all", "txt_all"):
        assert _rel(kw[k].grad.double().cpu(), torch.as_tensor(want["d_" + k])) <= grad_tol, k


def test_fp16_weights_beyond_65504_at_large_n():
    """B = 8 rows against N = 65536 columns with gamma = 0.01 and a low stored u: w_ij > 65504."""
    B, N = 8, 65536
    u = torch.full((B,), -30.0)
    case = _rounded(make_case(B=B, N=N, d=64, dr=32, gamma=0.01, u=(u, u.clone()), seed=2), torch.float16)
    want = oracle(case)
    kw = case.kwargs(dtype=torch.float16)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    for k in ("img", "txt", "img_all", "txt_all"):
        kw[k].requires_grad_()
    loss, _, _ = dk.drrho_clip_loss(logit_scale=case.logit_scale, backend="triton", **kw)
    loss.backward()
    for k in ("img", "txt", "img_all", "txt_all"):
        g = kw[k].grad
        assert torch.isfinite(g).all(), k
        assert _rel(g.double().cpu(), torch.as_tensor(want["d_" + k])) <= 2e-2, k


def test_deterministic_and_no_bn_allocation():
    """Bitwise-equal gradients on repeat, and peak memory far below one [B, N] float32 matrix."""
    B, d = 8192, 512
    kw = _inputs(B, None, d, d, torch.bfloat16)
    a = _run(kw, torch.bfloat16, "triton")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    b = _run(kw, torch.bfloat16, "triton")
    peak = torch.cuda.max_memory_allocated() - before
    for k in ("d_img", "d_txt"):
        assert torch.equal(a[k], b[k]), k
    assert peak < B * B * 4 / 2, f"peak extra memory {peak} B (one [B, B] float32 matrix is {B * B * 4} B)"


def _one_process_tiles(B, d, dr, dtype, ref=True):
    """The kernels' inputs of a one-process problem on the GPU."""
    kw = _inputs(B, None, d, dr, dtype, ref=ref)
    p = validate(kw["img"], kw["txt"], 14.0, kw["u_img"], kw["u_txt"], check_options(backend="triton"),
                 ref_img=kw.get("ref_img"), ref_txt=kw.get("ref_txt"))
    return detached(p.tiles)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=lambda d: IDS[d])
@pytest.mark.parametrize("shape", [(4096, 512, 512, True), (5001, 1000, 333, True), (3000, 768, 0, False)],
                         ids=["B4096-d512", "odd-B5001-d1000-dr333", "noref-B3000-d768"])
def test_transposed_forward_vs_two_direction(shape, dtype):
    """One process: the transposed forward (each tile once, partial statistics, merge) against the
    two-direction kernel on the same inputs; the same float32 accumulation, other summation orders."""
    from drrho_kernels.backends.triton import forward, forward_transposed
    B, d, dr, ref = shape
    k = _one_process_tiles(B, d, dr, dtype, ref=ref)
    got = forward_transposed.forward_transposed(k)
    want = forward.forward(dataclasses.replace(k, columns_are_rows=False))
    again = forward_transposed.forward_transposed(k)
    for name, a, b, c in zip(("stats", "margin"), got, want, again):
        assert torch.equal(a, c), f"{name}: not deterministic"
        assert _rel(a.double(), b.double()) <= 1e-4, f"{name}: {_rel(a.double(), b.double()):.2e}"


def test_transposed_forward_memory_at_32768():
    """B = N = 32768, d = dr = 512, bf16: the forward's extra memory is its partial buffers (12 MiB on an
    H100) and the [B] outputs, far inside the 64 MiB budget of the whole step."""
    from drrho_kernels.backends.triton import forward_transposed
    B, d = 32768, 512
    k = _one_process_tiles(B, d, d, torch.bfloat16)
    forward_transposed.forward_transposed(k)                     # autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = forward_transposed.forward_transposed(k)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    plan = forward_transposed.plan_for(B, d, d, torch.bfloat16, k.img.device)
    assert peak <= plan.partial_bytes(B) + 16 * B * 4 + (1 << 20), (peak, plan)
    assert peak < 64 * 2 ** 20
    assert all(torch.isfinite(v).all() for v in out)
