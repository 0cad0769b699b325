"""The checked problem of one loss evaluation, as structured values (SPEC.md notation in brackets).

``LossInputs``
    what :func:`drrho_kernels.drrho_clip_loss` was given, checked (``_validate.py`` builds it): the
    kernel inputs below, the logit scale as the caller passed it, the state ``u`` before the step and
    the options. It flows from the functional layer through the backend to the launchers.
``TileInputs``
    what the fused kernels read to build their tiles: rows, columns, reference embeddings, the
    per-row scales of both directions, the offset. Its fields, in order, are the leading arguments
    of every fused op (``ops.py`` derives the schemas from them) and a launcher receives one value.
``Weights``
    what the backward needs besides the tiles, known once the epilogue (``_math.finish``) has run:
    each anchor's weight normaliser and weight sum, the pair margins and, for a fold, the column
    anchors' own (``col_*``). Its fields follow ``TileInputs`` in the backward op's schema.

Directions are indexed ``k = 0`` (image anchors against text columns, SPEC's ``I``) and ``k = 1``
(text anchors against image columns, ``T``). A backward weight of anchor ``i`` of direction ``k`` is
``w_kij = exp(scale[k, i] * (S_kij - margin[i]) - log_norm[k, i])``; SPEC's global form has
``scale[k, i] = s`` and ``log_norm = u_new``.

To add a per-row input: a field here (with its schema type), the kernels that read it, and the
place that fills it (``_validate.py`` or ``_math.py``). Nothing in between changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ._math import accumulation_dtype

Tensor = torch.Tensor


def _arg(schema_type: str):
    """A field that is an argument of the fused ops, with its ``torch.library`` schema type."""
    return field(metadata={"schema": schema_type})


@dataclass(frozen=True)
class TileInputs:
    """The kernels' view of the problem. ``columns_are_rows``: one process, ``img_all is img``, N = B."""

    img: Tensor = _arg("Tensor")                    # [B, d]   x   rows (anchors)
    txt: Tensor = _arg("Tensor")                    # [B, d]   t
    img_all: Tensor = _arg("Tensor")                # [N, d]   X   columns (the global batch)
    txt_all: Tensor = _arg("Tensor")                # [N, d]   T
    ref_img: Tensor | None = _arg("Tensor?")        # [B, dr]  xr  reference rows
    ref_txt: Tensor | None = _arg("Tensor?")        # [B, dr]  tr
    ref_img_all: Tensor | None = _arg("Tensor?")    # [N, dr]  Xr  reference columns
    ref_txt_all: Tensor | None = _arg("Tensor?")    # [N, dr]  Tr
    scale: Tensor = _arg("Tensor")                  # [2, B]   s of each row anchor, per direction (acc dtype)
    offset: int = _arg("int")                       # row i is column p(i) = offset + i; N: no row is a column
    columns_are_rows: bool = _arg("bool")
    distill_scale: float = _arg("float")            # t_d, the teacher's scale (with_distill)
    with_distill: bool = _arg("bool")               # also the student and teacher statistics (SPEC 2.2)
    with_alone: bool = _arg("bool")                 # also the target-alone and reference-alone statistics

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

    log_norm: Tensor = _arg("Tensor")               # [2, B]  w = exp(scale (S - m) - log_norm)
    wsum: Tensor = _arg("Tensor")                   # [2, B]  sum_j w_kij
    margin: Tensor = _arg("Tensor")                 # [B]     m_i = <x_i, t_i> - <xr_i, tr_i>
    col_scale: Tensor | None = _arg("Tensor?")      # [2, N]  the column anchors' scales
    col_log_norm: Tensor | None = _arg("Tensor?")   # [2, N]
    col_margin: Tensor | None = _arg("Tensor?")     # [N]
    lse_q: Tensor | None = _arg("Tensor?")          # [2, B]  distillation: log-sum-exp of s y over all columns
    lse_p: Tensor | None = _arg("Tensor?")          # [2, B]  ... and of t_d z (the teacher)
    col_lse_q: Tensor | None = _arg("Tensor?")      # [2, N]  the fold's column anchors' (gather_u)
    col_lse_p: Tensor | None = _arg("Tensor?")      # [2, N]

    @property
    def fold(self) -> bool:
        return self.col_log_norm is not None

    @property
    def distill(self) -> bool:
        return self.lse_q is not None


TEMPERATURES = ("global", "per_direction", "individual")


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
    direction (``state``, ``options``), no logit scale. ``multiply_tau``: the authors' loss form
    (global forms only; SPEC 2.1)."""

    kind: str
    multiply_tau: bool = True
    scale_img: Tensor | None = None     # 0-dim, may require grad
    scale_txt: Tensor | None = None
    state: TauState | None = None
    options: TauOptions | None = None


@dataclass(frozen=True)
class LossInputs:
    """Checked inputs of one loss evaluation."""

    tiles: TileInputs
    temperature: Temperature    # the form; tiles.scale holds its scales per row
    u_img: Tensor               # [B] u^I before the step (float32 or float64)
    u_txt: Tensor               # [B] u^T
    gamma: float
    eps: float
    rho: float
    backend: str                # resolved: "reference", "torch", "cpp" or "triton"
    distill_weight: float = 0.0 # lambda of SPEC 2.2 (tiles.distill_scale is the teacher's scale)
    per_sample: bool = False    # return the per-anchor values (SPEC 2.3)

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


def schema_fields(cls) -> list[tuple[str, str]]:
    """``(name, schema type)`` of a dataclass of op arguments, in order."""
    return [(f.name, f.metadata["schema"]) for f in fields(cls)]


def as_args(value) -> tuple:
    """The field values of an op-argument dataclass, in schema order (the op boundary's flattening)."""
    return tuple(getattr(value, f.name) for f in fields(value))
