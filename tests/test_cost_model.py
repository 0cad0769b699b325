"""The cost model's FLOP counts against counts by hand (in units of ``2 B N`` FLOPs per width).

One process, B = N, with a reference: the GEMM floor is the forward's similarities (``d + dr``), their
recomputation (``d + dr``) and the two weighted products (``2 d``). The Triton path computes the forward
scores once (transposed forward, ``d + dr``) and, in the backward, for each direction and each d-slice of
width ``BD`` the scores again (``d + dr``) plus that direction's weighted product over all slices
(``slices * BD``: executed FLOPs, a partial last slice runs whole).
"""
import itertools

import pytest
import torch

from benchmarks import cost_model
from benchmarks.kernels import VARIANTS


def units(flops, B):
    return flops / (2 * B * B)


@pytest.mark.parametrize("d, dr, slices", [(512, 512, 1), (1024, 512, 2), (1280, 512, 3)])
def test_triton_and_floor_flops_by_hand_bfloat16(d, dr, slices):
    B = 32768                                 # a multiple of every tile: no padding
    floor = cost_model.floor_cost(B, B, d, dr, "bfloat16")
    assert units(floor["flops"], B) == 2 * (d + dr) + 2 * d
    tri = cost_model.triton_cost(B, B, d, dr, "bfloat16")
    bwd = VARIANTS["bwd_row"].candidates(d, dr, torch.bfloat16, 90)[0]
    assert -(-d // bwd.BD) == slices          # BD = 512 in bfloat16
    # executed FLOPs: the weighted product runs over whole slices (1280 is padded to 3 x 512)
    assert units(tri["flops"], B) == (d + dr) + 2 * slices * (d + dr) + 2 * slices * bwd.BD


@pytest.mark.parametrize("shape", cost_model.SHAPES)
def test_distillation_adds_no_product_only_exponentials(shape):
    """Same tiles (the plain path's defaults; the EXTRA / DISTILL tables may pick smaller ones, whose
    padding changes the executed FLOPs) on sm_100, where every path has its transposed forward; the HBM
    bytes without the column split (the paths' own largest blocks may split into different parts)."""
    d = shape["d"]
    dr = shape.get("dr") or d
    for dtype, split in itertools.product(("bfloat16", "float32"), (True, False)):
        same = {VARIANTS[v].kernel: VARIANTS[v].candidates(d, dr, getattr(torch, dtype), 100)[0]
                for v in ("fwd", "fwd_t", "bwd_row")}
        plain = cost_model.triton_cost(**shape, dtype=dtype, arch=100, tiles=same, split=split)
        distill = cost_model.triton_cost(**shape, dtype=dtype, arch=100, tiles=same, distill=True, split=split)
        assert distill["flops"] == plain["flops"]
        assert distill["exps"] == pytest.approx(3 * plain["exps"], rel=2e-3)   # the merge's few exps stay
        assert split or distill["hbm_bytes"] > plain["hbm_bytes"]


def test_float32_distillation_in_one_process_on_sm90_runs_the_general_forward():
    """Where the transposed forward's EXTRA path has no spill-free tile (float32, sm_80 / sm_90), the model
    follows the launcher: the general forward, each score tile once per direction (twice the products)."""
    shape = dict(B=4096, N=4096, d=512, dr=512, dtype="float32", arch=90)
    plain = {k["kernel"]: k for k in cost_model.triton_kernels(**shape)}
    distill = {k["kernel"]: k for k in cost_model.triton_kernels(**shape, distill=True)}
    assert "fwd_t" in plain and "fwd" not in plain
    assert "fwd" in distill and "fwd_t" not in distill
    assert distill["fwd"]["score_flops"] == 2 * plain["fwd_t"]["score_flops"] == 2 * 2 * 4096 * 4096 * 1024


def test_distillation_needs_the_teacher():
    with pytest.raises(ValueError, match="teacher"):
        cost_model.triton_cost(64, 64, 16, 16, ref=False, distill=True)


def test_markdown_has_every_shape_and_flags_slower_than_unfused():
    rep = cost_model.report()
    rows = [line for line in cost_model.markdown(rep).splitlines()[2:]]
    assert len(rows) == 2 * len(cost_model.SHAPES)
    widths = {s["d"] for s in cost_model.SHAPES}
    assert {768, 1024, 1280} <= widths
    for r, line in zip(rep["rows"], rows):
        slower = [r["triton"]["t_s"] > r[k]["t_s"] for k in ("unfused", "unfused_autocast") if k in r]
        assert line.count("**") == 2 * sum(slower), line
        assert ("unfused_autocast" in r) == (r["dtype"] == "bfloat16")


def test_the_shapes_of_the_issue_are_modelled():
    """T1-T4 (B = N = 32768), T5 (262144), T6 (B = 4096 of N = 65536, both schemes), the paper's per-rank shape
    (B = 640 of N = 5120, d = dr = 512, gather_u) and FastCLIP's (B = 320 of N = 5120)."""
    shapes = {(s["B"], s["N"], s["d"], s["dr"], s.get("column_grads")) for s in cost_model.SHAPES}
    assert {(32768, 32768, 512, 512, None), (262144, 262144, 512, 512, None), (4096, 65536, 512, 512, None),
            (4096, 65536, 512, 512, False), (640, 5120, 512, 512, False), (320, 5120, 512, 512, False)} <= shapes


def test_waves_tail_and_launch_overhead_by_hand():
    """wave_time: 133 programs on 132 SMs at one per SM run in two waves, the tail counted whole; 264 at two per
    SM fill one wave; 20 at (up to) two per SM: one wave in which each SM holds one. A launch: its waves of
    resident programs at their share of the peaks, plus LAUNCH_S; the step: the sum, epilogue launches included."""
    assert cost_model.wave_time(133, 1, 132, 1.0) == pytest.approx(2 * 132 / 133)
    assert cost_model.wave_time(264, 2, 132, 1.0) == pytest.approx(1.0)
    assert cost_model.wave_time(20, 2, 132, 1.0) == pytest.approx(132 / 20)
    assert cost_model.LAUNCH_S == 4e-6
    shape = dict(B=640, N=5120, d=512, dr=512, dtype="bfloat16", column_grads=False)
    tri = cost_model.triton_cost(**shape, programs_per_sm=1)
    k = {k["kernel"]: k for k in tri["kernels"]}
    fwd = k["fwd"]                        # 5 row blocks of 128 x 2 directions x 20 column parts of 2 blocks
    assert fwd["grid"] == [5, 2, 20] and fwd["programs"] == 200 and fwd["waves"] == 2 and fwd["parts"] == 20
    hw = cost_model.K.HW[90]
    bound = max(fwd["flops"] / hw.peak_flops["bf16"], fwd["hbm_bytes"] / hw.hbm_bytes_per_s,
                fwd["exps"] / (hw.units * hw.clock_hz * hw.exp_per_clk))
    assert fwd["t_s"] == pytest.approx(2 * 132 / 200 * bound + 4e-6)
    bwd = k["bwd_row_fold_split"]         # 10 row blocks x 2 directions x 7 parts x 2 slices of 256: 3 waves
    assert bwd["grid"] == [10, 14, 2] and bwd["waves"] == 3 and bwd["parts"] == 7
    epilogue = len(cost_model._trace("ours", "float32", True, True))
    assert 20 < epilogue == k["epilogue (torch)"]["launches"]
    assert tri["launches"] == epilogue + 3 + 1 + 4      # fwd, merge, positives, backward; a sum and a cast per output
    waves_only = sum(k["t_s"] - k["launches"] * 4e-6 for k in tri["kernels"])
    assert tri["t_s"] == pytest.approx(waves_only + tri["launches"] * 4e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("B", [640, 320])
def test_the_column_split_lowers_the_modelled_time_of_small_per_rank_batches(B, dtype):
    """Before the split (column_splits forced to 1) the forward and backward grids hold 10-20 programs for 132
    SMs: one wave, most SMs idle; after it, several waves of full SMs, and less time, the merge and the sums of
    the partial gradients included."""
    shape = dict(B=B, N=5120, d=512, dr=512, dtype=dtype, column_grads=False)
    after, before = cost_model.triton_cost(**shape), cost_model.triton_cost(**shape, split=False)
    assert after["t_s"] < before["t_s"]
    kernels = {k["kernel"]: k for k in before["kernels"]}
    assert kernels["fwd"]["parts"] == kernels["bwd_row_fold"]["parts"] == 1 and "fwd_merge" not in kernels
    assert kernels["fwd"]["programs"] == 2 * -(-B // 128) and kernels["fwd"]["waves"] == 1
    assert {k["kernel"] for k in after["kernels"]} >= {"fwd_merge", "bwd_row_fold_split"}
    assert sum(k["flops"] for k in after["kernels"] if k["kernel"].startswith("fwd")) == \
        sum(k["flops"] for k in before["kernels"] if k["kernel"].startswith("fwd"))


def test_the_authors_sequence_under_autocast():
    """On float32 inputs under bfloat16 autocast their similarity products are bfloat16 (the same FLOPs at the
    bfloat16 peak), the rest float32 (the float32 diagonal promotes them): about the HBM bytes of the float32
    sequence (within 5%), far above the bfloat16 one's, and the casts are launches of their own."""
    shape = dict(B=640, N=5120, d=512, dr=512)
    half, full = cost_model.unfused_cost(**shape, dtype="bfloat16"), cost_model.unfused_cost(**shape, dtype="float32")
    mixed = cost_model.unfused_cost(**shape, dtype="float32", autocast="bfloat16")
    assert mixed["flops"] == half["flops"] == full["flops"]
    assert 1.5 * half["hbm_bytes"] < 0.95 * full["hbm_bytes"] < mixed["hbm_bytes"] < 1.05 * full["hbm_bytes"]
    assert mixed["launches"] > full["launches"]
    mm = [w for op, _, w, m in cost_model._trace("unfused", "float32", True, True, "bfloat16") if m is not None]
    assert mm and all(item == 2 for writes in mm for _, item in writes)


def test_registry_describes_every_launch_of_the_triton_backend(monkeypatch):
    """Each launch the Triton backend makes (in the interpreter; one process plain, with per-sample outputs and
    with distillation, and a shard with column gradients) is a variant of ``kernels.VARIANTS`` (its jit function,
    its path flags) on the path ``kernels.PATHS`` names, with the registry's grid (the one-process forward's
    plan grid aside: the registry sizes it for a GPU, the interpreter for a pretend one)."""
    import drrho_kernels as dk
    from benchmarks import kernels
    from drrho_kernels.backends.triton import backward, forward, forward_transposed, launch
    if not launch.interpreting():
        pytest.skip("checks the launches in Triton's interpreter")
    seen = []

    def recorder(original):
        def record(fn, kernel, grid, args, flags, *rest):
            t = launch.INTERPRETER_TILES[kernel]
            seen.append((fn, dict(flags), tuple(grid(t)), t))
            return original(fn, kernel, grid, args, flags, *rest)
        return record
    for module, name in ((forward, "launch"), (backward, "launch"), (forward_transposed, "launch"),
                         (forward_transposed, "launch_fixed")):
        monkeypatch.setattr(module, name, recorder(getattr(module, name)))
    B, N, d, dr = 20, 44, 24, 16
    g = torch.Generator().manual_seed(0)
    cols = [torch.nn.functional.normalize(torch.randn(N, w, generator=g), dim=1) for w in (d, d, dr, dr)]
    u = torch.zeros(B)
    for path, extra in (("plain", {}), ("per_sample", dict(return_per_sample=True)), ("distill", dict(distill_weight=1.0))):
        seen.clear()
        x, t = (c[:B].clone().requires_grad_() for c in cols[:2])
        out = dk.drrho_clip_loss(x, t, torch.tensor(14.0, requires_grad=True), u, u, ref_img=cols[2][:B],
                                 ref_txt=cols[3][:B], backend="triton", **extra)
        out[0].backward()
        shape = kernels.Shape(B, B, d, dr, torch.float32, 90)
        names = []
        for fn, flags, grid, tiles in seen:
            [v] = [v for v in kernels.VARIANTS.values()
                   if v.fn is fn and all(flags.get(k) == x for k, x in v.flags.items())]
            names.append(v.name)
            assert v.name == "fwd_t" or v.name == "fwd_t_extra" or v.grid(shape, tiles) == grid, (v.name, grid)
        assert names == [kernels.PATHS[path][r] for r in ("fwd_t_margin", "fwd_t", "fwd_t_merge", "bwd_row_fold")]
    seen.clear()
    x, t = (c[12:12 + B].clone().requires_grad_() for c in cols[:2])
    X, T = (c.clone().requires_grad_() for c in cols[:2])
    dk.drrho_clip_loss(x, t, torch.tensor(14.0), u, u, ref_img=cols[2][12:12 + B], ref_txt=cols[3][12:12 + B],
                       img_all=X, txt_all=T, ref_img_all=cols[2], ref_txt_all=cols[3], offset=12,
                       backend="triton")[0].backward()
    shard = kernels.Shape(B, N, d, dr, torch.float32, 90)
    names = []
    for fn, flags, grid, tiles in seen:
        [v] = [v for v in kernels.VARIANTS.values() if v.fn is fn and all(flags.get(k) == x for k, x in v.flags.items())]
        names.append(v.name)
        assert v.grid(shard, tiles) == grid, (v.name, grid)
    assert names == ["fwd", "bwd_row", "bwd_col"]
