"""The Triton backend's real kernels against the float64 oracle (tests/spec_oracle.py).

CI has no GPU: conftest sets ``TRITON_INTERPRET=1`` before any import, so the kernels run in Triton's
interpreter on CPU tensors with the fixed 16 x 16 tiles of ``launch.INTERPRETER_TILES``. The shapes are
tiny but odd (B, N, d, dr not multiples of 16; several row, column, K and d-slice blocks), so every
mask, the positive exclusion by index, the online max, the d-slicing and the fold run. On a CUDA
machine with ``TRITON_INTERPRET=0`` the same tests run the compiled kernels on the GPU.

Tolerances (SPEC.md): float32 1e-4 relative against float64; float16 / bfloat16 2e-2 norm-wise on
gradients and 1e-3 on loss and state. Half inputs are compared with the oracle evaluated on the
same rounded inputs, so the tolerance measures the kernels, not the rounding of the inputs.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import drrho_kernels as dk
from drrho_kernels.backends import torch_chunked

from spec_oracle import make_case, oracle

triton = pytest.importorskip("triton")

from drrho_kernels.backends.triton import launch  # noqa: E402
from drrho_kernels.backends.triton import ops as triton_ops  # noqa: E402

if launch.interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover - compiled kernels and no GPU
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

EMBEDDINGS = ("img", "txt", "ref_img", "ref_txt", "img_all", "txt_all", "ref_img_all", "ref_txt_all")
# dtype: (tolerance on gradients (norm-wise), tolerance on loss, u and d loss / d s)
DTYPES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (2e-2, 1e-3),
}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

CASES = {
    # one process, reference, dr != d, B = N = 37 (3 row / column blocks), d = 40 (3 K chunks, 3 d slices)
    "single-ref-B37-d40-dr23": dict(B=37, d=40, dr=23),
    "single-noref-B7-d9": dict(B=7, d=9, ref=False),
    "single-N2-d3": dict(B=2, d=3),
    "single-unset-u-gamma1": dict(B=9, d=6, u="unset", gamma=1.0),
    "single-s100": dict(B=12, d=16, dr=20, scale=100.0),
    # distributed shape: B local rows against N gathered columns, the positives at `offset`
    "dist-ref-B5-N23-d17-dr9": dict(B=5, N=23, d=17, dr=9),
    "dist-noref-offset0-B6-N20": dict(B=6, N=20, d=12, ref=False, offset=0),
    "dist-offset-end-B4-N19": dict(B=4, N=19, d=8, offset=15),
    "dist-B1-N2": dict(B=1, N=2, d=3),
}


def rounded(case, dtype):
    """The case with its embeddings rounded to ``dtype`` (kept in float64 for the oracle)."""
    def r(x):
        return None if x is None else x.to(dtype).to(torch.float64)
    return dataclasses.replace(case, **{k: r(getattr(case, k)) for k in EMBEDDINGS})


def run(case, dtype, *, column_grad=True, loss_scale=1.0, backend="triton"):
    """Loss, new state and every gradient through the public API, on DEVICE."""
    kw = case.kwargs(dtype=dtype)
    for k in EMBEDDINGS:
        if kw.get(k) is not None:
            kw[k] = kw[k].to(DEVICE)
    leaves = ["img", "txt"] + (["img_all", "txt_all"] if column_grad and kw.get("img_all") is not None else [])
    for k in leaves:
        kw[k].requires_grad_(True)
    kw["u_img"], kw["u_txt"] = kw["u_img"].to(DEVICE), kw["u_txt"].to(DEVICE)
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(float(case.logit_scale), dtype=s_dtype, device=DEVICE, requires_grad=True)
    loss, u_img, u_txt = dk.drrho_clip_loss(logit_scale=s, backend=backend, **kw)
    (loss * loss_scale).backward()
    out = dict(loss=loss.detach(), u_img=u_img, u_txt=u_txt, d_s=s.grad / loss_scale)
    for k in leaves:
        out["d_" + k] = kw[k].grad.double() / loss_scale
        assert kw[k].grad.dtype == dtype, f"grad of {k}: expected {dtype}, got {kw[k].grad.dtype}"
    return out


def rel_err(got, want) -> float:
    got = np.asarray(torch.as_tensor(got).detach().double().cpu())
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def ds_scale(case, want: dict) -> float:
    """Sum of the magnitudes of the three terms of dL/ds (SPEC): (|c wd| + rho + |mean u|) / s^2.

    dL/ds is a difference of terms of size ~rho / s^2 and can be orders of magnitude smaller than them
    (-4e-4 against 0.32 in one case here), so its error is judged against this scale: float32 rounding
    of the terms alone (in any backend, the dense reference included) exceeds 1e-4 of the difference.
    """
    s, rho = float(case.logit_scale), case.rho
    u_mean = (want["u_img"].sum() + want["u_txt"].sum()) / (2 * len(want["u_img"]))
    cwd = s * want["loss"] - rho - u_mean
    return (abs(cwd) + rho + abs(u_mean)) / s ** 2


def assert_matches(got: dict, want: dict, dtype, label="", case=None):
    grad_tol, value_tol = DTYPES[dtype]
    errors = {k: rel_err(got[k], want[k]) for k in want if k in got}
    if case is not None:   # d_s against the size of its terms (see ds_scale)
        errors["d_s"] = abs(float(got["d_s"]) - want["d_s"]) / ds_scale(case, want)
    assert set(errors) >= {"loss", "u_img", "u_txt", "d_s", "d_img", "d_txt"}
    for k, e in errors.items():
        tol = grad_tol if k in ("d_img", "d_txt", "d_img_all", "d_txt_all") else value_tol
        assert e <= tol, f"{label} {k}: relative error {e:.2e} > {tol:.0e} (all: " + \
            ", ".join(f"{n}={v:.1e}" for n, v in errors.items()) + ")"
    return errors


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle(name, dtype):
    case = rounded(make_case(**CASES[name]), dtype)
    want = oracle(case)
    got = run(case, dtype)
    if case.img_all is not None:
        assert "d_img_all" in got and "d_txt_all" in got
    assert_matches(got, want, dtype, name, case)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's fixed tiles are what this test varies")
@pytest.mark.parametrize("fwd_tiles, bwd_tiles", [
    (launch.Tiles(32, 16, 16, 32, 0, 1, 1), launch.Tiles(16, 32, 32, 16, 64, 1, 1)),
    (launch.Tiles(16, 64, 64, 16, 0, 1, 1), launch.Tiles(32, 16, 16, 64, 32, 1, 1)),
], ids=["rect-a", "rect-b"])
def test_rectangular_tiles(monkeypatch, fwd_tiles, bwd_tiles):
    """BM != BN != BK != BKR != BD: no block size stands in for another (the default tiles are square)."""
    monkeypatch.setattr(launch, "INTERPRETER_FWD_TILES", fwd_tiles)
    monkeypatch.setattr(launch, "INTERPRETER_TILES", bwd_tiles)
    for kw in (dict(B=21, N=50, d=37, dr=19), dict(B=35, d=70, dr=9)):
        case = make_case(**kw)
        assert_matches(run(case, torch.float32), oracle(case), torch.float32, str(kw), case)


# ---------------------------------------------------------------------------------------------
# the one-process forward (columns_are_rows): each score tile once, row and column statistics
# ---------------------------------------------------------------------------------------------

def _fwd_args(case, dtype):
    g, s, u_img, u_txt = _process_problem(case, dtype)
    return (g["img"], g["txt"], g["img"], g["txt"], g["ref_img"], g["ref_txt"], g["ref_img"], g["ref_txt"], s,
            u_img, u_txt, 0, case.gamma, case.eps)


def test_single_process_uses_transposed_forward(monkeypatch):
    """The public API, one process: the forward is the transposed one (and the two-direction kernel
    is not launched); the distributed shape keeps the two-direction kernel."""
    calls = []
    real = launch.forward_transposed
    monkeypatch.setattr(launch, "forward_transposed", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_fwd = launch.kernels._fwd_kernel
    launched = []

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real_fwd[grid]
    monkeypatch.setattr(launch.kernels, "_fwd_kernel", Spy())
    case = make_case(B=9, d=6, dr=5)
    assert_matches(run(case, torch.float32), oracle(case), torch.float32, case=case)
    assert calls == [1] and launched == []
    case = make_case(B=4, N=11, d=6, dr=5)
    assert_matches(run(case, torch.float32), oracle(case), torch.float32, case=case)
    assert calls == [1] and len(launched) == 1


# (groups, splits, panel columns) with the interpreter's 16 x 16 tiles at B = 53 (4 row and 4 column
# blocks, the last one ragged): one program; groups only; splits only; several panels per group
# (panel 16 = one block); uneven groups (1, 1, 2 blocks) with a two-block panel; everything at once.
PLANS = [(1, 1, 64), (4, 1, 64), (1, 4, 64), (2, 2, 16), (3, 2, 32), (3, 3, 16)]


def test_transposed_forward_plans():
    """Every (groups, splits, panel) split of the tiles gives the two-direction forward's statistics
    (float32, 1e-5) and the oracle's state; repeated runs are bitwise equal (no atomics)."""
    case = make_case(B=53, d=20, dr=9, seed=7)
    args = _fwd_args(case, torch.float32)
    x, t, _, _, xr, tr, _, _, s, u_img, u_txt, _, gamma, eps = args
    two_dir = launch.forward(*args, columns_are_rows=False)
    want = oracle(case)
    names = ("phi", "u_img", "u_txt", "margin", "wsum_img", "wsum_txt")
    for plan in PLANS:
        got = launch.forward_transposed(x, t, xr, tr, True, 9, s, u_img, u_txt, gamma, eps, plan=launch.Plan(*plan))
        for name, a, b in zip(names, got, two_dir):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{plan} {name}")
        assert rel_err(got[1], want["u_img"]) < 1e-5 and rel_err(got[2], want["u_txt"]) < 1e-5, plan
    again = launch.forward_transposed(x, t, xr, tr, True, 9, s, u_img, u_txt, gamma, eps, plan=launch.Plan(*plan))
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    for bad in ((5, 1, 16), (1, 5, 16), (0, 1, 16)):        # a group or split without a block
        with pytest.raises(ValueError, match="plan"):
            launch.forward_transposed(x, t, xr, tr, True, 9, s, u_img, u_txt, gamma, eps, plan=launch.Plan(*bad))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: DTYPE_IDS[d])
def test_transposed_forward_vs_two_direction(dtype):
    """Op level, every dtype, without reference, odd B, a plan with groups, splits and panels:
    the transposed forward against the two-direction kernel on the same inputs."""
    case = rounded(make_case(B=45, d=19, ref=False, seed=11, scale=30.0), dtype)
    args = _fwd_args(case, dtype)
    x, t, _, _, _, _, _, _, s, u_img, u_txt, _, gamma, eps = args
    got = launch.forward_transposed(x, t, x, t, False, 0, s, u_img, u_txt, gamma, eps, plan=launch.Plan(2, 3, 16))
    want = launch.forward(*args, columns_are_rows=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)


def test_distributed_rows_only():
    """Columns without gradient: only d_img, d_txt (the row terms), no column kernel."""
    case = make_case(B=6, N=21, d=10, dr=7)
    got = run(case, torch.float32, column_grad=False)
    assert "d_img_all" not in got
    assert_matches(got, oracle(case), torch.float32, case=case)


def test_state_special_values():
    """Unset state (0, +-inf, NaN) restarts from l; set entries follow the moving average."""
    B = 8
    u = torch.tensor([0.0, math.inf, -math.inf, math.nan, 0.3, -1.2, 2.5, 1e-3])
    case = make_case(B=B, d=7, u=(u.clone(), u.flip(0).clone()), gamma=0.3)
    got = run(case, torch.float32)
    assert_matches(got, oracle(case), torch.float32, case=case)


def test_positive_excluded_by_index_not_value():
    """Duplicated pairs: a negative with exactly the positive's score (a_ij = 0) still counts."""
    case = make_case(B=9, N=20, d=6, dr=4, offset=5)
    for name in ("img_all", "txt_all", "ref_img_all", "ref_txt_all"):
        cols = getattr(case, name)
        cols[3] = cols[case.offset]                    # column 3 repeats the first row's pair
        cols[case.offset + 2] = cols[case.offset + 1]  # two rows of this process are the same pair
    for name in ("img", "txt", "ref_img", "ref_txt"):
        setattr(case, name, getattr(case, name + "_all")[case.offset:case.offset + 9].clone())
    got = run(case, torch.float32)
    assert_matches(got, oracle(case), torch.float32, case=case)


def test_noncontiguous_inputs():
    case = make_case(B=11, N=19, d=13, dr=6)
    kw = case.kwargs(dtype=torch.float32)
    for k in EMBEDDINGS:
        kw[k] = kw[k].T.contiguous().T        # same values, column-major strides
        assert not kw[k].is_contiguous()
        kw[k] = kw[k].to(DEVICE)
    kw["u_img"], kw["u_txt"] = kw["u_img"].to(DEVICE), kw["u_txt"].to(DEVICE)
    for k in ("img", "txt", "img_all", "txt_all"):
        kw[k].requires_grad_(True)
    loss, u_img, _ = dk.drrho_clip_loss(logit_scale=case.logit_scale, backend="triton", **kw)
    loss.backward()
    want = oracle(case)
    assert rel_err(loss, want["loss"]) < 1e-4
    assert rel_err(u_img, want["u_img"]) < 1e-4
    for k in ("img", "txt", "img_all", "txt_all"):
        assert rel_err(kw[k].grad, want["d_" + k]) < 1e-4, k


def _max_weight(case) -> float:
    """max_ij w_ij of the oracle's new state (to prove a case really leaves the float16 range)."""
    x, T = case.img.numpy(), case.txt.numpy()
    xr, tr = case.ref_img.numpy(), case.ref_txt.numpy()
    pos = (x * T).sum(1) - (xr * tr).sum(1)
    d = case.logit_scale * (x @ T.T - xr @ tr.T - pos[:, None])
    np.fill_diagonal(d, -np.inf)
    return float(np.exp(d - oracle(case)["u_img"][:, None]).max())


def test_fp16_weights_above_65504():
    """gamma = 1e-4 with a low stored u makes w_ij ~ N / gamma > 65504: the float16 weighted product
    must rescale (SCALE_P) instead of overflowing to inf."""
    B = 20
    u = torch.full((B,), -50.0)
    case = rounded(make_case(B=B, d=24, dr=24, gamma=1e-4, u=(u, u.clone())), torch.float16)
    assert _max_weight(case) > 65504.0
    got = run(case, torch.float16)
    assert all(torch.isfinite(got[k]).all() for k in ("d_img", "d_txt"))
    assert_matches(got, oracle(case), torch.float16, case=case)


def test_fp16_tiny_weights_with_loss_scaling():
    """A stale, large u makes every weight ~ 1e-9, below float16's subnormals; with an upstream loss
    scale (as AMP's GradScaler applies) the gradient itself is representable and must be right."""
    B = 20
    u = torch.full((B,), 24.0)
    case = rounded(make_case(B=B, d=24, dr=24, gamma=0.5, u=(u, u.clone())), torch.float16)
    assert _max_weight(case) < 6e-8
    got = run(case, torch.float16, loss_scale=2.0 ** 24)
    assert_matches(got, oracle(case), torch.float16, case=case)


def _process_problem(case, dtype):
    """Op arguments of one process (rows at ``offset`` of the global batch), on DEVICE."""
    kw = case.kwargs(dtype=dtype)
    t = {k: (kw[k].to(DEVICE) if kw[k] is not None else None) for k in EMBEDDINGS}
    s = torch.tensor(float(case.logit_scale), device=DEVICE)
    return t, s, kw["u_img"].to(DEVICE), kw["u_txt"].to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_fold_gather_u_scheme(dtype):
    """The distributed scheme that gathers u: with the global batch's new state and margins given,
    the row kernel folds every column anchor's terms into d_img, d_txt. Process r's fold gradient of
    its phi_r equals the gradient of the global single-process phi on its rows."""
    W, B = 3, 7
    N = W * B
    glob = rounded(make_case(B=N, d=11, dr=6, seed=3), dtype)           # the global batch, one process
    want = oracle(glob)
    fwd, bwd = triton_ops.fused_ops()
    g, s, u_img, u_txt = _process_problem(glob, dtype)
    _, gu_img, gu_txt, gmargin, _, _ = fwd(g["img"], g["txt"], g["img"], g["txt"], g["ref_img"], g["ref_txt"],
                                           g["ref_img"], g["ref_txt"], s, u_img, u_txt, 0, glob.gamma,
                                           glob.eps, True)
    for r in range(W):
        off = r * B
        rows = slice(off, off + B)
        args = (g["img"][rows], g["txt"][rows], g["img"], g["txt"], g["ref_img"][rows], g["ref_txt"][rows],
                g["ref_img"], g["ref_txt"], s)
        _, ui, ut, margin, wi, wt = fwd(*args, u_img[rows], u_txt[rows], off, glob.gamma, glob.eps, False)
        torch.testing.assert_close(ui, gu_img[rows], rtol=1e-5, atol=1e-6)
        grad_phi = torch.ones((), device=DEVICE)
        outs = bwd(grad_phi, *args, ui, ut, margin, wi, wt, gu_img, gu_txt, gmargin, off, False, False)
        expected = torch_chunked.backward(grad_phi, *args, ui, ut, margin, wi, wt, gu_img, gu_txt, gmargin, off,
                                          False, False)
        scale = float(glob.logit_scale) * N * (N - 1)      # d phi / dx = s N (N - 1) dL/dx (single process)
        tol = DTYPES[dtype][0]
        for k, got_k, exp_k in (("img", outs[0], expected[0]), ("txt", outs[1], expected[1])):
            assert got_k.dtype == dtype and outs[2].shape == (0, 11)
            assert rel_err(got_k, want["d_" + k][rows] * scale) <= tol, (r, k)
            assert rel_err(got_k, exp_k.double()) <= tol, (r, k)


def test_column_grads_match_torch_backend():
    """Op level: column_grads without fold against the torch backend's backward."""
    case = make_case(B=5, N=17, d=9, dr=12)
    fwd, bwd = triton_ops.fused_ops()
    g, s, u_img, u_txt = _process_problem(case, torch.float32)
    args = (g["img"], g["txt"], g["img_all"], g["txt_all"], g["ref_img"], g["ref_txt"], g["ref_img_all"],
            g["ref_txt_all"], s)
    stats = fwd(*args, u_img, u_txt, case.offset, case.gamma, case.eps, False)
    grad_phi = torch.tensor(0.37, device=DEVICE)
    got = bwd(grad_phi, *args, *stats[1:], None, None, None, case.offset, False, True)
    exp = torch_chunked.backward(grad_phi, *args, *stats[1:], None, None, None, case.offset, False, True)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_backward_is_deterministic():
    case = make_case(B=9, N=21, d=10)
    a, b = run(case, torch.float32), run(case, torch.float32)
    for k in ("d_img", "d_txt", "d_img_all", "d_txt_all"):
        assert torch.equal(a[k], b[k]), k


def test_float64_uses_torch_algorithm():
    """Float64 inputs have no Triton kernel: the op computes them in float64 (torch backend's algorithm)."""
    case = make_case(B=6, N=14, d=5, dr=3)
    got = run(case, torch.float64)
    assert got["loss"].dtype == torch.float64
    want = oracle(case)
    for k in ("loss", "d_s", "d_img", "d_txt", "d_img_all", "d_txt_all"):
        assert rel_err(got[k], want[k]) < 1e-10, k
    assert rel_err(got["u_img"], want["u_img"]) < 1e-6     # returned in the float32 dtype of the state


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    case = make_case(B=3, d=4)
    kw = case.kwargs(dtype=torch.float32)
    fwd, _ = triton_ops.fused_ops()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fwd(kw["img"], kw["txt"], kw["img"], kw["txt"], kw["ref_img"], kw["ref_txt"], kw["ref_img"], kw["ref_txt"],
            torch.tensor(5.0), kw["u_img"], kw["u_txt"], 0, 0.8, 1e-14, True)


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_autotune_wiring(monkeypatch, arch):
    """The GPU path's pruning (no GPU needed): per-arch candidates, clamped to d and dr; grids."""
    monkeypatch.setattr(launch, "device_arch", lambda device=None: arch)
    tuned = launch._tuned("bwd")
    assert set(tuned.keys) >= {"D", "DR", "HAS_REF", "IS_ROW", "FOLD", "SCALE_P"}
    x = torch.empty(3, 40, dtype=torch.bfloat16)
    configs = launch._prune("bwd")(tuned.configs, {"p_x": x}, D=40, DR=23)
    expected = launch.candidates("bwd", 40, 23, torch.bfloat16, arch)
    assert [c.kwargs for c in configs] == [t.meta() for t in expected]
    for t in expected:
        assert t.BD == 64 and t.BK <= 64 and t.BKR <= 32       # clamped: next power of two of d, dr
        assert launch.bwd_grid(1000, 40, t) == (-(-1000 // t.BM), 2, 1)
    for t in launch.candidates("bwd", 768, 512, torch.float32, arch):
        assert t.BM * t.BD <= 128 * 32 * t.num_warps          # accumulator <= 128 registers per thread


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_transposed_plan(monkeypatch, arch):
    """The one-process forward's plan (no GPU needed): candidates, groups and splits within the blocks,
    the partial buffers' bound, and the plan at the tuning target (H100: 132 SMs, 50 MiB of L2)."""
    monkeypatch.setattr(launch, "device_arch", lambda device=None: arch)
    tuned = launch._tuned("fwdt")
    assert set(tuned.keys) >= {"D", "DR", "HAS_REF"}
    for dtype in (torch.bfloat16, torch.float32):
        tiles = launch.candidates("fwdt", 512, 512, dtype, arch)
        assert tiles and all(t.BN <= 64 and t.BD == 0 for t in tiles)
        configs = launch._prune("fwdt")(tuned.configs, {"p_x": torch.empty(3, 512, dtype=dtype)}, D=512, DR=512)
        assert [c.kwargs for c in configs] == [t.meta() for t in tiles]
    for B in (2, 17, 100, 1000, 5000, 32768, 262144):
        for sms in (1, 2, 108, 132):
            p = launch.transposed_plan(B, 128, 64, 2048, sms, 50 << 20)
            assert 1 <= p.groups <= min(launch.MAX_PARTS, -(-B // 64))
            assert 1 <= p.splits <= min(launch.MAX_PARTS, -(-B // 128))
            assert p.groups * p.splits <= launch.PROGRAMS_PER_SM * sms and p.panel_cols >= 64
            assert p.partial_bytes(B) <= 24 * launch.MAX_PARTS * B
    h100 = launch.transposed_plan(32768, 128, 64, 2048, 132, 50 << 20)
    assert h100.grid == (16, 16) and h100.partial_bytes(32768) == 12 << 20       # 12 MiB << 64 MiB


@pytest.mark.skipif(DEVICE != "cpu", reason="opcheck is run once, in the interpreter")
def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration of drrho::triton_fwd / _bwd."""
    case = make_case(B=4, N=9, d=5, dr=3)
    fwd, bwd = triton_ops.fused_ops()
    kw = case.kwargs(dtype=torch.float32)
    args = (kw["img"].requires_grad_(), kw["txt"].requires_grad_(), kw["img_all"], kw["txt_all"], kw["ref_img"],
            kw["ref_txt"], kw["ref_img_all"], kw["ref_txt_all"], torch.tensor(5.0))
    fwd_args = (*args, kw["u_img"], kw["u_txt"], case.offset, case.gamma, case.eps, False)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(fwd, fwd_args, test_utils=tests)
    stats = fwd(*fwd_args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(bwd, (torch.tensor(1.0), *plain, *stats[1:], None, None, None, case.offset, False, True),
                          test_utils=("test_schema", "test_faketensor"))
