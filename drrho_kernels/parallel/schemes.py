"""Data-parallel DRRho-CLIP loss: W processes, B pairs each, one global batch of N = W * B columns.

SPEC.md, "Distributed contract": every process returns its own ``L_r`` over its ``B`` anchors against
all ``N`` columns; the data-parallel mean ``(1/W) sum_r L_r`` and its gradient with respect to every
sample's embeddings equal the single-process ``L`` of the concatenated batch, and every process ends
with the same updated ``u``. Two schemes meet it:

``"gather_grad"``
    All-gather the features *with* gradient. Each process evaluates its rows against the gathered
    columns (``offset = rank * B``) on the single-process path (``loss.functional.compute_loss``); the
    backward of the gather reduce-scatters (sums) the column gradients to the processes that own the
    samples. Works with every backend, ``"reference"`` included. One collective in the backward.

``"gather_u"`` (the default; the FastCLIP scheme of the authors' code)
    All-gather the features *without* gradient, run the backend's fused forward op and the epilogue
    on them (``loss.functional.fused_terms``), then all-gather the already-updated ``u`` (and the pair
    margins) of every process. The loss is assembled on the single-process path
    (``loss.functional.loss_from_terms``) with the gathered values as the fold's columns: the backward
    adds, to the gradient of each local sample, the column terms of *every* anchor of the global
    batch. No collective in the backward, and the ``[N, d]`` column gradients never exist.

    This equals what ``"gather_grad"`` delivers provided every process back-propagates the same
    scaling of its loss (``L_r.backward()``, or the same factor on every process, e.g. an AMP grad
    scaler or a gradient-accumulation divisor shared by all ranks): the column terms of process
    ``r``'s anchors are computed on the owner with the owner's own upstream gradient. That is the
    normal DDP setup. The gradient w.r.t. ``logit_scale`` is the local ``d L_r / d s`` in both schemes
    (DDP averages it). Needs a fused backend (torch, triton, cpp); with ``backend="reference"`` the
    loss falls back to ``"gather_grad"``. With half-precision embeddings it is also the more exact
    scheme: row and column terms are summed in float32 before the single rounding to the input dtype,
    as in one process, while ``"gather_grad"`` rounds the column gradients before the reduce-scatter.

Communication per step and per process (``k = W - 1``; ``e`` bytes per element of the embeddings'
dtype, the reference embeddings are sent in that dtype too; ``a`` = 4, or 8 for float64 inputs; ``su``
bytes per element of the state ``u`` (4 for the module's float32 state); ``dr = 0`` without a
reference model). A rank's "bytes" are the bytes it receives in the all-gathers, reduce-scatters and all-to-all;
a ring or tree implementation sends about as many::

                                   gather_grad            gather_u
    forward   meta (agreement)     k * M * 8              k * M * 8
              indices (if given)   k * B * 8              k * B * 8
              sharded state fetch  f * 2 n * su           f * 2 n * su
              features x, t        k * B * 2d * e         k * B * 2d * e
              reference xr, tr     k * B * 2dr * e        k * B * 2dr * e
              new state            k * B * 2 n * su       k * B * (2 n + 1 [+ 4] [+ 4]) * a
    backward  column gradients     k * B * 2d * e         0

``M``: the metadata entries (``META_LEN``: the ok flag, the shapes, dtypes and scheme, and every field
of ``LossOptions``). ``n``: state arrays per direction (1: ``u``; 5 with per-sample temperatures: ``u``, ``tau``, bound,
two Adam moments). ``gather_u`` adds the margins and, with per-sample temperatures, the columns' old
scales and weight normalisers per direction (the fold's column anchors); with distillation the
columns' two log-sum-exps per direction. State fetch: only with the module's
``state_sharding="sharded"`` (:mod:`drrho_kernels.parallel.sharded_state`), one ``all_to_all_single``; ``f`` is
the number of this rank's ``B`` rows whose owner is another rank (``k B / W`` on average for uniformly
drawn indices), ``su * f`` bytes per state array and direction. Returning the new entries to their
owners costs nothing more: both schemes already all-gather the new state of the global batch, and each
owner keeps its entries of it.

:func:`bytes_per_step` evaluates this table; :func:`count_bytes` records what the code actually
passes to the collectives (the tests check that they agree). Every collective used
(``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``) exists in torch 2.5, the
oldest that ``pyproject.toml`` admits.

Usage with DDP (every process; the loss module is not wrapped, the model is)::

    dist.init_process_group("nccl")                     # or "gloo" on the CPU
    model = DDP(model)
    crit = DRRhoCLIPLoss(len(dataset), process_group="world")           # distributed_scheme="gather_u"
    for epoch in ...:
        crit.set_epoch(epoch)
        for img, txt, index in loader:                   # this process's B pairs and dataset indices
            x, t, s = model(img, txt)
            loss = crit(x, t, index, s, ref_img=ref_model.encode_image(img), ref_txt=...)
            loss.backward()                              # DDP averages the gradients over processes

Errors: every process first checks its own arguments (``loss.validate.check_rows``: the checks that need
no columns, so B = 1 per process is fine); then, before any other collective, every process
all-gathers a small metadata vector (whether its own arguments passed the checks, ``B``, ``d``, ``dr``,
dtypes, reference present or not, indices given or not, scheme, temperature form, sharded state or not,
and every field of the call's ``LossOptions``: derived from the dataclass, so a new option is agreed on
without a change here). A mismatch between processes, or a bad argument on any process, raises on *every*
process (a ``ValueError`` naming the argument and the per-rank values; the process whose own input
was bad raises its own error), never a hang and never a corrupted state. A failure *after* these
checks on one process only (say, out of memory in a kernel) is like any collective failure: the
other processes wait in the next collective until the process group's timeout.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..core import ops
from ..core.inputs import TEMPERATURES, LossOptions, TauState, accumulation_dtype, option_items
from ..core.transfer import to_device
from ..loss.functional import compute_loss, fused_terms, loss_from_terms, resolved, state_out
from ..loss.validate import (FLOAT_DTYPES, STATE_DTYPES, check_global_index, check_index, check_n_columns,
                             check_options, check_rows, row_scales, with_columns)
from .collectives import (all_gather, all_gather_with_grad, check_process_group, comm_device, count_bytes,
                          host_group, resolve_group)

__all__ = ["SCHEMES", "DistributedLoss", "distributed_drrho_clip_loss", "bytes_per_step", "count_bytes",
           "resolve_group", "check_distributed_args"]

SCHEMES = ("gather_u", "gather_grad")
STATE_ARRAYS = {"global": ("u",), "per_direction": ("u",), "individual": ("u", "tau", "bound", "m", "v")}
_DTYPES = FLOAT_DTYPES + tuple(d for d in STATE_DTYPES if d not in FLOAT_DTYPES)


class DistributedLoss(NamedTuple):
    """Result of :func:`distributed_drrho_clip_loss` on one process."""

    loss: torch.Tensor          # 0-dim L_r of this process's B anchors against all N columns
    u_img_new: torch.Tensor     # [B] new state of this process's anchors (dtype of u_img)
    u_txt_new: torch.Tensor     # [B]
    u_img_all: torch.Tensor     # [N] new state of the whole global batch, rank order (identical on all ranks)
    u_txt_all: torch.Tensor     # [N]
    index_all: torch.Tensor | None   # [N] gathered dataset indices (when ``index`` was given)
    state_all: dict             # every new state array of the global batch, [2, N] each ("u"; per-sample
                                # temperatures also "tau", "bound", "m", "v"), accumulation dtype


def check_distributed_args(process_group, scheme) -> None:
    """Constructor-time checks of :class:`drrho_kernels.DRRhoCLIPLoss`'s distributed arguments."""
    if scheme not in SCHEMES:
        raise ValueError(f"distributed_scheme: expected one of {SCHEMES}, got {scheme!r}")
    check_process_group(process_group)


# ---------------------------------------------------------------------------------------------
# Checks: local first, then one metadata all-gather so that every rank agrees before anything else.

def _given(v) -> str:
    return "given" if v else "None"


# What every rank must share besides its options: (name, argument named in the error, what is expected,
# how a value reads in the message).
_FACTS = (
    ("B", "img", "the same batch size B (rows of img) on every rank (N = W * B)", str),
    ("d", "img", "the same embedding width d on every rank", str),
    ("has_ref", "ref_img", "a reference model on every rank or on none (ref_img given)", _given),
    ("dr", "ref_img", "the same reference width dr on every rank", str),
    ("dtype", "img", "the same dtype on every rank", str),
    ("u_dtype", "u_img", "the same state dtype on every rank", str),
    ("has_index", "index", "sample indices on every rank or on none", _given),
    ("scheme", "distributed_scheme", "the same scheme on every rank", repr),
    ("temperature", "logit_scale", "the same temperature form on every rank (global, per direction or individual)",
     repr),
    ("sharded", "state_sharding", "the same state_sharding on every rank",
     lambda v: repr("sharded" if v else "replicated")),
)
_CHOICES = {"dtype": _DTYPES, "u_dtype": _DTYPES, "scheme": SCHEMES, "temperature": TEMPERATURES}
# The options' names as the caller spells the arguments.
_ARGUMENT = {"per_sample": "return_per_sample", "tau": "tau_options"}


def _metadata_items(p, index, scheme, sharded: bool) -> list[tuple[str, object, tuple | None]]:
    """``(name, value, choices)`` of everything the ranks must agree on: the facts, then every option."""
    t = p.tiles
    facts = dict(B=p.batch, d=t.img.shape[1], has_ref=t.has_ref, dr=t.ref_dim if t.has_ref else -1, dtype=t.img.dtype,
                 u_dtype=p.u_img.dtype, has_index=index is not None, scheme=scheme, temperature=p.temperature.kind,
                 sharded=sharded)
    return [(name, facts[name], _CHOICES.get(name)) for name, *_ in _FACTS] + option_items(p.options)


def _encode(value, choices) -> float:
    """One metadata entry as a float64: a choice by its index, None as -inf (no option can be -inf)."""
    if choices is not None:
        return float(choices.index(value))
    return float("-inf") if value is None else float(value)


def _decode(x: float, choices):
    if choices is not None:
        return choices[int(x)]
    return None if x == float("-inf") else x


# The layout of the metadata vector (the same for every value of LossOptions).
_META_CHOICES = [(name, choices) for name, _, choices in option_items(LossOptions())]
_META_NAMES = [name for name, *_ in _FACTS] + [name for name, _ in _META_CHOICES]
META_LEN = 1 + len(_META_NAMES)     # entries of the metadata vector (float64): the ok flag, then the names


def _meta_row(items) -> list[float]:
    return [1.0] + [_encode(v, c) for _, v, c in items]


def _describe_values(values, ranks) -> str:
    return ", ".join(f"{v} on rank {r}" for v, r in zip(values, ranks))


def _agree(meta: torch.Tensor, rank: int, local_error: BaseException | None) -> None:
    """Raise on every rank if any rank's checks failed or the ranks disagree; ``meta`` is ``[W, 1 + len(names)]``
    (the ok flag, then the entries of :data:`_META_NAMES`)."""
    if local_error is not None:
        raise local_error
    rows = meta.tolist()
    bad = [r for r, row in enumerate(rows) if row[0] <= 0]
    if bad:
        raise ValueError(f"distributed DRRho-CLIP loss: the arguments of rank(s) {bad} failed their checks "
                         f"(see the error raised there); every rank stops, no state was changed")
    ranks = list(range(len(rows)))
    facts = {name: (arg, expected, fmt) for name, arg, expected, fmt in _FACTS}
    for col, name in enumerate(_META_NAMES, start=1):
        values = [row[col] for row in rows]
        if all(v == values[0] for v in values):
            continue
        choices = _CHOICES.get(name) or dict(_META_CHOICES).get(name)
        shown = [_decode(v, choices) for v in values]
        if name in facts:
            arg, expected, fmt = facts[name]
            shown = [fmt(v) for v in shown]
        else:
            top = name.split(".")[0]
            arg = _ARGUMENT.get(top, top) + name[len(top):]
            expected = f"the same {arg} on every rank"
        raise ValueError(f"{arg}: expected {expected}, got {_describe_values(shown, ranks)} "
                         f"(raised on every rank; this is rank {rank})")


def _step(img, txt, logit_scale, u_img, u_txt, options, *, ref_img, ref_txt, index, data_size, scheme, group,
          local_error=None, tau_state=None, fetch_state=None, index_checked=False
          ) -> tuple[DistributedLoss, torch.Tensor | None]:
    """``options``: the checked :class:`LossOptions` (the module's), or the keyword arguments of
    ``check_options`` (checked here, so that a bad option on one rank stops every rank). Returns the result
    and the gathered indices on the host (None for an accelerator index)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    meta_row, p = [0.0] * (1 + len(_META_NAMES)), None
    if local_error is None:
        try:
            if scheme not in SCHEMES:
                raise ValueError(f"distributed_scheme: expected one of {SCHEMES}, got {scheme!r}")
            if not isinstance(options, LossOptions):
                options = check_options(**options)
            p = resolved(check_rows(img, txt, logit_scale, u_img, u_txt, options, ref_img=ref_img, ref_txt=ref_txt,
                                    tau_state=tau_state))
            if index is None and fetch_state is not None:
                raise ValueError("index: expected the dataset indices of the rows with a sharded state, got None")
            if index is not None and not index_checked:     # (the module checked its own already)
                index = check_index(index, p.batch, data_size if data_size is not None else 2 ** 62)
            meta_row = _meta_row(_metadata_items(p, index, scheme, fetch_state is not None))
        except Exception as exc:        # re-raised after every rank has heard of it
            local_error = exc
    # The ranks agree over host tensors (a gloo group of the same ranks): no device value is read (SPEC 3.2).
    hosts = host_group(group)
    meta = all_gather(torch.tensor([meta_row], dtype=torch.float64), hosts, "meta")
    _agree(meta, rank, local_error)
    device = comm_device(group, img)

    batch = p.batch
    n_columns, offset = world * batch, rank * batch
    check_n_columns(n_columns, "img", f" (W = {world} processes, B = {batch} rows each)")
    index_all = index_host = None
    if index is not None:
        if index.device.type == "cpu":  # the dataloader's: gathered and checked on the host, then sent over
            index_host = all_gather(index.to(torch.int64), hosts, "index")
            check_global_index(index_host, rank)
            index_all = to_device(index_host, device)
        else:                           # an accelerator's: gathered there, its repeats not checked (SPEC 3.2)
            index_all = all_gather(index.to(torch.int64), group, "index")
    if fetch_state is not None:         # sharded state: the rows' entries from their owners (sharded_state.py)
        if index_host is None:
            index_host = index_all.cpu()    # the owners' arithmetic runs on the host: one copy for such an index
        p = _with_state(p, fetch_state(index_host))
    # Under autocast the float32 embeddings are cast before they are gathered (as the ops would cast them
    # after): half the bytes, and the column gradients reduced in float32 by the cast's backward.
    p = replace(p, tiles=ops.autocast_tiles(p.tiles))
    rows = p.tiles
    refs = [all_gather(r, group, "reference") for r in (rows.ref_img, rows.ref_txt)] if rows.has_ref else [None, None]
    if scheme == "gather_u" and p.backend == "reference":
        scheme = "gather_grad"    # the dense reference has no fused op pair to fold with
    names = STATE_ARRAYS[p.temperature.kind]

    if scheme == "gather_grad":
        q = with_columns(p, all_gather_with_grad(rows.img, group, "features"),
                         all_gather_with_grad(rows.txt, group, "features"), *refs, offset)
        loss, state = compute_loss(q)
        state = {k: state[k].detach().to(p.u_img.dtype) for k in names}
        packed = all_gather(torch.cat([state[k] for k in names]).T, group, "state")        # [N, 2 n]
        state_all = {k: packed[:, 2 * i:2 * i + 2].T for i, k in enumerate(names)}
    else:
        q = with_columns(p, all_gather(rows.img.detach(), group, "features"),
                         all_gather(rows.txt.detach(), group, "features"), *refs, offset)
        terms = fused_terms(q)
        loss, state, state_all = _fold(q, terms, names, group, n_columns)
    u_img_new, u_txt_new = state_out(q, state["u"])
    u_img_all, u_txt_all = state_out(q, state_all["u"])
    return DistributedLoss(loss, u_img_new, u_txt_new, u_img_all.contiguous(), u_txt_all.contiguous(), index_all,
                           state_all), index_host


def _fold(q, terms, names, group, n_columns):
    """``gather_u``: all-gather the new state and what the fold's column anchors need of every row of the
    global batch, then the loss with them as the fold's columns. Returns ``(loss, state, state_all)``.

    The column anchors need each row's scale, weight normaliser and margin (and the distillation's two
    log-sum-exps): gathered, except what every rank knows already (one global scale; a normaliser that is
    the new ``u`` itself, gathered as state)."""
    per_row = [terms.state[k] for k in names] + [terms.margin[None]]
    gather_scale = q.temperature.kind == "individual"
    gather_norm = terms.log_norm is not terms.state["u"]
    if gather_scale:
        per_row.append(q.tiles.scale.detach())
    if gather_norm:
        per_row.append(terms.log_norm)
    if terms.distill:                   # the column anchors' two log-sum-exps of the distillation
        per_row += [terms.extras["lse_q"], terms.extras["lse_p"]]
    packed = all_gather(torch.cat(per_row).T, group, "state")            # [N, 2 n + 1 (+ 2) (+ 2) (+ 4)]
    state_all = {k: packed[:, 2 * i:2 * i + 2].T for i, k in enumerate(names)}
    col = 2 * len(names) + 1
    columns = dict(col_margin=packed[:, col - 1])
    if gather_scale:
        columns["col_scale"], col = packed[:, col:col + 2].T, col + 2
    else:
        columns["col_scale"] = q.tiles.scale.detach()[:, :1].expand(2, n_columns)
    if gather_norm:
        columns["col_log_norm"], col = packed[:, col:col + 2].T, col + 2
    else:
        columns["col_log_norm"] = state_all["u"]
    if terms.distill:
        columns.update(col_lse_q=packed[:, col:col + 2].T, col_lse_p=packed[:, col + 2:col + 4].T)
    loss = loss_from_terms(q, terms, terms.weights(**columns))
    return loss, terms.state, state_all


def _with_state(p, state: dict):
    """``p`` with the rows' state ``[2, B]`` per kind in place of the placeholders it was checked with."""
    t, tiles = p.temperature, p.tiles
    if t.kind == "individual":          # the temperatures are state, and the rows' scales are 1 / tau
        t = replace(t, state=TauState(state["tau"], state["bound"], state["m"], state["v"]))
        tiles = replace(tiles, scale=row_scales(t, p.batch, p.acc_dtype))
    return replace(p, tiles=tiles, temperature=t, u_img=state["u"][0], u_txt=state["u"][1])


def distributed_drrho_clip_loss(img, txt, logit_scale, u_img, u_txt, *, ref_img=None, ref_txt=None,
                                index=None, data_size=None, gamma=0.8, eps=1e-14, rho=8.0, backend="auto",
                                scheme="gather_u", group=None, local_error=None, multiply_tau=True,
                                tau_state=None, tau_options=None, distill_weight=0.0,
                                distill_scale=100.0, fetch_state=None) -> DistributedLoss:
    """The DRRho-CLIP loss of this process's ``B`` anchors against the global batch of all processes.

    Every process of ``group`` must call it at the same step with the same ``B``, ``d``, ``dr``, dtypes,
    options (``gamma``, ``eps``, ``rho``, ...) and scheme (checked: a mismatch raises on every process). The
    global batch is the concatenation of the processes' batches in rank order, so this process's row ``i`` is
    column ``rank * B + i``. The mean of the returned losses over processes, and its gradient, equal
    :func:`drrho_kernels.drrho_clip_loss` on the concatenated batch (SPEC.md, "Distributed contract").

    Args:
        img, txt, logit_scale, u_img, u_txt, ref_img, ref_txt, gamma, eps, rho, backend: as in
            :func:`drrho_kernels.drrho_clip_loss`, for this process's ``B`` pairs (no ``*_all``: the
            columns are gathered here).
        index: optional ``[B]`` dataset indices of the pairs; gathered (``index_all`` of the result) and
            checked to be distinct across the global batch. data_size: their range, for the check.
        scheme: ``"gather_u"`` (default, no collective in the backward; needs a fused backend) or
            ``"gather_grad"`` (all-gather with gradient); see the module docstring.
        group: the process group (None: the default group).
        local_error: an exception this process already raised while preparing the call (the module
            passes its own state lookup's); every rank learns of it in the first collective and stops.
        multiply_tau, tau_state, tau_options: the temperature form, as in
            :func:`drrho_kernels.drrho_clip_loss` and :func:`drrho_kernels.loss.functional.individual_clip_loss`
            (``logit_scale=None`` with a ``tau_state``).
        distill_weight, distill_scale: the distillation term (SPEC 2.2), as in
            :func:`drrho_kernels.drrho_clip_loss`; its softmax runs over all N columns of the global batch.
        fetch_state: the module's sharded state (:mod:`drrho_kernels.parallel.sharded_state`): called with the
            gathered ``[N]`` indices once every rank agreed, it returns this rank's rows' state (``[2, B]``
            per kind), which replaces ``u_img``, ``u_txt`` and ``tau_state`` (then placeholders of the
            right shapes, for the checks). Needs ``index``.

    Returns:
        :class:`DistributedLoss`: this process's loss, its anchors' new ``u``, and the new ``u`` of the
        whole global batch (``[N]``, identical on every process) with the gathered indices.

    Raises:
        TypeError, ValueError, IndexError: a bad argument on any process, or arguments that differ
            between processes (raised on every process). RuntimeError: no initialised process group.
    """
    group = resolve_group(group)
    options = dict(gamma=gamma, eps=eps, rho=rho, backend=backend, multiply_tau=multiply_tau, tau=tau_options,
                   distill_weight=distill_weight, distill_scale=distill_scale)
    return _step(img, txt, logit_scale, u_img, u_txt, options, ref_img=ref_img, ref_txt=ref_txt, index=index,
                 data_size=data_size, scheme=scheme, group=group, local_error=local_error, tau_state=tau_state,
                 fetch_state=fetch_state)[0]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_step(batch: int, world_size: int, dim: int, ref_dim: int | None = None, *,
                   scheme: str = "gather_u", dtype: torch.dtype = torch.float32,
                   state_dtype: torch.dtype = torch.float32, index: bool = True,
                   temperature: str = "global", distill: bool = False, state_sharding: str = "replicated",
                   fetch_rows: float | None = None) -> dict:
    """Bytes one process receives per step in the collectives of ``scheme`` (the table of the module doc).

    Args:
        batch: ``B``, pairs per process. world_size: ``W`` (``N = W * B``). dim: ``d``.
        ref_dim: ``dr``, or None without a reference model. dtype: the embeddings' dtype (the
            reference embeddings are sent in it too). state_dtype: dtype of ``u`` (the module: float32).
        index: whether dataset indices are gathered (the module does; the functional only with ``index``).
        temperature: ``"global"``, ``"per_direction"`` or ``"individual"`` (five state arrays, and the
            fold's old scales and weight normalisers).
        distill: a distillation term (``gather_u`` also gathers the columns' two log-sum-exps per direction).
        state_sharding: ``"replicated"`` or ``"sharded"`` (the module's state spread over the ranks: the
            all-to-all that fetches the batch's entries from their owners).
        fetch_rows: with ``"sharded"``, ``f``: how many of this rank's ``B`` rows another rank owns; default
            ``(W - 1) B / W``, the mean for uniformly drawn indices (then the parts are floats).

    Returns:
        a dict with ``forward``, ``backward``, ``total`` and the parts ``meta``, ``index``, ``features``,
        ``reference``, ``state``, ``column_grads``, ``state_fetch``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    if state_sharding not in ("replicated", "sharded"):
        raise ValueError(f"state_sharding: expected 'replicated' or 'sharded', got {state_sharding!r}")
    k = world_size - 1
    n = len(STATE_ARRAYS[temperature])
    e = _element_size(dtype)
    a = _element_size(accumulation_dtype(dtype))
    parts = dict(
        meta=k * META_LEN * 8,
        index=k * batch * 8 if index else 0,
        features=k * batch * 2 * dim * e,
        reference=k * batch * 2 * ref_dim * e if ref_dim else 0,
        state=k * batch * ((2 * n + 1 + (4 if temperature == "individual" else 0) + (4 if distill else 0)) * a
                           if scheme == "gather_u" else 2 * n * _element_size(state_dtype)),
        column_grads=0 if scheme == "gather_u" else k * batch * 2 * dim * e,
        state_fetch=0,
    )
    if state_sharding == "sharded":
        f = k * batch / world_size if fetch_rows is None else fetch_rows
        parts["state_fetch"] = f * 2 * n * _element_size(state_dtype)
    forward = sum(parts[part] for part in ("meta", "index", "features", "reference", "state", "state_fetch"))
    return dict(parts, forward=forward, backward=parts["column_grads"], total=forward + parts["column_grads"])


