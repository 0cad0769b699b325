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
