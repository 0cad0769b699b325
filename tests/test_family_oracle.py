"""SPEC part 2's oracle (tests/family_oracle.py): self-consistency (its forms against part 1's oracle, finite
differences of every closed form, part 1's included through the multiply_tau form), and parity with the
authors' code.

The parity tests read the authors' code from the snapshots named by ``DRRHO_AUTHORS_REPO`` (DRRho-CLIP)
and ``FASTCLIP_REPO`` (fast_clip) through tests/authors_harness.py, and are skipped without them. All
runs are float64; ``pytest -s`` prints the measured worst relative differences.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import authors_harness as ah
import family_oracle as fo
from helpers import rel_err as rel
from spec_oracle import Case, make_case, oracle

HAVE_DRRHO, WHY_DRRHO = ah.available(ah.DRRHO_ENV)
HAVE_FASTCLIP, WHY_FASTCLIP = ah.available(ah.FASTCLIP_ENV)
needs_drrho = pytest.mark.skipif(not HAVE_DRRHO, reason=WHY_DRRHO)
needs_fastclip = pytest.mark.skipif(not HAVE_FASTCLIP, reason=WHY_FASTCLIP)
needs_both = pytest.mark.skipif(not (HAVE_DRRHO and HAVE_FASTCLIP), reason=WHY_DRRHO or WHY_FASTCLIP)

PARITY = 1e-9


def report(title, worst):
    print(f"\n{title}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


# ------------------------------------------------------------------------------ finite differences
EMB = ("img", "txt", "img_all", "txt_all")


def directions(case: Case, seed: int, which=EMB):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(getattr(case, k).shape, generator=g, dtype=torch.float64)
            for k in which if getattr(case, k) is not None}


def moved(case: Case, dirs: dict, h: float, scale_dir: float = 0.0) -> Case:
    kw = {k: getattr(case, k) + h * v for k, v in dirs.items()}
    return dataclasses.replace(case, logit_scale=case.logit_scale + h * scale_dir, **kw)


def along(grads: dict, dirs: dict) -> float:
    return sum(float((np.asarray(grads[f"d_{k}"]) * dirs[k].numpy()).sum()) for k in dirs)


def central(f, h=1e-6):
    return (f(h) - f(-h)) / (2 * h)


CASES = dict(single=dict(B=6, d=5), single_noref=dict(B=6, d=5, ref=False),
             dist=dict(B=4, N=10, d=5, dr=3, offset=3), dist_noref=dict(B=4, N=10, d=5, ref=False, offset=6))


# --------------------------------------------------------------------------- 2.1 global, self-checks
@pytest.mark.parametrize("name", list(CASES))
def test_per_direction_equal_scales(name):
    """Same embedding gradients and u as part 1; the scale gradient and the value are the seed's."""
    case = make_case(**CASES[name], seed=2)
    p1, pd = oracle(case), fo.global_oracle(case, "per_direction", scale_txt=case.logit_scale)
    for k in p1:
        if k.startswith(("d_img", "d_txt", "u_")):
            assert rel(pd[k], p1[k]) < 1e-13, k
    s, U = case.logit_scale, pd["U_img"] + pd["U_txt"]
    assert pd["loss"] == pytest.approx(p1["loss"] + U / (2 * s) + case.rho / s, rel=1e-13)
    assert pd["d_s"] == pytest.approx(p1["d_s"] - U / (2 * s * s) - case.rho / (s * s), rel=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_no_multiply_tau_is_s_times_part_one(name):
    case = make_case(**CASES[name], seed=3)
    p1, nm = oracle(case), fo.global_oracle(case, "no_multiply_tau")
    for k in p1:
        if k.startswith(("d_img", "d_txt")):
            assert rel(nm[k], case.logit_scale * p1[k]) < 1e-13, k
    assert nm["loss"] == pytest.approx(nm["A_img"] + nm["A_txt"], rel=1e-14)


@pytest.mark.parametrize("form", fo.FORMS)
@pytest.mark.parametrize("name", ["single", "dist"])
def test_global_forms_finite_differences(form, name):
    """Directional derivatives of the value (w and u held at their values) match the closed forms,
    embeddings (rows and columns) and each scale."""
    case = make_case(**CASES[name], seed=4)
    sT = 3.5 if form == "per_direction" else None
    base = fo.global_oracle(case, form, scale_txt=sT)
    frozen = {k: base[k] for k in ("u_img", "u_txt", "w_img", "w_txt", "s_img_", "s_txt_")}
    dirs = directions(case, 5)
    fd = central(lambda h: fo.global_oracle(moved(case, dirs, h), form, scale_txt=sT, frozen=frozen)["loss"])
    assert fd == pytest.approx(along(base, dirs), rel=1e-7)
    fd_s = central(lambda h: fo.global_oracle(moved(case, {}, h, 1.0), form, scale_txt=sT, frozen=frozen)["loss"])
    assert fd_s == pytest.approx(base["d_s_img"] if form == "per_direction" else base["d_s"], rel=1e-7)
    if form == "per_direction":
        fd_t = central(lambda h: fo.global_oracle(case, form, scale_txt=sT + h, frozen=frozen)["loss"])
        assert fd_t == pytest.approx(base["d_s_txt"], rel=1e-7)


# ------------------------------------------------------------------------ 2.2 distillation, self-checks
@pytest.mark.parametrize("name", ["single", "dist"])
def test_distillation_finite_differences(name):
    case = make_case(**CASES[name], seed=6, scale=7.0)
    base = fo.distill_oracle(case, teacher_scale=20.0)
    dirs = directions(case, 7)
    fd = central(lambda h: fo.distill_oracle(moved(case, dirs, h), teacher_scale=20.0)["loss"])
    assert fd == pytest.approx(along(base, dirs), rel=1e-7)
    fd_s = central(lambda h: fo.distill_oracle(moved(case, {}, h, 1.0), teacher_scale=20.0)["loss"])
    assert fd_s == pytest.approx(base["d_s"], rel=1e-7)
    assert base["loss"] == pytest.approx(0.5 * (base["ce_img"].mean() + base["ce_txt"].mean()), rel=1e-14)


def test_distillation_from_itself_has_no_gradient():
    """Teacher = student (same embeddings, same scale): p = q, so D is the entropy and every gradient is 0."""
    case = make_case(B=5, d=4, seed=8, scale=6.0)
    case = dataclasses.replace(case, ref_img=case.img.clone(), ref_txt=case.txt.clone())
    out = fo.distill_oracle(case, teacher_scale=6.0)
    for k in ("d_img", "d_txt"):
        assert np.abs(out[k]).max() < 1e-15
    assert abs(out["d_s"]) < 1e-15


def test_sogclr_total_composition():
    case = make_case(**CASES["dist"], seed=9, scale=9.0)
    for mt in (True, False):
        tot = fo.sogclr_oracle(case, multiply_tau=mt, distill_weight=0.3, teacher_scale=50.0)
        g = fo.global_oracle(case, "multiply_tau" if mt else "no_multiply_tau")
        D = fo.distill_oracle(case, 50.0)
        f = 0.3 / (9.0 if mt else 1.0)
        assert tot["total"] == pytest.approx(g["loss"] + f * D["loss"], rel=1e-14)
        assert rel(tot["d_txt_all"], g["d_txt_all"] + f * D["d_txt_all"]) < 1e-14
        assert tot["d_s"] == pytest.approx(g["d_s"] + f * D["d_s"], rel=1e-13)


# ------------------------------------------------------------------------ 2.1 individual, self-checks
def individual_case(B=5, N=None, offset=None, seed=10, ref=False, gamma=0.7, rho=6.0):
    """Distributed shape always (N = B allowed): columns are constants for fast_clip's gradients."""
    c = make_case(B=B, N=N or B, d=4, dr=3, ref=ref, seed=seed, gamma=gamma, rho=rho,
                  offset=0 if N is None else offset)
    return c


def random_states(N, seed, epoch_seen=True):
    rng = np.random.default_rng(seed)

    def one():
        st = fo.TauState(tau=rng.uniform(0.02, 0.3, N), u=rng.uniform(0.05, 2.0, N), b=rng.uniform(0.0, 8.0, N),
                         m=rng.normal(0, 1, N), v=rng.uniform(0.1, 4.0, N))
        if epoch_seen:
            st.u[0], st.u[1] = 0.0, np.inf  # reset rules
        return st
    return one(), one()


IND = dict(epoch=1, lr_tau=0.03, beta1=0.9, beta2=0.98, eps_tau=1e-6)


@pytest.mark.parametrize("ref", [False, True])
@pytest.mark.parametrize("shape", [dict(B=6), dict(B=4, N=10, offset=2)])
def test_individual_finite_differences(shape, ref):
    """fast_clip's gradients: rows variable, gathered columns / b' / u' / old tau constant."""
    case = individual_case(**shape, ref=ref)
    sI, sT = random_states(case.img_all.shape[0], 11)
    base = fo.individual_oracle(case, sI, sT, **IND)
    dirs = directions(case, 12, which=("img", "txt"))
    fd = central(lambda h: fo.individual_oracle(moved(case, dirs, h), sI, sT, frozen=base["frozen"], **IND)["loss"])
    assert fd == pytest.approx(along(base, dirs), rel=1e-7)


def test_individual_one_process_without_group_doubles():
    """Rows and columns the same tensors (no process group in fast_clip): the gradient is the full
    derivative of the value, exactly twice fast_clip's process-group gradient."""
    case = individual_case(B=6, seed=13)
    sI, sT = random_states(6, 14)
    base = fo.individual_oracle(case, sI, sT, **IND)
    dirs = directions(case, 15, which=("img", "txt"))
    both = {"img": dirs["img"], "txt": dirs["txt"], "img_all": dirs["img"], "txt_all": dirs["txt"]}
    fd = central(lambda h: fo.individual_oracle(moved(case, both, h), sI, sT, frozen=base["frozen"], **IND)["loss"])
    assert fd == pytest.approx(2 * along(base, dirs), rel=1e-7)


def test_individual_distributed_contract():
    """W ranks: the state update is the single-process one; mean_r L_r = L; rank gradients are W times the
    single-process gradient of their rows (the data-parallel mean is the single-process gradient)."""
    W, B = 3, 3
    N = W * B
    full = individual_case(B=N, seed=16, ref=True)
    sI, sT = random_states(N, 17)
    one = fo.individual_oracle(full, sI, sT, **IND)
    values = []
    for r in range(W):
        c = dataclasses.replace(full, img=full.img_all[r * B:(r + 1) * B], txt=full.txt_all[r * B:(r + 1) * B],
                                ref_img=full.ref_img_all[r * B:(r + 1) * B],
                                ref_txt=full.ref_txt_all[r * B:(r + 1) * B], offset=r * B)
        out = fo.individual_oracle(c, sI, sT, **IND)
        values.append(out["loss"])
        for k in ("d_img", "d_txt"):
            assert rel(out[k], W * one[k][r * B:(r + 1) * B]) < 1e-13
        for k in ("tau_img", "u_txt", "b_img", "m_txt", "v_img"):
            assert rel(out[k], one[k]) == 0.0
    assert np.mean(values) == pytest.approx(one["loss"], rel=1e-13)


def test_individual_epoch_zero_rules():
    """gamma = 1, betas 0: u' = g (no b rescaling, no reset), m' = grad, v' = grad^2, a step of -lr sign."""
    case = individual_case(B=6, seed=18, gamma=1.0)
    sI, sT = random_states(6, 19, epoch_seen=False)
    out = fo.individual_oracle(case, sI, sT, **dict(IND, epoch=0))
    g, grad = out["g_img"], out["grad_tau_img"]
    assert rel(out["u_img"], g) == 0.0
    assert rel(out["m_img"], grad) == 0.0 and rel(out["v_img"], grad ** 2) == 0.0
    step = 0.03 * grad / (np.abs(grad) + 1e-6)
    assert rel(out["tau_img"], np.clip(sI.tau - step, 0.01, 1.0)) < 1e-15
    assert np.all(np.abs(grad) <= 5.0)


# ------------------------------------------------------------------------ 2.3 per-sample and JEST
def test_per_sample_outputs():
    case = make_case(**CASES["dist"], seed=20)
    out = fo.per_sample_oracle(case)
    g = fo.global_oracle(case)
    assert rel(out["l_img"], g["l_img"]) == 0.0 and rel(out["u_txt"], g["u_txt"]) == 0.0
    # without a reference signal (zero reference embeddings) the shifted l is s * the target's loss
    z = dataclasses.replace(case, ref_img=case.ref_img * 0, ref_txt=case.ref_txt * 0,
                            ref_img_all=case.ref_img_all * 0, ref_txt_all=case.ref_txt_all * 0)
    zo = fo.per_sample_oracle(z)
    assert rel(zo["l_img"] / case.logit_scale, out["target_img"]) < 1e-14
    assert rel(zo["l_txt"] / case.logit_scale, out["target_txt"]) < 1e-14
    # the reference alone: swap the roles of target and reference
    sw = dataclasses.replace(case, img=case.ref_img, txt=case.ref_txt, img_all=case.ref_img_all,
                             txt_all=case.ref_txt_all, ref_img=None, ref_txt=None, ref_img_all=None,
                             ref_txt_all=None)
    assert rel(fo.per_sample_oracle(sw)["target_img"], out["ref_img"]) < 1e-14
    D = fo.distill_oracle(case)
    assert rel(out["ce_txt"], D["ce_txt"]) == 0.0


def jest_inputs(N=12, d=6, seed=21, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def emb():
        return torch.nn.functional.normalize(torch.randn(N, d, generator=g, dtype=dtype), dim=1)
    return dict(ref_img=emb(), ref_txt=emb(), img=emb(), txt=emb())


def test_jest_oracle_self_consistency():
    x = jest_inputs()
    n_chunks, f, tl, tr = 3, 0.5, 12.0, 20.0
    out = fo.jest_oracle(**x, learner_scale=tl, ref_scale=tr, n_chunks=n_chunks, filter_ratio=f, topk=True,
                         world_size=2)
    b = 6
    assert fo.jest_draws(b, n_chunks, f) == 1 and fo.jest_draws(15, 2, 0.8) == 1 and fo.jest_draws(10, 3, 0.8) == 0
    for r, o in enumerate(out):
        assert len(o["inds"]) == n_chunks * o["n_draws"] and len(set(o["inds"].tolist())) == len(o["inds"])
        assert np.argmin(o["diag"]) not in o["inds"][:o["n_draws"]]  # weight 0 in the first chunk
    # chunk 2 of rank 0 with torch: conditional learnability over the pairs drawn by both ranks
    S = torch.zeros(12, dtype=torch.bool)
    for r, o in enumerate(out):
        S[r * b + torch.as_tensor(o["inds"][:1])] = True
    X, T, R, Rt = (x[k] for k in ("img", "txt", "ref_img", "ref_txt"))
    rows = slice(0, b)

    def lse(z):
        return torch.logsumexp(z[:, S], dim=1)
    cond = (tr * (R[rows] * Rt[rows]).sum(1) - tl * (X[rows] * T[rows]).sum(1)
            + 0.5 * (lse(tl * X[rows] @ T.T) + lse(tl * T[rows] @ X.T))
            - 0.5 * (lse(tr * R[rows] @ Rt.T) + lse(tr * Rt[rows] @ R.T)))
    cond[S[rows]] = -float("inf")
    assert rel(np.where(np.isfinite(cond.numpy()), cond.numpy(), 0), np.where(np.isfinite(out[0]["cond"][0]),
                                                                                out[0]["cond"][0], 0)) < 1e-13
    assert out[0]["inds"][1] == int(torch.argmax(cond))
    # sampling: the same generators give the same draws
    a = fo.jest_oracle(**x, learner_scale=tl, ref_scale=tr, n_chunks=2, filter_ratio=f,
                       generators=[torch.Generator().manual_seed(5)])
    c = fo.jest_oracle(**x, learner_scale=tl, ref_scale=tr, n_chunks=2, filter_ratio=f,
                       generators=[torch.Generator().manual_seed(5)])
    assert (a[0]["inds"] == c[0]["inds"]).all() and len(a[0]["inds"]) == 6


# =============================================================================== parity with authors
def u_table(N, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, generator=g, dtype=torch.float64)
    u[0] = 0.0  # unset
    return u


def sogclr_spec(N, seed, *, ref=True, multiply_tau=False, distill=None, student_scale=None, scale=8.0):
    g = torch.Generator().manual_seed(seed)

    def emb(width):
        return torch.nn.functional.normalize(torch.randn(N, width, generator=g, dtype=torch.float64), dim=1)
    spec = dict(img=emb(6), txt=emb(6), u_img=u_table(N, seed + 1), u_txt=u_table(N, seed + 2), scale=scale,
                gamma=0.7, rho=11.0, eps=1e-14, multiply_tau=multiply_tau, distill=distill,
                student_scale=student_scale)
    if ref:
        spec.update(ref_img=emb(4), ref_txt=emb(4))
    return spec


def spec_case(spec, rank, world) -> Case:
    N = spec["img"].shape[0]
    B = N // world
    sl = slice(rank * B, (rank + 1) * B)
    ref = spec.get("ref_img") is not None
    cols = dict(img_all=spec["img"], txt_all=spec["txt"])
    if ref:
        cols.update(ref_img_all=spec["ref_img"], ref_txt_all=spec["ref_txt"])
    return Case(img=spec["img"][sl], txt=spec["txt"][sl], logit_scale=spec["scale"], u_img=spec["u_img"][sl],
                u_txt=spec["u_txt"][sl], ref_img=spec["ref_img"][sl] if ref else None,
                ref_txt=spec["ref_txt"][sl] if ref else None, offset=rank * B, gamma=spec["gamma"],
                eps=spec["eps"], rho=spec["rho"], **cols)


SOGCLR_VARIANTS = {
    "nomt_ref": dict(ref=True, multiply_tau=False),
    "nomt_noref": dict(ref=False, multiply_tau=False),
    "distill_mt": dict(multiply_tau=True, distill=dict(weight=0.4, teacher_scale=100.0)),
    "distill_nomt": dict(multiply_tau=False, distill=dict(weight=0.4, teacher_scale=100.0)),
    # train.py with ref_features_usage ref+distill and distill_ref_logit_scale > 0: constant contrastive scale
    "distill_mt_const": dict(multiply_tau=True, distill=dict(weight=1.0, teacher_scale=100.0), student_scale=13.0,
                             scale=20.0),
}


def check_sogclr(results, specs, world):
    worst = {}

    def upd(k, v):
        worst[k] = max(worst.get(k, 0.0), v)
    for name, spec in specs.items():
        per_rank = results[name]
        ors = [fo.sogclr_oracle(spec_case(spec, r, world), multiply_tau=spec["multiply_tau"],
                                distill_weight=None if spec["distill"] is None else spec["distill"]["weight"],
                                teacher_scale=100.0, student_scale=spec.get("student_scale")) for r in range(world)]
        B = spec["img"].shape[0] // world
        for r, (theirs, mine) in enumerate(zip(per_rank, ors)):
            assert "error" not in theirs, theirs.get("error")
            for k in ("contrastive", "distill", "total", "d_s") + (("d_s_student",) if "d_s_student" in mine else ()):
                upd(k, rel(theirs[k], mine[k]))
            # one process: rows and columns are the same tensors; several: their all_gather with gradient
            # sums every rank's column terms into the owner's rows
            want = {k: mine[k] + sum(o[f"{k}_all"][r * B:(r + 1) * B] for o in ors) for k in ("d_img", "d_txt")}
            for k in want:
                upd(k, rel(theirs[k], want[k]))
        u_mine = np.concatenate([o["u_img"] for o in ors]), np.concatenate([o["u_txt"] for o in ors])
        upd("u", max(rel(per_rank[0]["u_img"], u_mine[0]), rel(per_rank[0]["u_txt"], u_mine[1])))
    return worst


@needs_drrho
def test_sogclr_parity_one_process():
    """SogCLRLoss multiply_tau=False, and distillation (multiply_tau on and off), no process group."""
    specs = {k: sogclr_spec(6, 30 + i, **v) for i, (k, v) in enumerate(SOGCLR_VARIANTS.items())}
    results, why = ah.run_jobs({k: ("sogclr", s) for k, s in specs.items()}, 1, process_group_=False)
    worst = check_sogclr(results, specs, 1)
    report("SogCLRLoss (no multiply_tau / distillation) vs family_oracle, one process", worst)
    assert max(worst.values()) < PARITY, worst


# ---------------------------------------------------------------------------------- fast_clip runs
FC_HYPER = dict(gamma=0.6, gamma_schedule="cosine", gamma_decay_epochs=3, rho=6.0, eps=1e-14, tau_init=0.07,
                lr_tau=0.02, beta1=0.9, beta2=0.98, eps_tau=1e-6)


def fastclip_spec(N=8, data_size=12, seed=40, epochs=(0, 0, 1, 1, 2, 2)):
    g = torch.Generator().manual_seed(seed)

    def emb():
        return torch.nn.functional.normalize(torch.randn(N, 5, generator=g, dtype=torch.float64), dim=1)
    steps = [dict(epoch=e, index=torch.randperm(data_size, generator=g)[:N], img=emb(), txt=emb()) for e in epochs]
    return dict(data_size=data_size, hyper=dict(FC_HYPER), steps=steps)


def check_fastclip(result_per_rank, spec, world, doubled=False):
    h = spec["hyper"]
    # their tables are float32 at construction: tau starts at float32(tau_init), then we cast them to float64
    tables = {k: fo.TauState.fresh(spec["data_size"], float(np.float32(h["tau_init"]))) for k in ("img", "txt")}
    names = dict(tau="tau", u="u", b="bound", m="m_grad_tau", v="v_grad_tau")
    worst = {}
    for n, step in enumerate(spec["steps"]):
        gamma = fo.sogclr_gamma(step["epoch"], h["gamma"], h["gamma_schedule"], h["gamma_decay_epochs"])
        idx = step["index"].numpy()
        N = len(idx)
        B = N // world
        st = {k: tables[k].take(idx) for k in tables}
        outs = []
        for r in range(world):
            sl = slice(r * B, (r + 1) * B)
            case = Case(img=step["img"][sl], txt=step["txt"][sl], img_all=step["img"], txt_all=step["txt"],
                        logit_scale=1 / h["tau_init"], u_img=torch.zeros(B), u_txt=torch.zeros(B), offset=r * B,
                        gamma=gamma, eps=h["eps"], rho=h["rho"])
            outs.append(fo.individual_oracle(case, st["img"], st["txt"], epoch=step["epoch"], lr_tau=h["lr_tau"],
                                             beta1=h["beta1"], beta2=h["beta2"], eps_tau=h["eps_tau"]))
        for k in tables:
            tables[k].put(idx, outs[0][f"state_{k}"])
        for r in range(world):
            theirs = result_per_rank[r]["steps"][n]
            assert theirs["gamma"] == pytest.approx(gamma, abs=1e-15)
            f = 2.0 if doubled else 1.0
            worst["loss"] = max(worst.get("loss", 0), rel(theirs["loss"], outs[r]["loss"]))
            for k in ("d_img", "d_txt"):
                worst["grad"] = max(worst.get("grad", 0), rel(theirs[k], f * outs[r][k]))
            for mine, theirs_name in names.items():
                for k, sfx in (("img", "im"), ("txt", "tt")):
                    err = rel(theirs[f"{theirs_name}_{sfx}"], getattr(tables[k], mine))
                    worst[mine] = max(worst.get(mine, 0), err)
    return worst


@needs_fastclip
def test_fastclip_individual_parity_group_of_one():
    spec = fastclip_spec()
    results, why = ah.run_jobs({"f": ("fastclip", spec)}, 1, process_group_=True)
    worst = check_fastclip(results["f"], spec, 1)
    report("FastCLIPLossIndividual (gloo group of 1, 6 steps, epochs 0-2) vs family_oracle", worst)
    assert max(worst.values()) < PARITY, worst


@needs_fastclip
def test_fastclip_individual_without_group_doubles_gradients():
    spec = fastclip_spec(seed=41, epochs=(0, 1, 2))
    results, why = ah.run_jobs({"f": ("fastclip", spec)}, 1, process_group_=False)
    worst = check_fastclip(results["f"], spec, 1, doubled=True)
    report("FastCLIPLossIndividual without a process group vs 2 x family_oracle gradients", worst)
    assert max(worst.values()) < PARITY, worst


# ------------------------------------------------------------------------------------ JEST runs
JEST_VARIANTS = {
    "topk2": dict(n_chunks=2, filter_ratio=0.5, topk=True),
    "topk3": dict(n_chunks=3, filter_ratio=0.5, topk=True),
    "sample2": dict(n_chunks=2, filter_ratio=0.5, topk=False),
    "sample3": dict(n_chunks=3, filter_ratio=0.5, topk=False),
}


def jest_spec(seed, **kw):
    return dict(jest_inputs(N=12, seed=seed), learner_scale=14.0, ref_scale=100.0 if seed % 2 else 30.0,
                seeds=[seed, seed + 100], **kw)


def check_jest(results, specs, world):
    worst = dict(diag=0.0, cond=0.0)
    for name, spec in specs.items():
        mine = fo.jest_oracle(spec["ref_img"], spec["ref_txt"], spec["img"], spec["txt"],
                              learner_scale=spec["learner_scale"], ref_scale=spec["ref_scale"], world_size=world,
                              n_chunks=spec["n_chunks"], filter_ratio=spec["filter_ratio"], topk=spec["topk"],
                              generators=[torch.Generator().manual_seed(s) for s in spec["seeds"][:world]])
        for theirs, m in zip(results[name], mine):
            assert "error" not in theirs, theirs.get("error")
            assert theirs["inds"].tolist() == m["inds"].tolist(), name
            worst["diag"] = max(worst["diag"], rel(theirs["diag"], m["diag"]))
            assert len(theirs["cond"]) == len(m["cond"]) == spec["n_chunks"] - 1
            for tc, mc in zip(theirs["cond"], m["cond"]):
                tc = tc.numpy()
                fin = np.isfinite(mc)
                assert np.all(tc[~fin] < -1e7)  # theirs: logits - 1e8 where already drawn
                worst["cond"] = max(worst["cond"], rel(tc[fin], mc[fin]))
    return worst


@needs_drrho
def test_jest_parity_group_of_one():
    specs = {k: jest_spec(50 + i, **v) for i, (k, v) in enumerate(JEST_VARIANTS.items())}
    results, why = ah.run_jobs({k: ("jest", s) for k, s in specs.items()}, 1, process_group_=True)
    worst = check_jest(results, specs, 1)
    report("jointly_sample_batch_softmax (group of 1) vs family_oracle", worst)
    assert max(worst.values()) < PARITY, worst


# --------------------------------------------------------------------- one spawn: two gloo ranks
@pytest.fixture(scope="module")
def two_ranks():
    """Every two-process run in one spawn: SogCLRLoss variants, FastCLIPLossIndividual, JEST."""
    specs = dict(sogclr={k: sogclr_spec(8, 60 + i, **v) for i, (k, v) in enumerate(SOGCLR_VARIANTS.items())},
                 fastclip=fastclip_spec(N=8, seed=42),
                 jest={k: jest_spec(70 + i, **v) for i, (k, v) in enumerate(JEST_VARIANTS.items())})
    jobs = {f"s_{k}": ("sogclr", s) for k, s in specs["sogclr"].items()}
    jobs["f"] = ("fastclip", specs["fastclip"])
    jobs.update({f"j_{k}": ("jest", s) for k, s in specs["jest"].items()})
    results, why = ah.run_jobs(jobs, 2)
    return specs, results


@pytest.mark.slow        # two spawned gloo processes (one spawn for the three)
@needs_both
def test_sogclr_parity_two_ranks(two_ranks):
    specs, results = two_ranks
    worst = check_sogclr({k: results[f"s_{k}"] for k in specs["sogclr"]}, specs["sogclr"], 2)
    report("SogCLRLoss (no multiply_tau / distillation) vs family_oracle, 2 gloo ranks", worst)
    assert max(worst.values()) < PARITY, worst


@pytest.mark.slow        # two spawned gloo processes (one spawn for the three)
@needs_both
def test_fastclip_individual_parity_two_ranks(two_ranks):
    specs, results = two_ranks
    worst = check_fastclip(results["f"], specs["fastclip"], 2)
    report("FastCLIPLossIndividual (2 gloo ranks, 6 steps, epochs 0-2) vs family_oracle", worst)
    assert max(worst.values()) < PARITY, worst


@pytest.mark.slow        # two spawned gloo processes (one spawn for the three)
@needs_both
def test_jest_parity_two_ranks(two_ranks):
    specs, results = two_ranks
    worst = check_jest({k: results[f"j_{k}"] for k in specs["jest"]}, specs["jest"], 2)
    report("jointly_sample_batch_softmax (2 gloo ranks) vs family_oracle", worst)
    assert max(worst.values()) < PARITY, worst


# ------------------------------------------------------------------------ their failure modes
@needs_drrho
def test_authors_failure_modes():
    """What fails in the released code (recorded in the project notes)."""
    base = jest_spec(80, n_chunks=2, filter_ratio=0.5, topk=True)
    # 1. jointly_sample_batch_softmax gathers is_sampled unconditionally: no group, no selection
    r, _ = ah.run_jobs({"j": ("jest", base)}, 1, process_group_=False)
    assert r["j"][0]["error"].startswith("ValueError: Default process group has not been initialized")
    r, _ = ah.run_jobs({"j": ("jest", dict(base, n_chunks=1))}, 1, process_group_=False)
    assert "error" not in r["j"][0]  # a single chunk never gathers
    # 2. a batch too small for its chunks: int(10 * 20 / 100 / 3) = 0 draws
    small = dict(jest_inputs(N=10, seed=81), learner_scale=10.0, ref_scale=100.0, seeds=[1], n_chunks=3,
                 filter_ratio=0.8, topk=True)
    # 3. identical learner and reference (all diagonal scores equal): the first draw has no weight
    same = dict(small, img=small["ref_img"], txt=small["ref_txt"], learner_scale=100.0, n_chunks=2)
    # 4. float32 sampling: exp(logits) overflows once a conditional score passes ~88.7
    f32 = {k: v.float() for k, v in jest_inputs(N=10, seed=82, dtype=torch.float32).items()}
    f32.update(ref_txt=f32["ref_img"], txt=-f32["img"])
    over = dict(f32, learner_scale=100.0, ref_scale=100.0, seeds=[1], n_chunks=2, filter_ratio=0.6, topk=False)
    r, _ = ah.run_jobs({"small": ("jest", small), "same": ("jest", same), "over": ("jest", over)}, 1)
    assert r["small"][0]["error"] == "RuntimeError: cannot sample n_sample <= 0 samples"
    assert r["same"][0]["error"] == "RuntimeError: invalid multinomial distribution (sum of probabilities <= 0)"
    assert r["over"][0]["error"].startswith("RuntimeError: probability tensor contains either `inf`, `nan`")
    # 5. train.py after selection: offset = rank * int(b * (1 - f)) while the selected batch is n_chunks * draws
    #    rows (b = 12, f = 0.5, 4 chunks: 4 rows, offset 6 on rank 1 of 2): SogCLRLoss's mask cannot be built
    spec = dict(sogclr_spec(4, 83), offset=6)
    r, _ = ah.run_jobs({"s": ("sogclr", spec)}, 1, process_group_=False)
    assert r["s"][0]["error"] == "RuntimeError: Class values must be smaller than num_classes."
    assert fo.jest_draws(12, 4, 0.5) * 4 == 4 and int(12 * (100 - 0.5 * 100) / 100) == 6


@needs_drrho
def test_drrho_copy_of_individual_loss():
    """DRRho-CLIP's FastCLIPLossIndividual: create_loss cannot build it, its train.py cannot call it, and
    its Adam step divides by v_hat + eps instead of sqrt(v_hat) + eps (u, b, m, v as fast_clip's)."""
    B = 6
    case = individual_case(B=B, seed=90, gamma=0.8, rho=8.0)
    sI, sT = random_states(B, 91)
    state = {f"{n}_{k}": getattr(st, n) for k, st in (("img", sI), ("txt", sT)) for n in ("tau", "u", "b", "m", "v")}
    hyper = dict(gamma=0.8, gamma_schedule="cosine", gamma_decay_epochs=10, rho=8.0, eps=1e-14, lr_tau=0.03,
                 beta1=0.9, beta2=0.98, eps_tau=1e-6)
    got, why = ah.drrho_individual_probe(state, (case.img, case.txt), epoch=1, hyper=hyper)
    assert got["construct_error"] == "TypeError: FastCLIPLoss.__init__() got an unexpected keyword argument " \
                                     "'dist_loss_weight'"
    assert got["forward_error"].startswith("TypeError: FastCLIPLossIndividual.forward() missing")
    gamma = fo.sogclr_gamma(1, 0.8, "cosine", 10)
    assert got["gamma"] == pytest.approx(gamma, abs=1e-15)
    mine = fo.individual_oracle(dataclasses.replace(case, gamma=gamma), sI, sT, epoch=1, lr_tau=0.03, beta1=0.9,
                                beta2=0.98, eps_tau=1e-6)
    assert rel(got["u_im"], mine["u_img"]) < PARITY and rel(got["bound_im"], mine["b_img"]) < PARITY
    assert rel(got["m_im"], mine["m_img"]) < PARITY and rel(got["v_im"], mine["v_img"]) < PARITY
    m_hat, v_hat = mine["m_img"] / (1 - 0.9 ** 2), mine["v_img"] / (1 - 0.98 ** 2)
    no_sqrt = np.clip(sI.tau - 0.03 * m_hat / (v_hat + 1e-6), 0.01, 1.0)
    assert rel(got["tau_im"], no_sqrt) < PARITY
    assert rel(got["tau_im"], mine["tau_img"]) > 1e-3  # fast_clip's (sqrt) step differs
    assert got["n_gathered"] == 10  # no old tau in its gather list: its driver would use the new tau for columns
