"""One conformance suite: every backend and dtype against the float64 oracle, with one tolerance table.

Backends: ``reference`` (dense), ``torch`` (row-chunked), ``cpp`` (the C++ extension; skipped with
the reason when it was not built) and ``triton`` (Triton's interpreter on CPU tensors, or the
compiled kernels on a CUDA device). Truth: ``tests/spec_oracle.py``, an independent float64 NumPy
statement of SPEC.md; for half inputs it is evaluated on the same rounded inputs, so the tolerance
measures the backend, not the rounding of the inputs.

Tolerances (SPEC.md "Numerics"): float32 1e-4 relative on loss, gradients and dL/ds; half inputs
2e-2 norm-wise on gradients. Relative errors are norm-wise; a half-precision gradient entry whose
true value lies below the dtype's smallest normal number is compared as zero. dL/ds is a difference
of terms that can be thousands of times larger than it (``(A - rho - U) / s^2``), so its error is
measured against ``|dL/ds| + 1e-3 (|A| + rho + |U|) / s^2`` (docs/SPEC.md, Appendix A): SPEC's plain
relative error where it does not cancel, and at most ~2 float32 ulp of its terms where it does.

The cases are tiny but odd (B, N, d, dr not multiples of 16; several row, column, K and d-slice
blocks for Triton's 16 x 16 interpreter tiles), and include what a wrong kernel gets visibly wrong:
``eps`` that dominates the log at ``s = 100`` (well-separated pairs), stored state with NaN, +-inf
and 0 among set entries with ``gamma < 1``, and half inputs at ``s = 100`` where a similarity
rounded to the half dtype would fail the tolerance.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

import drrho_kernels as dk
from helpers import rel_err
from spec_oracle import Case, log_mean_exp_negatives, make_case, negatives, oracle, update_u

EMBEDDINGS = ("img", "txt", "ref_img", "ref_txt", "img_all", "txt_all", "ref_img_all", "ref_txt_all")


class Tol(NamedTuple):
    loss: float
    state: float     # u
    grad: float      # embedding gradients (norm-wise)
    scale: float     # dL/ds (see scale_grad_error)


TOLERANCES = {
    torch.float64: Tol(1e-12, 1e-12, 1e-10, 1e-10),
    torch.float32: Tol(1e-5, 1e-5, 1e-4, 1e-4),
    torch.bfloat16: Tol(1e-3, 1e-3, 2e-2, 1e-3),
    torch.float16: Tol(1e-3, 1e-3, 2e-2, 1e-3),
}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _triton_device() -> str | None:
    """Where the Triton kernels run here: "cpu" (interpreter), "cuda", or None (not runnable)."""
    if "triton" not in dk.available_backends("cuda" if torch.cuda.is_available() else "cpu"):
        return None
    from drrho_kernels.backends.triton import launch
    return "cpu" if launch.interpreting() else "cuda"


TRITON_DEVICE = _triton_device()
DEVICES = {"reference": "cpu", "torch": "cpu", "cpp": "cpu", "triton": TRITON_DEVICE}


def _backend_param(name):
    reason = None
    if name == "cpp" and "cpp" not in dk.available_backends("cpu"):
        from drrho_kernels.backends import cpp
        reason = f"C++ extension not built ({cpp.load_error()})"
    if name == "triton" and TRITON_DEVICE is None:
        reason = "triton is not installed, or no CUDA device and TRITON_INTERPRET is not set"
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""), id=name)


BACKENDS = [_backend_param(name) for name in ("reference", "torch", "cpp", "triton")]


def backend_dtypes(dtypes, backends=None):
    """``(backend, dtype)`` parameters, ids ``<backend>-<dtype>``, without Triton x float64: Triton has no
    float64 kernels, float64 resolves to the torch backend (test_float64_on_triton_resolves_to_torch)."""
    return [pytest.param(b.values[0], dtype, marks=b.marks, id=f"{b.values[0]}-{DTYPE_IDS[dtype]}")
            for b in (BACKENDS if backends is None else backends) for dtype in dtypes
            if not (b.values[0] == "triton" and dtype == torch.float64)]


# Triton's interpreter takes seconds per call at B = 37, d = 40: the developers' loop (-m "not slow") runs the
# temperature forms, distillation and per-sample outputs on Triton at the other sizes, the whole suite at this one.
SLOW_ON = {("triton", "single-B37-d40-dr23")}


def backend_dtype_cases(dtypes, names, backends=None):
    """``(backend, dtype, name)`` parameters, ids ``<backend>-<dtype>-<name>`` (as the two parametrizations
    they replace), the pairs of ``SLOW_ON`` marked slow."""
    return [pytest.param(*p.values, name, id=f"{p.id}-{name}",
                         marks=[*p.marks, *([pytest.mark.slow] if (p.values[0], name) in SLOW_ON else [])])
            for p in backend_dtypes(dtypes, backends) for name in names]


def separated(B=9, N=None, d=16, dr=12, eps=1e-4, seed=0, scale=100.0) -> Case:
    """Well-separated pairs (<x_i, t_i> ~ 0.95, negatives ~ +-0.25) at s = 100: g_i ~ e^-50, so
    ``log(eps + g)`` is ``log(eps)`` to many digits and a kernel that drops eps is far off."""
    g = torch.Generator().manual_seed(seed)
    n = B if N is None else N

    def unit(x):
        return torch.nn.functional.normalize(x, dim=1)

    X = unit(torch.randn(n, d, generator=g, dtype=torch.float64))
    T = unit(X + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d))
    Xr, Tr = (unit(torch.randn(n, dr, generator=g, dtype=torch.float64)) for _ in range(2))
    u = (torch.randn(B, generator=g, dtype=torch.float64).float() - 10.0,
         torch.randn(B, generator=g, dtype=torch.float64).float() - 10.0)
    if N is None:
        return Case(img=X, txt=T, logit_scale=scale, u_img=u[0], u_txt=u[1], ref_img=Xr, ref_txt=Tr, eps=eps,
                    gamma=0.5)
    off = (N - B) // 2
    rows = slice(off, off + B)
    return Case(img=X[rows].clone(), txt=T[rows].clone(), logit_scale=scale, u_img=u[0], u_txt=u[1],
                ref_img=Xr[rows].clone(), ref_txt=Tr[rows].clone(), img_all=X, txt_all=T, ref_img_all=Xr,
                ref_txt_all=Tr, offset=off, eps=eps, gamma=0.5)


def stretched(case: Case, factor: float) -> Case:
    """Embeddings of norm ``factor``: larger similarities, so rounding them to a half dtype matters more."""
    return dataclasses.replace(case, **{k: getattr(case, k) * factor for k in ("img", "txt", "ref_img", "ref_txt")})


_SPECIAL_U = torch.tensor([0.0, math.nan, math.inf, -math.inf, 0.3, -1.2, 2.5, 1e-3, -0.7, 4.0, math.nan])


def special_state(B=11, N=None, seed=4) -> Case:
    """Stored u with NaN, +inf, -inf and 0 (unset: restart from l) among set entries, gamma = 0.3."""
    u = _SPECIAL_U[:B]
    return make_case(B=B, N=N, d=7, dr=5, seed=seed, gamma=0.3, u=(u.clone(), u.flip(0).clone()))


CASES = {
    # one process
    "single-ref-B6-d5": lambda: make_case(B=6, d=5),
    "single-noref-B7-d9": lambda: make_case(B=7, d=9, ref=False),
    "single-B37-d40-dr23": lambda: make_case(B=37, d=40, dr=23),
    "single-odd-B37-d13-dr29": lambda: make_case(B=37, d=13, dr=29, seed=3),
    "single-N2": lambda: make_case(B=2, d=3),
    "single-unset-gamma1": lambda: make_case(B=9, d=6, u="unset", gamma=1.0),
    "single-s100": lambda: make_case(B=12, d=16, dr=20, scale=100.0),
    "single-s100-norm1.5": lambda: stretched(make_case(B=12, d=4, dr=4, scale=100.0), 1.5),
    "single-special-u": lambda: special_state(),
    "single-eps1e-4-s100": lambda: separated(eps=1e-4),
    "single-eps1e-6-s100": lambda: separated(eps=1e-6, seed=1),
    # distributed shape: B local rows against N gathered columns, the positives at `offset`
    "dist-ref-B5-N23-d17-dr9": lambda: make_case(B=5, N=23, d=17, dr=9),
    "dist-noref-offset0-B6-N20": lambda: make_case(B=6, N=20, d=12, ref=False, offset=0),
    "dist-offset-end-B4-N19": lambda: make_case(B=4, N=19, d=8, offset=15),
    "dist-odd-B13-N41": lambda: make_case(B=13, N=41, d=7, dr=3, offset=17, seed=5),
    "dist-B1-N2": lambda: make_case(B=1, N=2, d=3),
    "dist-B1-N2-offset1": lambda: make_case(B=1, N=2, d=3, offset=1),
    "dist-B-eq-N": lambda: make_case(B=6, N=6, d=4),
    "dist-special-u": lambda: special_state(B=8, N=19),
    "dist-eps1e-4-s100": lambda: separated(B=6, N=17, eps=1e-4, seed=2),
}


def rounded(case: Case, dtype) -> Case:
    """The case with its embeddings rounded to ``dtype`` (kept in float64 for the oracle)."""
    def r(x):
        return None if x is None else x.to(dtype).to(torch.float64)
    return dataclasses.replace(case, **{k: r(getattr(case, k)) for k in EMBEDDINGS})


def on_device(case: Case, backend: str, dtype, *, column_grads=True, leaves=True):
    """``(kwargs of the public call, the leaves with gradient, the state dtype)`` of the case on the backend's
    device: embeddings in ``dtype``, ``u`` in the accumulation dtype, the rows (and columns) as leaves."""
    device = DEVICES[backend]
    kw = case.kwargs(dtype=dtype)
    for k in EMBEDDINGS:
        if kw[k] is not None:
            kw[k] = kw[k].to(device)
    names = ["img", "txt"] + (["img_all", "txt_all"] if column_grads and kw["img_all"] is not None else [])
    for k in names if leaves else ():
        kw[k].requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw["u_img"], kw["u_txt"] = (kw[k].to(device=device, dtype=acc) for k in ("u_img", "u_txt"))
    return kw, (names if leaves else []), acc


def run(case: Case, backend: str, dtype, *, column_grads=True, loss_scale=1.0) -> dict:
    """Loss, new state and every gradient through the public API (float64 NumPy), and their dtypes."""
    kw, leaves, state_dtype = on_device(case, backend, dtype, column_grads=column_grads)
    s = torch.tensor(float(case.logit_scale), dtype=state_dtype, device=DEVICES[backend], requires_grad=True)
    loss, u_img, u_txt = dk.drrho_clip_loss(logit_scale=s, backend=backend, **kw)
    (loss * loss_scale).backward()
    out = dict(loss=loss.item(), u_img=u_img, u_txt=u_txt, d_s=s.grad.item() / loss_scale,
               dtypes=dict(loss=loss.dtype, u=u_img.dtype, grad={k: kw[k].grad.dtype for k in leaves}))
    for k in leaves:
        out["d_" + k] = kw[k].grad.double() / loss_scale
    return {k: (v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def scale_grad_error(got: float, want: dict, case: Case | None = None, *, scale=None, rho=None) -> float:
    """Error of dL/ds against ``|dL/ds| + 1e-3 (|A| + rho + |U|) / s^2`` (docs/SPEC.md, Appendix A);
    ``want`` holds the true loss, u and dL/ds; the scale and rho come from ``case`` or are given."""
    s = float(case.logit_scale if case is not None else scale)
    rho = float(case.rho if case is not None else rho)
    u_img, u_txt = np.asarray(want["u_img"], dtype=np.float64), np.asarray(want["u_txt"], dtype=np.float64)
    u_mean = (u_img.sum() + u_txt.sum()) / (2 * len(u_img))
    d_s, loss = float(want["d_s"]), float(want["loss"])
    weighted = s * loss - rho - u_mean                      # A = (1/(B(N-1))) sum w d
    return abs(float(got) - d_s) / (abs(d_s) + 1e-3 * (abs(weighted) + rho + abs(u_mean)) / s ** 2)


def assert_conforms(got: dict, case: Case, dtype, label: str = "") -> dict:
    """``got`` (from :func:`run`) matches the oracle of ``case`` within the tolerance table."""
    want = oracle(case)
    tol = TOLERANCES[dtype]
    errors = {k: rel_err(got[k], want[k], dtype if k.startswith("d_i") or k.startswith("d_t") else None)
              for k in want if k in got and k != "d_s"}
    errors["d_s"] = scale_grad_error(got["d_s"], want, case)
    assert {"loss", "u_img", "u_txt", "d_s", "d_img", "d_txt"} <= set(errors)
    for k, err in errors.items():
        bound = {"loss": tol.loss, "d_s": tol.scale}.get(k, tol.state if k.startswith("u_") else tol.grad)
        assert err <= bound, (f"{label} {k}: relative error {err:.2e} > {bound:.0e} (all: "
                              + ", ".join(f"{n}={v:.1e}" for n, v in errors.items()) + ")")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got["dtypes"]["loss"] == acc and got["dtypes"]["u"] == acc
    assert all(g == dtype for g in got["dtypes"]["grad"].values()), got["dtypes"]
    return errors


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend,dtype", backend_dtypes(TOLERANCES))
def test_backend_matches_oracle(backend, name, dtype):
    case = rounded(CASES[name](), dtype)
    got = run(case, backend, dtype)
    if case.img_all is not None:
        assert "d_img_all" in got and "d_txt_all" in got
    assert_conforms(got, case, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_only_gradients(backend):
    """Columns without gradient (the gather_u scheme's shape): d_img, d_txt only, the row terms."""
    case = make_case(B=6, N=21, d=10, dr=7)
    got = run(case, backend, torch.float32, column_grads=False)
    assert "d_img_all" not in got
    assert_conforms(got, case, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_excluded_by_index_not_value(backend):
    """Duplicated pairs: a negative with exactly the positive's score (a_ij = 0) still counts."""
    case = make_case(B=9, N=20, d=6, dr=4, offset=5)
    for name in ("img_all", "txt_all", "ref_img_all", "ref_txt_all"):
        cols = getattr(case, name)
        cols[3] = cols[case.offset]                    # column 3 repeats the first row's pair
        cols[case.offset + 2] = cols[case.offset + 1]  # two rows of this process are the same pair
    for name in ("img", "txt", "ref_img", "ref_txt"):
        setattr(case, name, getattr(case, name + "_all")[case.offset:case.offset + 9].clone())
    assert_conforms(run(case, backend, torch.float32), case, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    case = make_case(B=11, N=19, d=13, dr=6)
    strided = dataclasses.replace(case, **{k: getattr(case, k).T.contiguous().T for k in EMBEDDINGS})
    assert not strided.img.is_contiguous()
    assert_conforms(run(strided, backend, torch.float32), case, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logit_scale_stays_finite(backend):
    """s = 100 with margins near 2: exp(d) would overflow without the running maximum."""
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 4, generator=g, dtype=torch.float64), dim=1)
    case = Case(img=img, txt=-img, logit_scale=100.0, u_img=torch.zeros(8), u_txt=torch.zeros(8), rho=0.0)
    got = run(case, backend, torch.float32)
    assert np.isfinite(got["loss"]) and np.isfinite(got["d_img"]).all() and got["u_img"].max() > 100
    assert_conforms(got, case, torch.float32, backend)


def clustered(c: float, sigma: float, B=12, d=8, dr=6, seed=7) -> Case:
    """Embeddings ``c e_1 + sigma * noise`` (references unit-scale, spread 0.5) at s = 100: similarities
    near ``c^2`` whose spread is a few units of d, so that many weights of a row count, and the rounding
    of a similarity to a half dtype (about ``c^2`` ulps) moves d by O(0.1 - 1)."""
    g = torch.Generator().manual_seed(seed)

    def emb(width, centre, spread):
        e = torch.zeros(width, dtype=torch.float64)
        e[0] = centre
        return e + spread * torch.randn(B, width, generator=g, dtype=torch.float64)

    img, txt, ref_img, ref_txt = emb(d, c, sigma), emb(d, c, sigma), emb(dr, 1.0, 0.5), emb(dr, 1.0, 0.5)
    u = [torch.randn(B, generator=g, dtype=torch.float64).float() for _ in range(2)]
    return Case(img=img, txt=txt, logit_scale=100.0, u_img=u[0], u_txt=u[1], ref_img=ref_img, ref_txt=ref_txt,
                gamma=0.8)


# Per half dtype, a case whose similarities lose to the dtype's rounding (float16 keeps 11 bits: norm 8;
# bfloat16 8 bits, whose inputs also lose a spread below ~c/128: norm 4, spread 0.015).
HALF_ACCUMULATION = {torch.float16: lambda: clustered(8.0, 0.003), torch.bfloat16: lambda: clustered(4.0, 0.015)}


def u_from_half_similarities(case: Case, dtype) -> np.ndarray:
    """The image anchors' new u that a kernel computes if it rounds its similarity tiles ``x T^T`` and
    ``xr Tr^T`` to ``dtype`` before use (the pairs' own similarities kept exact): float64 NumPy, with part 1's
    ``l`` and moving average (``spec_oracle``) on the rounded margins."""
    x, t, xr, tr = (getattr(case, k).double().numpy() for k in ("img", "txt", "ref_img", "ref_txt"))
    half = lambda a: torch.from_numpy(a).to(dtype).double().numpy()   # noqa: E731
    d = case.logit_scale * (half(x @ t.T) - half(xr @ tr.T) - ((x * t).sum(1) - (xr * tr).sum(1))[:, None])
    B = d.shape[0]
    l = log_mean_exp_negatives(d, negatives(B, B, 0), case.eps)
    u_old = case.u_img.double().numpy()
    assert np.all(np.isfinite(u_old) & (u_old != 0))                    # every entry set: the blend applies
    return update_u(l, u_old, case.gamma)


@pytest.mark.parametrize("backend,dtype", backend_dtypes([torch.float16, torch.bfloat16]))
def test_half_tolerance_catches_a_similarity_rounded_to_half(backend, dtype):
    """Half inputs whose float32 accumulation matters: a similarity rounded to the input dtype (what a
    kernel that forgot float32 accumulation computes) misses the tolerance of u by more than 5x in
    float16 and in bfloat16 (checked here in NumPy), while every backend meets it."""
    case = rounded(HALF_ACCUMULATION[dtype](), dtype)
    want = oracle(case)
    assert rel_err(u_from_half_similarities(case, dtype), want["u_img"]) > 5 * TOLERANCES[dtype].state
    assert_conforms(run(case, backend, dtype), case, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_weights_above_65504(backend):
    """gamma = 1e-4 with a low stored u makes w_ij ~ N / gamma > 65504: a float16 weighted product
    must rescale instead of overflowing to inf."""
    u = torch.full((20,), -50.0)
    case = rounded(make_case(B=20, d=24, dr=24, gamma=1e-4, u=(u, u.clone())), torch.float16)
    got = run(case, backend, torch.float16)
    assert np.isfinite(got["d_img"]).all() and np.isfinite(got["d_txt"]).all()
    assert_conforms(got, case, torch.float16, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_tiny_weights_with_loss_scaling(backend):
    """A stale, large u makes every weight ~ 1e-9, below float16's subnormals; with an upstream loss
    scale (as AMP's GradScaler applies) the gradient itself is representable and must be right."""
    u = torch.full((20,), 24.0)
    case = rounded(make_case(B=20, d=24, dr=24, gamma=0.5, u=(u, u.clone())), torch.float16)
    assert_conforms(run(case, backend, torch.float16, loss_scale=2.0 ** 24), case, torch.float16, backend)


def test_float64_on_triton_resolves_to_torch():
    """Triton has no float64 kernels: the one resolution rule sends float64 to the torch backend (which is
    why the suite generates no Triton x float64 case): ``backend="triton"`` on float64 inputs gives the
    torch backend's numbers, bit for bit."""
    from drrho_kernels.backends import resolve
    device = torch.device(TRITON_DEVICE or "cpu")
    if TRITON_DEVICE is None:
        pytest.skip("triton cannot run here")
    assert resolve("triton", device, torch.float64) == "torch"
    assert resolve("triton", device, torch.float32) == "triton"
    if device.type == "cuda":
        assert resolve("auto", device, torch.float64) == "torch"
    case = make_case(B=5, N=11, d=4, dr=3)
    on_triton, on_torch = run(case, "triton", torch.float64), run(case, "torch", torch.float64)
    for key, value in on_torch.items():
        if key != "dtypes":
            np.testing.assert_array_equal(on_triton[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------------
# The op pair's semantics outside the autograd path (every fused backend): the fold, column
# gradients and the one-process transpose trick.

FUSED = [p for p in BACKENDS if p.values[0] != "reference"]


def _problem(case, backend, dtype):
    from helpers import problem
    return problem(case, backend, dtype, device=DEVICES[backend])


def _gains(p, weights, grad_phi=1.0):
    """``(gain, col_gain, dgain, col_dgain)`` of an upstream gradient ``grad_phi`` (no distillation)."""
    gain = grad_phi * p.tiles.scale.detach()
    return gain, None if weights.col_scale is None else grad_phi * weights.col_scale, None, None


@pytest.mark.parametrize("ref", [True, False], ids=["ref", "noref"])
@pytest.mark.parametrize("backend,dtype", backend_dtypes([torch.float64, torch.float32, torch.bfloat16], FUSED))
def test_fold_of_gathered_columns_gives_the_global_gradient(backend, ref, dtype):
    """The gather_u scheme's backward: a process holding rows [off, off + B) of a global batch of N,
    with every anchor's new state and margin given as the fold's columns, gets exactly the
    one-process gradient of those samples. With column gradients asked too, the columns get the
    rows' anchors' weights only (what the unfolded call gives)."""
    from drrho_kernels.core import ops
    from drrho_kernels.loss.functional import fused_terms
    W, B = 3, 5
    N = W * B
    glob = rounded(make_case(B=N, d=11, dr=6, ref=ref, seed=3), dtype)
    want = oracle(glob)
    gp = _problem(glob, backend, dtype)
    g_terms = fused_terms(gp)
    col_scale = gp.tiles.scale.detach()
    tol = TOLERANCES[dtype].grad
    for r in range(W):
        rows = slice(r * B, (r + 1) * B)
        local = dataclasses.replace(
            glob, img=glob.img[rows], txt=glob.txt[rows], u_img=glob.u_img[rows], u_txt=glob.u_txt[rows],
            ref_img=glob.ref_img[rows] if ref else None, ref_txt=glob.ref_txt[rows] if ref else None,
            img_all=glob.img, txt_all=glob.txt, ref_img_all=glob.ref_img, ref_txt_all=glob.ref_txt, offset=r * B)
        p = _problem(local, backend, dtype)
        terms = fused_terms(p)
        assert rel_err(terms.u_new.cpu(), g_terms.u_new[:, rows].cpu()) <= TOLERANCES[dtype].state
        weights = terms.weights(col_scale=col_scale, col_log_norm=g_terms.u_new, col_margin=g_terms.margin)
        gains = _gains(p, weights)
        d_img, d_txt, d_img_all, _ = ops.backward(backend, gains, p.tiles, weights, False)
        assert d_img.dtype == dtype and d_img_all.shape == (0, 11)
        norm = float(glob.logit_scale) * N * (N - 1)          # d phi / dx = s N (N - 1) dL/dx, one process
        for name, got in (("img", d_img), ("txt", d_txt)):
            assert rel_err(got.double().cpu() / norm, want["d_" + name][rows], dtype) <= tol, (r, name)
        both = ops.backward(backend, gains, p.tiles, weights, True)
        plain = ops.backward(backend, (gains[0], None, None, None), p.tiles, terms.weights(), True)
        for a, b in zip(both[:2], (d_img, d_txt)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        for a, b in zip(both[2:], plain[2:]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("ref", [True, False], ids=["ref", "noref"])
@pytest.mark.parametrize("backend,dtype", backend_dtypes([torch.float64, torch.float32], FUSED))
def test_transpose_trick_equals_the_general_path(backend, ref, dtype):
    """One process (one similarity matrix per chunk feeds both directions) gives what the
    two-matrix path gives with the rows' own weights as the fold's columns: forward and backward."""
    from drrho_kernels.core import ops
    from drrho_kernels.loss.functional import fused_terms
    case = make_case(B=21, d=5, dr=3, ref=ref, seed=2)
    p = _problem(case, backend, dtype)
    general = dataclasses.replace(p, tiles=dataclasses.replace(p.tiles, columns_are_rows=False))
    one, two = fused_terms(p), fused_terms(general)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in ((one.u_new, two.u_new), (one.wsum, two.wsum), (one.wdsum, two.wdsum), (one.margin, two.margin)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    weights = one.weights()
    gain = _gains(p, weights, 0.7)[0]
    own = two.weights(col_scale=p.tiles.scale.detach(), col_log_norm=two.u_new, col_margin=two.margin)
    trick = ops.backward(backend, (gain, None, None, None), p.tiles, weights, False)
    folded = ops.backward(backend, (gain, gain, None, None), general.tiles, own, False)
    for a, b in zip(trick[:2], folded[:2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


# ---------------------------------------------------------------------------------------------
# The temperature family (SPEC 2.1): per-direction scales, multiply_tau off, per-sample temperatures.
# Truth: tests/family_oracle.py (independent float64 NumPy, checked against the authors' code).

FORM_CASES = ["single-ref-B6-d5", "single-B37-d40-dr23", "single-s100", "single-special-u", "dist-ref-B5-N23-d17-dr9",
              "dist-offset-end-B4-N19", "dist-eps1e-4-s100"]


def run_form(case: Case, backend: str, dtype, form: str, s_txt: float | None):
    """``run`` for a global temperature form: ``form`` "no_multiply_tau" or "per_direction" (``s_txt``)."""
    device = DEVICES[backend]
    kw, leaves, acc = on_device(case, backend, dtype)
    scales = [torch.tensor(float(v), dtype=acc, device=device, requires_grad=True)
              for v in ((case.logit_scale, s_txt) if form == "per_direction" else (case.logit_scale,))]
    loss, u_img, u_txt = dk.drrho_clip_loss(logit_scale=tuple(scales) if len(scales) == 2 else scales[0],
                                            backend=backend, multiply_tau=form != "no_multiply_tau", **kw)
    grads = torch.autograd.grad(loss, [kw[k] for k in leaves] + scales)
    out = dict(loss=loss.item(), u_img=u_img, u_txt=u_txt, **{"d_" + k: g for k, g in zip(leaves, grads)})
    out.update(dict(zip(("d_s_img", "d_s_txt") if len(scales) == 2 else ("d_s",), (g.item() for g in grads[len(leaves):]))))
    return {k: (v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def _scale_error(got: float, want: dict, k: str, s: float, rho: float) -> float:
    """dL/ds_k = (A_k - U_k - rho) / s_k^2 per direction: the metric of docs/SPEC.md, Appendix A."""
    terms = (abs(want[f"A_{k}"]) + abs(want[f"U_{k}"]) + rho) / s ** 2
    return abs(got - want[f"d_s_{k}"]) / (abs(want[f"d_s_{k}"]) + 1e-3 * terms)


@pytest.mark.parametrize("form", ["no_multiply_tau", "per_direction", "per_direction_tied"])
@pytest.mark.parametrize("backend,dtype,name", backend_dtype_cases([torch.float64, torch.float32, torch.bfloat16], FORM_CASES, BACKENDS))
def test_temperature_form_matches_oracle(backend, name, form, dtype):
    from family_oracle import global_oracle
    case = rounded(CASES[name](), dtype)
    s_txt = case.logit_scale * (0.6 if form == "per_direction" else 1.0)
    oracle_form = "no_multiply_tau" if form == "no_multiply_tau" else "per_direction"
    want = global_oracle(case, form=oracle_form, scale_txt=s_txt if oracle_form == "per_direction" else None)
    got = run_form(case, backend, dtype, "per_direction" if form.startswith("per_direction") else form, s_txt)
    tol = TOLERANCES[dtype]
    errors = {k: rel_err(got[k], want[k], dtype if k.startswith("d_i") or k.startswith("d_t") else None)
              for k in ("loss", "u_img", "u_txt", "d_img", "d_txt", "d_img_all", "d_txt_all") if k in got}
    if form == "no_multiply_tau":
        errors["d_s"] = rel_err(got["d_s"], want["d_s"])              # (A_I + A_T) / s: no cancellation
    else:
        errors["d_s_img"] = _scale_error(got["d_s_img"], want, "img", case.logit_scale, case.rho)
        errors["d_s_txt"] = _scale_error(got["d_s_txt"], want, "txt", s_txt, case.rho)
    for k, err in errors.items():
        bound = {"loss": tol.loss}.get(k, tol.state if k.startswith("u_") else
                                       tol.scale if k.startswith("d_s") else tol.grad)
        assert err <= bound, f"{backend} {name} {form} {k}: {err:.2e} > {bound:.0e} ({errors})"


def test_tied_pair_gives_the_single_scales_embedding_gradients_and_the_seeds_scale_gradient():
    """Passing the same tensor twice: embedding gradients equal the global form's; the scale gradient is
    the seed's, sum_k (A_k - U_k - rho) / s^2, not the released code's (A - U/2 - rho) / s^2."""
    from family_oracle import global_oracle
    case = make_case(B=7, d=6, dr=4, seed=5)
    s = torch.tensor(float(case.logit_scale), dtype=torch.float64, requires_grad=True)
    kw = case.kwargs(requires_grad=True)
    img, txt = kw.pop("img"), kw.pop("txt")
    kw["u_img"], kw["u_txt"] = kw["u_img"].double(), kw["u_txt"].double()
    tied, _, _ = dk.drrho_clip_loss(img, txt, (s, s), backend="torch", **kw)
    g_tied = torch.autograd.grad(tied, [img, txt, s])
    single, _, _ = dk.drrho_clip_loss(img, txt, s, backend="torch", **kw)
    g_single = torch.autograd.grad(single, [img, txt, s])
    for a, b in zip(g_tied[:2], g_single[:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    want = global_oracle(case, form="per_direction")
    assert abs(g_tied[2].item() - want["d_s"]) <= 1e-10 * abs(want["d_s"])
    assert abs(g_single[2].item() - g_tied[2].item()) > 1e-3 * abs(want["d_s"])    # the two gradients differ


def _tau_states(B: int, seed: int, mixed: bool = True):
    """Per-direction fast_clip states (float64): temperatures 0.01 (s = 100) next to 1.0 (s = 1) when
    ``mixed``, linear u with unset entries (0, NaN, inf, below 1e-35), bounds, Adam moments."""
    from family_oracle import TauState as OracleState
    g = np.random.default_rng(seed)
    states = []
    for _ in range(2):
        tau = g.uniform(0.02, 0.5, B)
        if mixed:
            tau[::3], tau[1::3] = 0.01, 1.0
        u = g.uniform(1e-3, 2.0, B)
        u[:4] = [0.0, np.nan, np.inf, 1e-40][: min(4, B)]
        states.append(OracleState(tau, u, g.uniform(0.0, 3.0, B), g.normal(0.0, 0.5, B), g.uniform(0.0, 0.5, B)))
    return states


def run_individual(case: Case, states, backend, dtype, epoch, options):
    from drrho_kernels.core.inputs import TauState, TauOptions
    from drrho_kernels.loss.functional import individual_clip_loss
    device = DEVICES[backend]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw = case.kwargs(dtype=dtype)
    for k in EMBEDDINGS:
        if kw[k] is not None:
            kw[k] = kw[k].to(device)
    img, txt = kw.pop("img").requires_grad_(), kw.pop("txt").requires_grad_()
    kw.pop("u_img"), kw.pop("u_txt")
    pair = lambda name: torch.tensor(np.stack([getattr(s, name) for s in states]), dtype=acc, device=device)  # noqa: E731
    state = TauState(pair("tau"), pair("b"), pair("m"), pair("v"))
    opts = TauOptions(epoch=epoch, **options)
    u = pair("u")
    loss, u_img, u_txt, new = individual_clip_loss(img, txt, u[0], u[1], state, opts, backend=backend, **kw)
    d_img, d_txt = torch.autograd.grad(loss, [img, txt])
    out = dict(loss=loss.item(), d_img=d_img, d_txt=d_txt, u_img=u_img, u_txt=u_txt)
    for name, ours in (("tau", "tau"), ("b", "bound"), ("m", "m"), ("v", "v")):
        out[f"{name}_img"], out[f"{name}_txt"] = getattr(new, ours)
    return {k: (v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


INDIVIDUAL_OPTIONS = dict(lr=0.0133, beta1=0.9, beta2=0.999, eps=1e-8, tau_min=0.01, tau_max=1.0, grad_clamp=5.0)


@pytest.mark.parametrize("epoch", [0, 1, 2])
@pytest.mark.parametrize("ref", [True, False], ids=["ref", "noref"])
@pytest.mark.parametrize("backend,dtype", backend_dtypes([torch.float64, torch.float32, torch.bfloat16], FUSED))
def test_individual_temperatures_match_fast_clip(backend, ref, epoch, dtype):
    """Per-sample temperatures, one process: fast_clip's loss value, embedding gradients and new tables
    (tau, u, b, m, v), with s = 100 next to s = 1 in the same tile and reset entries of u; with a
    reference model every margin is RHO-shifted (no released code does this)."""
    from family_oracle import individual_oracle
    B = 19
    case = rounded(make_case(B=B, d=13, dr=9, ref=ref, seed=21 + epoch, gamma=0.7), dtype)
    case = dataclasses.replace(case, eps=1e-6)
    states = _tau_states(B, seed=epoch)
    options = dict(INDIVIDUAL_OPTIONS, lr=0.05)
    want = individual_oracle(case, *states, epoch=epoch, lr_tau=options["lr"], beta1=options["beta1"],
                             beta2=options["beta2"], eps_tau=options["eps"], tau_min=options["tau_min"],
                             tau_max=options["tau_max"], grad_clamp=options["grad_clamp"])
    got = run_individual(case, states, backend, dtype, epoch, options)
    tol = TOLERANCES[dtype]
    for k in ("loss", "d_img", "d_txt", "u_img", "u_txt", "tau_img", "tau_txt", "b_img", "b_txt", "m_img", "m_txt",
              "v_img", "v_txt"):
        bound = tol.loss if k == "loss" else tol.grad if k.startswith("d_") else max(tol.state, 10 * tol.loss)
        err = rel_err(got[k], want[k], dtype if k.startswith("d_") else None)
        assert err <= bound, f"{backend} epoch {epoch} {k}: {err:.2e} > {bound:.0e}"


# ---------------------------------------------------------------------------------------------
# Distillation (SPEC 2.2) and per-sample outputs (SPEC 2.3). Truth: family_oracle's sogclr_oracle
# (the authors' SogCLRLoss + train.py, checked against their code) and per_sample_oracle.

DISTILL_CASES = ["single-ref-B6-d5", "single-B37-d40-dr23", "single-s100", "dist-ref-B5-N23-d17-dr9",
                 "dist-offset-end-B4-N19", "dist-eps1e-4-s100", "single-special-u"]


@pytest.mark.parametrize("multiply_tau", [True, False], ids=["multiply_tau", "no_multiply_tau"])
@pytest.mark.parametrize("backend,dtype,name", backend_dtype_cases([torch.float64, torch.float32, torch.bfloat16], DISTILL_CASES, BACKENDS))
def test_distillation_matches_oracle(backend, name, multiply_tau, dtype):
    from family_oracle import sogclr_oracle
    case = rounded(CASES[name](), dtype)
    weight, teacher = 0.7, 50.0
    want = sogclr_oracle(case, multiply_tau=multiply_tau, distill_weight=weight, teacher_scale=teacher)
    device = DEVICES[backend]
    kw, leaves, acc = on_device(case, backend, dtype)
    s = torch.tensor(float(case.logit_scale), dtype=acc, device=device, requires_grad=True)
    loss, u_img, _ = dk.drrho_clip_loss(logit_scale=s, backend=backend, multiply_tau=multiply_tau,
                                        distill_weight=weight, distill_scale=teacher, **kw)
    grads = torch.autograd.grad(loss, [kw[k] for k in leaves] + [s])
    tol = TOLERANCES[dtype]
    errors = dict(loss=rel_err(loss.item(), want["total"]), u_img=rel_err(u_img.double().cpu(), want["u_img"]),
                  d_s=rel_err(grads[-1].item(), want["d_s"]))
    for k, g in zip(leaves, grads):
        errors["d_" + k] = rel_err(g.double().cpu(), want["d_" + k], dtype)
    bounds = dict(loss=tol.loss, u_img=tol.state, d_s=max(tol.scale, tol.loss))
    for k, err in errors.items():
        assert err <= bounds.get(k, tol.grad), f"{backend} {name} {k}: {err:.2e} ({errors})"


PER_SAMPLE_CASES = ["single-ref-B6-d5", "single-noref-B7-d9", "single-B37-d40-dr23", "dist-ref-B5-N23-d17-dr9",
                    "dist-noref-offset0-B6-N20", "single-eps1e-6-s100"]


@pytest.mark.parametrize("backend,dtype,name", backend_dtype_cases([torch.float64, torch.float32], PER_SAMPLE_CASES, BACKENDS))
def test_per_sample_outputs_match_oracle(backend, name, dtype):
    from family_oracle import per_sample_oracle
    case = rounded(CASES[name](), dtype)
    want = per_sample_oracle(case, teacher_scale=100.0)
    kw, _, acc = on_device(case, backend, dtype, leaves=False)
    out = dk.drrho_clip_loss(logit_scale=float(case.logit_scale), backend=backend, return_per_sample=True, **kw)
    plain = dk.drrho_clip_loss(logit_scale=float(case.logit_scale), backend=backend, **kw)
    assert out.loss.item() == pytest.approx(plain[0].item(), rel=1e-12, abs=1e-12)   # the loss does not change
    values = out.per_sample._asdict()
    names = dict(distill_img="ce_img", distill_txt="ce_txt")
    for field, value in values.items():
        key = names.get(field, field)
        if case.ref_img is None and key.split("_")[0] in ("ref", "ce"):
            assert value is None, field
            continue
        assert value.shape == (case.img.shape[0],) and not value.requires_grad
        bound = 10 * TOLERANCES[dtype].state
        assert rel_err(value.double().cpu(), want[key]) <= bound, f"{backend} {name} {field}"
