"""The checked problem of one loss evaluation, as structured values (SPEC.md notation in brackets).

``LossOptions``
    the options of a call (gamma, eps, rho, the loss form, distillation, backend, per-sample outputs,
    the per-sample temperatures' hyper-parameters): one frozen value, checked once where the call enters
    (``loss.validate.check_options``: the functional call, the module's constructor). The ranks of a
    distributed step agree on every one of its fields (``parallel.schemes`` derives what it compares
    from them, :func:`option_items`).
``LossInputs``
    what :func:`drrho_kernels.drrho_clip_loss` was given, checked (``loss/validate.py`` builds it): the
    kernel inputs below, the logit scale as the caller passed it, the state ``u`` before the step, the
    options and the backend that runs (resolved by ``loss/functional.py``). It flows from the functional
    layer through the backend to the launchers.
``TileInputs``
    what the fused kernels read to build their tiles: rows, columns, reference embeddings, the
    per-row scales of both directions, and the kernels' scalar options. Its tensor fields, in order,
    are the leading arguments of every fused op, and its scalar fields travel as ONE ``float[] scalars``
    argument (``core/ops.py`` derives the schemas from the fields; a new scalar adds no op argument), so
    a launcher receives one value.
``Weights``
    what the backward needs besides the tiles, known once the epilogue (``core/epilogue.finish``) has run:
    each anchor's weight normaliser and weight sum, the pair margins and, for a fold, the column
    anchors' own (``col_*``). Its fields follow ``TileInputs`` in the backward op's schema.

Directions are indexed ``k = 0`` (image anchors against text columns, SPEC's ``I``) and ``k = 1``
(text anchors against image columns, ``T``). A backward weight of anchor ``i`` of direction ``k`` is
``w_kij = exp(scale[k, i] * (S_kij - margin[i]) - log_norm[k, i])``; SPEC's global form has
``scale[k, i] = s`` and ``log_norm = u_new``.

Recipes (docs/DESIGN.md, "Adding an input"): a new option is a field of ``LossOptions`` and its check;
a new per-row input of the loss is a field here, its check, and the place that uses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

Tensor = torch.Tensor

TEMPERATURES = ("global", "per_direction", "individual")
BACKENDS = ("auto", "torch", "triton", "cpp", "reference")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32 (SPEC: Numerics)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Options

@dataclass(frozen=True)
class TauOptions:
    """Hyper-parameters of the per-sample temperatures' own update (SPEC 2.1, "individual")."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    tau_min: float
    tau_max: float
    grad_clamp: float
    epoch: int


@dataclass(frozen=True)
class LossOptions:
    """The options of one loss evaluation. Build it with ``loss.validate.check_options`` (which checks every
    field and names the argument in its message); the defaults are the authors' (``SogCLRLoss``)."""

    gamma: float = 0.8               # moving-average rate in (0, 1]
    eps: float = 1e-14               # floor inside the log, > 0
    rho: float = 8.0                 # DRO radius term, >= 0
    multiply_tau: bool = True        # the authors' loss form (global forms), else A_I + A_T
    distill_weight: float = 0.0      # lambda of SPEC 2.2 (> 0 needs a reference model)
    distill_scale: float = 100.0     # t_d, the teacher's logit scale
    per_sample: bool = False         # return the per-anchor values (SPEC 2.3)
    backend: str = field(default="auto", metadata={"choices": BACKENDS})
    # the per-sample temperatures' hyper-parameters (temperature="individual"), else None
    tau: TauOptions | None = field(default=None, metadata={"nested": TauOptions})


def option_items(value, cls=None, prefix: str = "") -> list[tuple[str, object, tuple | None]]:
    """``(name, value, choices)`` of every field of an options dataclass, nested ones by dotted name after
    a ``(name, given, None)`` entry (their values None when the nested value is): the same names, in the
    same order, for every value of ``cls``. What the ranks of a step agree on."""
    out = []
    for f in fields(cls or type(value)):
        v = None if value is None else getattr(value, f.name)
        nested = f.metadata.get("nested")
        if nested is not None:
            out += [(prefix + f.name, v is not None, None)] + option_items(v, nested, prefix + f.name + ".")
        else:
            out.append((prefix + f.name, v, f.metadata.get("choices")))
    return out


# ---------------------------------------------------------------------------------------------
# The kernels' inputs

def _tensor(schema_type: str = "Tensor", embedding: bool = False):
    """A tensor argument of the fused ops (``embedding``: cast under autocast, ``core/ops.py``)."""
    return field(metadata={"schema": schema_type, "embedding": embedding})


def _scalar():
    """A scalar option of the kernels: packed with the others into the ops' one ``float[] scalars``."""
    return field(metadata={"schema": "scalar"})


@dataclass(frozen=True)
class TileInputs:
    """The kernels' view of the problem. ``columns_are_rows``: one process, ``img_all is img``, N = B."""

    img: Tensor = _tensor(embedding=True)                       # [B, d]   x   rows (anchors)
    txt: Tensor = _tensor(embedding=True)                       # [B, d]   t
    img_all: Tensor = _tensor(embedding=True)                   # [N, d]   X   columns (the global batch)
    txt_all: Tensor = _tensor(embedding=True)                   # [N, d]   T
    ref_img: Tensor | None = _tensor("Tensor?", True)           # [B, dr]  xr  reference rows
    ref_txt: Tensor | None = _tensor("Tensor?", True)           # [B, dr]  tr
    ref_img_all: Tensor | None = _tensor("Tensor?", True)       # [N, dr]  Xr  reference columns
    ref_txt_all: Tensor | None = _tensor("Tensor?", True)       # [N, dr]  Tr
    scale: Tensor = _tensor()                       # [2, B]   s of each row anchor, per direction (acc dtype)
    offset: int = _scalar()                         # row i is column p(i) = offset + i; N: no row is a column
    columns_are_rows: bool = _scalar()
    distill_scale: float = _scalar()                # t_d, the teacher's scale (with_distill)
    with_distill: bool = _scalar()                  # also the student and teacher statistics (SPEC 2.2)
    with_alone: bool = _scalar()                    # also the target-alone and reference-alone statistics

    @property
    def batch(self) -> int:
        return self.img.shape[0]

    @property
    def n_columns(self) -> int:
        return self.img_all.shape[0]

    @property
    def has_ref(self) -> bool:
        return self.ref_img is not None

    @property
    def ref_dim(self) -> int:
        return self.ref_img.shape[1] if self.ref_img is not None else 0

    @property
    def n_stats(self) -> int:
        """Rows of the forward's statistics per direction (``STATS``)."""
        return len(STATS) if self.with_distill or self.with_alone else 3

    @property
    def acc_dtype(self) -> torch.dtype:
        return accumulation_dtype(self.img.dtype)


# The forward's statistics per direction and anchor, over the anchor's negatives (``stats[k, r, i]``). With
# y = <row, col> the target's and z = <ref row, ref col> the reference's similarity, y_i, z_i the pair's own:
#   M, E, F        d = s (y - z - (y_i - z_i))              the DRRho statistics (always)
#   Mt, Et, Ft     d = s (y - y_i)                           the target alone (distillation's student too)
#   Mp, Ep, Gp     d = t_d (z - z_i), Gp = sum exp(d - Mp) y  the teacher (with_distill)
#   Mr, Er, Fr     d = s (z - z_i)                           the reference alone (with_alone)
# with the online form M = max d, E = sum exp(d - M), F = sum exp(d - M) d. Rows 3.. only when asked
# (with_distill or with_alone; groups not asked for may hold anything).
STATS = ("M", "E", "F", "Mt", "Et", "Ft", "Mp", "Ep", "Gp", "Mr", "Er", "Fr")


@dataclass(frozen=True)
class Weights:
    """Per-anchor weight description of the backward (``[2, B]``: direction, row; ``[2, N]``: direction, column).

    ``col_*`` describe the column anchors for a fold (the distributed scheme that gathers ``u``): the
    gradient of every local sample also gets the terms of every global anchor that has it as a
    negative. In one process (``columns_are_rows``) they are None: the fold uses the rows' own.
    """

    log_norm: Tensor = _tensor()                    # [2, B]  w = exp(scale (S - m) - log_norm)
    wsum: Tensor = _tensor()                        # [2, B]  sum_j w_kij
    margin: Tensor = _tensor()                      # [B]     m_i = <x_i, t_i> - <xr_i, tr_i>
    col_scale: Tensor | None = _tensor("Tensor?")   # [2, N]  the column anchors' scales
    col_log_norm: Tensor | None = _tensor("Tensor?")    # [2, N]
    col_margin: Tensor | None = _tensor("Tensor?")  # [N]
    lse_q: Tensor | None = _tensor("Tensor?")       # [2, B]  distillation: log-sum-exp of s y over all columns
    lse_p: Tensor | None = _tensor("Tensor?")       # [2, B]  ... and of t_d z (the teacher)
    col_lse_q: Tensor | None = _tensor("Tensor?")   # [2, N]  the fold's column anchors' (gather_u)
    col_lse_p: Tensor | None = _tensor("Tensor?")   # [2, N]

    @property
    def fold(self) -> bool:
        return self.col_log_norm is not None

    @property
    def distill(self) -> bool:
        return self.lse_q is not None


# ---------------------------------------------------------------------------------------------
# Temperatures and the whole problem

@dataclass(frozen=True)
class TauState:
    """Per-sample temperature state of the anchors, ``[2, B]`` each (direction, row), before the step:
    the temperatures, the running bounds ``b`` and the Adam moments (the moving averages are
    ``LossInputs.u_img``/``u_txt``, linear-domain for this form)."""

    tau: Tensor
    bound: Tensor
    m: Tensor
    v: Tensor

    def rows(self, index) -> "TauState":
        return TauState(*(x[:, index] for x in (self.tau, self.bound, self.m, self.v)))


@dataclass(frozen=True)
class Temperature:
    """The temperature form. ``global``: one scale ``s`` (``scale_img is scale_txt``); ``per_direction``:
    ``s_I`` for image anchors, ``s_T`` for text anchors; ``individual``: one temperature per sample and
    direction (``state``; hyper-parameters ``LossOptions.tau``), no logit scale. ``multiply_tau``: the
    authors' loss form (global forms only; SPEC 2.1)."""

    kind: str
    multiply_tau: bool = True
    scale_img: Tensor | None = None     # 0-dim, may require grad
    scale_txt: Tensor | None = None
    state: TauState | None = None


@dataclass(frozen=True)
class LossInputs:
    """Checked inputs of one loss evaluation."""

    tiles: TileInputs
    temperature: Temperature    # the form; tiles.scale holds its scales per row
    u_img: Tensor               # [B] u^I before the step (float32 or float64)
    u_txt: Tensor               # [B] u^T
    options: LossOptions
    backend: str = ""           # the backend that runs ("reference", "torch", "cpp", "triton"), once resolved

    @property
    def batch(self) -> int:
        return self.tiles.batch

    @property
    def n_columns(self) -> int:
        return self.tiles.n_columns

    @property
    def device(self) -> torch.device:
        return self.tiles.img.device

    @property
    def acc_dtype(self) -> torch.dtype:
        return self.tiles.acc_dtype

    @property
    def logit_scale(self) -> Tensor:
        """The global form's one scale ``s`` (0-dim)."""
        return self.temperature.scale_img

    @property
    def u_old(self) -> Tensor:
        """``[2, B]``: the state of both directions in the accumulation dtype."""
        return torch.stack([self.u_img, self.u_txt]).to(self.acc_dtype)


# ---------------------------------------------------------------------------------------------
# The op boundary: dataclasses <-> flat argument lists

def schema_fields(cls) -> list[tuple[str, str]]:
    """``(name, schema type)`` of the op arguments of a dataclass, in order: its tensors, then (if it has
    scalar fields) one ``float[] scalars``."""
    out = [(f.name, f.metadata["schema"]) for f in fields(cls) if f.metadata["schema"] != "scalar"]
    return out + ([("scalars", "float[]")] if scalar_fields(cls) else [])


def scalar_fields(cls) -> list[str]:
    """The names of the scalar fields of a dataclass, in the order of its ``scalars`` list."""
    return [f.name for f in fields(cls) if f.metadata["schema"] == "scalar"]


def embedding_fields(cls) -> list[str]:
    """The tensor fields that hold embeddings (what autocast casts)."""
    return [f.name for f in fields(cls) if f.metadata.get("embedding")]


_SCALAR_TYPES = {"int": int, "bool": bool, "float": float}


def _set_op_layout(cls):
    """Record, once, the names of ``cls``'s tensor and scalar fields and the scalars' types as class
    attributes (``torch.compile`` reads those; it cannot call ``dataclasses.fields`` on a class)."""
    cls.OP_TENSORS = tuple(f.name for f in fields(cls) if f.metadata["schema"] != "scalar")
    cls.OP_SCALARS = tuple((f.name, _SCALAR_TYPES[f.type]) for f in fields(cls) if f.metadata["schema"] == "scalar")


for _cls in (TileInputs, Weights):
    _set_op_layout(_cls)


def as_args(value) -> tuple:
    """The op arguments of a dataclass value, in schema order (the op boundary's flattening)."""
    tensors = tuple(getattr(value, name) for name in value.OP_TENSORS)
    if not value.OP_SCALARS:
        return tensors
    return tensors + ([float(getattr(value, name)) for name, _ in value.OP_SCALARS],)


def from_args(cls, args) -> object:
    """The dataclass value of its op arguments (inverse of :func:`as_args`)."""
    if not cls.OP_SCALARS:
        return cls(*args)
    scalars = {name: kind(v) for (name, kind), v in zip(cls.OP_SCALARS, args[-1])}
    return cls(*args[:-1], **scalars)


def n_args(cls) -> int:
    return len(cls.OP_TENSORS) + (1 if cls.OP_SCALARS else 0)
