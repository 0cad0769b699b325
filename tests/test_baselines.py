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


def _unfused_under_autocast(case):
    """Float32 features (as CUDA autocast hands them over) into the unfused loss under CPU bfloat16 autocast:
    its similarity products run in bfloat16, the rest as their types promote (float32)."""
    kw = case.kwargs(dtype=torch.float32, requires_grad=True)
    s = torch.tensor(case.logit_scale, requires_grad=True)
    cols = {k: kw[k] for k in ("img_all", "txt_all", "ref_img_all", "ref_txt_all") if kw[k] is not None}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, u_img, _ = baselines.unfused_drrho_loss(kw["img"], kw["txt"], s, kw["u_img"], kw["u_txt"], kw["ref_img"],
                                                      kw["ref_txt"], offset=kw["offset"], **cols)
    return loss, u_img, torch.autograd.grad(loss, [kw["img"], kw["txt"], s]), kw


@pytest.mark.parametrize("N", [None, 40])
def test_unfused_under_autocast_is_the_loss_at_bfloat16_similarities(N):
    """Against the float64 oracle: within two bfloat16 units (2^-7) for the loss and u (the similarities are
    rounded to bfloat16 once; measured up to 2.6e-3), within the suite's bfloat16 gradient tolerance (2e-2) for
    the gradients; and not the float32 loss: the bfloat16 products show in u."""
    for seed in range(4):
        case = make_case(B=24, N=N, d=32, dr=16, seed=seed, u="unset", scale=1 / 0.07)
        loss, u_img, (d_img, d_txt, d_s), _ = _unfused_under_autocast(case)
        want = oracle(case)
        assert loss.dtype == torch.float32 and rel_err(loss.item(), want["loss"]) < 2 ** -7
        assert 1e-5 < rel_err(u_img.detach().double().numpy(), want["u_img"]) < 2 ** -7
        for got, key in ((d_img, "d_img"), (d_txt, "d_txt")):
            assert rel_err(got.double().numpy(), want[key]) < 2e-2, key
        assert abs(d_s.item() - want["d_s"]) < 2e-2 * abs(want["d_s"])


def test_unfused_under_autocast_computes_as_the_authors_sogclr_loss():
    """The authors' released SogCLRLoss (DRRHO_AUTHORS_REPO) under the same autocast on the same float32
    features (one process, epoch 0: u is the log-sum-exp, as the baseline's unset u): the same numbers."""
    from benchmarks import authors
    module, why = authors.load_module()
    if module is None:
        pytest.skip(why)
    case = make_case(B=24, d=32, dr=16, seed=1, u="unset", scale=1 / 0.07)
    loss, _, grads, _ = _unfused_under_autocast(case)
    kw = case.kwargs(dtype=torch.float32, requires_grad=True)
    s, index = torch.tensor(case.logit_scale, requires_grad=True), torch.arange(24)
    crit = module.SogCLRLoss(24, gamma=0.8, gamma_schedule="cosine", gamma_decay_epochs=10, rho=8.0,
                             device=torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = crit(features=(kw["img"], kw["txt"]), indices=(index, index), logit_scale=s, offset=0,
                      ref_features=(kw["ref_img"], kw["ref_txt"]))[0]
    assert abs(theirs.item() - loss.item()) <= 1e-6 * abs(loss.item())
    for mine, their in zip(grads, torch.autograd.grad(theirs, [kw["img"], kw["txt"], s])):
        assert rel_err(mine.double().numpy(), their.double().numpy()) < 1e-5
