"""Half-precision tile products of the C++ backend (csrc/cpu/half_gemm.h, issue 16).

bfloat16 / float16 inputs use tile products with half inputs and float32 accumulation where such a
product runs here and is faster (``brgemm``: oneDNN's batch-reduce GEMM, AMX CPUs; ``mkl``: MKL's half
GEMMs, counted by ``auto`` only with avx512_bf16 / avx512_fp16 / AMX), else the inputs are upcast to
float32 (``upcast``). ``DRRHO_KERNELS_CPU_HALF_GEMM`` forces a path; ``emulate`` runs the brgemm path's
packing, blocking and scaling with a scalar product, so that logic is tested on any CPU.

Here: every path forced in turn (one that cannot run on this CPU is skipped with its reason; the upcast
fallback and the emulated brgemm layouts always run) against the float64 oracle within SPEC's half
tolerances, on the conformance cases and on shapes that span several chunks, 64-column blocks and
odd row counts; the upcast path is exactly the float32 computation; the selection logic (modes,
errors, the CPU-flag rule, the timed self-test, the environment variable read once at first use).
In-process tests switch paths with ``cpp._redecide_half_gemm`` and restore the environment's choice
(once per run of tests that force the same path: deciding ``auto`` again takes about a second).

Skipped (with the reason) only when the extension was not built.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import drrho_kernels as dk
from drrho_kernels.backends import cpp
from helpers import run_backend
from spec_oracle import make_case
import test_conformance as conf

_C = cpp.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"C++ extension not built ({cpp.load_error()})")

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "f16"]
PATHS = ["off", "emulate", "mkl", "brgemm", "on"]      # off: the upcast fallback, always runnable


def _restore():
    for dt in HALF:
        cpp._redecide_half_gemm(dt, "")


def _at(mode: str) -> bool:
    """Whether both half dtypes run with ``mode`` now (``cpp.half_gemm``: no new decision)."""
    return all(cpp.half_gemm(dt)["mode"] == mode for dt in HALF)


def _environment_mode() -> str:
    return (os.environ.get("DRRHO_KERNELS_CPU_HALF_GEMM") or "auto").strip().lower()


@pytest.fixture
def restore_choice():
    yield
    _restore()


_FORCED: dict = {}      # mode -> the infos of its last forcing


@pytest.fixture(params=PATHS)
def path(request):
    """Force a path for both half dtypes; skip (with the reason) where it cannot run on this CPU. The path
    stays forced for the next test of the same path (deciding ``auto`` again takes about a second): a test
    without this fixture, and the end of the module, restore the environment's choice (see below)."""
    if request.param not in _FORCED or not _at(request.param):
        _FORCED[request.param] = {dt: cpp._redecide_half_gemm(dt, request.param) for dt in HALF}
    infos = _FORCED[request.param]
    bad = [info for info in infos.values() if info["error"]]
    if bad:
        pytest.skip(f"{request.param} cannot run here: {bad[0]['reason']}")
    want = {"off": {"upcast"}, "on": {"brgemm", "mkl"}}.get(request.param, {request.param})
    assert all(info["path"] in want for info in infos.values()), infos
    yield request.param


@pytest.fixture(autouse=True)
def _environment_choice(request):
    """A test that does not force a path runs with the environment's choice."""
    if "path" not in request.fixturenames and not _at(_environment_mode()):
        _restore()
    yield


@pytest.fixture(scope="module", autouse=True)
def _restore_at_the_end():
    """The files after this one see the environment's choice."""
    yield
    if not _at(_environment_mode()):
        _restore()


@pytest.fixture
def tiny_tiles():
    """Chunks of 7 rows (odd: the VNNI pair padding) whatever N, blocks of 3 columns."""
    def set_rows(rows, N):
        _C.set_tiling(4 * N * rows, 3, 0)
    yield set_rows
    _C.set_tiling(0, 0, 0)


# --------------------------------------------------------------------------------------------------
# Numbers against the float64 oracle, every path

@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name", list(conf.CASES))
def test_conformance_cases(path, name, dtype):
    case = conf.rounded(conf.CASES[name](), dtype)
    conf.assert_conforms(conf.run(case, "cpp", dtype), case, dtype, f"cpp[{path}] {name}")


# Several chunks, several 64-column blocks with a tail, odd row counts and widths, both schemes.
LARGE = {
    "single-B150-d33-dr20": lambda: make_case(B=150, d=33, dr=20, seed=11),
    "single-noref-B97-d24": lambda: make_case(B=97, d=24, ref=False, seed=12),
    "dist-B70-N200-d17-dr9": lambda: make_case(B=70, N=200, d=17, dr=9, offset=61, seed=13),
    "dist-noref-B33-N130-d15": lambda: make_case(B=33, N=130, d=15, ref=False, offset=0, seed=14),
    "single-s100-B80": lambda: make_case(B=80, d=16, dr=16, scale=100.0, seed=15),
}


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("tiles", ["default", "rows7"])
@pytest.mark.parametrize("name", list(LARGE))
def test_large_shapes_and_tilings(path, name, tiles, dtype, tiny_tiles):
    case = conf.rounded(LARGE[name](), dtype)
    if tiles == "rows7":
        tiny_tiles(7, case.img.shape[0] if case.img_all is None else case.img_all.shape[0])
    conf.assert_conforms(conf.run(case, "cpp", dtype), case, dtype, f"cpp[{path}] {name} {tiles}")


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("multiply_tau", [True, False], ids=["multiply_tau", "no_multiply_tau"])
@pytest.mark.parametrize("name", ["single-B37-d40-dr23", "dist-ref-B5-N23-d17-dr9", "single-s100"])
def test_distillation(path, name, multiply_tau, dtype):
    """Distillation keeps y and z apart (two score products, the reference's with alpha +1)."""
    conf.test_distillation_matches_oracle("cpp", name, multiply_tau, dtype)


@pytest.mark.parametrize("ref", [True, False], ids=["ref", "noref"])
def test_fold_of_gathered_columns(path, ref):
    conf.test_fold_of_gathered_columns_gives_the_global_gradient("cpp", ref, torch.bfloat16)


def test_float16_weight_range(path):
    """Weights above 65504 and below float16's subnormals: the power-of-two scaling of the rounded weights."""
    conf.test_fp16_weights_above_65504("cpp")
    conf.test_fp16_tiny_weights_with_loss_scaling("cpp")


@pytest.mark.parametrize("name", ["single-B37-d40-dr23", "dist-ref-B5-N23-d17-dr9"])
def test_per_sample_outputs(path, name):
    """The forward's extra statistic groups (y and z apart) in bfloat16."""
    conf.test_per_sample_outputs_match_oracle("cpp", name, torch.bfloat16)


def test_forced_half_path_is_taken(path):
    """A half-precision path rounds the weights for the weighted products: its gradients differ from the
    upcast path's (no silent fallback); the upcast path's equal them bitwise (a second run)."""
    case = make_case(B=40, N=90, d=24, dr=16, offset=20, seed=21)
    got = run_backend(case, "cpp", dtype=torch.bfloat16)
    for dt in HALF:
        cpp._redecide_half_gemm(dt, "off")
    upcast = run_backend(case, "cpp", dtype=torch.bfloat16)
    same = all(np.array_equal(got[k], upcast[k]) for k in ("d_img", "d_txt", "d_img_all", "d_txt_all"))
    assert same == (path == "off")


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name", ["single-ref", "dist-ref"])
def test_upcast_path_is_the_float32_computation(name, dtype, restore_choice):
    """The fallback: half inputs upcast once, exactly the float32 computation on the upcast inputs."""
    cpp._redecide_half_gemm(dtype, "off")
    case = make_case(**{"single-ref": dict(B=70, d=9), "dist-ref": dict(B=21, N=150, d=11, dr=7)}[name])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # several chunks: one worker, so that the sums over rows are bitwise repeatable
    try:
        half = run_backend(case, "cpp", dtype=dtype)
        upcast = run_backend(conf.rounded(case, dtype), "cpp", dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert half["loss"] == upcast["loss"]
    for key in ("d_img", "d_txt", "d_img_all", "d_txt_all"):
        if key in half:
            want = torch.from_numpy(upcast[key]).float().to(dtype).double().numpy()
            np.testing.assert_array_equal(half[key], want)


# --------------------------------------------------------------------------------------------------
# The choice

def _native(dtype, flags):
    names = ("avx512_bf16", "amx_bf16") if dtype == torch.bfloat16 else ("avx512_fp16", "amx_fp16")
    return any(n in flags for n in names)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_auto_choice_is_explained(dtype, restore_choice):
    info = cpp._redecide_half_gemm(dtype, "auto")
    assert info["mode"] == "auto" and not info["error"] and info["reason"].startswith("auto: ")
    assert info["path"] in ("upcast", "brgemm", "mkl")
    assert set(info["candidates"]) == {"brgemm", "mkl"}
    for name, cand in info["candidates"].items():
        assert cand["note"], name
        if not cand["usable"]:
            assert cand["self_test_s"] is None and info["path"] != name
    mkl = info["candidates"]["mkl"]
    if mkl["usable"] and not _native(dtype, info["cpu_flags"]):
        # MKL without native half dot products converts to float32 inside: never timed, never chosen
        assert mkl["self_test_s"] is None and "not timed" in mkl["note"] and info["path"] != "mkl"
    if info["path"] != "upcast":
        won = info["candidates"][info["path"]]["self_test_s"]
        assert won is not None and won <= 0.9 * info["upcast_self_test_s"]
    if not info["candidates"]["brgemm"]["usable"] and not _native(dtype, info["cpu_flags"]):
        assert info["path"] == "upcast"          # this AVX2-only CPU (and any without AMX / avx512_bf16)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_timed_self_test(dtype, restore_choice):
    """``timed``: auto without the CPU-flag rule, so the timed self-test runs wherever a candidate works."""
    info = cpp._redecide_half_gemm(dtype, "timed")
    usable = [n for n, c in info["candidates"].items() if c["usable"]]
    if not usable:
        pytest.skip(f"no half-precision candidate runs here: {info['reason']}")
    assert info["upcast_self_test_s"] > 0 and "self-test" in info["reason"]
    times = {n: info["candidates"][n]["self_test_s"] for n in usable}
    assert all(t > 0 for t in times.values())
    fast = {n: t for n, t in times.items() if t <= 0.9 * info["upcast_self_test_s"]}
    assert info["path"] == (min(fast, key=fast.get) if fast else "upcast")


def test_forcing_a_path_that_cannot_run_raises_a_clear_error(restore_choice):
    """A forced path that fails its self-test is an error state: the kernel calls with that dtype raise a
    RuntimeError that names the variable and the way out; other dtypes are untouched; nothing crashes."""
    for mode in ("brgemm", "nonsense"):
        info = cpp._redecide_half_gemm(torch.bfloat16, mode)
        if not info["error"]:
            assert mode == "brgemm" and info["path"] == "brgemm"      # an AMX CPU: it runs
            continue
        assert info["path"] is None and "DRRHO_KERNELS_CPU_HALF_GEMM" in info["reason"]
        if mode == "brgemm":
            assert "auto" in info["reason"] and "off" in info["reason"]
        x = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        t = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        u = torch.zeros(6)
        with pytest.raises(RuntimeError, match="DRRHO_KERNELS_CPU_HALF_GEMM"):
            dk.drrho_clip_loss(x.bfloat16(), t.bfloat16(), 10.0, u, u, backend="cpp")
        for dt in (torch.float32, torch.float64):                # no effect on other dtypes
            dk.drrho_clip_loss(x.to(dt), t.to(dt), 10.0, u.to(dt), u.to(dt), backend="cpp")
    assert cpp._redecide_half_gemm(torch.bfloat16, "off")["path"] == "upcast"


def test_modes_and_arguments(restore_choice):
    info = cpp._redecide_half_gemm(torch.float16, "off")
    assert info["path"] == "upcast" and info["candidates"] == {} and "off" in info["reason"]
    info = cpp._redecide_half_gemm(torch.float16, "emulate")
    assert info["path"] == "emulate" and info["candidates"]["emulate"]["usable"]
    info = cpp._redecide_half_gemm(torch.float16, "on")
    assert info["error"] == (info["path"] is None)
    assert info["path"] in (None, "brgemm", "mkl")
    if info["path"] is None:
        assert not any(c["usable"] for c in info["candidates"].values())
    assert set(cpp.HALF_GEMM_MODES) >= {"auto", "on", "off"}
    with pytest.raises(ValueError, match="dtype"):
        cpp.half_gemm(torch.float32)
    assert cpp.half_gemm("float16")["dtype"] == "float16"


_ENV_SCRIPT = textwrap.dedent("""
    import json, torch
    import drrho_kernels as dk
    from drrho_kernels.backends import cpp
    x = torch.nn.functional.normalize(torch.randn(6, 8), dim=1).bfloat16()
    u = torch.zeros(6)
    try:
        dk.drrho_clip_loss(x, x.flip(0), 10.0, u, u, backend="cpp")   # the first use decides
        err = None
    except RuntimeError as exc:
        err = str(exc)
    print(json.dumps({"info": cpp.half_gemm(torch.bfloat16), "error": err}))
""")


@pytest.mark.parametrize("mode", ["off", "emulate", "brgemm", " ON "])
def test_environment_variable_is_read_at_first_use(mode):
    env = dict(os.environ, DRRHO_KERNELS_CPU_HALF_GEMM=mode)
    proc = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__), env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    info = out["info"]
    assert info["mode"] == mode.strip().lower()
    if info["error"]:
        assert out["error"] is not None and info["reason"] in out["error"]
    else:
        assert out["error"] is None
        assert info["path"] == {"off": "upcast", "on": info["path"]}.get(info["mode"], info["mode"])
