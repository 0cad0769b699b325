"""The benchmarks' unfused baseline computes the loss it claims to (SPEC.md), so its times and memory
are those of the real thing: checked against the float64 oracle, values, u and every gradient."""
import pytest
import torch

from benchmarks import baselines
from helpers import rel_err
from spec_oracle import make_case, oracle

CASES = {
    "single-ref": dict(B=7, d=5, dr=3),
    "single-noref": dict(B=6, d=4, ref=False),
    "shard-ref": dict(B=4, N=11, d=5, dr=6, offset=3),
    "shard-noref-offset0": dict(B=3, N=9, d=4, ref=False, offset=0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_unfused_baseline_matches_the_oracle(name):
    case = make_case(**CASES[name], seed=3)
    kw = case.kwargs(dtype=torch.float64, requires_grad=True)
    s = torch.tensor(case.logit_scale, dtype=torch.float64, requires_grad=True)
    cols = {k: kw[k] for k in ("img_all", "txt_all", "ref_img_all", "ref_txt_all") if kw[k] is not None}
    loss, u_img, u_txt = baselines.unfused_drrho_loss(
        kw["img"], kw["txt"], s, kw["u_img"].double(), kw["u_txt"].double(), kw["ref_img"], kw["ref_txt"],
        offset=kw["offset"], gamma=kw["gamma"], eps=kw["eps"], rho=kw["rho"], **cols)
    leaves = [kw["img"], kw["txt"], s] + ([cols["img_all"], cols["txt_all"]] if "img_all" in cols else [])
    grads = torch.autograd.grad(loss, leaves)
    want = oracle(case)
    got = dict(loss=loss.item(), u_img=u_img.detach(), u_txt=u_txt.detach(), d_img=grads[0], d_txt=grads[1],
               d_s=grads[2].item())
    if len(grads) > 3:
        got.update(d_img_all=grads[3], d_txt_all=grads[4])
    assert set(got) <= set(want) and len(got) == (8 if "N" in CASES[name] else 6)
    for key, value in got.items():
        assert rel_err(torch.as_tensor(value, dtype=torch.float64).numpy(), want[key]) < 1e-10, key
