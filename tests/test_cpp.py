"""The C++ CPU extension (``drrho_kernels._C``, backend ``"cpp"``): what only it has.

Its numbers against the float64 oracle in every mode and dtype are in tests/test_conformance.py;
here: the same cases again under tiny tiles (one or two rows per chunk, column blocks of 2 or 3, work
spread over the threads) so that the chunk and block merges of the online statistics run on small
inputs; half inputs computed exactly as float32 on the upcast inputs; the layout of gradients;
repeatability across runs and thread counts; the kernels' exponential; the op's own argument
checks; the empty batch; the fallback when the extension cannot be loaded.

Skipped (with the reason) only when the extension was not built.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import drrho_kernels as dk
from drrho_kernels.core import ops
from drrho_kernels.core.inputs import Weights
from drrho_kernels.backends import cpp
from drrho_kernels.loss.functional import fused_terms
from helpers import detached, problem, run_backend
from spec_oracle import make_case
from test_conformance import CASES, assert_conforms, rounded, run

_C = cpp.load()
needs_cpp = pytest.mark.skipif(_C is None, reason=f"C++ extension not built ({cpp.load_error()})")

# (chunk_bytes, col_block, spread_rows): the defaults; one row per chunk and blocks of 2 columns; a few
# rows per chunk (chunk_bytes / (N * element size)) and blocks of 3 columns; default chunks spread
# over the threads down to 2 rows (several workers on small inputs).
TILINGS = {"default": (0, 0, 0), "rows1-block2": (1, 2, 0), "rows2to4-block3": (160, 3, 0), "spread2": (0, 0, 2)}

# conformance cases that span several chunks and column blocks under the tiny tilings
TILED_CASES = ["single-odd-B37-d13-dr29", "single-special-u", "dist-odd-B13-N41", "dist-B1-N2-offset1",
               "dist-eps1e-4-s100", "single-s100"]


@pytest.fixture(params=list(TILINGS), ids=list(TILINGS))
def tiling(request):
    if _C is None:
        pytest.skip(f"C++ extension not built ({cpp.load_error()})")
    _C.set_tiling(*TILINGS[request.param])
    yield request.param
    _C.set_tiling(0, 0, 0)


def test_extension_loads_when_its_build_was_required():
    """With ``DRRHO_KERNELS_BUILD_CPP=1`` (CI, the README's test command) the C++ tests must not skip: the
    extension has to load (setup.py already fails the install when the build fails; this catches a stale or
    missing library, e.g. built against another torch)."""
    if os.environ.get("DRRHO_KERNELS_BUILD_CPP", "auto").strip() != "1":
        pytest.skip("DRRHO_KERNELS_BUILD_CPP is not 1: the extension is optional here")
    assert _C is not None, f"DRRHO_KERNELS_BUILD_CPP=1 but the C++ extension did not load ({cpp.load_error()})"


@needs_cpp
def test_build_info_and_backend_registry():
    info = _C.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["simd"] in ("avx512", "avx2", "default")
    assert (info["chunk_bytes"], info["col_block"], info["spread_rows"]) == _C.default_tiling()
    assert "cpp" in dk.available_backends("cpu")
    assert dk.available_backends("cpu")[0] == "cpp"          # "auto" picks it on CPU tensors


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", TILED_CASES)
def test_conforms_under_every_tiling(name, dtype, tiling):
    case = rounded(CASES[name](), dtype)
    assert_conforms(run(case, "cpp", dtype), case, dtype, f"cpp {name} {tiling}")


# Half inputs: tests/test_cpp_half_gemm.py (every tile-product path, the upcast one exactly float32's).


@needs_cpp
def test_gradients_keep_the_layout_of_their_inputs():
    """The backward returns gradients laid out like their inputs (what the fake implementation says)."""
    p = problem(make_case(B=6, d=5), "cpp")
    p = dataclasses.replace(p, tiles=dataclasses.replace(p.tiles, img=p.tiles.img.T.contiguous().T))
    terms = fused_terms(p)
    gain = p.tiles.scale.detach()
    grads = ops.backward("cpp", (gain, None, None, None), detached(p.tiles), terms.weights(), False)
    assert grads[0].stride() == torch.empty_like(p.tiles.img).stride()
    assert grads[1].is_contiguous()


@needs_cpp
def test_repeatable_across_runs_and_thread_counts():
    """One chunk: bitwise repeatable. Many chunks over several workers: sums over rows take the chunks
    in the order the workers finish them, so runs and thread counts agree to rounding."""
    case = make_case(B=40, N=64, d=16, seed=9)
    first = run_backend(case, "cpp", dtype=torch.float32)
    again = run_backend(case, "cpp", dtype=torch.float32)
    for key, value in first.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, again[key])
    single = make_case(B=40, d=16, seed=9)
    threads = torch.get_num_threads()
    try:
        _C.set_tiling(4 * 40 * 3, 0, 0)                  # 3 rows per chunk: 14 chunks
        spread = [run_backend(single, "cpp", dtype=torch.float32) for _ in range(2)]
        torch.set_num_threads(1)
        spread.append(run_backend(single, "cpp", dtype=torch.float32))
    finally:
        torch.set_num_threads(threads)
        _C.set_tiling(0, 0, 0)
    for other in spread[1:]:
        for key, value in spread[0].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(value, other[key], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# The kernels' exponential


@needs_cpp
@pytest.mark.parametrize("dtype,lo,hi,max_ulp", [(torch.float32, -87.0, 88.0, 2.0),
                                                 (torch.float64, -708.0, 709.0, 2.0)], ids=["f32", "f64"])
def test_vectorized_exp_accuracy(dtype, lo, hi, max_ulp):
    x = torch.cat([torch.linspace(lo, hi, 200001, dtype=torch.float64),
                   torch.empty(100000, dtype=torch.float64).uniform_(-3, 3)]).to(dtype)
    got = _C._vexp(x).double()
    want = torch.exp(x.double())
    ulp = torch.finfo(dtype).eps
    assert float(((got - want).abs() / want).max()) <= max_ulp * ulp
    special = torch.tensor([-float("inf"), float("inf"), float("nan"), lo - 1, -1e30, hi + 1, 0.0], dtype=dtype)
    out = _C._vexp(special)
    assert out[0] == 0 and out[1] == float("inf") and torch.isnan(out[2])
    assert out[3] == 0 and out[4] == 0 and out[5] == float("inf") and out[6] == 1


# --------------------------------------------------------------------------------------------------
# The op's own checks (direct calls; the public API checks everything before, in loss/validate.py)


@needs_cpp
def test_direct_op_call_checks_name_the_argument():
    p = problem(make_case(B=4, d=3), "cpp")
    tiles, terms = detached(p.tiles), fused_terms(p)
    with pytest.raises(RuntimeError, match=r"drrho::cpp_fwd: scale: expected shape \(2, 4\)"):
        ops.forward("cpp", dataclasses.replace(tiles, scale=tiles.scale[:, :3]))
    with pytest.raises(RuntimeError, match=r"drrho::cpp_fwd: offset: expected 0 <= offset <= N - B = 0 "):
        ops.forward("cpp", dataclasses.replace(tiles, offset=1))
    with pytest.raises(RuntimeError, match=r"columns_are_rows: expected img_all of the shape of img"):
        ops.forward("cpp", dataclasses.replace(tiles, offset=4))          # N: valid, but not with columns_are_rows
    dist = detached(problem(make_case(B=4, N=9, d=3), "cpp").tiles)        # offset 2 of N - B = 5
    ops.forward("cpp", dataclasses.replace(dist, offset=5))                 # the last valid offset runs
    for bad in (6, -1):
        with pytest.raises(RuntimeError, match=r"drrho::cpp_fwd: offset: expected 0 <= offset <= N - B = 5 "):
            ops.forward("cpp", dataclasses.replace(dist, offset=bad))
    with pytest.raises(RuntimeError, match="ref_img and ref_txt"):
        ops.forward("cpp", dataclasses.replace(tiles, ref_txt=None))
    gain = tiles.scale
    weights = terms.weights()
    with pytest.raises(RuntimeError, match=r"drrho::cpp_bwd: log_norm: expected shape \(2, 4\)"):
        ops.backward("cpp", (gain, None, None, None), tiles, dataclasses.replace(weights, log_norm=weights.log_norm[:1]),
                     False)
    half_fold = dataclasses.replace(weights, col_log_norm=weights.log_norm)
    with pytest.raises(RuntimeError, match="col_gain, col_scale, col_log_norm and col_margin"):
        ops.backward("cpp", (gain, None, None, None), tiles, half_fold, False)
    with pytest.raises(RuntimeError, match="dgain: expected lse_q, lse_p"):
        ops.backward("cpp", (gain, None, gain, None), tiles, weights, False)


@needs_cpp
def test_empty_batch_returns_early():
    e = torch.empty(0, 3, dtype=torch.float64)
    cols = torch.randn(3, 3, dtype=torch.float64)
    z = torch.empty(2, 0, dtype=torch.float64)
    stats, margin, pos = torch.ops.drrho.cpp_fwd(e, e, cols, cols, None, None, None, None, z,
                                                 [0, False, 100.0, False, False])
    assert stats.shape == (2, 3, 0) and margin.shape == (0,) and pos.shape == (2, 0)
    w = Weights(z, z, torch.empty(0, dtype=torch.float64), None, None, None, None, None, None, None)
    tiles = dk.core.inputs.TileInputs(e, e, cols, cols, None, None, None, None, z, 0, False, 100.0, False, False)
    d = ops.backward("cpp", (z, None, None, None), tiles, w, True)
    assert d[0].shape == (0, 3) and d[2].shape == (3, 3) and not d[2].any()


# --------------------------------------------------------------------------------------------------
# Fallback without the extension (runs whether or not it was built)

_FALLBACK = textwrap.dedent("""
    import sys, warnings
    import torch
    sys.modules["drrho_kernels._C"] = None           # importing it now raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import drrho_kernels as dk                    # the warning comes once, at import
        backends = dk.available_backends("cpu")
        dk.available_backends("cpu")
        x = torch.nn.functional.normalize(torch.randn(5, 4), dim=1).requires_grad_()
        t = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
        u = torch.zeros(5)
        loss_auto, _, _ = dk.drrho_clip_loss(x, t, 10.0, u, u)
        loss_auto.backward()
        loss_torch, _, _ = dk.drrho_clip_loss(x, t, 10.0, u, u, backend="torch")
        try:
            dk.drrho_clip_loss(x, t, 10.0, u, u, backend="cpp")
            cpp_error = None
        except RuntimeError as exc:
            cpp_error = str(exc)
    ours = [w for w in caught if "C++ extension" in str(w.message)]
    print("BACKENDS", backends)
    print("WARNINGS", len(ours), ours[0].category.__name__ if ours else None)
    print("MESSAGE", ours[0].message if ours else None)
    print("SAME", bool(loss_auto == loss_torch), x.grad is not None)
    print("CPPERROR", cpp_error)
""")


def test_fallback_when_the_extension_cannot_be_loaded():
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__), env=dict(os.environ, PYTHONWARNINGS="default"))
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert "cpp" not in lines["BACKENDS"] and lines["BACKENDS"].startswith("['torch'")
    assert lines["WARNINGS"] == "1 RuntimeWarning"                 # once, however often it is asked
    cause = "ModuleNotFoundError: import of drrho_kernels._C halted"     # the cause is named
    assert cause in lines["MESSAGE"] and "torch backend" in lines["MESSAGE"]
    assert lines["SAME"] == "True True"
    assert "backend='cpp' cannot run here" in lines["CPPERROR"] and cause in lines["CPPERROR"]
