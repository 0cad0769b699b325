"""The cost model's FLOP counts against counts by hand (in units of ``2 B N`` FLOPs per width).

One process, B = N, with a reference: the GEMM floor is the forward's similarities (``d + dr``), their
recomputation (``d + dr``) and the two weighted products (``2 d``). The Triton path computes the forward
scores once (transposed forward, ``d + dr``) and, in the backward, for each direction and each d-slice of
width ``BD`` the scores again (``d + dr``) plus that direction's weighted product over all slices
(``slices * BD``: executed FLOPs, a partial last slice runs whole).
"""
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
    padding changes the executed FLOPs) on sm_100, where every path has its transposed forward."""
    d = shape["d"]
    dr = shape.get("dr") or d
    for dtype in ("bfloat16", "float32"):
        same = {VARIANTS[v].kernel: VARIANTS[v].candidates(d, dr, getattr(torch, dtype), 100)[0]
                for v in ("fwd", "fwd_t", "bwd_row")}
        plain = cost_model.triton_cost(**shape, dtype=dtype, arch=100, tiles=same)
        distill = cost_model.triton_cost(**shape, dtype=dtype, arch=100, tiles=same, distill=True)
        assert distill["flops"] == plain["flops"]
        assert distill["exps"] == pytest.approx(3 * plain["exps"], rel=2e-3)   # the merge's few exps stay
        assert distill["hbm_bytes"] > plain["hbm_bytes"]


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
        slower = r["triton"]["t_bound_s"] > r["unfused"]["t_bound_s"]
        assert ("**" in line) == slower, line


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
