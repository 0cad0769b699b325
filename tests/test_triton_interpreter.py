"""The Triton backend's own machinery, with its real kernels in Triton's interpreter (no GPU needed).

Its numbers against the float64 oracle in every mode and dtype are in tests/test_conformance.py;
here: tile shapes other than the interpreter's square default, the one-process forward's launch
plans (groups, splits, panels) against the two-direction kernel, determinism, the autotuning wiring
of the GPU path (candidates, pruning, grids) and the device check.

CI has no GPU: conftest sets ``TRITON_INTERPRET=1`` before any import, so the kernels run on CPU
tensors with the fixed tiles of ``tiles.INTERPRETER_TILES``.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from drrho_kernels.core import ops
from helpers import detached, problem
from spec_oracle import make_case
from test_conformance import assert_conforms, rounded, run

pytest.importorskip("triton")

from drrho_kernels.backends.triton import forward as triton_forward  # noqa: E402
from drrho_kernels.backends.triton import forward_transposed as ft  # noqa: E402
from drrho_kernels.backends.triton import launch, tiles  # noqa: E402

if not launch.interpreting():
    pytest.skip("these tests vary the interpreter's tiles (TRITON_INTERPRET=1)", allow_module_level=True)


@pytest.mark.parametrize("fwd_tiles, bwd_tiles", [
    (tiles.Tiles(BM=32, BN=16, BK=16, BKR=32, num_warps=1, num_stages=1),
     tiles.Tiles(BM=16, BN=32, BK=32, BKR=16, BD=64, num_warps=1, num_stages=1)),
    (tiles.Tiles(BM=16, BN=64, BK=64, BKR=16, num_warps=1, num_stages=1),
     tiles.Tiles(BM=32, BN=16, BK=16, BKR=64, BD=32, num_warps=1, num_stages=1)),
], ids=["rect-a", "rect-b"])
def test_rectangular_tiles(monkeypatch, fwd_tiles, bwd_tiles):
    """BM != BN != BK != BKR != BD: no block size stands in for another (the default tiles are square)."""
    monkeypatch.setitem(tiles.INTERPRETER_TILES, "fwd", fwd_tiles)
    monkeypatch.setitem(tiles.INTERPRETER_TILES, "fwdt", fwd_tiles)
    monkeypatch.setitem(tiles.INTERPRETER_TILES, "bwd", bwd_tiles)
    for kw in (dict(B=21, N=50, d=37, dr=19), dict(B=35, d=70, dr=9)):
        case = make_case(**kw)
        assert_conforms(run(case, "triton", torch.float32), case, torch.float32, str(kw))


def test_single_process_uses_transposed_forward(monkeypatch):
    """The public API, one process: the forward is the transposed one (and the two-direction kernel
    is not launched); the distributed shape keeps the two-direction kernel."""
    calls = []
    real = ft.forward_transposed
    monkeypatch.setattr(ft, "forward_transposed", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_fwd = triton_forward._fwd_kernel
    launched = []

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real_fwd[grid]
    monkeypatch.setattr(triton_forward, "_fwd_kernel", Spy())
    case = make_case(B=9, d=6, dr=5)
    assert_conforms(run(case, "triton", torch.float32), case, torch.float32)
    assert calls == [1] and launched == []
    case = make_case(B=4, N=11, d=6, dr=5)
    assert_conforms(run(case, "triton", torch.float32), case, torch.float32)
    assert calls == [1] and len(launched) == 1


def _two_direction(tiles_in):
    """The distributed-shape kernel on one-process inputs (the columns are the rows, offset 0)."""
    return triton_forward.forward(dataclasses.replace(tiles_in, columns_are_rows=False))


# (groups, splits, panel columns) with the interpreter's 16 x 16 tiles at B = 53 (4 row and 4 column
# blocks, the last one ragged): one program; groups only; splits only; several panels per group
# (panel 16 = one block); uneven groups (1, 1, 2 blocks) with a two-block panel; everything at once.
PLANS = [(1, 1, 64), (4, 1, 64), (1, 4, 64), (2, 2, 16), (3, 2, 32), (3, 3, 16)]


def test_transposed_forward_plans():
    """Every (groups, splits, panel) split of the tiles gives the two-direction forward's statistics
    (float32, 1e-5); repeated runs are bitwise equal (no atomics); a plan leaving a group or split
    without a block is refused."""
    k = detached(problem(make_case(B=53, d=20, dr=9, seed=7), "triton", torch.float32).tiles)
    want = _two_direction(k)
    for plan in PLANS:
        got = ft.forward_transposed(k, plan=tiles.Plan(*plan))
        for name, a, b in zip(("stats", "margin"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{plan} {name}")
    again = ft.forward_transposed(k, plan=tiles.Plan(*plan))
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    for bad in ((5, 1, 16), (1, 5, 16), (0, 1, 16)):
        with pytest.raises(ValueError, match="plan"):
            ft.forward_transposed(k, plan=tiles.Plan(*bad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_transposed_forward_vs_two_direction(dtype):
    """Every dtype, without reference, odd B, a plan with groups, splits and panels: the transposed
    forward against the two-direction kernel on the same inputs."""
    case = rounded(make_case(B=45, d=19, ref=False, seed=11, scale=30.0), dtype)
    k = detached(problem(case, "triton", dtype).tiles)
    got = ft.forward_transposed(k, plan=tiles.Plan(2, 3, 16))
    for a, b in zip(got, _two_direction(k)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)


def test_backward_is_deterministic():
    case = make_case(B=9, N=21, d=10)
    a, b = run(case, "triton", torch.float32), run(case, "triton", torch.float32)
    for key in ("d_img", "d_txt", "d_img_all", "d_txt_all"):
        assert (a[key] == b[key]).all(), key


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    import drrho_kernels.backends.triton as triton_backend  # noqa: PLC0415
    monkeypatch.setattr(triton_backend, "INTERPRETING", False)
    k = detached(problem(make_case(B=3, d=4), "triton", torch.float32).tiles)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.forward("triton", k)


def test_float64_tensors_are_refused_by_the_ops():
    """The public API sends float64 to the torch backend; a direct call of the Triton ops refuses it."""
    k = detached(problem(make_case(B=3, N=7, d=4), "triton", torch.float32).tiles)
    wide = dataclasses.replace(k, **{name: getattr(k, name).double() for name in
                                     ("img", "txt", "img_all", "txt_all", "ref_img", "ref_txt", "ref_img_all",
                                      "ref_txt_all")})
    with pytest.raises(TypeError, match="drrho::triton_fwd: float64 inputs have no Triton kernel"):
        ops.forward("triton", wide)


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_autotune_wiring(monkeypatch, arch):
    """The GPU path's pruning (no GPU needed): per-arch candidates, clamped to d and dr; grids."""
    from drrho_kernels.backends.triton import backward
    monkeypatch.setattr(launch, "device_arch", lambda device=None: arch)
    tuned = launch._tuned(backward._bwd_kernel, "bwd")
    assert set(tuned.keys) >= {"D", "DR", "HAS_REF", "IS_ROW", "FOLD", "SCALE_P"}
    x = torch.empty(3, 40, dtype=torch.bfloat16)
    configs = launch._prune("bwd")(tuned.configs, {"p_x": x}, D=40, DR=23)
    expected = tiles.candidates("bwd", 40, 23, torch.bfloat16, arch)
    assert [c.kwargs for c in configs] == [t.meta() for t in expected]
    for t in expected:
        assert t.BD == 64 and t.BK <= 64 and t.BKR <= 32       # clamped: next power of two of d, dr
    for t in tiles.candidates("bwd", 768, 512, torch.float32, arch):
        assert t.BM * t.BD <= 128 * 32 * t.num_warps          # accumulator <= 128 registers per thread


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_transposed_plan(monkeypatch, arch):
    """The one-process forward's plan (no GPU needed): candidates, groups and splits within the blocks,
    the partial buffers' bound, and the plan at the tuning target (H100: 132 SMs, 50 MiB of L2)."""
    monkeypatch.setattr(launch, "device_arch", lambda device=None: arch)
    tuned = launch._tuned(ft._fwd_t_kernel, "fwdt")
    assert set(tuned.keys) >= {"D", "DR", "HAS_REF"}
    for dtype in (torch.bfloat16, torch.float32):
        cands = tiles.candidates("fwdt", 512, 512, dtype, arch)
        assert cands and all(t.BN <= 64 and t.BD is None for t in cands)
        configs = launch._prune("fwdt")(tuned.configs, {"p_x": torch.empty(3, 512, dtype=dtype)}, D=512, DR=512)
        assert [c.kwargs for c in configs] == [t.meta() for t in cands]
    for B in (2, 17, 100, 1000, 5000, 32768, 262144):
        for sms in (1, 2, 108, 132):
            p = tiles.transposed_plan(B, 128, 64, 2048, sms, 50 << 20)
            assert 1 <= p.groups <= min(tiles.MAX_PARTS, -(-B // 64))
            assert 1 <= p.splits <= min(tiles.MAX_PARTS, -(-B // 128))
            assert p.groups * p.splits <= tiles.PROGRAMS_PER_SM * sms and p.panel_cols >= 64
            assert p.partial_bytes(B) <= 24 * tiles.MAX_PARTS * B
    h100 = tiles.transposed_plan(32768, 128, 64, 2048, 132, 50 << 20)
    assert h100.grid == (16, 16) and h100.partial_bytes(32768) == 12 << 20       # 12 MiB << 64 MiB


def test_tiles_are_built_with_keywords():
    with pytest.raises(TypeError):
        tiles.Tiles(64, 32, 32, 32, 128, 8, 2)       # positional: refused
    t = tiles.Tiles(BM=64, BN=32, num_warps=4, num_stages=2)
    assert t.meta() == {"BM": 64, "BN": 32} and t.name == "BM64_BN32_w4_s2"


@pytest.mark.parametrize("arch,extra,transposed", [(80, True, False), (90, True, False), (100, True, True),
                                                    (80, False, True)])
def test_one_process_forward_falls_back_where_the_transposed_kernel_spills(monkeypatch, arch, extra, transposed):
    """fp32 with EXTRA (distillation) on sm_80 / sm_90: the transposed kernel has no spill-free tile
    (empty table groups), so the one-process forward runs the general kernel with the rows as columns;
    it meets the oracle. The choice is read from the tables (the GPU arch faked, the kernels interpreted)."""
    import test_conformance as conf
    calls = []
    real = ft.forward_transposed
    monkeypatch.setattr(ft, "forward_transposed", lambda k, *a: calls.append(1) or real(k, *a))
    monkeypatch.setattr(triton_forward, "INTERPRETING", False)
    monkeypatch.setattr(triton_forward, "device_arch", lambda device: arch)
    assert tiles.transposed_forward_runs(torch.float32, arch, extra) == transposed
    if extra:
        conf.test_distillation_matches_oracle("triton", "single-B37-d40-dr23", True, torch.float32)
    else:
        case = rounded(conf.CASES["single-ref-B6-d5"](), torch.float32)
        assert_conforms(run(case, "triton", torch.float32), case, torch.float32, "triton")
    assert bool(calls) == transposed
