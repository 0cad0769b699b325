"""Sharded per-sample state: each rank of the process group stores only the entries it owns.

``DRRhoCLIPLoss(..., process_group="world", state_sharding="sharded")`` spreads ``u_img``, ``u_txt`` (and,
with ``temperature="individual"``, the temperatures, bounds and Adam moments) over the ``W`` ranks:

Ownership rule (fixed; recorded in every shard's checkpoint)
    sample ``i`` is owned by rank ``i % W``, in slot ``i // W`` of that rank's buffers. Rank ``r`` holds
    the ``ceil((data_size - r) / W)`` samples ``r, r + W, r + 2W, ...``: the shards' sizes differ by at
    most one, and ``full[r::W]`` is rank ``r``'s shard.

A step (inside the distributed step, once every rank agreed on the arguments and the indices of the
global batch are gathered, so that every rank knows which of its entries every other rank needs):

- fetch: one ``all_to_all_single``; owner ``q`` sends rank ``r`` the entries of ``r``'s rows that it owns
  (every state array of both directions packed in one ``[rows, 2 n]`` float32 message);
- return: nothing is sent. Both schemes already all-gather the new state of the whole global batch
  (the replicated state needs it, and ``gather_u`` folds with it); each owner keeps its entries of it.

Memory per rank: ``4 * 2 n * ceil(data_size / W)`` bytes of state (``n`` = 1, or 5 per-sample temperature
arrays) plus ``O(W B)`` per step; bytes per step: ``schemes.bytes_per_step(..., state_sharding="sharded")``.
Works with ``state_device="cpu"`` (the shard stays in host memory) and every temperature form and scheme.

Checkpoints: a rank's ``state_dict()`` holds its shard and its layout (``state_layout`` in the extra
state: rule, ``world_size``, ``rank``, ``data_size``). It loads only into the module of the same layout
(a mismatch raises before anything is copied). :func:`merge_state_shards` joins the ``W`` shards into
the ``state_dict`` of a replicated module; :func:`split_state` cuts one into the shards of any ``W``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..core.transfer import to_device
from ..loss.validate import check_int
from .collectives import all_to_all, resolve_group

__all__ = ["STATE_SHARDINGS", "RULE", "ShardLayout", "merge_state_shards", "split_state"]

STATE_SHARDINGS = ("replicated", "sharded")
RULE = "owner = index % world_size, slot = index // world_size"
EXTRA = "_extra_state"          # nn.Module's key of the extra state (the epoch, and a shard's layout)


@dataclass(frozen=True)
class ShardLayout:
    """Rank ``rank`` of ``world_size`` owns the samples ``rank, rank + world_size, ...`` of ``data_size``."""

    data_size: int
    world_size: int
    rank: int
    rule: str = RULE

    @classmethod
    def of(cls, process_group, data_size: int) -> "ShardLayout":
        """The layout of this process in ``process_group`` (it must be initialised)."""
        group = resolve_group(process_group)
        return cls(data_size, dist.get_world_size(group), dist.get_rank(group))

    @property
    def size(self) -> int:
        """Entries this rank stores: ``ceil((data_size - rank) / world_size)``."""
        return (self.data_size - self.rank + self.world_size - 1) // self.world_size

    def as_dict(self) -> dict:
        return asdict(self)

    def check_group(self, group) -> None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if (world, rank) != (self.world_size, self.rank):
            raise ValueError(f"process_group: expected the group this sharded state was built for (rank "
                             f"{self.rank} of {self.world_size}), got rank {rank} of {world}")

    def fetch(self, read, group, index_all: torch.Tensor, device) -> dict:
        """This rank's rows' state, ``[2, B]`` per kind on ``device``, from their owners.

        ``read(slots, device)`` returns this rank's entries at ``slots`` (``{kind: [2, S]}`` on ``device``);
        ``index_all`` is the global batch's ``[N]`` indices in rank order on the host (identical on every
        rank): who owns what is worked out there (NumPy), so the sizes of the all-to-all and the row orders
        reach the device without a device value read back (SPEC 3.2).
        """
        w, r = self.world_size, self.rank
        blocks = index_all.numpy().reshape(w, -1)   # row q: rank q's batch
        owners = blocks % w
        mine = owners == r                          # which of rank q's rows this rank owns
        # Row-major: rank 0's requests first, each rank's in its row order (what that rank expects from us).
        sent = read(to_device(torch.from_numpy(blocks[mine] // w), device), device)
        kinds = list(sent)
        packed = torch.cat([sent[k] for k in kinds]).T                                  # [S, 2 n]
        got = all_to_all(packed, mine.sum(1).tolist(), np.bincount(owners[r], minlength=w).tolist(),
                         group, "state_fetch")                                          # [B, 2 n] by owner
        rows = torch.empty_like(got)
        rows[to_device(torch.from_numpy(np.argsort(owners[r], kind="stable")), device)] = got
        return {k: rows[:, 2 * i:2 * i + 2].T.contiguous() for i, k in enumerate(kinds)}

    def owned(self, index_all: torch.Tensor, state_all: dict) -> tuple[torch.Tensor, dict]:
        """The slots (host) and the new state (``[2, M]`` per kind) of the global batch's samples this rank owns;
        ``index_all`` on the host."""
        idx = index_all.numpy()
        mine = np.flatnonzero(idx % self.world_size == self.rank)
        device = next(iter(state_all.values())).device
        cols = to_device(torch.from_numpy(mine), device)
        return torch.from_numpy(idx[mine] // self.world_size), {k: v[:, cols] for k, v in state_all.items()}


def placeholder_state(kinds, batch: int, device) -> dict:
    """Stand-ins of the right shape and dtype for the checks made before the entries are fetched."""
    return {kind: torch.ones(2, batch, dtype=torch.float32, device=device) for kind in kinds}


def _layout_of(state_dict, prefix: str = "") -> dict | None:
    extra = state_dict.get(prefix + EXTRA)
    return extra.get("state_layout") if isinstance(extra, dict) else None


def check_loaded_layout(layout: ShardLayout | None, state_dict, prefix: str = "") -> None:
    """Raise unless ``state_dict`` (a module's, keys under ``prefix``) has the layout ``layout`` (None: replicated)."""
    saved = _layout_of(state_dict, prefix)
    if layout is None:
        if saved is not None:
            raise ValueError(f"state_dict: expected the state of a replicated DRRhoCLIPLoss, got the shard of rank "
                             f"{saved.get('rank')} of {saved.get('world_size')}; join the shards with "
                             "drrho_kernels.merge_state_shards(shards) first")
        return
    if saved is None:
        raise ValueError(f"state_dict: expected the shard of rank {layout.rank} of {layout.world_size} (state_sharding="
                         "'sharded'), got a state_dict without a state_layout (a replicated one?); cut it with "
                         f"drrho_kernels.split_state(state_dict, {layout.world_size})[{layout.rank}]")
    want = layout.as_dict()
    bad = [f"{k} {saved.get(k)!r} (this module: {v!r})" for k, v in want.items() if saved.get(k) != v]
    if bad:
        raise ValueError(f"state_dict: the shard's layout differs from this module's: {', '.join(bad)}; "
                         "merge_state_shards and split_state re-cut shards for another layout")


def split_state(state_dict, world_size: int) -> list[dict]:
    """The ``world_size`` shards (rank order) of a replicated ``DRRhoCLIPLoss.state_dict()``.

    Shard ``r`` holds ``x[r::world_size]`` of every state array and the layout; each loads into the module
    of rank ``r`` built with ``state_sharding="sharded"`` in a group of ``world_size``.
    """
    world_size = check_int("world_size", world_size, low=1)
    if _layout_of(state_dict) is not None:
        raise ValueError("state_dict: expected a replicated state_dict, got a shard; merge_state_shards first")
    arrays, extra = _arrays(state_dict, "state_dict")
    data_size = next(iter(arrays.values())).shape[0]
    shards = []
    for rank in range(world_size):
        layout = ShardLayout(data_size, world_size, rank)
        shard = {k: v[rank::world_size].clone() for k, v in arrays.items()}
        shard[EXTRA] = dict(extra, state_layout=layout.as_dict())
        shards.append(shard)
    return shards


def merge_state_shards(shards) -> dict:
    """The replicated ``state_dict`` of the shards of all ranks (any order): ``merge(split(x, W)) == x``."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise TypeError(f"shards: expected a non-empty list of shard state_dicts, got {type(shards).__name__}")
    layouts = [_layout_of(s) for s in shards]
    if any(layout is None for layout in layouts):
        raise ValueError("shards: expected shard state_dicts (with a state_layout), got a replicated one at "
                         f"position {[layout is None for layout in layouts].index(True)}")
    first = layouts[0]
    for key in ("rule", "world_size", "data_size"):
        values = [layout.get(key) for layout in layouts]
        if len(set(values)) != 1:
            raise ValueError(f"shards: expected one {key} in every shard, got {values}")
    ranks = sorted(layout["rank"] for layout in layouts)
    if ranks != list(range(first["world_size"])):
        raise ValueError(f"shards: expected one shard of every rank 0..{first['world_size'] - 1}, got ranks {ranks}")
    parts = [_arrays(s, f"shards[{i}]") for i, s in enumerate(shards)]
    extras = [{k: v for k, v in extra.items() if k != "state_layout"} for _, extra in parts]
    if any(e != extras[0] for e in extras) or any(set(a) != set(parts[0][0]) for a, _ in parts):
        raise ValueError(f"shards: expected the same arrays and extra state (epoch) in every shard, got {extras}")
    merged = {k: v.new_empty(first["data_size"]) for k, v in parts[0][0].items()}
    for (arrays, _), layout in zip(parts, layouts):
        want = ShardLayout(first["data_size"], first["world_size"], layout["rank"]).size
        for k, v in arrays.items():
            if v.shape != (want,):
                raise ValueError(f"shards: expected {k} of shape ({want},) in the shard of rank {layout['rank']}, "
                                 f"got {tuple(v.shape)}")
            merged[k][layout["rank"]::first["world_size"]] = v
    merged[EXTRA] = extras[0]
    return merged


def _arrays(state_dict, name: str) -> tuple[dict, dict]:
    """The per-sample arrays (every tensor entry) and the extra state of a DRRhoCLIPLoss's state_dict."""
    if not hasattr(state_dict, "items"):
        raise TypeError(f"{name}: expected a DRRhoCLIPLoss state_dict, got {type(state_dict).__name__}")
    arrays = {k: v for k, v in state_dict.items() if k != EXTRA}
    if not arrays or any(not isinstance(v, torch.Tensor) or v.dim() != 1 for v in arrays.values()) \
            or len({v.shape[0] for v in arrays.values()}) != 1:
        got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in arrays.items()}
        raise ValueError(f"{name}: expected the 1-D state arrays of equal length of a DRRhoCLIPLoss state_dict "
                         f"(its own, without a prefix), got {got}")
    extra = state_dict.get(EXTRA, {})
    return arrays, dict(extra) if isinstance(extra, dict) else {}
