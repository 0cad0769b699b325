"""The op layer: the fused loss as dispatcher ops, schemas, fake implementations and autograd, once.

Every fused backend ``<b>`` (``torch``: row-chunked PyTorch, ``triton``: GPU kernels, ``cpp``: the
C++ extension) implements two ops whose schemas are derived here from the fields of
:class:`~drrho_kernels.core.inputs.TileInputs` and :class:`~drrho_kernels.core.inputs.Weights` (the tiles'
scalar options travel as one ``float[] scalars``, so a new scalar changes no signature):

``drrho::<b>_fwd(<TileInputs>) -> (Tensor stats, Tensor margin, Tensor positives)``
    ``stats`` ``[2, K, B]``: per direction and anchor, online statistics over the anchor's negatives
    (``core.inputs.STATS``: the DRRho ``(M, E, F)`` of ``d_j = s (S_j - m)``, K = 3; with ``with_distill`` or
    ``with_alone`` also the target's, the teacher's and the reference's, K = 12); ``margin`` ``[B]``;
    ``positives`` ``[2, B]``: the pairs' own similarities ``<x_i, t_i>`` and ``<xr_i, tr_i>``.
    Accumulation dtype; no autograd (called on detached inputs).
``drrho::<b>_bwd(Tensor gain, Tensor? col_gain, Tensor? dgain, Tensor? col_dgain, <TileInputs>, <Weights>,
bool column_grads) -> (Tensor d_img, Tensor d_txt, Tensor d_img_all, Tensor d_txt_all)``
    the weighted products of the gradient: with ``P_kij = gain[k, i] w_kij`` (plus, in a fold, the
    column anchors' ``col_gain[k', j] w_k'ji``; with distillation ``dgain[k, i] (q_kij - p_kij)`` over
    every column, the positive included, and the fold's column anchors' likewise) and
    ``partner_i = sum_k gain[k, i] wsum[k, i]``::

        d_img_i = sum_j P_0ij T_j - partner_i t_i      d_txt_i = sum_j P_1ij X_j - partner_i x_i
        d_txt_all_j = sum_i P_0ij x_i                  d_img_all_j = sum_i P_1ij t_i   (column_grads)

    In one process (``columns_are_rows``) the fold with the rows' own weights is implied. Without
    ``column_grads`` the column outputs are empty ``[0, d]`` tensors.

The backends share one op with autograd, ``drrho::loss(Tensor wdsum, Tensor? h, Tensor? h_ds, Tensor u_new,
Tensor? wsum, Tensor? s_img, Tensor? s_txt, <TileInputs>, <Weights>, float[] form, str backend) -> Tensor``:
the scalar loss of ``phi_k = sum_i wdsum[k, i] = sum_ij w_kij d_kij`` and ``H_k = sum_i h[k, i]`` (the
distillation cross-entropies, None without) for the temperature form ``form = [kind, multiply_tau, rho,
distill_weight]`` with the logit scales ``s_img``, ``s_txt`` (None: the global form's ``s_txt`` is ``s_img``;
the per-sample temperatures have none). Its forward also gives the slopes (``core.epilogue.loss_and_slopes``:
``dL/dphi``, ``dL/dH`` and the direct ``dL/ds``, the weights and ``u`` held constant, SPEC.md: "gradients ...
with w and the new u held constant"); its backward multiplies them by the upstream gradient:
``gain = dL/dphi_k * scale``, ``dgain = dL/dH_k * scale`` (d (s y) / d x = s T) for the named backend's
``_bwd`` op (the embeddings), ``dL/dphi_k wdsum / scale + dL/dH_k h_ds`` for the rows' scales (``h_ds = d h
/ d s``, from the epilogue) and the direct terms for ``s_img``, ``s_txt``. One autograd node for the whole
loss: a small step's host time is a handful of ops, not a graph of them.

Autocast (SPEC 3.1): every op has an implementation on the ``AutocastCPU`` / ``AutocastCUDA`` dispatch keys
that casts the float32 embeddings among its arguments (rows, columns, reference: the fields of
``TileInputs`` marked ``embedding``) to the autocast dtype, as ``torch.matmul`` would, and runs the op
with autocast excluded below it (so a backend's own products never autocast). Nothing else is cast: the
scales, the state, the weights and every per-row value stay float32, float64 is never downcast, and
the casts are part of the autograd graph (gradients come back in float32). Because it is a dispatcher
implementation, it holds in a compiled step too. (``torch.library.register_autocast`` would cast every
float32 argument, the scale and the state included, and change the numbers.)

Only this module and the backends' op implementations see the flat argument lists; everything else
passes the dataclasses. Because the ops have fake (meta) implementations and registered autograd,
``torch.compile`` traces them without graph breaks and ``torch.library.opcheck`` checks each.
"""
from __future__ import annotations

from typing import Callable

import torch

from .epilogue import loss_and_slopes
from .inputs import (TEMPERATURES, TileInputs, Weights, accumulation_dtype, as_args, embedding_fields, from_args,
                     n_args, schema_fields)

NAMESPACE = "drrho"

_TILE_FIELDS = schema_fields(TileInputs)
_WEIGHT_FIELDS = schema_fields(Weights)
_N_TILE, _N_WEIGHT = n_args(TileInputs), n_args(Weights)


def _args(pairs) -> str:
    return ", ".join(f"{kind} {name}" for name, kind in pairs)


TILE_ARGS = _args(_TILE_FIELDS)
WEIGHT_ARGS = _args(_WEIGHT_FIELDS)
FWD_SCHEMA = f"({TILE_ARGS}) -> (Tensor stats, Tensor margin, Tensor positives)"
BWD_SCHEMA = (f"(Tensor gain, Tensor? col_gain, Tensor? dgain, Tensor? col_dgain, {TILE_ARGS}, {WEIGHT_ARGS}, "
              "bool column_grads) -> (Tensor d_img, Tensor d_txt, Tensor d_img_all, Tensor d_txt_all)")
LOSS_SCHEMA = (f"(Tensor wdsum, Tensor? h, Tensor? h_ds, Tensor u_new, Tensor? wsum, Tensor? s_img, Tensor? s_txt, "
               f"{TILE_ARGS}, {WEIGHT_ARGS}, float[] form, str backend) -> Tensor")

_library = torch.library.Library(NAMESPACE, "FRAGMENT")
_defined: set[str] = set()


def tiles_of(args) -> TileInputs:
    return from_args(TileInputs, args[:_N_TILE])


def weights_of(args) -> Weights:
    return from_args(Weights, args[_N_TILE:_N_TILE + _N_WEIGHT])


def no_column_grads(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a backward returns for ``d_img_all, d_txt_all`` when they were not asked for."""
    return img.new_empty((0, img.shape[1])), txt.new_empty((0, txt.shape[1]))


# ---------------------------------------------------------------------------------------------
# Per-backend ops: definition, fake implementations, Python implementations.

def _fake_fwd(*args):
    tiles = tiles_of(args)
    acc, rows = accumulation_dtype(tiles.img.dtype), tiles.batch
    return (tiles.img.new_empty((2, tiles.n_stats, rows), dtype=acc), tiles.img.new_empty(rows, dtype=acc),
            tiles.img.new_empty((2, rows), dtype=acc))


def _fake_bwd(gain, col_gain, dgain, col_dgain, *args):
    tiles, column_grads = tiles_of(args), args[-1]
    if column_grads:
        cols = (torch.empty_like(tiles.img_all), torch.empty_like(tiles.txt_all))
    else:
        cols = no_column_grads(tiles.img, tiles.txt)
    return torch.empty_like(tiles.img), torch.empty_like(tiles.txt), *cols


# ---------------------------------------------------------------------------------------------
# Autocast: the embeddings, and only they, at the autocast dtype.

AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
HALF_DTYPES = (torch.float16, torch.bfloat16)
_EMBEDDINGS = [i for i, (name, _) in enumerate(_TILE_FIELDS) if name in embedding_fields(TileInputs)]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The half dtype float32 embeddings are computed in on ``device_type`` now (None outside autocast)."""
    if device_type in AUTOCAST_KEYS and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in HALF_DTYPES else None
    return None


def cast_embeddings(args: list, lead: int, dtype: torch.dtype) -> list:
    """``args`` with the float32 embeddings of the tiles (starting at ``lead``) cast to ``dtype``; a tensor
    passed twice (one process: ``img_all is img``) is cast once and stays one tensor."""
    args, done = list(args), {}
    for i in _EMBEDDINGS:
        x = args[lead + i]
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            if id(x) not in done:
                done[id(x)] = x.to(dtype)
            args[lead + i] = done[id(x)]
    return args


def autocast_tiles(tiles: TileInputs) -> TileInputs:
    """``tiles`` as the ops see them under the current autocast: for the paths that cast before the ops (the
    dense reference, which is no op; the distributed step, which then gathers half the bytes)."""
    dtype = autocast_dtype(tiles.img.device.type)
    if dtype is None:
        return tiles
    return from_args(TileInputs, cast_embeddings(as_args(tiles), 0, dtype))


def autocast_embeddings(*embeddings):
    """The float32 embeddings among ``embeddings`` at the current autocast dtype (the others as they are)."""
    dtype = autocast_dtype(embeddings[0].device.type)
    if dtype is None:
        return embeddings
    return tuple(x.to(dtype) if x is not None and x.dtype == torch.float32 else x for x in embeddings)


def _register_autocast(name: str, lead: int) -> None:
    """The ``Autocast<Device>`` implementations of op ``name`` whose tiles start at argument ``lead``."""
    for device_type, key in AUTOCAST_KEYS.items():
        below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, _device_type=device_type, _below=below):
            dtype = torch.get_autocast_dtype(_device_type)
            if dtype in HALF_DTYPES:
                args = cast_embeddings(args, lead, dtype)
            with torch._C._ExcludeDispatchKeyGuard(_below):
                return getattr(torch.ops.drrho, name).default(*args)

        _library.impl(name, kernel, key)


def define(backend: str) -> None:
    """Define ``drrho::<backend>_fwd`` / ``_bwd`` with their fake and autocast implementations (once)."""
    if backend in _defined:
        return
    for suffix, schema, fake, lead in (("fwd", FWD_SCHEMA, _fake_fwd, 0), ("bwd", BWD_SCHEMA, _fake_bwd, 4)):
        _library.define(f"{backend}_{suffix}{schema}")
        torch.library.register_fake(f"{NAMESPACE}::{backend}_{suffix}", fake, lib=_library)
        _register_autocast(f"{backend}_{suffix}", lead)
    _defined.add(backend)


def register(backend: str, forward: Callable | None = None, backward: Callable | None = None,
             dispatch_keys=("CompositeExplicitAutograd",)) -> None:
    """Define the op pair of ``backend`` and register its Python implementations, if given.

    ``forward(tiles: TileInputs) -> (stats, margin, positives)``; ``backward(gains, tiles, weights,
    column_grads) -> (d_img, d_txt, d_img_all | None, d_txt_all | None)`` with ``gains`` the tuple
    ``(gain, col_gain, dgain, col_dgain)``. The C++ backend passes neither: its library implements the
    ops it finds defined here.
    """
    define(backend)
    if forward is None:
        return

    def fwd_impl(*args):
        return forward(tiles_of(args))

    def bwd_impl(gain, col_gain, dgain, col_dgain, *args):
        d_img, d_txt, d_img_all, d_txt_all = backward((gain, col_gain, dgain, col_dgain), tiles_of(args),
                                                      weights_of(args), args[-1])
        if d_img_all is None:
            d_img_all, d_txt_all = no_column_grads(d_img, d_txt)
        return d_img, d_txt, d_img_all, d_txt_all

    for key in dispatch_keys:
        _library.impl(f"{backend}_fwd", fwd_impl, key)
        _library.impl(f"{backend}_bwd", bwd_impl, key)


_handles: dict = {}


def op(backend: str, which: str):
    """The op handle ``drrho::<backend>_<which>`` (``which``: "fwd" or "bwd"), looked up once."""
    handle = _handles.get((backend, which))
    if handle is None:
        handle = _handles[backend, which] = getattr(getattr(torch.ops, NAMESPACE), f"{backend}_{which}").default
    return handle


def forward(backend: str, tiles: TileInputs):
    """``(stats, margin, positives)`` of ``backend``'s forward op on (detached) tiles."""
    return op(backend, "fwd")(*as_args(tiles))


def backward(backend: str, gains, tiles: TileInputs, weights: Weights, column_grads: bool):
    """``(d_img, d_txt, d_img_all, d_txt_all)`` of ``backend``'s backward op; ``gains`` is
    ``(gain, col_gain, dgain, col_dgain)`` (the last three may be None)."""
    return op(backend, "bwd")(*gains, *as_args(tiles), *as_args(weights), column_grads)


# ---------------------------------------------------------------------------------------------
# The one op with autograd: the loss, whose backward holds the weights and u constant.

_library.define("loss" + LOSS_SCHEMA)

_LEAD = 7                            # wdsum, h, h_ds, u_new, wsum, s_img, s_txt
_TILE_NAMES = [name for name, _ in _TILE_FIELDS]
_WEIGHT_NAMES = [name for name, _ in _WEIGHT_FIELDS]
_IMG, _IMG_ALL, _SCALE = (_LEAD + _TILE_NAMES.index(n) for n in ("img", "img_all", "scale"))
_SCALARS = _LEAD + _TILE_NAMES.index("scalars")      # the tiles' one float[] argument, after their tensors
_WEIGHTS = _LEAD + _N_TILE                          # where the weights' arguments start
_COL_SCALE, _LSE_Q = (_WEIGHTS + _WEIGHT_NAMES.index(n) for n in ("col_scale", "lse_q"))
_FORM = _WEIGHTS + _N_WEIGHT                        # the form's float[] argument
_S_IMG, _S_TXT = 5, 6
_ROWS_ARE_COLUMNS = [name for name, _ in TileInputs.OP_SCALARS].index("columns_are_rows")
# what can carry a gradient (the autograd Function's inputs): img, txt, img_all, txt_all, the rows' scales,
# s_img, s_txt
_DIFFERENTIABLE = (_IMG, _IMG + 1, _IMG_ALL, _IMG_ALL + 1, _SCALE, _S_IMG, _S_TXT)
_NO_TILES = (None,) * (_SCALARS - _LEAD)


def _loss_and_slopes(args):
    """``core.epilogue.loss_and_slopes`` of the op's arguments."""
    kind, multiply_tau, rho, distill_weight = TEMPERATURES[int(args[_FORM][0])], bool(args[_FORM][1]), *args[_FORM][2:]
    return loss_and_slopes(kind, multiply_tau, args[_S_IMG], args[_S_TXT], args[0], args[3], rho,
                           args[_IMG_ALL].shape[0], h=args[1], wsum=args[4], distill_weight=distill_weight)


@torch.library.impl(_library, "loss", "CompositeExplicitAutograd")
def _loss_impl(*args):
    return _loss_and_slopes(args)[0]


@torch.library.register_fake(f"{NAMESPACE}::loss", lib=_library)
def _loss_fake(wdsum, *args):
    return wdsum.new_empty(())


def _loss_backward(ctx, grad_out):
    """The embeddings' gradients from the backend's backward op, the scales' from the slopes. Works on the
    flat arguments (no dataclass is rebuilt: this runs at every step)."""
    args = list(ctx.args)
    args[_LEAD:_SCALARS] = ctx.saved_tensors
    d_phi, d_h, direct = ctx.slopes
    needs = ctx.needs_input_grad[1:]                   # in the order of _DIFFERENTIABLE
    wdsum, h_ds, scale = args[0], args[2], args[_SCALE]
    grad = grad_out.to(wdsum.dtype)
    grad_phi = d_phi * grad
    distill = args[_LSE_Q] is not None
    grad_h = d_h * grad if distill else None
    grads = [None] * len(_DIFFERENTIABLE)
    if any(needs[:4]):
        column_grads = not ctx.rows_are_columns and (needs[2] or needs[3])
        col_scale = args[_COL_SCALE]
        gains = (grad_phi * scale, None if col_scale is None else grad_phi * col_scale,
                 grad_h * scale if distill else None, grad_h * col_scale if distill and col_scale is not None else None)
        d_img, d_txt, d_img_all, d_txt_all = op(ctx.backend, "bwd")(*gains, *args[_LEAD:_FORM], column_grads)
        grads[0], grads[1] = d_img, d_txt
        if column_grads:
            grads[2], grads[3] = d_img_all, d_txt_all
    if needs[4]:
        # phi_k = sum_i w d with d = scale * a and w constant: d phi_k / d scale[k, i] = wdsum[k, i] / scale[k, i];
        # the distillation term's own derivative comes from the epilogue (h_ds).
        grad_scale = grad_phi * wdsum / scale
        grads[4] = grad_scale.add_(grad_h * h_ds) if h_ds is not None else grad_scale
    if direct is not None:                             # the scales' own terms (rho, u), not through phi
        s_img, s_txt = args[_S_IMG], args[_S_TXT]
        if s_txt is None and needs[5]:
            grads[5] = (direct * grad).to(s_img.dtype)
        elif s_txt is not None:
            grads[5] = (direct[0] * grad).to(s_img.dtype) if needs[5] else None
            grads[6] = (direct[1] * grad).to(s_txt.dtype) if needs[6] else None
    return None, *grads


class _Loss(torch.autograd.Function):
    """The loss op's autograd: the forward (the loss and its slopes), the backward :func:`_loss_backward`.
    Registered as the op's ``Autograd`` kernel: what ``torch.library.register_autograd`` does, without its
    per-call ``fill_defaults`` over the schema (O(arguments^2) Python objects: 0.2 ms a call at 30
    arguments, as much as the rest of a small step). Its inputs are the op's arguments (as one tuple) and,
    again, the seven that can carry a gradient; the tiles' tensors (what the caller holds) are saved for the
    backward, the step's own per-row values (weights, state) kept on ``ctx``."""

    @staticmethod
    def forward(ctx, args, *differentiable):
        loss, *slopes = _loss_and_slopes(args)
        ctx.args, ctx.slopes = args[:_LEAD] + _NO_TILES + args[_SCALARS:], slopes
        ctx.backend, ctx.rows_are_columns = args[-1], bool(args[_SCALARS][_ROWS_ARE_COLUMNS])
        ctx.save_for_backward(*args[_LEAD:_SCALARS])
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return _loss_backward(ctx, grad_out)


def _loss_autograd(*args):
    return _Loss.apply(args, *(args[i] for i in _DIFFERENTIABLE))


_library.impl("loss", _loss_autograd, "Autograd")
_register_autocast("loss", _LEAD)


def loss_args(backend: str, wdsum: torch.Tensor, tiles: TileInputs, weights: Weights, *, u_new: torch.Tensor,
              temperature, rho: float, distill_weight: float = 0.0, wsum=None, h=None, h_ds=None) -> tuple:
    """The arguments of ``drrho::loss`` (its schema's order) for :func:`loss`."""
    t = temperature
    s_img, s_txt = (None, None) if t.kind == "individual" else (
        t.scale_img, None if t.kind == "global" else t.scale_txt)            # 0-d (validate.check_scales)
    form = [float(TEMPERATURES.index(t.kind)), float(t.multiply_tau), float(rho), float(distill_weight)]
    return (wdsum, h, h_ds, u_new, wsum, s_img, s_txt, *as_args(tiles), *as_args(weights), form, backend)


def loss(backend: str, wdsum: torch.Tensor, tiles: TileInputs, weights: Weights, **form) -> torch.Tensor:
    """The scalar loss of the fused terms (``core.epilogue.loss_and_slopes``), differentiable in the embeddings and
    scales of ``tiles`` and ``temperature`` (weights and ``u`` constant; ``h`` the distillation
    cross-entropies, ``h_ds`` their derivative in the scale; ``wsum`` the per-sample temperatures' value);
    ``form``: the keywords of :func:`loss_args`."""
    return torch.ops.drrho.loss.default(*loss_args(backend, wdsum, tiles, weights, **form))
