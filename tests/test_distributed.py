"""Distributed DRRho-CLIP loss with real processes (CPU, gloo): SPEC.md, "Distributed contract".

One spawn per world size (W = 2 and 4) runs every scenario in the workers, which save their results;
the tests compare them with the single-process loss on the concatenated batch: the ranks' mean loss,
every embedding gradient of that mean (what DDP's averaging yields), the averaged logit-scale
gradient, the new u (identical on every rank), both schemes, with and without a reference model,
the module's state, the bytes passed to the collectives, and errors raised on every rank. Every
temperature form (SPEC 2.1): per-direction scales, multiply_tau off, per-sample temperatures. The truth
is the tests' own float64 oracle (tests/family_oracle.py) of the concatenated batch, never the package.
"""
from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

import drrho_kernels as dk
import family_oracle as fo
from drrho_kernels.parallel import schemes as ddk
from drrho_kernels.backends import triton_interpreter
from helpers import rel_err
from processes import spawn
from spec_oracle import Case

B, D, DR, SCALE, GAMMA, RHO = 3, 6, 4, 7.0, 0.8, 8.0
# W = 4 is slow (its spawn runs every scenario in four processes): the developers' loop runs W = 2.
WORLD_SIZES = (2, pytest.param(4, marks=pytest.mark.slow))


SCALE_TXT = 4.5                 # the text anchors' scale of the per-direction cases
DISTILL = dict(distill_weight=0.6, distill_scale=30.0)
TAU_OPTIONS = dict(lr=0.03, beta1=0.9, beta2=0.98, eps=1e-6, tau_min=0.01, tau_max=1.0, grad_clamp=5.0, epoch=1)


# The workers run gloo on CPU tensors, so Triton takes part only in its interpreter (conftest turns it on
# without a GPU, and the spawned workers inherit TRITON_INTERPRET). On a CUDA machine (TRITON_INTERPRET=0)
# its cases are skipped with this reason; the compiled kernels are tested by tests/test_triton_gpu.py.
TRITON_SKIP = (None if triton_interpreter() else
               "Triton on CPU tensors needs TRITON_INTERPRET=1 (the gloo workers use CPU tensors); "
               "the compiled kernels are tested by tests/test_triton_gpu.py")


def value_cases():
    cases = []
    fused = [("torch", torch.float64), ("triton", torch.float32)]
    if "cpp" in dk.available_backends("cpu"):
        fused.append(("cpp", torch.float64))
    for backend, dtype in fused + [("reference", torch.float64)]:
        for scheme in ddk.SCHEMES:
            for ref in (True, False):
                cases.append(dict(backend=backend, dtype=dtype, scheme=scheme, ref=ref, form="multiply_tau"))
    for backend, dtype in fused:
        for scheme in ddk.SCHEMES:
            for form in ("per_direction", "no_multiply_tau", "individual", "distill"):
                cases.append(dict(backend=backend, dtype=dtype, scheme=scheme, ref=True, form=form))
    return cases


def case_name(c) -> str:
    form = "" if c["form"] == "multiply_tau" else f"-{c['form']}"
    return f"{c['backend']}-{c['scheme']}-{'ref' if c['ref'] else 'noref'}{form}"


def value_params():
    """The value cases as test parameters: the Triton ones skipped, with the reason, where they cannot run."""
    skip = pytest.mark.skipif(TRITON_SKIP is not None, reason=TRITON_SKIP or "")
    return [pytest.param(c, id=case_name(c), marks=[skip] if c["backend"] == "triton" else [])
            for c in value_cases()]


def tau_tables(world: int, batch: int = B):
    """Per-sample temperature state of the concatenated batch, per direction: fast_clip's tables."""
    g = np.random.default_rng(world)
    n = world * batch
    tau = g.uniform(0.02, 0.3, (2, n))
    tau[:, ::3] = 0.01                    # s = 100 next to s = 3..50
    return dict(tau=tau, u=g.uniform(0.0, 2.0, (2, n)), bound=g.uniform(0.0, 2.0, (2, n)),
                m=g.normal(0.0, 0.3, (2, n)), v=g.uniform(0.0, 0.3, (2, n)))


def global_data(world: int, dtype=torch.float64, seed: int = 0, batch: int = B):
    """The concatenated batch (same on every process: generated from the seed)."""
    g = torch.Generator().manual_seed(seed + 101 * world)
    n = world * batch

    def emb(rows, width):
        return torch.nn.functional.normalize(torch.randn(rows, width, generator=g, dtype=torch.float64), dim=1)

    data = dict(img=emb(n, D), txt=emb(n, D), ref_img=emb(n, DR), ref_txt=emb(n, DR),
                u_img=torch.randn(n, generator=g, dtype=torch.float64),
                u_txt=torch.randn(n, generator=g, dtype=torch.float64),
                index=torch.randperm(10 * n, generator=g)[:n])
    data["u_img"][::3] = 0.0            # some unset entries
    for key in ("img", "txt", "ref_img", "ref_txt"):
        data[key] = data[key].to(dtype)
    return data


# ------------------------------------------------------------------------------------------------
# Worker side.

def _shard(data, rank, batch=B):
    return {k: v[rank * batch:(rank + 1) * batch].clone() for k, v in data.items()}


def _run_value_case(rank, world, c):
    from drrho_kernels.core.inputs import TauOptions, TauState
    data = global_data(world, c["dtype"])
    mine = _shard(data, rank)
    img = mine["img"].requires_grad_()
    txt = mine["txt"].requires_grad_()
    acc = torch.float64 if c["dtype"] == torch.float64 else torch.float32
    s = torch.tensor(SCALE, dtype=acc, requires_grad=True)
    s_txt = torch.tensor(SCALE_TXT, dtype=acc, requires_grad=True)
    refs = dict(ref_img=mine["ref_img"], ref_txt=mine["ref_txt"]) if c["ref"] else {}
    form = dict(multiply_tau=c["form"] != "no_multiply_tau", **(DISTILL if c["form"] == "distill" else {}))
    scales, leaves = s, [img, txt, s]
    if c["form"] == "per_direction":
        scales, leaves = (s, s_txt), [img, txt, s, s_txt]
    u_img, u_txt = mine["u_img"], mine["u_txt"]
    if c["form"] == "individual":
        rows = slice(rank * B, (rank + 1) * B)
        tables = {k: torch.tensor(v[:, rows], dtype=acc) for k, v in tau_tables(world).items()}
        form = dict(tau_state=TauState(tables["tau"], tables["bound"], tables["m"], tables["v"]),
                    tau_options=TauOptions(**TAU_OPTIONS))
        scales, leaves, (u_img, u_txt) = None, [img, txt], tables["u"]
    with ddk.count_bytes() as log:
        out = ddk.distributed_drrho_clip_loss(
            img, txt, scales, u_img, u_txt, index=mine["index"], data_size=10 * world * B,
            gamma=GAMMA, rho=RHO, backend=c["backend"], scheme=c["scheme"], **refs, **form)
        grads = torch.autograd.grad(out.loss, leaves)
    result = dict(loss=out.loss.item(), d_img=grads[0], d_txt=grads[1], u_img=out.u_img_new, u_txt=out.u_txt_new,
                  u_img_all=out.u_img_all, u_txt_all=out.u_txt_all, index_all=out.index_all,
                  state_all={k: v.double() for k, v in out.state_all.items()}, bytes=list(log))
    result.update(zip(("d_s", "d_s_txt"), (g.item() for g in grads[2:])))
    return result


MODULE_STEPS = 2


def _module_batches(world):
    """Two steps of the global batch, different samples, epochs 0 and 1 (gamma 1 then < 1)."""
    return [global_data(world, seed=step) for step in range(MODULE_STEPS)]


def _run_module_case(rank, world, scheme):
    crit = dk.DRRhoCLIPLoss(data_size=10 * world * B, gamma=GAMMA, rho=RHO, gamma_decay_epochs=3,
                            backend="torch", process_group="world", distributed_scheme=scheme)
    losses = []
    shared_index = _module_batches(world)[0]["index"]
    for step, data in enumerate(_module_batches(world)):
        data["index"] = shared_index    # the same samples again: the second step uses the stored u
        mine = _shard(data, rank)
        crit.set_epoch(step)
        img = mine["img"].requires_grad_()
        loss = crit(img, mine["txt"], mine["index"], torch.tensor(SCALE, dtype=torch.float64),
                    ref_img=mine["ref_img"], ref_txt=mine["ref_txt"])
        loss.backward()
        losses.append(loss.item())
    return dict(losses=losses, u_img=crit.u_img.clone(), u_txt=crit.u_txt.clone())


ERROR_CASES = ("uneven_B", "uneven_d", "uneven_dr", "uneven_dtype", "ref_on_rank0_only", "nan_on_rank1",
               "bad_scheme_on_rank1", "module_duplicate_index", "module_index_out_of_range_rank0")


def _run_error_case(rank, world, name):
    data = global_data(world)
    mine = _shard(data, rank)
    img, txt, u_img, u_txt = mine["img"], mine["txt"], mine["u_img"], mine["u_txt"]
    ref_img, ref_txt = mine["ref_img"], mine["ref_txt"]
    scheme = "gather_u"
    if name == "uneven_B" and rank == 0:
        img, txt, u_img, u_txt = (torch.cat([x, x[:1]]) for x in (img, txt, u_img, u_txt))
        ref_img, ref_txt = (torch.cat([x, x[:1]]) for x in (ref_img, ref_txt))
    elif name == "uneven_d" and rank == world - 1:
        img, txt = img[:, :-1], txt[:, :-1]
    elif name == "uneven_dr" and rank == 0:
        ref_img, ref_txt = ref_img[:, :-1], ref_txt[:, :-1]
    elif name == "uneven_dtype" and rank == 1:
        img, txt = img.float(), txt.float()
    elif name == "ref_on_rank0_only" and rank != 0:
        ref_img = ref_txt = None
    elif name == "nan_on_rank1" and rank == 1:
        img = img.clone()
        img[0, 0] = float("nan")
    elif name == "bad_scheme_on_rank1" and rank == 1:
        scheme = "gather_everything"
    state_before = None
    try:
        if name.startswith("module_"):
            crit = dk.DRRhoCLIPLoss(data_size=10 * world * B, backend="torch", process_group="world")
            crit.u_img.fill_(0.5)
            state_before = crit.u_img.clone()
            index = mine["index"]
            if name == "module_duplicate_index" and rank == 1:
                index = _shard(data, 0)["index"]
            if name == "module_index_out_of_range_rank0" and rank == 0:
                index = index.clone()
                index[0] = 10 * world * B
            try:
                crit(img, txt, index, SCALE, ref_img=ref_img, ref_txt=ref_txt)
            finally:
                state_unchanged = bool(torch.equal(crit.u_img, state_before))
        else:
            ddk.distributed_drrho_clip_loss(img, txt, SCALE, u_img, u_txt, ref_img=ref_img, ref_txt=ref_txt,
                                            backend="torch", scheme=scheme)
    except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
        out = dict(type=type(exc).__name__, message=str(exc))
        if state_before is not None:
            out["state_unchanged"] = state_unchanged
        return out
    return dict(type=None, message="no error")


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = dict(values={}, modules={}, errors={})
    try:
        for c in value_cases():
            if c["backend"] != "triton" or TRITON_SKIP is None:
                results["values"][case_name(c)] = _run_value_case(rank, world, c)
        for scheme in ddk.SCHEMES:
            results["modules"][scheme] = _run_module_case(rank, world, scheme)
        for name in ERROR_CASES:
            results["errors"][name] = _run_error_case(rank, world, name)
        # The group still works after all those errors.
        results["after_errors"] = _run_value_case(rank, world, value_cases()[0])["loss"]
    finally:
        dist.destroy_process_group()
    return results


# ------------------------------------------------------------------------------------------------
# Test side.

@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def runs(request):
    world = request.param
    start = time.monotonic()
    results = spawn(_worker, world)
    print(f"\nW = {world}: workers took {time.monotonic() - start:.1f} s")
    return world, results


def _single(world, dtype, ref, form="multiply_tau"):
    """The oracle of the concatenated batch (the contract's truth: the tests' own float64 statement)."""
    data = global_data(world, dtype)
    case = Case(img=data["img"].double(), txt=data["txt"].double(), logit_scale=SCALE, u_img=data["u_img"],
                u_txt=data["u_txt"], ref_img=data["ref_img"].double() if ref else None,
                ref_txt=data["ref_txt"].double() if ref else None, gamma=GAMMA, rho=RHO)
    if form == "individual":
        n = world * B
        tables = tau_tables(world)
        states = [fo.TauState(*(tables[k][d].copy() for k in ("tau", "u", "bound", "m", "v"))) for d in range(2)]
        opts = {k: v for k, v in TAU_OPTIONS.items() if k not in ("lr", "eps")}
        want = fo.individual_oracle(case, *states, lr_tau=TAU_OPTIONS["lr"], eps_tau=TAU_OPTIONS["eps"], **opts)
        state_all = {k: np.stack([want[f"{name}_img"], want[f"{name}_txt"]]) for k, name in
                     (("u", "u"), ("tau", "tau"), ("bound", "b"), ("m", "m"), ("v", "v"))}
        return dict(loss=want["loss"], d_img=want["d_img"], d_txt=want["d_txt"], u_img=want["u_img"],
                    u_txt=want["u_txt"], index=data["index"], state_all=state_all, n=n)
    if form == "distill":
        want = fo.sogclr_oracle(case, multiply_tau=True, distill_weight=DISTILL["distill_weight"],
                                teacher_scale=DISTILL["distill_scale"])
        return dict(loss=want["total"], d_img=want["d_img"], d_txt=want["d_txt"], u_img=want["u_img"],
                    u_txt=want["u_txt"], index=data["index"], d_s=want["d_s"])
    want = fo.global_oracle(case, form=form, scale_txt=SCALE_TXT if form == "per_direction" else None)
    out = dict(loss=want["loss"], d_img=want["d_img"], d_txt=want["d_txt"], u_img=want["u_img"],
               u_txt=want["u_txt"], index=data["index"])
    if form == "per_direction":
        out.update(d_s=want["d_s_img"], d_s_txt=want["d_s_txt"])
    else:
        out["d_s"] = want["d_s"]
    return out


MAX_DEV: dict[str, float] = {}


@pytest.mark.parametrize("case", value_params())
def test_mean_loss_gradients_and_u_match_single_process(runs, case):
    world, results = runs
    per_rank = [r["values"][case_name(case)] for r in results]
    data_dtype = torch.float32 if case["dtype"] == torch.float32 else torch.float64
    want = _single(world, data_dtype, case["ref"], case["form"])
    tol = 1e-9 if case["dtype"] == torch.float64 else 1e-4
    # DDP averages gradients: the gradient of the mean loss is each rank's gradient / W.
    got = dict(
        loss=sum(r["loss"] for r in per_rank) / world,
        d_img=torch.cat([r["d_img"] for r in per_rank]) / world,
        d_txt=torch.cat([r["d_txt"] for r in per_rank]) / world,
        u_img=torch.cat([r["u_img"] for r in per_rank]),
        u_txt=torch.cat([r["u_txt"] for r in per_rank]),
    )
    for key in ("d_s", "d_s_txt"):
        if key in want:
            got[key] = sum(r[key] for r in per_rank) / world
    errs = {k: rel_err(got[k], want[k]) for k in got}
    if "state_all" in want:            # per-sample temperatures: every table of the global batch
        for k, v in want["state_all"].items():
            errs["state_" + k] = rel_err(per_rank[0]["state_all"][k], v)
            assert all(torch.equal(r["state_all"][k], per_rank[0]["state_all"][k]) for r in per_rank[1:]), k
    MAX_DEV[f"W{world}-{case_name(case)}"] = max(errs.values())
    print(f"W={world} {case_name(case)}: max rel dev {max(errs.values()):.2e} {errs}")
    for key, err in errs.items():
        assert err <= tol, f"{key}: relative deviation {err:.3e} > {tol:.0e} ({errs})"
    # Every rank holds the same new u of the whole global batch, bitwise, and the gathered indices.
    for r in per_rank[1:]:
        assert torch.equal(r["u_img_all"], per_rank[0]["u_img_all"])
        assert torch.equal(r["u_txt_all"], per_rank[0]["u_txt_all"])
        assert torch.equal(r["index_all"], per_rank[0]["index_all"])
    assert rel_err(per_rank[0]["u_img_all"], want["u_img"]) <= tol
    assert rel_err(per_rank[0]["u_txt_all"], want["u_txt"]) <= tol
    assert torch.equal(per_rank[0]["index_all"], want["index"])


@pytest.mark.parametrize("case", value_params())
def test_bytes_passed_to_collectives_match_the_formula(runs, case):
    world, results = runs
    scheme = case["scheme"] if case["backend"] != "reference" else "gather_grad"  # reference falls back
    want = ddk.bytes_per_step(B, world, D, DR if case["ref"] else None, scheme=scheme, dtype=case["dtype"],
                              state_dtype=torch.float32 if case["form"] == "individual" and case["dtype"] == torch.float32
                              else torch.float64,
                              index=True, temperature="individual" if case["form"] == "individual" else "global",
                              distill=case["form"] == "distill")
    for rank, r in enumerate(results):
        log = r["values"][case_name(case)]["bytes"]
        got_parts = {}
        for entry in log:
            part = {"features_grad": "column_grads"}.get(entry["what"], entry["what"])
            got_parts[part] = got_parts.get(part, 0) + entry["bytes"]
        fwd = sum(e["bytes"] for e in log if e["phase"] == "forward")
        bwd = sum(e["bytes"] for e in log if e["phase"] == "backward")
        assert (fwd, bwd) == (want["forward"], want["backward"]), (rank, log, want)
        for part in ("meta", "index", "features", "reference", "state", "column_grads"):
            assert got_parts.get(part, 0) == want[part], (part, got_parts, want)


def test_bytes_formula_by_hand():
    # W = 8, B = 256, d = dr = 512, bfloat16: k = 7.
    a = ddk.bytes_per_step(256, 8, 512, 512, scheme="gather_grad", dtype=torch.bfloat16)
    b = ddk.bytes_per_step(256, 8, 512, 512, scheme="gather_u", dtype=torch.bfloat16)
    feats = 7 * 256 * 2 * 512 * 2
    assert a["features"] == b["features"] == feats == a["reference"] == b["reference"]
    assert a["backward"] == feats and b["backward"] == 0
    assert a["state"] == 7 * 256 * 2 * 4 and b["state"] == 7 * 256 * 3 * 4
    assert a["forward"] == 7 * ddk.META_LEN * 8 + 7 * 256 * 8 + 2 * feats + a["state"]
    c = ddk.bytes_per_step(256, 8, 512, 512, scheme="gather_u", dtype=torch.bfloat16, temperature="individual")
    assert c["state"] == 7 * 256 * (2 * 5 + 1 + 4) * 4      # five arrays per direction, margins, old scales, norms
    assert b["total"] < a["total"]
    assert ddk.bytes_per_step(256, 1, 512, 512)["total"] == 0      # one process sends nothing


@pytest.mark.parametrize("scheme", ddk.SCHEMES)
def test_module_state_identical_on_every_rank_and_equal_to_single_process(runs, scheme):
    world, results = runs
    per_rank = [r["modules"][scheme] for r in results]
    from spec_oracle import oracle
    n_data = 10 * world * B
    u_img, u_txt = torch.zeros(n_data, dtype=torch.float64), torch.zeros(n_data, dtype=torch.float64)
    shared_index = _module_batches(world)[0]["index"]
    for step, data in enumerate(_module_batches(world)):
        gamma = fo.sogclr_gamma(step, GAMMA, "cosine", 3)
        case = Case(img=data["img"], txt=data["txt"], logit_scale=SCALE, u_img=u_img[shared_index].float(),
                    u_txt=u_txt[shared_index].float(), ref_img=data["ref_img"], ref_txt=data["ref_txt"], gamma=gamma,
                    rho=RHO)
        want = oracle(case)
        mean = sum(r["losses"][step] for r in per_rank) / world
        assert abs(mean - want["loss"]) <= 1e-9 * abs(want["loss"]), (step, mean, want["loss"])
        u_img[shared_index] = torch.from_numpy(want["u_img"]).float().double()     # the module's state is float32
        u_txt[shared_index] = torch.from_numpy(want["u_txt"]).float().double()
    for r in per_rank:
        assert torch.equal(r["u_img"], per_rank[0]["u_img"]) and torch.equal(r["u_txt"], per_rank[0]["u_txt"])
    assert (per_rank[0]["u_img"][shared_index] != 0).all()
    torch.testing.assert_close(per_rank[0]["u_img"].double(), u_img, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_rank[0]["u_txt"].double(), u_txt, rtol=1e-6, atol=1e-7)


EXPECTED_ERRORS = {
    "uneven_B": ("ValueError", "batch size"),
    "uneven_d": ("ValueError", "embedding width"),
    "uneven_dr": ("ValueError", "reference width"),
    "uneven_dtype": ("ValueError", "dtype"),
    "ref_on_rank0_only": ("ValueError", "reference model on every rank"),
    "bad_scheme_on_rank1": ("ValueError", "distributed_scheme"),
    "nan_on_rank1": ("ValueError", None),
    "module_duplicate_index": ("ValueError", "distinct"),
    "module_index_out_of_range_rank0": (None, None),
}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_uneven_or_bad_inputs_raise_on_every_rank(runs, name):
    world, results = runs
    errors = [r["errors"][name] for r in results]
    assert all(e["type"] is not None for e in errors), errors      # every rank raised: no hang, no success
    etype, fragment = EXPECTED_ERRORS[name]
    if name == "nan_on_rank1":
        assert "finite" in errors[1]["message"]
        others = [e for rank, e in enumerate(errors) if rank != 1]
        assert all("rank(s) [1]" in e["message"] for e in others), others
    elif name == "bad_scheme_on_rank1":
        assert errors[1]["type"] == "ValueError" and "distributed_scheme" in errors[1]["message"]
        assert all("rank(s) [1]" in e["message"] for r, e in enumerate(errors) if r != 1)
    elif name == "module_index_out_of_range_rank0":
        assert errors[0]["type"] == "IndexError" and "index" in errors[0]["message"]
        assert all("rank(s) [0]" in e["message"] for e in errors[1:])
    else:
        for e in errors:
            assert e["type"] == etype and fragment in e["message"], errors
    for e in errors:
        if "state_unchanged" in e:
            assert e["state_unchanged"], f"{name}: a step that raised changed the state"


def test_group_still_works_after_the_errors(runs):
    world, results = runs
    want = _single(world, torch.float64, ref=True)["loss"]
    mean = sum(r["after_errors"] for r in results) / world
    assert abs(mean - want) <= 1e-9 * abs(want)


def test_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ddk.distributed_drrho_clip_loss(torch.randn(2, 3), torch.randn(2, 3), 5.0, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="distributed_scheme"):
        dk.DRRhoCLIPLoss(10, distributed_scheme="ring")
    with pytest.raises(TypeError, match="process_group"):
        dk.DRRhoCLIPLoss(10, process_group="everyone")
    with pytest.raises(RuntimeError, match="init_process_group"):
        dk.DRRhoCLIPLoss(10, process_group="world")(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), 5.0)
