"""Sharded per-sample state (``state_sharding="sharded"``, drrho_kernels/sharded_state.py) with real gloo processes.

The truth is the replicated module in the same processes, fed the same inputs: losses, gradients and the
final state must be bit-identical (``torch.equal``) for every temperature form (one scale, a pair, per-sample
temperatures, distillation) and both schemes, over steps whose random indices cross owners, at W = 2 and 4.
Also: the bytes the all-to-all passes (counted) against ``bytes_per_step``; checkpoints (resume bit-exact,
mismatched layouts refused with the module untouched, re-cut for another W with ``merge_state_shards`` /
``split_state`` and resumed bit-identically to replicated training); errors raised on every rank with the
state untouched; ``state_device="cpu"``.
"""
from __future__ import annotations

import io
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import drrho_kernels as dk
from drrho_kernels.parallel import schemes as ddk
from drrho_kernels.parallel.sharded_state import RULE, ShardLayout
from processes import spawn

B, D, DR, STEPS = 3, 5, 4, 3
# W = 4 (its spawn resumes from W = 2's checkpoint) is slow: the developers' loop runs W = 2.
WORLD_SIZES = (2, pytest.param(4, marks=pytest.mark.slow, id="W4"))
FORMS = ("global", "per_direction", "individual", "distill")
CONFIGS = [(form, scheme, None) for form in FORMS for scheme in ddk.SCHEMES] + [("global", "gather_u", "cpu")]
INDIVIDUAL = ("u_img", "u_txt", "tau_img", "tau_txt", "bound_img", "bound_txt", "tau_m_img", "tau_m_txt",
              "tau_v_img", "tau_v_txt")
RESHARD_DATA_SIZE = 29
RESHARD = ("individual", "gather_u", None)


def config_name(c) -> str:
    return f"{c[0]}-{c[1]}" + (f"-state_{c[2]}" if c[2] else "")


def data_size_for(world: int) -> int:
    return 3 * world * B + 1            # shards of unequal size; successive draws overlap


def make(c, sharding, data_size):
    form, scheme, state_device = c
    kwargs = dict(temperature="individual") if form == "individual" else {}
    if form == "distill":
        kwargs.update(distill_weight=0.5, distill_scale=30.0)
    return dk.DRRhoCLIPLoss(data_size, gamma=0.7, gamma_decay_epochs=2, rho=6.0, backend="torch",
                            process_group="world", distributed_scheme=scheme, state_sharding=sharding,
                            state_device=state_device, **kwargs)


def step_inputs(world, rank, step, data_size, seed=0):
    """This rank's block of the global batch of ``step``: random indices (distinct in the global batch)."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    n = world * B
    index = torch.randperm(data_size, generator=g)[:n]
    emb = lambda w: torch.nn.functional.normalize(torch.randn(n, w, generator=g), dim=1)  # noqa: E731
    rows = slice(rank * B, (rank + 1) * B)
    return index[rows].clone(), *(emb(w)[rows].clone() for w in (D, D, DR, DR))


def train(crit, c, world, rank, steps, data_size, start=0, seed=0, log_bytes=False):
    """Steps ``start .. start + steps - 1``; per step the loss, every gradient and (sharded) the bytes."""
    out = []
    for step in range(start, start + steps):
        index, img, txt, ref_img, ref_txt = step_inputs(world, rank, step, data_size, seed)
        img.requires_grad_()
        txt.requires_grad_()
        scales = ()
        if c[0] == "per_direction":
            scales = (torch.tensor(9.0, requires_grad=True), torch.tensor(6.0, requires_grad=True))
        elif c[0] != "individual":
            scales = (torch.tensor(8.0, requires_grad=True),)
        logit_scale = scales if len(scales) == 2 else scales[0] if scales else None
        crit.set_epoch(step)
        with ddk.count_bytes() as log:
            loss = crit(img, txt, index, logit_scale, ref_img=ref_img, ref_txt=ref_txt)
            loss.backward()
        out.append(dict(loss=loss.detach(), grads=[x.grad for x in (img, txt, *scales)], index=index,
                        bytes=list(log) if log_bytes else None))
    return out


def state_of(crit):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in crit.state_dict().items()}


def _attempt(load):
    try:
        load()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return dict(type=type(exc).__name__, message=str(exc))
    return dict(type=None, message="no error")


def _layout_errors(world, rank):
    """Loading shards of another layout into a trained sharded module: refused, the module untouched."""
    c = ("individual", "gather_u", None)
    data_size = 4 * world                          # every shard has 4 entries: only the layout tells them apart
    crit = make(c, "sharded", data_size)
    train(crit, c, world, rank, 1, data_size)
    before = state_of(crit)
    full = {k: torch.rand(data_size) for k in INDIVIDUAL}
    full["_extra_state"] = {"epoch": 3}
    other = {k: torch.rand(data_size + world) for k in INDIVIDUAL}
    attempts = dict(
        other_rank=dk.split_state(full, world)[(rank + 1) % world],
        other_world_size=dk.split_state(full, 2 * world)[rank],
        other_data_size=dk.split_state(other, world)[rank],
        replicated=full,
    )
    out = {name: _attempt(lambda sd=sd: crit.load_state_dict(sd)) for name, sd in attempts.items()}
    after = state_of(crit)
    out["unchanged"] = all(torch.equal(after[k], before[k]) for k in INDIVIDUAL) and after["_extra_state"] == \
        before["_extra_state"]
    out["own_shard"] = _attempt(lambda: crit.load_state_dict(dk.split_state(full, world)[rank]))
    out["own_shard_loaded"] = torch.equal(crit.u_img, full["u_img"][rank::world]) and crit.epoch == 3
    return out


ERROR_CASES = ("index_out_of_range_rank0", "index_on_two_ranks", "bad_scale_rank1", "replicated_on_rank0")


def _error_case(world, rank, name):
    c = ("global", "gather_u", None)
    data_size = data_size_for(world)
    crit = make(c, "replicated" if name == "replicated_on_rank0" and rank == 0 else "sharded", data_size)
    if name == "replicated_on_rank0":       # no step can run: some state by hand
        crit.u_img.uniform_(-1.0, 1.0)
    else:
        train(crit, c, world, rank, 1, data_size)
    before = state_of(crit)
    index, img, txt, ref_img, ref_txt = step_inputs(world, rank, 5, data_size)
    scale = torch.tensor(8.0)
    if name == "index_out_of_range_rank0" and rank == 0:
        index[0] = data_size
    if name == "index_on_two_ranks" and rank == 1:
        index = step_inputs(world, 0, 5, data_size)[0]
    if name == "bad_scale_rank1" and rank == 1:
        scale = torch.tensor(-1.0)
    out = _attempt(lambda: crit(img, txt, index, scale, ref_img=ref_img, ref_txt=ref_txt))
    after = state_of(crit)
    out["unchanged"] = all(torch.equal(after[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))
    return out


def _worker(rank, world, port, outdir, previous):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = dict(configs={}, resume={}, errors={})
    try:
        data_size = data_size_for(world)
        for c in CONFIGS:
            rep, shard = make(c, "replicated", data_size), make(c, "sharded", data_size)
            results["configs"][config_name(c)] = dict(
                replicated=train(rep, c, world, rank, STEPS, data_size),
                sharded=train(shard, c, world, rank, STEPS, data_size, log_bytes=True),
                replicated_state=state_of(rep), sharded_state=state_of(shard),
                devices={str(getattr(shard, k).device) for k in shard.state_names})
        # Checkpoint: 2 steps, save, 2 more; a fresh module loads the checkpoint and does the same 2.
        for c in (("individual", "gather_u", None), ("per_direction", "gather_grad", None)):
            a = make(c, "sharded", data_size)
            train(a, c, world, rank, 2, data_size, seed=1)
            buffer = io.BytesIO()
            torch.save(a.state_dict(), buffer)
            tail_a = train(a, c, world, rank, 2, data_size, start=2, seed=1)
            buffer.seek(0)
            b = make(c, "sharded", data_size)
            b.load_state_dict(torch.load(buffer, weights_only=True))
            tail_b = train(b, c, world, rank, 2, data_size, start=2, seed=1)
            results["resume"][config_name(c)] = dict(a=tail_a, b=tail_b, a_state=state_of(a), b_state=state_of(b))
        # Re-cut: W = 2 trains 2 steps and saves; W = 4 resumes from the W = 2 shards, merged and split for 4.
        shard, rep = make(RESHARD, "sharded", RESHARD_DATA_SIZE), make(RESHARD, "replicated", RESHARD_DATA_SIZE)
        if previous is None:
            train(shard, RESHARD, world, rank, 2, RESHARD_DATA_SIZE, seed=2)
            train(rep, RESHARD, world, rank, 2, RESHARD_DATA_SIZE, seed=2)
            torch.save(shard.state_dict(), os.path.join(outdir, f"reshard_shard{rank}.pt"))
            torch.save(rep.state_dict(), os.path.join(outdir, f"reshard_replicated{rank}.pt"))
        else:
            shards = [torch.load(os.path.join(previous, f), weights_only=True)
                      for f in sorted(os.listdir(previous)) if f.startswith("reshard_shard")]
            shard.load_state_dict(dk.split_state(dk.merge_state_shards(shards), world)[rank])
            rep.load_state_dict(torch.load(os.path.join(previous, "reshard_replicated0.pt"), weights_only=True))
            results["reshard"] = dict(
                sharded=train(shard, RESHARD, world, rank, 2, RESHARD_DATA_SIZE, start=2, seed=2),
                replicated=train(rep, RESHARD, world, rank, 2, RESHARD_DATA_SIZE, start=2, seed=2),
                sharded_state=state_of(shard), replicated_state=state_of(rep))
        results["layout_errors"] = _layout_errors(world, rank)
        for name in ERROR_CASES:
            results["errors"][name] = _error_case(world, rank, name)
        # The group still works after the errors, and the states still agree.
        c = CONFIGS[0]
        results["after_errors"] = [train(make(c, s, data_size), c, world, rank, 1, data_size, seed=3)[0]["loss"]
                                   for s in ("replicated", "sharded")]
    finally:
        dist.destroy_process_group()
    return results


# ------------------------------------------------------------------------------------------------
# Test side.

class _Runs:
    """The workers' results per world size, spawned at first use (W = 4 after W = 2, from its checkpoint)."""

    def __init__(self, tmp_path_factory):
        self.factory, self.results, self.dirs = tmp_path_factory, {}, {}

    def __getitem__(self, world):
        if world not in self.results:
            previous = None
            if world == 4:
                self[2]
                previous = self.dirs[2]
            outdir = self.factory.mktemp(f"sharded_w{world}")
            start = time.monotonic()
            self.results[world] = spawn(_worker, world, str(outdir), previous and str(previous))
            self.dirs[world] = outdir
            print(f"\nW = {world}: workers took {time.monotonic() - start:.1f} s")
        return self.results[world]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _Runs(tmp_path_factory)


def _equal_steps(got, want, where):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g["index"], w["index"])
        assert torch.equal(g["loss"], w["loss"]), (where, step, g["loss"], w["loss"])
        assert len(g["grads"]) == len(w["grads"])
        for k, (a, b) in enumerate(zip(g["grads"], w["grads"])):
            assert torch.equal(a, b), (where, step, f"gradient {k}", (a - b).abs().max())


def _equal_states(got, want, where):
    assert set(got) == set(want), where
    for k in got:
        if isinstance(want[k], torch.Tensor):
            assert torch.equal(got[k], want[k]), (where, k)
        else:
            assert got[k] == want[k], (where, k)


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("c", CONFIGS, ids=config_name)
def test_sharded_state_is_bit_identical_to_replicated(runs, world, c):
    per_rank = [r["configs"][config_name(c)] for r in runs[world]]
    data_size = data_size_for(world)
    crossed = set()
    for rank, r in enumerate(per_rank):
        _equal_steps(r["sharded"], r["replicated"], (world, rank))
        layout = ShardLayout(data_size, world, rank)
        shard, rep = r["sharded_state"], r["replicated_state"]
        assert shard["_extra_state"] == dict(epoch=STEPS - 1, state_layout=dict(
            data_size=data_size, world_size=world, rank=rank, rule=RULE))
        for name in (k for k in rep if k != "_extra_state"):
            assert shard[name].shape == (layout.size,) == (len(range(rank, data_size, world)),)
            assert torch.equal(shard[name], rep[name][rank::world]), (rank, name)
        assert r["devices"] == {"cpu"}
        for step in r["sharded"]:
            crossed |= set((step["index"] % world).tolist()) - {rank}
    assert crossed == set(range(world))          # every rank's entries were fetched by another rank
    drawn = torch.cat([step["index"] for r in per_rank for step in r["sharded"]])
    assert torch.unique(drawn).numel() < drawn.numel()          # some steps read entries an earlier one wrote
    merged = dk.merge_state_shards([r["sharded_state"] for r in per_rank[::-1]])
    _equal_states(merged, per_rank[0]["replicated_state"], "merged")


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("c", CONFIGS, ids=config_name)
def test_fetch_bytes_counted_match_the_formula(runs, world, c):
    form, scheme, _ = c
    for rank, r in enumerate(runs[world]):
        for step in r["configs"][config_name(c)]["sharded"]:
            f = int((step["index"] % world != rank).sum())          # rows owned by another rank
            want = ddk.bytes_per_step(B, world, D, DR, scheme=scheme, dtype=torch.float32,
                                      temperature="global" if form == "distill" else form,
                                      distill=form == "distill", state_sharding="sharded", fetch_rows=f)
            got = {}
            for entry in step["bytes"]:
                part = {"features_grad": "column_grads"}.get(entry["what"], entry["what"])
                got[part] = got.get(part, 0) + entry["bytes"]
            assert [e["op"] for e in step["bytes"] if e["what"] == "state_fetch"] == ["all_to_all"]
            for part in ("meta", "index", "features", "reference", "state", "column_grads", "state_fetch"):
                assert got.get(part, 0) == want[part], (rank, part, got, want)
            assert sum(got.values()) == want["total"]


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
def test_checkpoint_resumes_bit_exact(runs, world):
    for r in runs[world]:
        for name, res in r["resume"].items():
            _equal_steps(res["b"], res["a"], (world, name))
            _equal_states(res["b_state"], res["a_state"], (world, name))


@pytest.mark.slow
def test_recut_for_another_world_size_resumes_like_replicated(runs):
    runs[4]
    saved = lambda what: torch.load(runs.dirs[2] / f"reshard_{what}.pt", weights_only=True)  # noqa: E731
    merged = dk.merge_state_shards([saved("shard1"), saved("shard0")])
    _equal_states(merged, saved("replicated0"), "W = 2 shards merged vs W = 2 replicated")
    for rank, r in enumerate(runs[4]):          # W = 4 loaded split_state(merge_state_shards(W = 2 shards), 4)
        _equal_steps(r["reshard"]["sharded"], r["reshard"]["replicated"], ("W = 4 from W = 2", rank))
        rep = r["reshard"]["replicated_state"]
        for name in INDIVIDUAL:
            assert torch.equal(r["reshard"]["sharded_state"][name], rep[name][rank::4]), (rank, name)


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
def test_mismatched_layouts_are_refused_and_leave_the_module_untouched(runs, world):
    for rank, r in enumerate(runs[world]):
        e = r["layout_errors"]
        assert e["other_rank"]["type"] == "ValueError" and "rank" in e["other_rank"]["message"], e
        assert "world_size" in e["other_world_size"]["message"], e
        assert "data_size" in e["other_data_size"]["message"], e
        assert e["replicated"]["type"] == "ValueError" and "split_state" in e["replicated"]["message"], e
        assert e["unchanged"]
        assert e["own_shard"]["type"] is None and e["own_shard_loaded"], e


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_steps_raise_on_every_rank_and_leave_the_state_untouched(runs, world, name):
    errors = [r["errors"][name] for r in runs[world]]
    assert all(e["type"] is not None for e in errors), errors
    assert all(e["unchanged"] for e in errors), errors
    culprit, kind, words = dict(index_out_of_range_rank0=(0, "IndexError", "index"),
                                index_on_two_ranks=(None, "ValueError", "distinct"),
                                bad_scale_rank1=(1, "ValueError", "logit_scale"),
                                replicated_on_rank0=(None, "ValueError", "state_sharding"))[name]
    for rank, e in enumerate(errors):
        if culprit is None or rank == culprit:
            assert e["type"] == kind and words in e["message"], (rank, e)
        else:
            assert f"rank(s) [{culprit}]" in e["message"], (rank, e)


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
def test_group_still_works_after_the_errors(runs, world):
    for r in runs[world]:
        assert torch.equal(*r["after_errors"])


# ------------------------------------------------------------------------------------------------
# One process: constructor, checkpoint helpers, bytes formula.

def test_constructor_checks():
    with pytest.raises(ValueError, match="state_sharding: expected one of"):
        dk.DRRhoCLIPLoss(10, process_group="world", state_sharding="partitioned")
    with pytest.raises(ValueError, match="process_group='world' or a ProcessGroup, got None"):
        dk.DRRhoCLIPLoss(10, state_sharding="sharded")
    with pytest.raises(RuntimeError, match="init_process_group"):        # the layout needs W and the rank now
        dk.DRRhoCLIPLoss(10, process_group="world", state_sharding="sharded")
    assert dk.DRRhoCLIPLoss(10).state_sharding == "replicated"


def _full(data_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(data_size, generator=g) for k in INDIVIDUAL}
    for k in ("tau_img", "tau_txt"):                  # loadable temperatures: finite and > 0
        out[k] = 0.01 + out[k].abs()
    out["_extra_state"] = {"epoch": 4}
    return out


@pytest.mark.parametrize("data_size", (1, 3, 12, 29))
@pytest.mark.parametrize("world", (1, 2, 3, 4, 7))
def test_merge_of_split_is_the_identity(world, data_size):
    full = _full(data_size)
    shards = dk.split_state(full, world)
    assert [s["_extra_state"]["state_layout"]["rank"] for s in shards] == list(range(world))
    for rank, shard in enumerate(shards):
        assert shard["_extra_state"] == {"epoch": 4, "state_layout": dict(
            data_size=data_size, world_size=world, rank=rank, rule=RULE)}
        size = ShardLayout(data_size, world, rank).size
        assert size in (data_size // world, -(-data_size // world))                 # floor or ceil
        for k in INDIVIDUAL:
            assert torch.equal(shard[k], torch.tensor([full[k][i].item() for i in range(data_size)
                                                       if i % world == rank]))       # owner i % W, slot i // W
    merged = dk.merge_state_shards(shards[::-1])                                     # any order
    _equal_states(merged, full, (world, data_size))
    assert list(merged) == list(full)


def test_merge_and_split_refuse_what_they_cannot_join():
    shards = dk.split_state(_full(10), 3)
    cases = [
        (shards[:2], "one shard of every rank"),
        ([shards[0], shards[0], shards[2]], "one shard of every rank"),
        ([shards[0], dk.split_state(_full(10), 2)[1], shards[2]], "world_size"),
        ([shards[0], dk.split_state(_full(11), 3)[1], shards[2]], "data_size"),
        ([shards[0], dict(shards[1], _extra_state=dict(shards[1]["_extra_state"], epoch=5)), shards[2]], "epoch"),
        ([shards[0], dict(shards[1], **{k: torch.zeros(4) for k in INDIVIDUAL}), shards[2]], "shape (3,)"),
        ([shards[0], dict(shards[1], u_img=torch.zeros(4)), shards[2]], "equal length"),
        ([_full(10)], "replicated"),
    ]
    for bad, words in cases:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            dk.merge_state_shards(bad)
    with pytest.raises(TypeError, match="non-empty list"):
        dk.merge_state_shards([])
    with pytest.raises(ValueError, match="merge_state_shards first"):
        dk.split_state(shards[0], 2)
    with pytest.raises(ValueError, match="world_size"):
        dk.split_state(_full(10), 0)
    with pytest.raises(ValueError, match="without a prefix"):
        dk.split_state({"loss.u_img": torch.zeros(3), "loss.u_txt": torch.zeros(4)}, 2)


def test_replicated_module_refuses_a_shard_and_stays_untouched():
    crit = dk.DRRhoCLIPLoss(10, temperature="individual", backend="torch")
    crit.u_img.uniform_()
    crit.set_epoch(2)
    before = state_of(crit)
    shard = dk.split_state(_full(10), 1)[0]              # even the one shard of W = 1 has a layout
    with pytest.raises(ValueError, match="merge_state_shards"):
        crit.load_state_dict(shard)
    _equal_states(state_of(crit), before, "after the refused load")
    crit.load_state_dict(dk.merge_state_shards([shard]))
    _equal_states(state_of(crit), _full(10), "merged")


def test_bytes_formula_of_the_fetch_by_hand():
    # W = 8, B = 256, d = dr = 512, bfloat16; 100 of this rank's rows are owned elsewhere.
    rep = ddk.bytes_per_step(256, 8, 512, 512, dtype=torch.bfloat16)
    sharded = ddk.bytes_per_step(256, 8, 512, 512, dtype=torch.bfloat16, state_sharding="sharded", fetch_rows=100)
    assert rep["state_fetch"] == 0 and sharded["state_fetch"] == 100 * 2 * 4      # u of both directions, float32
    assert sharded["total"] - rep["total"] == sharded["state_fetch"]
    individual = ddk.bytes_per_step(256, 8, 512, 512, temperature="individual", state_sharding="sharded",
                                    fetch_rows=100)
    assert individual["state_fetch"] == 100 * 10 * 4                              # five arrays per direction
    mean = ddk.bytes_per_step(256, 8, 512, 512, state_sharding="sharded")
    assert mean["state_fetch"] == 7 * 256 / 8 * 2 * 4                            # (W - 1) B / W rows on average
    assert ddk.bytes_per_step(256, 1, 512, 512, state_sharding="sharded")["total"] == 0
    with pytest.raises(ValueError, match="state_sharding"):
        ddk.bytes_per_step(256, 8, 512, 512, state_sharding="partitioned")
