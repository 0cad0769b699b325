"""Parity with the authors' released code, run from local snapshots (never copied into this repository).

- DRRho-CLIP's ``SogCLRLoss`` (``src/fast_clip/loss.py``; snapshot named by ``DRRHO_AUTHORS_REPO``): six
  steps over three epochs of the cosine gamma schedule, with and without a reference model, with and
  without ``multiply_tau``, on every backend (float64 where the backend has it, Triton in float32).
- fast_clip's ``FastCLIPLossIndividual`` (``FASTCLIP_REPO``), driven as fast_clip's train.py drives it
  (``local()``, the gather of the state, ``set_params``, ``forward()``): per-sample temperatures over
  steps across epochs 0, 1 and 2, in a gloo process group of one process and of two, against this
  package's one-process functional and its distributed call with both schemes.

A snapshot is a checkout or a bare git directory (its HEAD is read); without one the tests skip with the
reason. The worst differences are written to ``authors_parity.json`` in the ``results_dir`` fixture's
directory (``$DRRHO_KERNELS_RESULTS``, else a temporary one; docs/TESTING.md) when the tests run: copy it to
``benchmarks/results/authors_parity.json`` (cited by docs/RESULTS.md) to update the committed figures.
"""
from __future__ import annotations

import json
import platform

import pytest
import torch

import drrho_kernels as dk
import authors_harness as ah
from helpers import rel_err

HAVE_DRRHO, WHY_DRRHO = ah.available(ah.DRRHO_ENV)
HAVE_FASTCLIP, WHY_FASTCLIP = ah.available(ah.FASTCLIP_ENV)
RESULTS_NAME = "authors_parity.json"
FIGURES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _write_figures(results_dir):
    yield
    if FIGURES:
        record = dict(torch=torch.__version__, python=platform.python_version(),
                      drrho_clip_commit=_commit(ah.DRRHO_ENV), fast_clip_commit=_commit(ah.FASTCLIP_ENV),
                      worst_relative_differences=dict(sorted(FIGURES.items())))
        (results_dir / RESULTS_NAME).write_text(json.dumps(record, indent=1) + "\n")


def _commit(env: str) -> str | None:
    """The snapshot's HEAD commit (a bare git directory or a checkout), if it has one."""
    import os
    import subprocess
    root = os.environ.get(env)
    if not root:
        return None
    for args in (["git", f"--git-dir={root}", "rev-parse", "HEAD"], ["git", "-C", root, "rev-parse", "HEAD"]):
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


# ------------------------------------------------------------------------------------ SogCLRLoss

def run_sogclr(backend, with_ref, multiply_tau, state_dtype=torch.float64, steps=6):
    """Both implementations fed the same batches; the worst relative differences of loss, gradients
    (img, txt, logit_scale) and u (absolute)."""
    M, _ = ah.drrho_loss()
    data_size, B, d, dr = 40, 12, 16, 8
    feat_dtype = torch.float32 if backend == "triton" else torch.float64
    theirs = M.SogCLRLoss(data_size, gamma=0.7, gamma_schedule="cosine", gamma_decay_epochs=3, rho=11.0,
                          device=torch.device("cpu"), multiply_tau=multiply_tau)
    theirs.u_im, theirs.u_tt = theirs.u_im.to(state_dtype), theirs.u_tt.to(state_dtype)
    ours = dk.DRRhoCLIPLoss(data_size, gamma=0.7, gamma_schedule="cosine", gamma_decay_epochs=3)  # its schedule
    u_img, u_txt = torch.zeros(data_size, dtype=state_dtype), torch.zeros(data_size, dtype=state_dtype)
    worst = dict(loss=0.0, grad=0.0, scale=0.0, u=0.0)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        epoch = step // 2
        theirs.adjust_gamma(epoch)
        ours.set_epoch(epoch)
        assert ours.gamma == pytest.approx(theirs.gamma, abs=1e-15)
        index = torch.randperm(data_size, generator=g)[:B]
        feats = [torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
        refs = [torch.nn.functional.normalize(torch.randn(B, dr, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
        results = []
        for which in ("theirs", "ours"):
            dtype = torch.float64 if which == "theirs" else feat_dtype
            img, txt = (f.to(dtype).clone().requires_grad_() for f in feats)
            s = torch.tensor(8.0 + step, dtype=dtype, requires_grad=True)
            if which == "theirs":
                loss, _, (new_img, new_txt) = theirs(features=(img, txt), indices=(index, index), logit_scale=s,
                                                     offset=0, ref_features=tuple(refs) if with_ref else None)
                theirs.set_params(index, index, new_img.detach().to(state_dtype), new_txt.detach().to(state_dtype))
                u = (theirs.u_im[index, 0], theirs.u_tt[index, 0])
            else:
                ref = dict(ref_img=refs[0].to(dtype), ref_txt=refs[1].to(dtype)) if with_ref else {}
                state = (u_img[index].to(torch.float32), u_txt[index].to(torch.float32)) if backend == "triton" \
                    else (u_img[index], u_txt[index])
                loss, new_img, new_txt = dk.drrho_clip_loss(img, txt, s, *state, gamma=ours.gamma, rho=11.0,
                                                            backend=backend, multiply_tau=multiply_tau, **ref)
                u_img[index], u_txt[index] = new_img.to(state_dtype), new_txt.to(state_dtype)
                u = (u_img[index], u_txt[index])
            loss.backward()
            results.append((loss.detach(), img.grad, txt.grad, s.grad, u))
        (la, gia, gta, gsa, ua), (lb, gib, gtb, gsb, ub) = results
        worst["loss"] = max(worst["loss"], abs(la - lb.double()).item() / abs(la).item())
        worst["grad"] = max(worst["grad"], rel_err(gib, gia), rel_err(gtb, gta))
        worst["scale"] = max(worst["scale"], abs(gsa - gsb.double()).item() / abs(gsa).item())
        worst["u"] = max(worst["u"], (ua[0] - ub[0]).abs().max().item(), (ua[1] - ub[1]).abs().max().item())
    label = f"sogclr[{backend}, ref={with_ref}, multiply_tau={multiply_tau}, {str(state_dtype)[6:]} state]"
    FIGURES[label] = {k: float(f"{v:.2e}") for k, v in worst.items()}
    return worst


SOGCLR_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b == "cpp" and "cpp" not in dk.available_backends(),
                                                             reason="C++ extension not built")) for b in
                   ("torch", "reference", "cpp")]


@pytest.mark.skipif(not HAVE_DRRHO, reason=WHY_DRRHO)
@pytest.mark.parametrize("multiply_tau", [True, False], ids=["multiply_tau", "no_multiply_tau"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "noref"])
@pytest.mark.parametrize("backend", SOGCLR_BACKENDS)
def test_sogclr_float64_state(backend, with_ref, multiply_tau):
    worst = run_sogclr(backend, with_ref, multiply_tau)
    assert worst["loss"] < 1e-12 and worst["grad"] < 1e-11 and worst["scale"] < 1e-11 and worst["u"] < 1e-12, worst


@pytest.mark.skipif(not HAVE_DRRHO, reason=WHY_DRRHO)
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "noref"])
def test_sogclr_float32_state(with_ref):
    # Their update adds log(1 - gamma) to the float32 u before promoting (``u_im + math.log(1 - gamma)``),
    # which rounds it to float32; ours blends in float64. The gap is that rounding, nothing more.
    worst = run_sogclr("torch", with_ref, True, torch.float32)
    assert worst["loss"] < 1e-8 and worst["grad"] < 1e-7 and worst["scale"] < 1e-6 and worst["u"] < 1e-6, worst


@pytest.mark.skipif(not HAVE_DRRHO, reason=WHY_DRRHO)
@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="Triton cannot run on CPU tensors here")
@pytest.mark.parametrize("multiply_tau", [True, False], ids=["multiply_tau", "no_multiply_tau"])
def test_sogclr_triton_float32(multiply_tau):
    """Triton (its interpreter here) has float32 kernels: SPEC's float32 tolerance against their float64."""
    worst = run_sogclr("triton", True, multiply_tau)
    assert worst["loss"] < 1e-5 and worst["grad"] < 1e-4 and worst["u"] < 1e-4, worst


# ----------------------------------------------------------------- SogCLRLoss with distillation

def sogclr_spec(multiply_tau, N=8, d=6, dr=5, seed=3, **package):
    g = torch.Generator().manual_seed(seed)

    def emb(width):
        return torch.nn.functional.normalize(torch.randn(N, width, generator=g, dtype=torch.float64), dim=1)
    u = torch.randn(2, N, generator=g, dtype=torch.float64)
    u[:, ::3] = 0.0
    return dict(img=emb(d), txt=emb(d), ref_img=emb(dr), ref_txt=emb(dr), u_img=u[0], u_txt=u[1], scale=9.0,
                gamma=0.7, rho=11.0, eps=1e-4, multiply_tau=multiply_tau,
                distill=dict(weight=0.8, teacher_scale=100.0), **package)


def compare_sogclr(theirs, ours, label):
    worst = {}
    for t, o in zip(theirs, ours):
        worst["loss"] = max(worst.get("loss", 0.0), abs(o["total"] - t["total"]) / abs(t["total"]))
        worst["scale"] = max(worst.get("scale", 0.0), abs(o["d_s"] - t["d_s"]) / abs(t["d_s"]))
        for k in ("d_img", "d_txt"):
            worst["grad"] = max(worst.get("grad", 0.0), rel_err(o[k], t[k]))
        for k in ("u_img", "u_txt"):
            worst["u"] = max(worst.get("u", 0.0), float((o[k] - t[k]).abs().max()))
    FIGURES[label] = {k: float(f"{v:.2e}") for k, v in worst.items()}
    return worst


DISTILL_BACKENDS = ["torch"] + (["cpp"] if "cpp" in dk.available_backends() else [])


@pytest.mark.skipif(not HAVE_DRRHO, reason=WHY_DRRHO)
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["W1", "W2"])
@pytest.mark.parametrize("multiply_tau", [True, False], ids=["multiply_tau", "no_multiply_tau"])
def test_sogclr_distillation(multiply_tau, world):
    """SogCLRLoss with dist_features = the reference features, the student scale = the logit scale and the
    teacher's 100 (train.py's ref_features_usage "ref,distill"), against this package in the same ranks."""
    spec = sogclr_spec(multiply_tau)
    jobs = {"theirs": ("sogclr", spec)}
    for backend in DISTILL_BACKENDS:
        for scheme in ("gather_u", "gather_grad"):
            jobs[f"{backend}-{scheme}"] = ("package_sogclr", dict(spec, backend=backend, scheme=scheme))
    results, why = ah.run_jobs(jobs, world, spawn=True)
    if results is None:
        pytest.skip(why)
    for name in jobs:
        if name == "theirs":
            continue
        worst = compare_sogclr(results["theirs"], results[name],
                               f"sogclr_distill[W={world}, {name}, multiply_tau={multiply_tau}]")
        assert all(v < 1e-9 for v in worst.values()), (name, worst)


# -------------------------------------------------------------------------- FastCLIPLossIndividual

HYPER = dict(gamma=0.6, gamma_schedule="cosine", gamma_decay_epochs=3, rho=6.0, eps=1e-14, tau_init=0.07,
             lr_tau=0.02, beta1=0.9, beta2=0.98, eps_tau=1e-6)


def individual_spec(N=8, data_size=12, seed=40, epochs=(0, 0, 1, 1, 2, 2), **package):
    g = torch.Generator().manual_seed(seed)

    def emb():
        return torch.nn.functional.normalize(torch.randn(N, 5, generator=g, dtype=torch.float64), dim=1)
    steps = [dict(epoch=e, index=torch.randperm(data_size, generator=g)[:N], img=emb(), txt=emb()) for e in epochs]
    return dict(data_size=data_size, hyper=dict(HYPER), steps=steps, **package)


TABLES = {"tau": ("tau_im", "tau_tt"), "u": ("u_im", "u_tt"), "bound": ("bound_im", "bound_tt"),
          "m": ("m_grad_tau_im", "m_grad_tau_tt"), "v": ("v_grad_tau_im", "v_grad_tau_tt")}


def compare_individual(theirs, ours, label):
    """Per step: the mean loss over ranks, every rank's row gradients, every table of the dataset."""
    worst = {}
    world = len(theirs)
    for n in range(len(theirs[0]["steps"])):
        t_steps, o_steps = [r["steps"][n] for r in theirs], [r["steps"][n] for r in ours]
        loss_t = sum(s["loss"] for s in t_steps) / world
        loss_o = sum(s["loss"] for s in o_steps) / world
        worst["loss"] = max(worst.get("loss", 0.0), abs(loss_o - loss_t) / abs(loss_t))
        for t, o in zip(t_steps, o_steps):
            for k in ("d_img", "d_txt"):
                worst["grad"] = max(worst.get("grad", 0.0), rel_err(o[k], t[k]))
        for name, (im, tt) in TABLES.items():
            for r in range(world):
                got = o_steps[r][name]
                worst[name] = max(worst.get(name, 0.0), rel_err(got[0], t_steps[r][im]), rel_err(got[1], t_steps[r][tt]))
    FIGURES[label] = {k: float(f"{v:.2e}") for k, v in worst.items()}
    return worst


@pytest.fixture(scope="module")
def group_of_one():
    spec = individual_spec()
    jobs = {"theirs": ("fastclip", spec), "functional": ("package_individual", dict(spec, distributed=False)),
            "gather_u": ("package_individual", dict(spec, scheme="gather_u")),
            "gather_grad": ("package_individual", dict(spec, scheme="gather_grad"))}
    if "cpp" in dk.available_backends():
        jobs["cpp"] = ("package_individual", dict(spec, distributed=False, backend="cpp"))
    results, why = ah.run_jobs(jobs, 1, process_group_=True)
    if results is None:
        pytest.skip(why)
    return results


@pytest.mark.skipif(not HAVE_FASTCLIP, reason=WHY_FASTCLIP)
@pytest.mark.parametrize("ours", ["functional", "gather_u", "gather_grad", "cpp"])
def test_fastclip_individual_group_of_one(group_of_one, ours):
    if ours not in group_of_one:
        pytest.skip("C++ extension not built")
    worst = compare_individual(group_of_one["theirs"], group_of_one[ours], f"fastclip_individual[W=1, {ours}]")
    assert all(v < 1e-9 for v in worst.values()), worst


@pytest.fixture(scope="module")
def two_ranks():
    spec = individual_spec(seed=42)
    jobs = {"theirs": ("fastclip", spec), "gather_u": ("package_individual", dict(spec, scheme="gather_u")),
            "gather_grad": ("package_individual", dict(spec, scheme="gather_grad"))}
    results, why = ah.run_jobs(jobs, 2)
    if results is None:
        pytest.skip(why)
    return results


@pytest.mark.slow        # two spawned gloo processes
@pytest.mark.skipif(not HAVE_FASTCLIP, reason=WHY_FASTCLIP)
@pytest.mark.parametrize("ours", ["gather_u", "gather_grad"])
def test_fastclip_individual_two_ranks(two_ranks, ours):
    """Two gloo processes: the mean loss, each rank's row gradients and the tables on each rank. (Each
    rank's own loss value differs from theirs by design: docs/TEMPERATURES.md.)"""
    worst = compare_individual(two_ranks["theirs"], two_ranks[ours], f"fastclip_individual[W=2, {ours}]")
    assert all(v < 1e-9 for v in worst.values()), worst


# -------------------------------------------------------------------------- jointly_sample_batch_softmax

JEST_VARIANTS = {"topk2": dict(n_chunks=2, filter_ratio=0.5, topk=True),
                 "topk3": dict(n_chunks=3, filter_ratio=0.75, topk=True),
                 "sample2": dict(n_chunks=2, filter_ratio=0.5, topk=False),
                 "sample3": dict(n_chunks=3, filter_ratio=0.5, topk=False)}


def jest_spec(seed, N=24, d=6, **kw):
    g = torch.Generator().manual_seed(seed)

    def emb():
        return torch.nn.functional.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
    return dict(ref_img=emb(), ref_txt=emb(), img=emb(), txt=emb(), learner_scale=14.0, ref_scale=100.0,
                seeds=[seed, seed + 1], **kw)


def compare_jest(theirs, ours, label):
    worst = dict(cond=0.0)
    for t, o in zip(theirs, ours):
        assert "error" not in t, t.get("error")
        assert torch.equal(t["inds"], o["inds"]), (label, t["inds"], o["inds"])
        worst["cond"] = max(worst["cond"], rel_err(o["diag"], t["diag"]))
        for ct, co in zip(t["cond"], o["cond"]):
            keep = torch.isfinite(co)                       # ours -inf where drawn, theirs -1e8
            assert bool((ct[~keep] < -1e7).all())
            worst["cond"] = max(worst["cond"], rel_err(co[keep], ct[keep]))
    FIGURES[label] = {k: float(f"{v:.2e}") for k, v in worst.items()}
    return worst


@pytest.mark.skipif(not HAVE_DRRHO, reason=WHY_DRRHO)
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["W1", "W2"])
def test_jest_selection(world):
    """The same indices (top-k and sampled with the same generator state) and the same conditional scores,
    in a process group of one and of two (their function needs one), on every fused backend."""
    specs = {name: jest_spec(60 + i, **v) for i, (name, v) in enumerate(JEST_VARIANTS.items())}
    jobs = {f"theirs-{n}": ("jest", s) for n, s in specs.items()}
    backends = ["torch"] + (["cpp"] if "cpp" in dk.available_backends() else [])
    for n, s in specs.items():
        for b in backends:
            jobs[f"{b}-{n}"] = ("package_jest", dict(s, backend=b))
    results, why = ah.run_jobs(jobs, world, spawn=True)
    if results is None:
        pytest.skip(why)
    for n in specs:
        for b in backends:
            worst = compare_jest(results[f"theirs-{n}"], results[f"{b}-{n}"], f"jest[W={world}, {b}, {n}]")
            assert worst["cond"] < 1e-6, (n, b, worst)


@pytest.mark.skipif(not HAVE_DRRHO, reason=WHY_DRRHO)
def test_jest_where_theirs_fails_ours_selects_the_expected_count():
    """Chunks that do not divide: theirs draws fewer pairs than its loop expects; ours draws exactly
    floor(b (1 - f)) (or says why not)."""
    spec = jest_spec(90, N=12, n_chunks=4, filter_ratio=0.5, topk=True)
    results, _ = ah.run_jobs({"theirs": ("jest", spec)}, 1, spawn=True)
    assert len(results["theirs"][0]["inds"]) == 4                 # 12 * 0.5 / 4 -> 1 per chunk: 4, not 6
    idx = dk.jest_select(spec["img"], spec["txt"], spec["ref_img"], spec["ref_txt"], 14.0, filter_ratio=0.5,
                         n_chunks=4, topk=True, generator=torch.Generator().manual_seed(0))
    assert len(idx) == 6 and len(set(idx.tolist())) == 6
