"""Every argument check of the public entry points, and its message.

:func:`check_options` builds the one :class:`~drrho_kernels.core.inputs.LossOptions` value of a call (the
functional call, or once in the module's constructor). :func:`validate` checks the tensors of
:func:`drrho_kernels.drrho_clip_loss` against them before any kernel runs and returns a
:class:`~drrho_kernels.core.inputs.LossInputs`: the checked, normalised arguments that the backends receive
and never re-check (the backend that runs is resolved by ``loss/functional.py``, not here). It is two
steps, which the distributed layer calls apart: :func:`check_rows` (everything one process knows: its
rows, scale, state and options) and :func:`check_columns` (the columns against those rows).

Messages name the argument, what was expected and what was given. Shape, dtype and device
checks are free and always run. Value checks (positive and finite ``logit_scale``, finite
embeddings, sample indices in range) read tensor data: they run on CPU tensors; on accelerator
tensors the embedding and scale checks would cost a device synchronisation per step, so there a
non-finite embedding or a non-positive scale propagates into a NaN loss and NaN ``u`` (which the
moving-average rule treats as unset at the next step) instead of raising (SPEC 3.2). Under
``torch.compile`` the data-dependent checks are skipped so that the graph has no break.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import replace

import numpy as np
import torch

from ..core.inputs import (BACKENDS, LossInputs, LossOptions, TauOptions, TauState, Temperature, TileInputs,
                           accumulation_dtype)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"


def _data_checks_enabled(t: torch.Tensor) -> bool:
    """Value checks read data: only on the CPU, and never inside a torch.compile graph."""
    return t.device.type == "cpu" and not _compiling()


_compiling = torch.compiler.is_compiling


def check_tensor(name: str, x, *, ndim: int, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(x)}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {_describe(x)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {_describe(x)}")
    return x


def check_same_device(reference_name: str, reference: torch.Tensor, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} (the device of "
                             f"{reference_name}), got {_describe(x)}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if _data_checks_enabled(x) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} non-finite entries in {_describe(x)}")


def check_all_finite(**tensors) -> None:
    """:func:`check_finite` of every named tensor (None: absent) with one read of the host: the sum of their
    norms is finite exactly when every entry is, unless finite values overflow it; only then, or when one
    is not finite, each tensor is checked by itself to name it (a small step's checks cost one op, not 24)."""
    given = [x for x in tensors.values() if x is not None and _data_checks_enabled(x)]
    if not given:
        return
    with torch.no_grad():
        total = float(torch.stack(torch._foreach_norm(given)).sum())
    if not math.isfinite(total):
        for name, x in tensors.items():
            if x is not None:
                check_finite(name, x)


def check_real(name: str, value, *, low: float, high: float = math.inf, low_open: bool,
               high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {_describe(value)}")
    value = float(value)
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if math.isnan(value) or not (lo_ok and hi_ok):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{name}: expected a value in {lb}{low}, {high}{hb}, got {value!r}")
    return value


def _check_pair(name_a: str, a, name_b: str, b):
    if (a is None) != (b is None):
        given, missing = (name_a, name_b) if a is not None else (name_b, name_a)
        raise ValueError(f"{given} and {missing}: expected both or neither, got {given} without {missing}")


def _constant(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` detached, in ``dtype``; itself when it is already (no op: a small step's time is its ops)."""
    x = x.detach() if x.requires_grad else x
    return x if x.dtype == dtype else x.to(dtype)


def _check_rows(name: str, x: torch.Tensor, rows: int, width: int, width_name: str) -> None:
    if x.shape[0] != rows or x.shape[1] != width:
        raise ValueError(f"{name}: expected shape ({rows}, {width}) (rows x {width_name}), "
                         f"got {_describe(x)}")


def check_logit_scale(logit_scale, device: torch.device, dtype: torch.dtype, name: str = "logit_scale") -> torch.Tensor:
    """One scale ``s = 1/tau > 0``: a Python real or a 1-element floating tensor; a 0-dim tensor."""
    what = "a positive float or a 1-element floating tensor"
    if isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        value = check_real(name, logit_scale, low=0.0, low_open=True)
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite value > 0 (s = 1/tau), got {value!r}")
        # a fill, not a copy from the host: no wait on an accelerator (SPEC 3.2)
        return torch.full((), value, dtype=accumulation_dtype(dtype), device=device)
    if not isinstance(logit_scale, torch.Tensor):
        raise TypeError(f"{name}: expected {what}, got {_describe(logit_scale)}")
    if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
        raise ValueError(f"{name}: expected a 1-element floating tensor, got {_describe(logit_scale)}")
    if logit_scale.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of img) or a "
                         f"Python float, got {_describe(logit_scale)}")
    if _data_checks_enabled(logit_scale):
        value = logit_scale.item()
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite value > 0 (s = 1/tau), got {value!r}")
    return logit_scale if logit_scale.dim() == 0 else logit_scale.reshape(())


def check_scales(logit_scale, device: torch.device, dtype: torch.dtype, multiply_tau) -> Temperature:
    """A global scale ``s``, or a pair ``(s_img, s_txt)`` (per direction, SPEC 2.1)."""
    if isinstance(logit_scale, (tuple, list)):
        if len(logit_scale) != 2:
            raise ValueError(f"logit_scale: expected one scale or a pair (s_img, s_txt), got a "
                             f"{type(logit_scale).__name__} of {len(logit_scale)}")
        s_img, s_txt = (check_logit_scale(v, device, dtype, f"logit_scale[{k}]") for k, v in enumerate(logit_scale))
        return Temperature("per_direction", multiply_tau, s_img, s_txt)
    if logit_scale is None:
        raise TypeError("logit_scale: expected a positive float, a 1-element floating tensor or a pair "
                        "(s_img, s_txt) of them, got None")
    s = check_logit_scale(logit_scale, device, dtype)
    return Temperature("global", multiply_tau, s, s)


def check_tau_options(*, tau_lr, tau_betas, tau_eps, tau_range, tau_grad_clamp, tau_init=None,
                      epoch: int = 0) -> TauOptions:
    """The per-sample temperatures' hyper-parameters (module constructor and call alike)."""
    lr = check_real("tau_lr", tau_lr, low=0.0, low_open=True, high_open=True)
    if not isinstance(tau_betas, (tuple, list)) or len(tau_betas) != 2:
        raise TypeError(f"tau_betas: expected a pair (beta1, beta2), got {_describe(tau_betas)}")
    beta1, beta2 = (check_real(f"tau_betas[{k}]", b, low=0.0, high=1.0, low_open=False, high_open=True)
                    for k, b in enumerate(tau_betas))
    eps = check_real("tau_eps", tau_eps, low=0.0, low_open=True, high_open=True)
    if not isinstance(tau_range, (tuple, list)) or len(tau_range) != 2:
        raise TypeError(f"tau_range: expected a pair (tau_min, tau_max), got {_describe(tau_range)}")
    tau_min = check_real("tau_range[0]", tau_range[0], low=0.0, low_open=True, high_open=True)
    tau_max = check_real("tau_range[1]", tau_range[1], low=tau_min, low_open=False, high_open=True)
    clamp = check_real("tau_grad_clamp", tau_grad_clamp, low=0.0, low_open=True)
    if tau_init is not None:
        check_real("tau_init", tau_init, low=tau_min, high=tau_max, low_open=False)
    return TauOptions(lr, beta1, beta2, eps, tau_min, tau_max, clamp, check_int("epoch", epoch, low=0))


def check_tau_state(state, batch: int, device: torch.device) -> TauState:
    if not isinstance(state, TauState):
        raise TypeError(f"tau_state: expected a TauState, got {_describe(state)}")
    for name in ("tau", "bound", "m", "v"):
        x = check_tensor(f"tau_state.{name}", getattr(state, name), ndim=2, dtypes=STATE_DTYPES)
        if x.shape != (2, batch) or x.device != device:
            raise ValueError(f"tau_state.{name}: expected shape (2, {batch}) (direction, row) on {device}, "
                             f"got {_describe(x)}")
    if _data_checks_enabled(state.tau) and not bool(((state.tau > 0) & torch.isfinite(state.tau)).all()):
        raise ValueError("tau_state.tau: expected finite temperatures > 0")
    return state


def check_state(name: str, u, batch: int, device: torch.device) -> torch.Tensor:
    u = check_tensor(name, u, ndim=1, dtypes=STATE_DTYPES)
    if u.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (one entry per row of img), got {_describe(u)}")
    if u.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of img), got {_describe(u)}")
    return u


def check_int(name: str, value, *, low: int) -> int:
    """An ``int`` (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {_describe(value)}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def check_gamma(gamma) -> float:
    return check_real("gamma", gamma, low=0.0, high=1.0, low_open=True)


def check_eps(eps) -> float:
    return check_real("eps", eps, low=0.0, low_open=True, high_open=True)


def check_rho(rho) -> float:
    return check_real("rho", rho, low=0.0, low_open=False, high_open=True)


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def _check_reference(name: str, x, rows: int, width: int | None, img: torch.Tensor, what: str) -> torch.Tensor:
    x = check_tensor(name, x, ndim=2)
    width = x.shape[1] if width is None else width
    if width < 1:
        raise ValueError(f"{name}: expected at least one feature, got {_describe(x)}")
    _check_rows(name, x, rows, width, what)
    check_same_device("img", img, **{name: x})
    return x


def check_distill(distill_weight, distill_scale) -> tuple[float, float]:
    """``distill_weight >= 0`` and a teacher scale ``> 0`` (that a weight > 0 has a teacher: :func:`check_rows`)."""
    weight = check_real("distill_weight", distill_weight, low=0.0, low_open=False, high_open=True)
    scale = check_real("distill_scale", distill_scale, low=0.0, low_open=True, high_open=True)
    return weight, scale


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_describe(value)}")
    return value


def check_options(*, gamma=0.8, eps=1e-14, rho=8.0, multiply_tau=True, distill_weight=0.0, distill_scale=100.0,
                  per_sample=False, backend="auto", tau=None) -> LossOptions:
    """The options of a call, checked: the one :class:`LossOptions` value the evaluation carries.

    ``tau``: the per-sample temperatures' :class:`TauOptions` (``temperature="individual"``; see
    :func:`check_tau_options`), or None for the global and per-direction forms.
    """
    if tau is not None and not isinstance(tau, TauOptions):
        raise TypeError(f"tau_options: expected a TauOptions, got {_describe(tau)}")
    weight, scale = check_distill(distill_weight, distill_scale)
    if weight > 0 and tau is not None:
        raise ValueError("distill_weight: distillation is defined for the global and per-direction temperatures "
                         f"(the authors' SogCLRLoss), not with temperature='individual'; got {weight!r}")
    return LossOptions(gamma=check_gamma(gamma), eps=check_eps(eps), rho=check_rho(rho),
                       multiply_tau=check_bool("multiply_tau", multiply_tau), distill_weight=weight,
                       distill_scale=scale, per_sample=check_bool("return_per_sample", per_sample),
                       backend=check_backend(backend), tau=tau)


def check_rows(img, txt, logit_scale, u_img, u_txt, options: LossOptions, *, ref_img=None, ref_txt=None,
               tau_state=None) -> LossInputs:
    """Every check that needs only this process's rows, scale, state and (checked) options.

    Returns the problem with the rows as its own columns (one process: N = B, ``columns_are_rows``);
    :func:`check_columns` replaces them. ``N >= 2`` is checked once the columns are known.
    """
    img = check_tensor("img", img, ndim=2)
    txt = check_tensor("txt", txt, ndim=2)
    batch, width = img.shape
    if batch < 1 or width < 1:
        raise ValueError(f"img: expected at least one row and one feature, got {_describe(img)}")
    _check_rows("txt", txt, batch, width, "d of img")
    if txt.dtype != img.dtype:
        raise TypeError(f"txt: expected dtype {img.dtype} (the dtype of img), got {_describe(txt)}")
    check_same_device("img", img, txt=txt)
    _check_pair("ref_img", ref_img, "ref_txt", ref_txt)
    if ref_img is not None:
        ref_img = _check_reference("ref_img", ref_img, batch, None, img, "dr")
        ref_txt = _check_reference("ref_txt", ref_txt, batch, ref_img.shape[1], img, "dr of ref_img")
        # The reference model gets no gradient and is computed in the embeddings' precision.
        ref_img, ref_txt = (_constant(r, img.dtype) for r in (ref_img, ref_txt))
    if options.tau is None:
        if tau_state is not None:       # per-sample temperatures need their hyper-parameters
            raise TypeError(f"tau_options: expected a TauOptions, got {_describe(None)}")
        temperature = check_scales(logit_scale, img.device, img.dtype, options.multiply_tau)
    else:
        if logit_scale is not None:
            raise ValueError(f"logit_scale: expected None with per-sample temperatures (temperature="
                             f"'individual': the temperatures are state), got {_describe(logit_scale)}")
        temperature = Temperature("individual", True, state=check_tau_state(tau_state, batch, img.device))
    u_img = check_state("u_img", u_img, batch, img.device)
    u_txt = check_state("u_txt", u_txt, batch, img.device)
    check_all_finite(img=img, txt=txt, ref_img=ref_img, ref_txt=ref_txt)
    if options.distill_weight > 0 and ref_img is None:
        raise ValueError(f"distill_weight: expected 0 without a reference model (the teacher's features are "
                         f"ref_img, ref_txt), got {options.distill_weight!r}")
    tiles = TileInputs(img, txt, img, txt, ref_img, ref_txt, ref_img, ref_txt,
                       row_scales(temperature, batch, accumulation_dtype(img.dtype)), 0, True, options.distill_scale,
                       options.distill_weight > 0 or (options.per_sample and ref_img is not None), options.per_sample)
    return LossInputs(tiles, temperature, u_img, u_txt, options)


def row_scales(t: Temperature, batch: int, acc: torch.dtype) -> torch.Tensor:
    """``[2, B]``: the scale of each row anchor per direction (differentiable in the logit scales)."""
    if t.kind == "individual":
        return (1.0 / t.state.tau).to(acc)
    if t.kind == "global":
        return t.scale_img.to(acc).expand(2, batch)
    return torch.stack([t.scale_img.to(acc).reshape(1).expand(batch), t.scale_txt.to(acc).reshape(1).expand(batch)])


def check_columns(p: LossInputs, img_all, txt_all, ref_img_all=None, ref_txt_all=None, *, offset=0) -> LossInputs:
    """Check the columns (the global batch) against the checked rows of ``p``; return the problem with them."""
    rows = p.tiles
    img, batch, width = rows.img, rows.batch, rows.img.shape[1]
    _check_pair("img_all", img_all, "txt_all", txt_all)
    _check_pair("ref_img_all", ref_img_all, "ref_txt_all", ref_txt_all)
    if img_all is None:
        raise ValueError("img_all and txt_all: expected [N, d] column tensors, got None")
    img_all = check_tensor("img_all", img_all, ndim=2)
    txt_all = check_tensor("txt_all", txt_all, ndim=2)
    n_columns = img_all.shape[0]
    _check_rows("img_all", img_all, n_columns, width, "d of img")
    _check_rows("txt_all", txt_all, n_columns, width, "d of img")
    for name, x in (("img_all", img_all), ("txt_all", txt_all)):
        if x.dtype != img.dtype:
            raise TypeError(f"{name}: expected dtype {img.dtype} (the dtype of img), got {_describe(x)}")
    check_same_device("img", img, img_all=img_all, txt_all=txt_all)
    check_n_columns(n_columns, "img_all")
    offset = check_offset(offset, batch, n_columns)
    if rows.has_ref:
        if ref_img_all is None:
            raise ValueError("ref_img_all and ref_txt_all: expected [N, dr] reference columns when "
                             "img_all and txt_all are given with ref_img and ref_txt, got None")
        ref_img_all = _check_reference("ref_img_all", ref_img_all, n_columns, rows.ref_dim, img, "dr of ref_img")
        ref_txt_all = _check_reference("ref_txt_all", ref_txt_all, n_columns, rows.ref_dim, img, "dr of ref_img")
        ref_img_all, ref_txt_all = (r.detach().to(img.dtype) for r in (ref_img_all, ref_txt_all))
    elif ref_img_all is not None:
        raise ValueError("ref_img_all and ref_txt_all: expected None without ref_img and ref_txt, got tensors")
    check_all_finite(img_all=img_all, txt_all=txt_all, ref_img_all=ref_img_all, ref_txt_all=ref_txt_all)
    return with_columns(p, img_all, txt_all, ref_img_all, ref_txt_all, offset)


def with_columns(p: LossInputs, img_all, txt_all, ref_img_all, ref_txt_all, offset: int) -> LossInputs:
    """``p`` with these (already checked) columns; row ``i`` is column ``offset + i``."""
    tiles = replace(p.tiles, img_all=img_all, txt_all=txt_all, ref_img_all=ref_img_all, ref_txt_all=ref_txt_all,
                    offset=offset, columns_are_rows=False)
    return replace(p, tiles=tiles)


def check_n_columns(n_columns: int, what: str, detail: str = "") -> None:
    if n_columns < 2:
        raise ValueError(f"{what}: expected N >= 2 columns (each anchor needs a negative), got N = {n_columns}{detail}")


def check_offset(offset, batch: int, n_columns: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset: expected an int, got {_describe(offset)}")
    offset = int(offset)
    if not 0 <= offset <= n_columns - batch:
        raise ValueError(f"offset: expected 0 <= offset <= N - B = {n_columns - batch} "
                         f"(N = {n_columns} columns, B = {batch} rows), got {offset}")
    return offset


def validate(img, txt, logit_scale, u_img, u_txt, options: LossOptions, *, ref_img=None, ref_txt=None,
             img_all=None, txt_all=None, ref_img_all=None, ref_txt_all=None, offset=0,
             tau_state=None) -> LossInputs:
    """Check every tensor argument of :func:`drrho_kernels.drrho_clip_loss` against the checked
    ``options``; return the problem (its backend not yet resolved)."""
    p = check_rows(img, txt, logit_scale, u_img, u_txt, options, ref_img=ref_img, ref_txt=ref_txt,
                   tau_state=tau_state)
    if img_all is None and txt_all is None:
        if ref_img_all is not None or ref_txt_all is not None:
            raise ValueError("ref_img_all and ref_txt_all: expected None when img_all and txt_all are "
                             "not given (the columns are then the rows), got tensors")
        check_n_columns(p.batch, "img")
        check_offset(offset, p.batch, p.batch)
        return p
    return check_columns(p, img_all, txt_all, ref_img_all, ref_txt_all, offset=offset)


def check_index(index, batch: int, data_size: int) -> torch.Tensor:
    """Dataset indices of a batch for :class:`drrho_kernels.DRRhoCLIPLoss`: ``[B]`` integers in range, no repeats.

    The values are checked on a CPU index (the dataloader's: host data, no device sync); an index on an
    accelerator is checked for its dtype and shape only (SPEC 3.2: reading it would stall the host)."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index: expected an integer torch.Tensor of shape ({batch},), got {_describe(index)}")
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"index: expected an integer dtype (int64 or int32), got {_describe(index)}")
    if index.dim() != 1 or index.shape[0] != batch:
        raise ValueError(f"index: expected shape ({batch},) (one dataset index per row of img), "
                         f"got {_describe(index)}")
    if _data_checks_enabled(index) and index.numel() > 0:
        lo, hi, repeats = range_and_repeats(index)
        if lo < 0 or hi >= data_size:
            bad = lo if lo < 0 else hi
            raise IndexError(f"index: expected dataset indices in [0, {data_size}) (data_size), got {bad}")
        if repeats:
            raise ValueError("index: expected distinct dataset indices within a batch (each sample has "
                             "one u entry), got repeated indices")
    return index.long()


SMALL_INDEX = 512


def range_and_repeats(index: torch.Tensor) -> tuple[int, int, bool]:
    """``(min, max, whether a value repeats)`` of a non-empty host index, read on the host with no aten op: in
    Python up to ``SMALL_INDEX`` entries, in NumPy above. Measured here (one thread): at 64 entries inside a
    module step the Python check takes 10 us and NumPy's sort 30 us (code the step runs nowhere else, cold
    in the caches), at 32768 entries 2.4 ms against 0.18 ms."""
    if index.numel() <= SMALL_INDEX:
        values = index.tolist()
        return min(values), max(values), len(set(values)) != len(values)
    ordered = np.sort(index.numpy())
    return int(ordered[0]), int(ordered[-1]), bool((ordered[1:] == ordered[:-1]).any())


def check_global_index(index_all: torch.Tensor, rank: int) -> None:
    """The gathered indices of the global batch (host copies) are distinct: each sample has one state entry."""
    if _data_checks_enabled(index_all) and index_all.numel() and range_and_repeats(index_all)[2]:
        raise ValueError("index: expected distinct dataset indices across the global batch (each sample "
                         "has one u entry), got a sample on more than one rank or twice "
                         f"(raised on every rank; this is rank {rank})")
