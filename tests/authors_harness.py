"""Drive the authors' released code, read from local snapshots, exactly as their train.py drives it.

Nothing of theirs is copied into this repository: the sources are read at test time by
:mod:`benchmarks.authors` from the snapshots named by ``DRRHO_AUTHORS_REPO`` (Optimization-AI/DRRho-CLIP)
and ``FASTCLIP_REPO`` (Optimization-AI/fast_clip), each a checkout or a bare git directory whose ``HEAD``
is read. There is no fallback location: with a variable unset every entry point returns ``(None, reason)``.

Runs are described as *jobs* ``{name: (kind, spec)}`` (kinds ``"sogclr"``, ``"fastclip"``, ``"jest"``; the
spec holds the *global* batch and each rank takes its rows) and executed by :func:`run_jobs` in one of three
contexts: one process without a process group, one process in a gloo group of size 1 (initialised
in-process with a FileStore and destroyed afterwards), or ``world_size`` gloo processes started by the tests'
one spawn helper (:func:`processes.spawn`: the workers return their results, destroy their group and leave
with ``os._exit(0)``, so that the abort of a process that imported ``torch.distributed.nn`` in its static
destructors at exit cannot fail a finished run). Results come back per rank as dicts of tensors / floats /
strings.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings

import torch
import torch.distributed as dist

from benchmarks.authors import (DIST_PATH, DRRHO_ENV, FASTCLIP_ENV, LOSS_PATH, exec_module, jest_namespace,  # noqa: F401
                                read_source)

FASTCLIP_TABLES = ("u_im", "u_tt", "tau_im", "tau_tt", "bound_im", "bound_tt", "m_grad_tau_im", "m_grad_tau_tt",
                   "v_grad_tau_im", "v_grad_tau_tt")


# ------------------------------------------------------------------------------------------ loading
@functools.lru_cache(maxsize=None)
def drrho_loss():
    """The DRRho-CLIP ``loss.py`` module (``SogCLRLoss``, and its copy of ``FastCLIPLossIndividual``)."""
    return exec_module(DRRHO_ENV, LOSS_PATH, "drrho_authors_loss")


@functools.lru_cache(maxsize=None)
def fastclip_loss():
    """The fast_clip ``loss.py`` module (``FastCLIPLossIndividual``)."""
    return exec_module(FASTCLIP_ENV, LOSS_PATH, "fastclip_authors_loss")


@functools.lru_cache(maxsize=None)
def distributed_utils(env: str):
    """``src/training/distributed.py`` of the snapshot named by ``env`` (``all_gather_tuple_tensor``)."""
    return exec_module(env, DIST_PATH, f"authors_distributed_{env.lower()}")


def available(*envs: str) -> tuple[bool, str]:
    """Whether every snapshot named by ``envs`` is readable, and why not."""
    for env in envs:
        _, where = read_source(env, LOSS_PATH)
        if _ is None:
            return False, where
    return True, ""


# ----------------------------------------------------------------------------------- process groups
@contextlib.contextmanager
def process_group(rank: int = 0, world_size: int = 1, init_method: str | None = None):
    """A gloo process group, destroyed on exit (refuses to nest in an existing one); ``init_method`` default:
    a FileStore in a temporary directory (removed on exit)."""
    if dist.is_initialized():
        raise RuntimeError("a default process group is already initialised in this process")
    with tempfile.TemporaryDirectory(prefix="pg_") as tmp:
        dist.init_process_group("gloo", init_method=init_method or f"file://{os.path.join(tmp, 'store')}", rank=rank,
                                world_size=world_size)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _rank_rows(n: int, rank: int, world: int) -> slice:
    if n % world:
        raise ValueError(f"global batch {n} does not split over {world} processes")
    b = n // world
    return slice(rank * b, (rank + 1) * b)


# -------------------------------------------------------------------------------------------- jobs
def _job_sogclr(spec: dict, rank: int, world: int) -> dict:
    """One step of DRRho-CLIP's ``SogCLRLoss`` as train.py calls it (``ref_features_usage`` ref / distill).

    spec: ``img``, ``txt`` [N, d]; optional ``ref_img``, ``ref_txt`` [N, dr]; ``u_img``, ``u_txt`` [N] (the
    tables' entries of the N samples, log domain); ``scale``; optional ``student_scale`` (a separate tensor
    for the distillation student, as train.py does when ``distill_ref_logit_scale > 0``); ``gamma``,
    ``rho``, ``eps``, ``multiply_tau``, ``loss_weight``; ``shift`` (pass ``ref_features``; default: whenever
    references are given, as train.py does); ``distill``: None or ``dict(weight, teacher_scale)``
    (``dist_features`` = the reference features, as train.py does); ``offset`` (default ``rank * B``: to
    reproduce train.py's offset after example selection; one process only, since a rank that raises would
    leave the others waiting in a collective). An exception is returned as ``error``.
    """
    M, where = drrho_loss()
    D, _ = distributed_utils(DRRHO_ENV)
    N = spec["img"].shape[0]
    sl = _rank_rows(N, rank, world)
    B = sl.stop - sl.start
    distill = spec.get("distill")
    crit = M.SogCLRLoss(N, gamma=spec["gamma"], gamma_schedule="none", rho=spec["rho"], eps=spec["eps"],
                        multiply_tau=spec["multiply_tau"], device=torch.device("cpu"),
                        loss_weight=spec.get("loss_weight", 1.0),
                        dist_loss_weight=1.0 if distill is None else distill["weight"])
    crit.gamma = spec["gamma"]  # what adjust_gamma(epoch) would have set
    crit.u_im = spec["u_img"].detach().double().reshape(-1, 1).clone()
    crit.u_tt = spec["u_txt"].detach().double().reshape(-1, 1).clone()
    idx = torch.arange(N)[sl]
    img = spec["img"][sl].detach().clone().requires_grad_()
    txt = spec["txt"][sl].detach().clone().requires_grad_()
    s = torch.tensor(float(spec["scale"]), dtype=torch.float64, requires_grad=True)
    s_student = s if spec.get("student_scale") is None else torch.tensor(
        float(spec["student_scale"]), dtype=torch.float64, requires_grad=True)
    ref = None
    if spec.get("ref_img") is not None:
        ref = [spec["ref_img"][sl].detach().clone(), spec["ref_txt"][sl].detach().clone()]
    shift = spec.get("shift", ref is not None)
    model_out = {"features": [img, txt], "indices": [idx, idx], "logit_scale": s,
                 "offset": spec.get("offset", rank * B),
                 "ref_features": ref if shift else None}
    if distill is not None:
        model_out.update({"dist_features": ref, "dist_loss_weight": distill["weight"],
                          "dist_student_logit_scale": s_student,
                          "dist_teacher_logit_scale": distill.get("teacher_scale", 100.0)})
    try:
        losses = crit(**model_out, output_dict=True)
    except Exception as exc:
        if world > 1:
            raise
        return dict(error=f"{type(exc).__name__}: {exc}", where=where)
    gather_list = losses.pop("gather_list")
    remote_gather_list = D.all_gather_tuple_tensor(gather_list, None)
    remote_indices = D.all_gather_tuple_tensor([idx.unsqueeze(-1), idx.unsqueeze(-1)], None)
    remote_indices = [r.squeeze(-1).to(device="cpu", dtype=torch.int64) for r in remote_indices]
    crit.set_params(*remote_indices, *remote_gather_list)
    total = sum(losses.values())
    total.backward()
    out = dict(contrastive=losses["contrastive_loss"].item(),
               distill=losses["distill_loss"].item() if "distill_loss" in losses else 0.0,
               total=total.item(), d_img=img.grad.clone(), d_txt=txt.grad.clone(), d_s=s.grad.item(),
               u_img=crit.u_im[:, 0].clone(), u_txt=crit.u_tt[:, 0].clone(), where=where)
    if s_student is not s:
        out["d_s_student"] = s_student.grad.item()
    return out


def _job_fastclip(spec: dict, rank: int, world: int) -> dict:
    """fast_clip's ``FastCLIPLossIndividual`` over several steps, driven as fast_clip's train.py does.

    spec: ``data_size``; ``hyper`` = dict(gamma, gamma_schedule, gamma_decay_epochs, rho, eps, tau_init,
    lr_tau, beta1, beta2, eps_tau) (constructor arguments, as fast_clip's ``create_loss`` passes them);
    ``steps``: list of dict(epoch, index [N] int64, img [N, d], txt [N, d]) (the global batch of each step;
    ``adjust_hyperparams(epoch)`` is called when the epoch changes, as at the start of
    ``train_one_epoch``). The tables are made float64 after construction. Per step this rank returns its
    loss, the gradients of its rows, and copies of all tables after ``set_params``.
    """
    M, where = fastclip_loss()
    D, _ = distributed_utils(FASTCLIP_ENV)
    h = spec["hyper"]
    crit = M.FastCLIPLossIndividual(
        data_size=spec["data_size"], tau_init=h["tau_init"], lr_tau=h["lr_tau"], beta1_tau=h["beta1"],
        beta2_tau=h["beta2"], eps_tau=h["eps_tau"], device=torch.device("cpu"), gamma=h["gamma"],
        gamma_schedule=h["gamma_schedule"], gamma_decay_epochs=h["gamma_decay_epochs"], rho=h["rho"],
        eps=h["eps"], multiply_tau=False)
    for name in FASTCLIP_TABLES:
        setattr(crit, name, getattr(crit, name).double())
    rank_pg = dist.get_rank() if dist.is_initialized() else 0
    records, epoch = [], None
    for step in spec["steps"]:
        if step["epoch"] != epoch:
            epoch = step["epoch"]
            crit.adjust_hyperparams(epoch)
        N = step["img"].shape[0]
        sl = _rank_rows(N, rank, world)
        offset = rank_pg * (sl.stop - sl.start)
        image_idx = text_idx = step["index"][sl].clone()
        indices = (image_idx, text_idx)
        indices_device = [image_idx.unsqueeze(-1), text_idx.unsqueeze(-1)]
        img = step["img"][sl].detach().clone().requires_grad_()
        txt = step["txt"][sl].detach().clone().requires_grad_()
        model_out = {"image_features": img, "text_features": txt,
                     "logit_scale": torch.tensor(1.0 / h["tau_init"], dtype=torch.float64)}
        features = [model_out["image_features"], model_out["text_features"]]
        remote_features = D.all_gather_tuple_tensor(features, None)
        local_args = {"features": features, "indices": indices, "remote_features": remote_features,
                      "logit_scale": model_out["logit_scale"], "offset": offset}
        loss1_im, loss1_tt, sim_im, sim_tt, gather_list = crit.local(**local_args)
        sim = (sim_tt.T, sim_im.T)
        u = gather_list[0:2]
        remote_gather_list = D.all_gather_tuple_tensor(gather_list, None)
        remote_indices = D.all_gather_tuple_tensor(indices_device, None)
        remote_indices[0] = remote_indices[0].squeeze(-1).to(device="cpu", dtype=torch.int64)
        remote_indices[1] = remote_indices[1].squeeze(-1).to(device="cpu", dtype=torch.int64)
        crit.set_params(*remote_indices, *remote_gather_list)
        remote_u = remote_gather_list[0:2]
        remote_bounds = remote_gather_list[4:6]
        remote_tau = remote_gather_list[6:8]
        model_out.update({"remote_tau": remote_tau, "remote_bounds": remote_bounds})
        model_out.update({"features": features, "remote_features": remote_features, "remote_u": remote_u})
        model_out.update({"offset": offset, "loss1": (loss1_im, loss1_tt), "u": u, "sim": sim})
        losses = crit(**model_out, output_dict=True)
        total = sum(losses.values())
        total.backward()
        rec = dict(loss=total.item(), d_img=img.grad.clone(), d_txt=txt.grad.clone(), gamma=crit.gamma,
                   beta1=crit.beta1_tau, beta2=crit.beta2_tau)
        rec.update({name: getattr(crit, name)[:, 0].clone() for name in FASTCLIP_TABLES})
        records.append(rec)
    return dict(steps=records, where=where)


def _job_jest(spec: dict, rank: int, world: int) -> dict:
    """The authors' ``jointly_sample_batch_softmax`` as train.py calls it (under ``torch.no_grad()``).

    spec: ``ref_img``, ``ref_txt``, ``img``, ``txt`` [N, d] (global batch; this rank takes its rows);
    ``learner_scale`` (``params_learner["t"]``), ``ref_scale`` (``params_ref["t"]``, train.py: 100.0),
    ``n_chunks``, ``filter_ratio``, ``topk``, ``seeds`` (one per rank: ``torch.manual_seed`` before the
    call; their function draws from the global generator). Returns ``inds``, the probed ``logits_ii`` and
    conditional ``logits`` of each later chunk, or ``error`` (the exception, as ``Type: message``).
    """
    ns, where = jest_namespace()
    if ns is None:
        raise RuntimeError(where)
    N = spec["img"].shape[0]
    sl = _rank_rows(N, rank, world)
    records = []
    ns["__probe__"] = lambda name, value: records.append((name, value.detach().clone()))
    torch.manual_seed(int(spec["seeds"][rank]))
    learner = [spec["img"][sl].clone(), spec["txt"][sl].clone()]
    ref = [spec["ref_img"][sl].clone(), spec["ref_txt"][sl].clone()]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            inds = ns["jointly_sample_batch_softmax"](ref, learner, {"t": spec.get("ref_scale", 100.0)},
                                                       {"t": spec["learner_scale"]}, n_chunks=spec["n_chunks"],
                                                       filter_ratio=spec["filter_ratio"], topk=spec["topk"])
    except Exception as exc:  # their failure modes are part of what is measured
        return dict(error=f"{type(exc).__name__}: {exc}", where=where)
    return dict(inds=inds, diag=[v for k, v in records if k == "logits_ii"][0],
                cond=[v for k, v in records if k == "logits"], where=where)


def _job_package_jest(spec: dict, rank: int, world: int) -> dict:
    """This package's :func:`drrho_kernels.jest_select` on a ``jest`` spec, in the same ranks, its draws from
    a ``torch.Generator`` seeded like the authors' global one."""
    from drrho_kernels.reference.selection import jest_select
    N = spec["img"].shape[0]
    sl = _rank_rows(N, rank, world)
    g = torch.Generator().manual_seed(int(spec["seeds"][rank]))
    out = jest_select(spec["img"][sl], spec["txt"][sl], spec["ref_img"][sl], spec["ref_txt"][sl],
                      spec["learner_scale"], ref_scale=spec.get("ref_scale", 100.0), filter_ratio=spec["filter_ratio"],
                      n_chunks=spec["n_chunks"], topk=spec["topk"], generator=g,
                      process_group="world" if dist.is_initialized() else None, backend=spec.get("backend", "torch"),
                      return_scores=True)
    return dict(inds=out.indices, diag=out.scores, cond=out.conditional)


def _job_package_individual(spec: dict, rank: int, world: int) -> dict:
    """This package's per-sample temperatures on the steps of a ``fastclip`` spec, in the same ranks: the
    distributed call (``scheme`` "gather_u" or "gather_grad"; with ``distributed=False`` the one-process
    functional) with float64 tables kept here (fast_clip's start: tau = float32(tau_init), the rest 0)."""
    import numpy as np

    from drrho_kernels.core.inputs import TauOptions, TauState
    from drrho_kernels.loss.functional import individual_clip_loss
    from drrho_kernels.loss.schedule import gamma_at_epoch
    from drrho_kernels.parallel.schemes import distributed_drrho_clip_loss
    h = spec["hyper"]
    n = spec["data_size"]
    tables = {k: torch.zeros(2, n, dtype=torch.float64) for k in ("u", "tau", "bound", "m", "v")}
    tables["tau"].fill_(float(np.float32(h["tau_init"])))
    records = []
    for step in spec["steps"]:
        N = step["img"].shape[0]
        sl = _rank_rows(N, rank, world)
        index = step["index"][sl]
        img = step["img"][sl].detach().clone().requires_grad_()
        txt = step["txt"][sl].detach().clone().requires_grad_()
        gamma = gamma_at_epoch(step["epoch"], h["gamma"], h["gamma_schedule"], h["gamma_decay_epochs"])
        state = TauState(*(tables[k][:, index] for k in ("tau", "bound", "m", "v")))
        options = TauOptions(lr=h["lr_tau"], beta1=h["beta1"], beta2=h["beta2"], eps=h["eps_tau"], tau_min=0.01,
                             tau_max=1.0, grad_clamp=5.0, epoch=step["epoch"])
        common = dict(gamma=gamma, eps=h["eps"], rho=h["rho"], backend=spec.get("backend", "torch"))
        u = tables["u"][:, index]
        if spec.get("distributed", True):
            out = distributed_drrho_clip_loss(img, txt, None, u[0], u[1], index=index, data_size=n,
                                              scheme=spec.get("scheme", "gather_u"), tau_state=state,
                                              tau_options=options, **common)
            loss, new, where = out.loss, out.state_all, out.index_all
        else:
            loss, u_img, u_txt, tau_new = individual_clip_loss(img, txt, u[0], u[1], state, options, **common)
            new = dict(u=torch.stack([u_img, u_txt]), tau=tau_new.tau, bound=tau_new.bound, m=tau_new.m, v=tau_new.v)
            where = index
        loss.backward()
        for k in tables:
            tables[k][:, where] = new[k].detach().to(torch.float64)
        rec = dict(loss=loss.item(), d_img=img.grad.clone(), d_txt=txt.grad.clone())
        rec.update({k: tables[k].clone() for k in tables})
        records.append(rec)
    return dict(steps=records)


def _job_package_sogclr(spec: dict, rank: int, world: int) -> dict:
    """This package on the spec of a ``sogclr`` job, in the same ranks: the distributed call (``scheme``)
    in a process group, else the one-process functional; the authors' global form (multiply_tau on or
    off), RHO shift and distillation as train.py passes them (teacher = the reference features)."""
    import drrho_kernels as dk
    from drrho_kernels.parallel.schemes import distributed_drrho_clip_loss
    N = spec["img"].shape[0]
    sl = _rank_rows(N, rank, world)
    img = spec["img"][sl].detach().clone().requires_grad_()
    txt = spec["txt"][sl].detach().clone().requires_grad_()
    s = torch.tensor(float(spec["scale"]), dtype=torch.float64, requires_grad=True)
    distill = spec.get("distill") or {}
    kw = dict(gamma=spec["gamma"], rho=spec["rho"], eps=spec["eps"], multiply_tau=spec["multiply_tau"],
              backend=spec.get("backend", "torch"), distill_weight=distill.get("weight", 0.0),
              distill_scale=distill.get("teacher_scale", 100.0))
    if spec.get("ref_img") is not None:
        kw.update(ref_img=spec["ref_img"][sl].clone(), ref_txt=spec["ref_txt"][sl].clone())
    u = (spec["u_img"][sl].double(), spec["u_txt"][sl].double())
    if dist.is_initialized():
        out = distributed_drrho_clip_loss(img, txt, s, *u, scheme=spec.get("scheme", "gather_u"), **kw)
        loss, u_all = out.loss, (out.u_img_all, out.u_txt_all)
    else:
        loss, u_img, u_txt = dk.drrho_clip_loss(img, txt, s, *u, **kw)
        u_all = (u_img, u_txt)
    loss.backward()
    return dict(total=loss.item(), d_img=img.grad.clone(), d_txt=txt.grad.clone(), d_s=s.grad.item(),
                u_img=u_all[0].clone(), u_txt=u_all[1].clone())


_JOBS = {"sogclr": _job_sogclr, "package_sogclr": _job_package_sogclr, "fastclip": _job_fastclip, "jest": _job_jest, "package_individual": _job_package_individual,
         "package_jest": _job_package_jest}
_NEEDS = {"sogclr": (DRRHO_ENV,), "package_sogclr": (), "fastclip": (FASTCLIP_ENV,), "jest": (DRRHO_ENV,), "package_individual": (), "package_jest": ()}


def _run_all(jobs: dict, rank: int, world: int) -> dict:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.distributed.nn.all_gather is deprecated
        for name, (kind, spec) in jobs.items():
            out[name] = _JOBS[kind](spec, rank, world)
    return out


def _spawn_main(rank: int, world: int, port: int, jobs_file: str) -> dict:
    """One rank of a spawned run (:func:`processes.spawn`): its results, returned."""
    torch.set_num_threads(1)
    jobs = torch.load(jobs_file, weights_only=False)
    with process_group(rank, world, f"tcp://127.0.0.1:{port}"):
        return _run_all(jobs, rank, world)


def run_jobs(jobs: dict, world_size: int = 1, process_group_: bool = True, spawn: bool = False):
    """Run ``jobs`` (``{name: (kind, spec)}``) on ``world_size`` ranks; ``({name: [per-rank result]}, "")``
    or ``(None, reason)`` when a snapshot is missing.

    ``world_size == 1``: in this process, inside a gloo group of size 1 (``process_group_=True``, fast_clip's
    intended semantics: gathered features carry no gradient) or without any group (``False``: their
    gathers then return the features themselves, with gradient). ``world_size > 1`` (or ``spawn``): spawned
    gloo processes (:func:`processes.spawn`; torch.distributed.nn's all_gather backward keeps the group of its
    forward, so a group destroyed and created again in one process can break the authors' code: spawn avoids
    it).
    """
    for kind, _ in jobs.values():
        ok, why = available(*_NEEDS[kind])
        if not ok:
            return None, why
    if world_size == 1 and not spawn:
        if process_group_:
            with process_group(0, 1):
                result = _run_all(jobs, 0, 1)
        else:
            if dist.is_initialized():
                raise RuntimeError("a process group is initialised: cannot run the no-group variant")
            result = _run_all(jobs, 0, 1)
        return {name: [r] for name, r in result.items()}, ""
    from processes import spawn
    with tempfile.TemporaryDirectory(prefix="authors_") as tmp:
        jobs_file = os.path.join(tmp, "jobs.pt")
        torch.save(jobs, jobs_file)
        per_rank = spawn(_spawn_main, world_size, jobs_file, timeout=300.0, what="the authors' code")
    return {name: [per_rank[r][name] for r in range(world_size)] for name in jobs}, ""


# --------------------------------------------------------------- the DRRho-CLIP copy of the per-sample loss
def drrho_individual_probe(state: dict, features, epoch: int = 1, hyper: dict | None = None):
    """What DRRho-CLIP's own ``FastCLIPLossIndividual`` does, for the record.

    Returns ``(dict, reason)``: ``construct_error`` (building it as DRRho-CLIP's ``create_loss`` does),
    ``forward_error`` (calling it as DRRho-CLIP's train.py does), and, built directly with the arguments its
    base class accepts, one ``local()`` step from ``state`` (tables of the ``B`` samples: tau, u, b, m, v
    per direction, float64 ``[B]``) on ``features`` (img, txt ``[B, d]``, one process): ``tau_im``,
    ``tau_tt``, ``u_im``, ``m_im``, ``v_im`` and ``grad_inputs`` (what the update divides by).
    """
    M, where = drrho_loss()
    if M is None:
        return None, where
    h = dict(gamma=0.8, gamma_schedule="cosine", gamma_decay_epochs=10, rho=8.0, eps=1e-14, tau_init=0.07,
             lr_tau=5e-4, beta1=0.9, beta2=0.98, eps_tau=1e-6)
    h.update(hyper or {})
    B = features[0].shape[0]
    out = {}
    create_loss_args = {"data_size": B, "gamma": h["gamma"], "device": torch.device("cpu"), "rho": h["rho"],
                        "gamma_schedule": h["gamma_schedule"], "gamma_decay_epochs": h["gamma_decay_epochs"],
                        "eps": h["eps"], "multiply_tau": False, "dist_loss_weight": 1.0, "loss_weight": 1.0,
                        "tau_init": h["tau_init"], "lr_tau": h["lr_tau"], "beta1_tau": h["beta1"],
                        "beta2_tau": h["beta2"], "eps_tau": h["eps_tau"]}
    try:
        M.FastCLIPLossIndividual(**create_loss_args)
        out["construct_error"] = None
    except Exception as exc:
        out["construct_error"] = f"{type(exc).__name__}: {exc}"
    for k in ("dist_loss_weight", "loss_weight"):
        create_loss_args.pop(k)
    crit = M.FastCLIPLossIndividual(**create_loss_args)
    for name in FASTCLIP_TABLES:
        setattr(crit, name, getattr(crit, name).double())
    for mine, theirs in (("tau", "tau"), ("u", "u"), ("b", "bound"), ("m", "m_grad_tau"), ("v", "v_grad_tau")):
        for k, suffix in (("img", "im"), ("txt", "tt")):
            getattr(crit, f"{theirs}_{suffix}")[:, 0] = torch.as_tensor(state[f"{mine}_{k}"], dtype=torch.float64)
    crit.adjust_hyperparams(epoch)
    idx = torch.arange(B)
    feats = [f.detach().double().clone() for f in features]
    try:
        crit(features=feats, indices=[idx, idx], logit_scale=torch.tensor(1.0 / h["tau_init"]), offset=0,
             ref_features=None, output_dict=True)
        out["forward_error"] = None
    except Exception as exc:
        out["forward_error"] = f"{type(exc).__name__}: {exc}"
    _, _, _, _, gl = crit.local(features=feats, indices=(idx, idx), remote_features=feats, offset=0)
    out.update(u_im=gl[0][:, 0], u_tt=gl[1][:, 0], tau_im=gl[2][:, 0], tau_tt=gl[3][:, 0], bound_im=gl[4][:, 0],
               m_im=gl[6][:, 0], v_im=gl[8][:, 0], n_gathered=len(gl), gamma=crit.gamma, where=where)
    return out, ""
