"""SPEC part 3.2: a steady-state step reads no device value on the host.

Counted at the aten level on the CPU (tests/host_reads.py: the dispatcher's profiler, inside the package's
ops too) in the third step of a module, for the torch, cpp and triton (interpreter) backends, in one
process and in gloo at W = 2 (both schemes, replicated and sharded state, state in host memory). The only
reads allowed are the checks of host data. The CPU index (its range and repeats; across ranks, the
gathered host copies' repeats) is checked in NumPy on the tensor's own memory: no aten op at all. Where
the embeddings are CPU tensors: their one fused finite check and the logit scale's value. With those
embedding checks switched off, as they are for accelerator tensors, nothing is left. On a GPU the same step runs under
``torch.cuda.set_sync_debug_mode("error")`` (tests/test_triton_gpu.py).

Measured before this contract (commit e2bedb8, the same counter): one process 13 reads with the torch
backend (a ``bool`` of the gains per backward, a boolean mask per chunk), 8 with cpp/triton; W = 2: 37
(gather_u) / 36 (gather_grad), 41 / 40 with a sharded state (the metadata read back on the host, a
blocking index copy, ``bincount`` and masks on the device).
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

import drrho_kernels as dk
from drrho_kernels.loss import validate
from host_reads import HostReads
from processes import spawn

B, D = 16, 8
INDEX_CHECKS = 0            # the CPU index: its range and repeats in NumPy, on host memory (3 aten reads before)
EMBEDDING_CHECKS = 2        # one fused finite check of img, txt, ref_img, ref_txt; the logit scale's value


def _batch(step, rank=0):
    g = torch.Generator().manual_seed(100 * step + rank)
    emb = [torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1) for _ in range(4)]
    index = torch.randperm(1000, generator=torch.Generator().manual_seed(step))[:2 * B][rank * B:(rank + 1) * B]
    return emb, index


def _third_step_reads(crit, rank=0, embedding_checks=True):
    """Host reads of the third step of ``crit`` (the first two set up the shapes, the autotuner, the state)."""
    reads = None
    for step in range(3):
        (img, txt, ref_img, ref_txt), index = _batch(step, rank)
        img.requires_grad_()
        scale = None if crit.temperature == "individual" else torch.tensor(14.0, requires_grad=True)
        if step == 2:
            with HostReads() as reads:
                crit(img, txt, index, scale, ref_img=ref_img, ref_txt=ref_txt).backward()
        else:
            crit(img, txt, index, scale, ref_img=ref_img, ref_txt=ref_txt).backward()
    return reads


def _skip_unavailable(backend):
    if backend not in dk.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} cannot run here")


@pytest.fixture
def accelerator_embeddings(monkeypatch):
    """The embedding and scale checks as they are for accelerator tensors: not made (SPEC 3.2)."""
    monkeypatch.setattr(validate, "_data_checks_enabled", lambda t: not t.is_floating_point())


@pytest.mark.parametrize("form", ["global", "individual", "state_on_cpu"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_one_process_step_reads_only_its_checks(backend, form):
    _skip_unavailable(backend)
    kw = dict(temperature="individual") if form == "individual" else {}
    kw.update(state_device="cpu") if form == "state_on_cpu" else None
    reads = _third_step_reads(dk.DRRhoCLIPLoss(1000, backend=backend, **kw))
    # per-sample temperatures: no logit scale, but the CPU state's temperatures are checked (finite, > 0: one read)
    state_checks = -1 + 1 if form == "individual" else 0
    assert reads.total == INDEX_CHECKS + EMBEDDING_CHECKS + state_checks, reads.counts


@pytest.mark.parametrize("form", ["global", "individual"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_one_process_step_with_accelerator_embeddings_reads_only_the_index(backend, form, accelerator_embeddings):
    _skip_unavailable(backend)
    kw = dict(temperature="individual") if form == "individual" else {}
    reads = _third_step_reads(dk.DRRhoCLIPLoss(1000, backend=backend, **kw))
    assert reads.total == INDEX_CHECKS, reads.counts


def test_the_counter_sees_a_read_inside_an_op(monkeypatch):
    """The counter must see what a backend reads inside its own op (planted: a bool of the gains, as the
    torch backend did before)."""
    from drrho_kernels.backends import torch_chunked
    weights = torch_chunked._weights

    def reading(sim, scale, margin, log_norm, gain, along_rows, inplace=False):
        bool((gain > 0).all())
        return weights(sim, scale, margin, log_norm, gain, along_rows, inplace)

    monkeypatch.setattr(torch_chunked, "_weights", reading)
    reads = _third_step_reads(dk.DRRhoCLIPLoss(1000, backend="torch"))
    assert reads.total > INDEX_CHECKS + EMBEDDING_CHECKS


# ------------------------------------------------------------------------------------------------
# W = 2, gloo: every scheme and state layout; and errors still stop every rank after steady steps.

CONFIGS = [dict(distributed_scheme=s, state_sharding=h, **({"state_device": "cpu"} if c else {}))
           for s in ("gather_u", "gather_grad") for h in ("replicated", "sharded") for c in (False, True)]


def _dist_worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = dict(reads=[], device_reads=[], errors=[])
    try:
        for cfg in CONFIGS:
            crit = dk.DRRhoCLIPLoss(1000, backend="cpp", process_group="world", **cfg)
            results["reads"].append(dict(_third_step_reads(crit, rank).counts))
            # the accelerator case: no embedding checks (what a GPU step leaves)
            original = validate._data_checks_enabled
            validate._data_checks_enabled = lambda t: not t.is_floating_point()
            try:
                crit = dk.DRRhoCLIPLoss(1000, backend="cpp", process_group="world", **cfg)
                results["device_reads"].append(dict(_third_step_reads(crit, rank).counts))
            finally:
                validate._data_checks_enabled = original
            # a bad argument on rank 1 after steady steps at the same shape: every rank raises, no state changes
            (img, txt, ref_img, ref_txt), index = _batch(3, rank)
            before = [b.clone() for b in crit.buffers()]
            bad = dict(gamma_index=index.clone())
            if rank == 1:
                bad["gamma_index"][0] = 5000            # out of range
            try:
                crit(img, txt, bad["gamma_index"], 14.0, ref_img=ref_img, ref_txt=ref_txt)
                results["errors"].append("no error")
            except (ValueError, IndexError) as exc:
                same = all(torch.equal(a, b) for a, b in zip(before, crit.buffers()))
                results["errors"].append(f"{type(exc).__name__}: {exc} | state unchanged: {same}")
            crit(img.requires_grad_(), txt, index, 14.0, ref_img=ref_img, ref_txt=ref_txt).backward()   # trains on
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("host_sync")
    spawn(_dist_worker, 2, str(out), timeout=240.0, what="host-read workers")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(CONFIGS)),
                         ids=["-".join(f"{v}" for v in cfg.values()) for cfg in CONFIGS])
def test_distributed_step_reads_only_its_checks(distributed_runs, k):
    for rank, results in enumerate(distributed_runs):
        # the index checks (local and the gathered host copies', in NumPy), the embedding checks
        assert sum(results["reads"][k].values()) == INDEX_CHECKS + EMBEDDING_CHECKS, (rank, results["reads"][k])
        assert sum(results["device_reads"][k].values()) == INDEX_CHECKS, (rank, results["device_reads"][k])
        error = results["errors"][k]
        if rank == 1:
            assert error.startswith("IndexError: index") and error.endswith("state unchanged: True"), error
        else:
            assert "rank(s) [1]" in error and error.endswith("state unchanged: True"), error


# ------------------------------------------------------------------------------------------------
# State in host memory, steps on an accelerator: the write-backs complete without a wait.

class _Copy:
    """A stand-in for the CUDA event of a pending write-back (no GPU here)."""

    def __init__(self, done):
        self.done, self.waited = done, False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = True


def test_pending_host_write_backs_complete_when_done_needed_or_saved():
    crit = dk.DRRhoCLIPLoss(100, backend="torch", state_device="cpu")
    rows = torch.arange(1.0, 7.0).reshape(2, 3)                       # u_img, u_txt of samples 5, 6, 7
    done, busy = _Copy(True), _Copy(False)
    crit._pending_writes = [(torch.tensor([5, 6, 7]), rows, done), (torch.tensor([50, 51, 52]), rows + 10, busy)]
    img = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    crit._read_state(img, torch.tensor([1, 2, 3]))                    # needs neither: the done one is stored
    assert torch.equal(crit.u_img[5:8], rows[0]) and len(crit._pending_writes) == 1 and not busy.waited
    assert crit.u_img[50] == 0                                         # between steps: not yet stored
    crit._read_state(img, torch.tensor([9, 51, 60]))                   # needs sample 51: waits for that copy
    assert busy.waited and torch.equal(crit.u_txt[50:53], rows[1] + 10) and not crit._pending_writes
    crit._pending_writes = [(torch.tensor([70]), torch.tensor([[7.0], [8.0]]), _Copy(False))]
    state = crit.state_dict()                                          # saving stores everything first
    assert state["u_img"][70] == 7.0 and state["u_txt"][70] == 8.0 and not crit._pending_writes
    assert np.all(crit.u_img[[5, 50, 70]].numpy() == [1.0, 11.0, 7.0])
