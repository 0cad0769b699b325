"""The collectives the package uses, through one thin layer that can count their bytes.

Every module that talks to other ranks (the distributed schemes, the sharded state, the selection)
goes through these functions: :func:`all_gather`, :func:`reduce_scatter`, :func:`all_to_all`,
:func:`all_gather_with_grad`, and :func:`count_bytes` records what each passes. Every collective used
(``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``) exists in torch 2.5, the
oldest that ``pyproject.toml`` admits.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

__all__ = ["all_gather", "reduce_scatter", "all_to_all", "all_gather_with_grad", "count_bytes", "resolve_group",
           "check_process_group", "comm_device", "host_group"]

_byte_logs: list[list[dict]] = []


@contextlib.contextmanager
def count_bytes():
    """Record every collective of this package while the block runs.

    Yields a list that fills with one dict per collective: ``op`` (``"all_gather"``,
    ``"reduce_scatter"`` or ``"all_to_all"``), ``what`` (meta, index, features, reference, state,
    column_grads, state_fetch, selection), ``phase`` (forward or backward), ``local_bytes`` (this process's
    ``[B, ...]`` piece; for the all-to-all what it sends) and ``bytes`` (what this process receives from
    the others: ``(W - 1) * local_bytes`` for the gathers and reduce-scatters).
    """
    log: list[dict] = []
    _byte_logs.append(log)
    try:
        yield log
    finally:
        _byte_logs.remove(log)


def _record(op: str, what: str, phase: str, piece: torch.Tensor, world: int, received: int | None = None) -> None:
    if _byte_logs:
        local = piece.numel() * piece.element_size()
        entry = dict(op=op, what=what, phase=phase, local_bytes=local,
                     bytes=(world - 1) * local if received is None else received)
        for log in _byte_logs:
            log.append(entry)


def all_gather(x: torch.Tensor, group, what: str, phase: str = "forward") -> torch.Tensor:
    """Concatenate the equally-shaped ``[B, ...]`` pieces of all ranks: ``[W * B, ...]`` (rank order)."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _record("all_gather", what, phase, x, world)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def reduce_scatter(x: torch.Tensor, group, what: str, phase: str = "backward") -> torch.Tensor:
    """Sum ``[W * B, ...]`` over ranks and keep this rank's ``[B, ...]`` block."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _record("reduce_scatter", what, phase, out, world)
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


def all_to_all(x: torch.Tensor, send_rows: list[int], recv_rows: list[int], group, what: str,
               phase: str = "forward") -> torch.Tensor:
    """Send rows ``[sum(send_rows[:q]), ...)`` of ``x`` to rank ``q``; receive ``recv_rows[q]`` rows from each
    rank ``q``, concatenated in rank order. The row counts are host lists: nothing is read from a device."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    out = x.new_empty((sum(recv_rows), *x.shape[1:]))
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    _record("all_to_all", what, phase, x, world, received=(sum(recv_rows) - recv_rows[rank]) * row_bytes)
    dist.all_to_all_single(out, x, output_split_sizes=recv_rows, input_split_sizes=send_rows, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward reduce-scatters: every process's column gradient reaches the owner."""

    @staticmethod
    def forward(ctx, x, group, what):
        ctx.group = group
        ctx.what = what
        return all_gather(x, group, what)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, ctx.what + "_grad"), None, None


def all_gather_with_grad(x: torch.Tensor, group, what: str) -> torch.Tensor:
    """:func:`all_gather` whose backward sums the gathered gradient back to the owners (reduce-scatter)."""
    return _AllGatherWithGrad.apply(x, group, what)


def resolve_group(process_group):
    """``"world"`` or None: the default group; a ``ProcessGroup``: itself. Needs an initialised group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed DRRho-CLIP loss: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or use process_group=None for "
                           "a single process)")
    if process_group is None or (isinstance(process_group, str) and process_group == "world"):
        return dist.group.WORLD
    if isinstance(process_group, str):
        raise ValueError(f"process_group: expected None, 'world' or a ProcessGroup, got {process_group!r}")
    return process_group


def check_process_group(process_group) -> None:
    """A constructor's check of a ``process_group`` argument (None, ``"world"`` or a ``ProcessGroup``)."""
    if process_group is None or (isinstance(process_group, str) and process_group == "world"):
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group: expected None, 'world' or a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__} {process_group!r}")


_host_groups: dict = {}


def host_group(group):
    """A group of the same ranks whose collectives run on host tensors: ``group`` itself when it is a gloo
    group, else a gloo group made once (``use_local_synchronization``: only its ranks take part). The ranks
    agree over it on what they hold on the host (their arguments, their CPU indices) without reading a
    device value (SPEC 3.2)."""
    if dist.get_backend(group) == "gloo":
        return group
    if group not in _host_groups:
        _host_groups[group] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                             use_local_synchronization=True)
    return _host_groups[group]


def comm_device(group, img) -> torch.device:
    """Where this rank's collectives of ``group`` run: the embeddings' device, else the backend's."""
    if isinstance(img, torch.Tensor):
        return img.device
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
