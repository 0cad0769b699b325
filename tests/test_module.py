"""DRRhoCLIPLoss: state handling, gamma schedule, checkpoints, failed steps."""
import io
import math

import pytest
import torch

import drrho_kernels as dk
from spec_oracle import make_case, oracle


def batch(B=6, d=5, dr=4, seed=0, ref=True):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=1)  # noqa: E731
    out = dict(img=f(B, d), txt=f(B, d))
    if ref:
        out.update(ref_img=f(B, dr), ref_txt=f(B, dr))
    return out


def test_step_uses_and_writes_state_like_the_functional():
    crit = dk.DRRhoCLIPLoss(20, gamma=0.5, gamma_schedule="constant", rho=2.0, backend="torch")
    crit.u_img[[1, 5, 7]] = torch.tensor([0.3, -0.2, 0.0])   # 7 stays unset
    index = torch.tensor([7, 1, 5, 11, 2, 19])
    b = batch()
    before_u = crit.u_img[index].clone(), crit.u_txt[index].clone()
    loss = crit(b["img"], b["txt"], index, torch.tensor(4.0), b["ref_img"], b["ref_txt"])
    want, u_img, u_txt = dk.drrho_clip_loss(b["img"], b["txt"], 4.0, *before_u, ref_img=b["ref_img"],
                                            ref_txt=b["ref_txt"], gamma=0.5, rho=2.0, backend="torch")
    assert torch.equal(loss, want)
    assert torch.equal(crit.u_img[index], u_img) and torch.equal(crit.u_txt[index], u_txt)
    others = torch.ones(20, dtype=torch.bool)
    others[index] = False
    assert torch.equal(crit.u_txt[others], torch.zeros(int(others.sum())))


def test_matches_oracle_over_steps():
    """Two steps on overlapping samples: the second reads the state the first wrote."""
    crit = dk.DRRhoCLIPLoss(10, gamma=0.6, gamma_schedule="constant", backend="torch")
    state = torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    for step, index in enumerate([torch.tensor([0, 3, 4, 9]), torch.tensor([4, 9, 1, 2])]):
        case = make_case(B=4, d=5, seed=20 + step, u=(state[0][index].float(), state[1][index].float()), gamma=0.6)
        loss = crit(case.img.float(), case.txt.float(), index, torch.tensor(case.logit_scale),
                    case.ref_img.float(), case.ref_txt.float())
        want = oracle(case)
        assert loss.item() == pytest.approx(want["loss"], rel=1e-5)
        state[0][index] = torch.from_numpy(want["u_img"])
        state[1][index] = torch.from_numpy(want["u_txt"])
        torch.testing.assert_close(crit.u_img.double(), state[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(crit.u_txt.double(), state[1], rtol=1e-5, atol=1e-6)


def test_gamma_schedule_and_epoch():
    crit = dk.DRRhoCLIPLoss(4, gamma=0.8, gamma_decay_epochs=10)
    assert crit.gamma == 1.0                     # before any set_epoch: epoch 0
    crit.set_epoch(5)
    assert crit.gamma == pytest.approx(0.9)
    crit.set_epoch(25)
    assert crit.gamma == pytest.approx(0.8)
    assert dk.DRRhoCLIPLoss(4, gamma=0.3, gamma_schedule="constant").gamma == 0.3
    with pytest.raises(ValueError, match="epoch"):
        crit.set_epoch(-1)


@pytest.mark.parametrize("kwargs,words", [
    (dict(data_size=0), "data_size"), (dict(data_size=4, gamma=0.0), "gamma"),
    (dict(data_size=4, gamma_schedule="linear"), "gamma_schedule"), (dict(data_size=4, gamma_decay_epochs=0), "gamma_decay_epochs"),
    (dict(data_size=4, rho=-1.0), "rho"), (dict(data_size=4, eps=0.0), "eps"), (dict(data_size=4, backend="gpu"), "backend"),
    (dict(data_size=4, rho=float("inf")), "rho"), (dict(data_size=4, eps=float("inf")), "eps"),
])
def test_constructor_checks(kwargs, words):
    with pytest.raises(ValueError, match=words):
        dk.DRRhoCLIPLoss(**kwargs)


@pytest.mark.parametrize("kwargs,words", [
    (dict(data_size=4.0), "data_size"), (dict(data_size=True), "data_size"),
    (dict(data_size=4, gamma_decay_epochs=2.5), "gamma_decay_epochs"), (dict(data_size=4, gamma="0.5"), "gamma"),
])
def test_constructor_type_checks(kwargs, words):
    with pytest.raises(TypeError, match=words):
        dk.DRRhoCLIPLoss(**kwargs)


def test_constructor_and_call_share_their_bounds():
    """Whatever the constructor accepts, the call accepts (the same checks, the same bounds)."""
    crit = dk.DRRhoCLIPLoss(8, rho=1e300, eps=1e-300, gamma=1.0, gamma_schedule="constant")
    img = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    loss = crit(img, img.flip(0), torch.arange(4), 5.0)
    assert loss.shape == ()


BAD_STEPS = [
    ("index-out-of-range", dict(index=torch.tensor([0, 1, 2, 3, 4, 20])), IndexError, "[0, 20)"),
    ("index-negative", dict(index=torch.tensor([0, 1, 2, 3, 4, -1])), IndexError, "got -1"),
    ("index-float", dict(index=torch.arange(6.0)), TypeError, "integer dtype"),
    ("index-length", dict(index=torch.arange(5)), ValueError, "(6,)"),
    ("index-repeated", dict(index=torch.tensor([0, 1, 1, 3, 4, 5])), ValueError, "distinct"),
    ("index-list", dict(index=[0, 1, 2, 3, 4, 5]), TypeError, "index"),
    ("bad-scale", dict(logit_scale=torch.tensor(-1.0)), ValueError, "logit_scale"),
    ("bad-txt", dict(txt=torch.randn(6, 4)), ValueError, "txt"),
    ("nan-img", dict(img=torch.full((6, 5), float("nan"))), ValueError, "finite"),
    ("ref-alone", dict(ref_txt=None), ValueError, "ref_img"),
]


@pytest.mark.parametrize("name,changes,exc,words", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_failed_step_leaves_state_bit_identical(name, changes, exc, words):
    crit = dk.DRRhoCLIPLoss(20, backend="torch")
    b = batch()
    crit(b["img"], b["txt"], torch.arange(6), torch.tensor(5.0), b["ref_img"], b["ref_txt"])
    snapshot = {k: v.clone() for k, v in crit.state_dict().items() if isinstance(v, torch.Tensor)}
    args = dict(img=b["img"], txt=b["txt"], index=torch.arange(6) + 2, logit_scale=torch.tensor(5.0),
                ref_img=b["ref_img"], ref_txt=b["ref_txt"])
    args.update(changes)
    with pytest.raises(exc) as info:
        crit(**args)
    assert words in str(info.value)
    for k, v in crit.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snapshot[k]), k


def train(crit, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        crit.set_epoch(step // 2)
        b = batch(seed=100 + step)
        index = torch.randperm(30, generator=torch.Generator().manual_seed(step))[:6]
        losses.append(crit(b["img"], b["txt"], index, torch.tensor(7.0), b["ref_img"], b["ref_txt"]))
    return losses


def test_state_dict_round_trip_resumes_bit_exact():
    straight = dk.DRRhoCLIPLoss(30, gamma_decay_epochs=3, backend="torch")
    straight_losses = train(straight, 6)
    first = dk.DRRhoCLIPLoss(30, gamma_decay_epochs=3, backend="torch")
    train(first, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = dk.DRRhoCLIPLoss(30, gamma_decay_epochs=3, backend="torch")
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.epoch == first.epoch == 1
    resumed_losses = train(resumed, 3, start=3)
    for a, b in zip(resumed_losses, straight_losses[3:]):
        assert torch.equal(a, b)
    assert torch.equal(resumed.u_img, straight.u_img) and torch.equal(resumed.u_txt, straight.u_txt)
    assert set(straight.state_dict()) == {"u_img", "u_txt", "_extra_state"}


def test_state_stays_float32_and_pinned():
    crit = dk.DRRhoCLIPLoss(8, state_device="cpu")
    crit.u_img.fill_(1.0 + 2 ** -20)          # not representable in float16
    crit.half()
    assert crit.u_img.dtype == torch.float32 and crit.u_img[0].item() == 1.0 + 2 ** -20
    crit.to("meta")
    assert crit.u_img.device.type == "cpu"    # pinned: state_device wins over .to()
    follower = dk.DRRhoCLIPLoss(8).to("meta")
    assert follower.u_img.device.type == "meta" and follower.u_img.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_moves_to_the_first_batch_device():
    crit = dk.DRRhoCLIPLoss(8, backend="torch")
    b = batch(B=4, ref=False)
    crit(b["img"].cuda(), b["txt"].cuda(), torch.arange(4), 5.0)
    assert crit.u_img.device.type == "cuda" and (crit.u_img[:4] != 0).all()
    pinned = dk.DRRhoCLIPLoss(8, backend="torch", state_device="cpu")
    pinned(b["img"].cuda(), b["txt"].cuda(), torch.arange(4).cuda(), 5.0)
    assert pinned.u_img.device.type == "cpu" and (pinned.u_img[:4] != 0).all()


def test_repr_names_the_settings():
    text = repr(dk.DRRhoCLIPLoss(5, rho=11.0, backend="torch"))
    assert "data_size=5" in text and "rho=11.0" in text and "backend='torch'" in text


# --------------------------------------------------------------------------------------------------
# Per-sample temperatures (temperature="individual")

def pairs(B=6, seed=0):
    """``(img, txt, ref_img, ref_txt)`` of :func:`batch`."""
    b = batch(B=B, seed=seed)
    return b["img"], b["txt"], b["ref_img"], b["ref_txt"]


INDIVIDUAL = ("u_img", "u_txt", "tau_img", "tau_txt", "bound_img", "bound_txt", "tau_m_img", "tau_m_txt",
              "tau_v_img", "tau_v_txt")


def test_individual_state_buffers_and_their_updates():
    crit = dk.DRRhoCLIPLoss(30, temperature="individual", tau_init=0.05, backend="torch")
    assert crit.state_names == INDIVIDUAL
    for name in INDIVIDUAL:
        buf = getattr(crit, name)
        assert buf.dtype == torch.float32 and buf.shape == (30,) and name in crit.state_dict()
    assert bool((crit.tau_img == 0.05).all()) and not crit.u_img.any()
    img, txt, ref_img, ref_txt = pairs(B=6)
    img.requires_grad_()
    index = torch.tensor([1, 5, 7, 11, 20, 29])
    before = {k: getattr(crit, k).clone() for k in INDIVIDUAL}
    loss = crit(img, txt, index, ref_img=ref_img, ref_txt=ref_txt)
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    others = torch.ones(30, dtype=torch.bool)
    others[index] = False
    for name in INDIVIDUAL:
        assert torch.equal(getattr(crit, name)[others], before[name][others]), name   # only the batch's entries
    assert not torch.equal(crit.tau_img[index], before["tau_img"][index])
    assert bool((crit.u_img[index] > 0).all()) and bool((crit.bound_img[index] >= 0).all())
    # epoch 0: betas are 0, so each temperature moves by about lr (a signed step: m_hat / sqrt(v_hat) = +-1)
    step = (crit.tau_img[index] - 0.05).abs()
    torch.testing.assert_close(step, torch.full_like(step, 0.0133), rtol=1e-4, atol=1e-6)
    assert "temperature='individual'" in repr(crit) and "tau_lr=0.0133" in repr(crit)


def test_individual_resumes_bit_exact_from_a_checkpoint(tmp_path):
    def run(crit, steps, start=0):
        g = torch.Generator().manual_seed(7)
        losses = []
        for step in range(start + steps):
            img, txt, ref_img, ref_txt = pairs(B=5, seed=step)
            index = torch.randperm(12, generator=g)[:5]
            crit.set_epoch(step // 2)
            if step >= start:
                losses.append(crit(img, txt, index, ref_img=ref_img, ref_txt=ref_txt).detach())
        return losses

    a = dk.DRRhoCLIPLoss(12, temperature="individual", backend="torch")
    run(a, 3)
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    tail_a = run(a, 3, start=3)
    b = dk.DRRhoCLIPLoss(12, temperature="individual", backend="torch")
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    tail_b = run(b, 3, start=3)
    assert all(torch.equal(x, y) for x, y in zip(tail_a, tail_b))
    for name in INDIVIDUAL:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


BAD_TEMPERATURES = [
    ("pair-nonpositive", dict(), dict(logit_scale=(5.0, 0.0)), ValueError, "logit_scale[1]"),
    ("pair-nonfinite", dict(), dict(logit_scale=(torch.tensor(math.inf), 5.0)), ValueError, "logit_scale[0]"),
    ("pair-of-three", dict(), dict(logit_scale=(5.0, 5.0, 5.0)), ValueError, "pair"),
    ("nested-pair", dict(), dict(logit_scale=((5.0, 5.0), 5.0)), TypeError, "logit_scale[0]"),
    ("two-element-tensor", dict(), dict(logit_scale=torch.ones(2)), ValueError, "1-element"),
    ("missing-scale", dict(), dict(logit_scale=None), TypeError, "logit_scale"),
    ("scale-with-individual", dict(temperature="individual"), dict(logit_scale=torch.tensor(5.0)), ValueError,
     "temperature='individual'"),
]


@pytest.mark.parametrize("name,ctor,call,exc,words", BAD_TEMPERATURES, ids=[b[0] for b in BAD_TEMPERATURES])
def test_bad_temperature_arguments_leave_the_state_bit_identical(name, ctor, call, exc, words):
    crit = dk.DRRhoCLIPLoss(20, backend="torch", **ctor)
    crit.set_epoch(1)
    crit(*pairs(B=6)[:2], torch.arange(6), **({} if ctor else dict(logit_scale=5.0)))     # some state
    before = {k: v.clone() for k, v in crit.state_dict().items() if isinstance(v, torch.Tensor)}
    img, txt = pairs(B=6)[:2]
    with pytest.raises(exc) as info:
        crit(img, txt, torch.arange(6), **call)
    assert words in str(info.value)
    for k, v in crit.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(tau_init=0.001), ValueError, "tau_init"), (dict(tau_init=2.0), ValueError, "tau_init"),
    (dict(tau_lr=0.0), ValueError, "tau_lr"), (dict(tau_lr=-1.0), ValueError, "tau_lr"),
    (dict(tau_betas=(1.0, 0.9)), ValueError, "tau_betas[0]"), (dict(tau_betas=(0.9, -0.1)), ValueError, "tau_betas[1]"),
    (dict(tau_betas=0.9), TypeError, "tau_betas"), (dict(tau_eps=0.0), ValueError, "tau_eps"),
    (dict(tau_range=(0.5, 0.1)), ValueError, "tau_range[1]"), (dict(tau_grad_clamp=0.0), ValueError, "tau_grad_clamp"),
    (dict(temperature="per_sample"), ValueError, "temperature"), (dict(multiply_tau=1), TypeError, "multiply_tau"),
])
def test_individual_constructor_checks(kwargs, exc, words):
    kwargs.setdefault("temperature", "individual")
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        dk.DRRhoCLIPLoss(10, **kwargs)


def test_per_direction_and_no_multiply_tau_through_the_module():
    """The module passes the pair and multiply_tau through: the same numbers as the functional call."""
    img, txt, ref_img, ref_txt = pairs(B=6)
    pair = (torch.tensor(7.0, requires_grad=True), torch.tensor(12.0, requires_grad=True))
    for multiply_tau in (True, False):
        crit = dk.DRRhoCLIPLoss(10, backend="torch", multiply_tau=multiply_tau, gamma_schedule="constant")
        loss = crit(img, txt, torch.arange(6), pair, ref_img=ref_img, ref_txt=ref_txt)
        want, u_img, _ = dk.drrho_clip_loss(img, txt, pair, torch.zeros(6), torch.zeros(6), ref_img=ref_img,
                                            ref_txt=ref_txt, gamma=0.8, backend="torch", multiply_tau=multiply_tau)
        torch.testing.assert_close(loss, want, rtol=0, atol=0)
        torch.testing.assert_close(crit.u_img[:6], u_img, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.0, -0.02, float("nan"), float("inf")])
def test_loading_a_temperature_table_that_is_not_positive_raises_and_copies_nothing(bad):
    """A corrupted checkpoint is refused at load time (a sharded step checks placeholders, not the fetched
    entries, so it could not catch it later), and the module keeps its own tables."""
    crit = dk.DRRhoCLIPLoss(10, temperature="individual", backend="torch")
    mine = {k: v.clone() for k, v in crit.state_dict().items() if isinstance(v, torch.Tensor)}
    other = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in crit.state_dict().items()}
    other["u_img"] += 1.0
    other["tau_txt"][4] = bad
    with pytest.raises(ValueError, match="tau_txt"):
        crit.load_state_dict(other)
    assert all(torch.equal(mine[k], v) for k, v in crit.state_dict().items() if isinstance(v, torch.Tensor))
