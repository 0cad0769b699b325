"""``DRRhoCLIPLoss``: the loss as an ``nn.Module`` that owns the per-sample state (``u``, and with
per-sample temperatures the temperatures, bounds and Adam moments)."""
from __future__ import annotations

import torch
from torch import nn

from functools import partial

from dataclasses import replace

import numpy as np

from .core.inputs import TauState
from .core.transfer import to_device
from .loss.functional import compute_loss, resolved
from .loss.schedule import GAMMA_SCHEDULES, gamma_at_epoch
from .loss.validate import check_index, check_int, check_options, check_tau_options, check_tensor, validate
from .parallel.collectives import resolve_group
from .parallel.schemes import STATE_ARRAYS, _step, check_distributed_args
from .parallel.sharded_state import STATE_SHARDINGS, ShardLayout, check_loaded_layout, placeholder_state

TEMPERATURE_FORMS = ("global", "individual")
# module buffer of each state array, per direction (image anchors, text anchors)
BUFFERS = {"u": ("u_img", "u_txt"), "tau": ("tau_img", "tau_txt"), "bound": ("bound_img", "bound_txt"),
           "m": ("tau_m_img", "tau_m_txt"), "v": ("tau_v_img", "tau_v_txt")}


class DRRhoCLIPLoss(nn.Module):
    r"""DRRho-CLIP loss with its moving-average state for a dataset of ``data_size`` pairs.

    Holds ``u_img`` and ``u_txt``: float32 buffers of length ``data_size`` (in ``state_dict`` together
    with the epoch, so a checkpoint resumes exactly). Each call gathers the entries of the batch's
    samples, computes :func:`drrho_kernels.drrho_clip_loss` and writes the new entries back, only
    after the step succeeded: a call that raises leaves the state bit-identical.

    Temperatures (SPEC 2.1; docs/TEMPERATURES.md): ``temperature="global"`` takes the logit scale at each
    call, one scale or a pair ``(s_img, s_txt)`` (per direction), with the authors' ``multiply_tau``
    loss or without it. ``temperature="individual"`` (FastCLIP-v2 / iSogCLR) gives every sample its own
    temperature per direction, learned by their own Adam-like update at each step: the module owns
    ``tau_img``, ``tau_txt`` (``tau_init``), the bounds ``bound_img``, ``bound_txt``, the Adam moments
    ``tau_m_*``, ``tau_v_*`` and linear-domain ``u_img``, ``u_txt``, all float32 buffers of length
    ``data_size``; it is called without a logit scale.

    Args:
        data_size: number of pairs in the dataset (length of the state).
        gamma: final moving-average rate in (0, 1].
        gamma_schedule: ``"cosine"`` (the authors' schedule: epoch 0 uses 1.0, then a half-cosine decay
            to ``gamma`` over ``gamma_decay_epochs``, then ``gamma``) or ``"constant"`` (always ``gamma``).
        gamma_decay_epochs: length of the cosine decay, >= 1.
        rho: DRO term, >= 0. eps: floor inside the log, > 0.
        backend: see :func:`drrho_kernels.drrho_clip_loss`.
        state_device: where the state lives. ``None``: the device of the first batch (and it follows
            ``.to()``); ``"cpu"`` keeps it in host memory for huge datasets (1B samples is 8 GB),
            gathered and scattered each step.
        process_group: ``None`` (default): one process. ``"world"`` (the default group, looked up at each
            call) or a ``torch.distributed`` ``ProcessGroup``: data-parallel training, the loss of this
            process's anchors against the global batch of all processes, and every process's state
            updated for all samples of the global batch (see :mod:`drrho_kernels.parallel.schemes`).
        distributed_scheme: ``"gather_u"`` (default: features gathered without gradient plus the new
            ``u``, no collective in the backward) or ``"gather_grad"`` (all-gather with gradient).
        state_sharding: ``"replicated"`` (default: every process stores the whole dataset's state) or
            ``"sharded"`` (needs a process group, initialised when the module is built: rank ``r`` of ``W``
            stores the samples ``i`` with ``i % W == r`` in slot ``i // W``, fetched by their users at each
            step; its ``state_dict`` is its shard with the layout; see :mod:`drrho_kernels.parallel.sharded_state`).
        temperature: ``"global"`` (default) or ``"individual"``.
        multiply_tau: the global forms' loss (default True: the authors'; False: FastCLIP-v0's ``A_I + A_T``).
        tau_init, tau_lr, tau_betas, tau_eps, tau_range, tau_grad_clamp: the per-sample temperatures'
            initial value (within ``tau_range``), step size (> 0), Adam betas (each in [0, 1); both 0 in
            epoch 0), Adam epsilon (> 0), clamp range ``(tau_min, tau_max)`` and gradient clamp (> 0).
        distill_weight, distill_scale: the distillation term from the reference model (SPEC 2.2; a
            reference is then required at every call), as in :func:`drrho_kernels.drrho_clip_loss`.

    Call ``crit(img, txt, index, logit_scale, ref_img=None, ref_txt=None, return_per_sample=False)``: the
    loss, or with ``return_per_sample`` the pair ``(loss, per_sample)`` (:class:`drrho_kernels.PerSample`).

    Shape:
        ``img, txt``: ``[B, d]``; ``index``: ``[B]`` distinct dataset indices; ``ref_img, ref_txt``:
        ``[B, dr]``; output: 0-dim loss.

    Example::

        >>> import torch, drrho_kernels as dk
        >>> crit = dk.DRRhoCLIPLoss(data_size=100, backend="torch")
        >>> crit.set_epoch(0)
        >>> img = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        >>> loss = crit(img, txt, torch.tensor([3, 14, 15, 92]), torch.tensor(10.0))
        >>> bool((crit.u_img[[3, 14, 15, 92]] != 0).all())
        True
        >>> per_sample = dk.DRRhoCLIPLoss(data_size=100, temperature="individual", backend="torch")
        >>> loss = per_sample(img, txt, torch.tensor([3, 14, 15, 92]))
        >>> per_sample.tau_img[[3, 14]].tolist() != [0.03, 0.03]         # one step of their own update
        True
    """

    def __init__(self, data_size: int, *, gamma: float = 0.8, gamma_schedule: str = "cosine",
                 gamma_decay_epochs: int = 10, rho: float = 8.0, eps: float = 1e-14, backend: str = "auto",
                 state_device=None, process_group=None, distributed_scheme: str = "gather_u",
                 temperature: str = "global", multiply_tau: bool = True, tau_init: float = 0.03,
                 tau_lr: float = 0.0133, tau_betas=(0.9, 0.999), tau_eps: float = 1e-8, tau_range=(0.01, 1.0),
                 tau_grad_clamp: float = 5.0, distill_weight: float = 0.0, distill_scale: float = 100.0,
                 state_sharding: str = "replicated"):
        super().__init__()
        data_size = check_int("data_size", data_size, low=1)
        if gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"gamma_schedule: expected one of {GAMMA_SCHEDULES}, got {gamma_schedule!r}")
        gamma_decay_epochs = check_int("gamma_decay_epochs", gamma_decay_epochs, low=1)
        check_distributed_args(process_group, distributed_scheme)
        if state_sharding not in STATE_SHARDINGS:
            raise ValueError(f"state_sharding: expected one of {STATE_SHARDINGS}, got {state_sharding!r}")
        if state_sharding == "sharded" and process_group is None:
            raise ValueError("state_sharding: 'sharded' spreads the state over the ranks of a process group; "
                             "expected process_group='world' or a ProcessGroup, got None")
        if temperature not in TEMPERATURE_FORMS:
            raise ValueError(f"temperature: expected one of {TEMPERATURE_FORMS}, got {temperature!r}")
        self.temperature = temperature
        self.tau_hyper = dict(tau_lr=tau_lr, tau_betas=tuple(tau_betas) if isinstance(tau_betas, list) else tau_betas,
                              tau_eps=tau_eps, tau_range=tuple(tau_range) if isinstance(tau_range, list) else tau_range,
                              tau_grad_clamp=tau_grad_clamp)
        tau = check_tau_options(**self.tau_hyper, tau_init=tau_init) if temperature == "individual" else None
        # The options of every call, checked once; each step only sets the epoch's gamma (and tau's epoch).
        self.options = check_options(gamma=gamma, eps=eps, rho=rho, multiply_tau=multiply_tau,
                                     distill_weight=distill_weight, distill_scale=distill_scale, backend=backend,
                                     tau=tau)
        self.tau_init = float(tau_init)
        self.data_size = data_size
        self.gamma_schedule = gamma_schedule
        self.gamma_decay_epochs = gamma_decay_epochs
        self.state_device = None if state_device is None else torch.device(state_device)
        self.process_group = process_group
        self.distributed_scheme = distributed_scheme
        self.state_sharding = state_sharding
        self._layout = ShardLayout.of(process_group, data_size) if state_sharding == "sharded" else None
        self._epoch = 0
        self._pending_writes = []        # host write-backs in flight: (index, pinned rows, cuda event)
        device = self.state_device or "cpu"
        size = data_size if self._layout is None else self._layout.size
        for kind in STATE_ARRAYS["individual" if temperature == "individual" else "global"]:
            for name in BUFFERS[kind]:
                init = self.tau_init if kind == "tau" else 0.0
                self.register_buffer(name, torch.full((size,), init, dtype=torch.float32, device=device))

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state buffers of this module's form."""
        return tuple(name for kind in self._kinds for name in BUFFERS[kind])

    @property
    def _kinds(self) -> tuple[str, ...]:
        return STATE_ARRAYS["individual" if self.temperature == "individual" else "global"]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def gamma(self) -> float:
        """The moving-average rate of the current epoch."""
        return gamma_at_epoch(self._epoch, self.gamma_final, self.gamma_schedule, self.gamma_decay_epochs)

    # The options' fields under the names the constructor took (read-only; the options are one checked value).
    gamma_final = property(lambda self: self.options.gamma)
    rho = property(lambda self: self.options.rho)
    eps = property(lambda self: self.options.eps)
    backend = property(lambda self: self.options.backend)
    multiply_tau = property(lambda self: self.options.multiply_tau)
    distill_weight = property(lambda self: self.options.distill_weight)
    distill_scale = property(lambda self: self.options.distill_scale)

    def _step_options(self, per_sample: bool = False):
        """This step's options: the epoch's gamma (and the temperatures' epoch); built once per epoch."""
        key = (self._epoch, per_sample, self.options)
        if getattr(self, "_options_of", (None,))[0] != key:
            tau = self.options.tau and replace(self.options.tau, epoch=self._epoch)
            self._options_of = (key, replace(self.options, gamma=self.gamma, per_sample=per_sample, tau=tau))
        return self._options_of[1]

    def set_epoch(self, epoch: int) -> None:
        self._epoch = check_int("epoch", epoch, low=0)

    def get_extra_state(self):
        if self._layout is None:
            return {"epoch": self._epoch}
        return {"epoch": self._epoch, "state_layout": self._layout.as_dict()}

    def set_extra_state(self, state):
        self.set_epoch(int(state["epoch"]))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.complete_state_writes()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_loaded_layout(self._layout, state_dict, prefix)     # before anything is copied
        self.complete_state_writes()
        for name in BUFFERS["tau"] if self.temperature == "individual" else ():
            tau = state_dict.get(prefix + name)
            if isinstance(tau, torch.Tensor) and not bool(torch.isfinite(tau).all() and (tau > 0).all()):
                # sharded steps check placeholders, not the fetched entries: a bad table is refused here
                raise ValueError(f"state_dict: {prefix + name} holds temperatures that are not finite and > 0")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # The state stays float32 (a .half() must not round it) and, with a pinned state_device, stays there.
        self.complete_state_writes()
        before = {name: getattr(self, name) for name in self.state_names}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            device = self.state_device or new.device
            if new.dtype != torch.float32 or new.device != device:
                setattr(self, name, old.to(device=device))
        return self

    def _state_for(self, device: torch.device) -> None:
        if self.state_device is None and self.u_img.device != device:
            self.complete_state_writes()
            for name in self.state_names:
                setattr(self, name, getattr(self, name).to(device))

    def _read_state(self, img, index):
        """Check ``img`` and ``index``; return ``(index, state)``: the batch's entries of every state array,
        ``[2, B]`` per kind, on img's device (sharded: placeholders; the step fetches the entries)."""
        img = check_tensor("img", img, ndim=2)
        index = check_index(index, img.shape[0], self.data_size)
        self._state_for(img.device)
        self._complete_writes(needed=index)
        if self._layout is not None:
            return index, placeholder_state(self._kinds, img.shape[0], img.device)
        return index, self._gather(index, img.device)

    def _gather(self, index, device) -> dict:
        """The entries ``index`` of this module's buffers, ``[2, len(index)]`` per kind, on ``device``; host
        indices and host state reach the device through pinned memory, without a wait (SPEC 3.2)."""
        state_index = to_device(index, self.u_img.device)
        packed = to_device(torch.stack([getattr(self, name).index_select(0, state_index)
                                        for name in self.state_names]), device)
        return {kind: packed[2 * i:2 * i + 2] for i, kind in enumerate(self._kinds)}

    @torch.no_grad()
    def _write_state(self, index, state: dict) -> None:
        """Store the new state ``[2, B]`` per kind of the samples ``index`` (only once a step has succeeded).

        State in host memory and a step on a CUDA device: the new entries are copied to pinned host memory
        without a wait and stored by a later step, as soon as the copy is done or the entries are needed
        (:meth:`complete_state_writes`, which ``state_dict`` calls). Other devices copy at once."""
        packed = state["u"] if len(self._kinds) == 1 else torch.cat([state[kind] for kind in self._kinds])  # [2 n, M]
        if self.u_img.device.type == "cpu" and packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending_writes.append((index.cpu() if index.device.type != "cpu" else index, host, done))
            return
        state_index = to_device(index, self.u_img.device)
        packed = packed.to(device=self.u_img.device, dtype=torch.float32)
        for name, rows in zip(self.state_names, packed.unbind(0)):
            getattr(self, name).index_copy_(0, state_index, rows)

    def _complete_writes(self, needed=None, wait: bool = False) -> None:
        """Store the pending host write-backs that are done, that hold entries ``needed`` now, or all (``wait``)."""
        if not self._pending_writes:
            return
        keep, needed = [], None if needed is None else needed.cpu().numpy()
        for index, host, done in self._pending_writes:
            overlap = needed is not None and bool(np.intersect1d(index.numpy(), needed).size)
            if wait or overlap or done.query():
                done.synchronize()                   # returns at once when the copy is done
                for row, name in enumerate(self.state_names):
                    getattr(self, name).index_copy_(0, index, host[row])
            else:
                keep.append((index, host, done))
        self._pending_writes = keep

    def complete_state_writes(self) -> None:
        """Store every pending write-back (state in host memory, steps on an accelerator); ``state_dict``,
        ``load_state_dict`` and ``.to()`` call it. Between two steps the buffers may still hold the entries
        of the last step(s) before it, until their copies are done."""
        self._complete_writes(wait=True)

    def _form(self, logit_scale, state) -> tuple:
        """``(logit_scale, tau_state)`` of this module's temperature form."""
        if self.temperature == "individual":
            if logit_scale is not None:
                raise ValueError("logit_scale: expected None with temperature='individual' (the module owns the "
                                 f"per-sample temperatures), got {type(logit_scale).__name__}")
            return None, TauState(state["tau"], state["bound"], state["m"], state["v"]) if state is not None else None
        if logit_scale is None:
            raise TypeError("logit_scale: expected a positive float, a 1-element floating tensor or a pair "
                            "(s_img, s_txt) of them with temperature='global', got None")
        return logit_scale, None

    def forward(self, img, txt, index, logit_scale=None, ref_img=None, ref_txt=None, return_per_sample=False):
        if self.process_group is None:
            index, state = self._read_state(img, index)
            logit_scale, tau_state = self._form(logit_scale, state)
            p = resolved(validate(img, txt, logit_scale, *state["u"].unbind(0),
                                  self._step_options(return_per_sample), ref_img=ref_img, ref_txt=ref_txt,
                                  tau_state=tau_state))
            loss, new, *per_sample = compute_loss(p, per_sample=return_per_sample)
            self._write_state(index, new)
            return (loss, per_sample[0]) if return_per_sample else loss
        if return_per_sample:
            raise ValueError("return_per_sample: expected False with a process group (the per-anchor values are "
                             "those of drrho_clip_loss on one process), got True")
        group = resolve_group(self.process_group)
        error, state, tau_state, fetch = None, None, None, None
        try:
            index, state = self._read_state(img, index)
            logit_scale, tau_state = self._form(logit_scale, state)
            if self._layout is not None:
                self._layout.check_group(group)
                fetch = partial(self._layout.fetch, self._gather, group, device=img.device)  # with the indices
        except Exception as exc:            # every rank hears of it in the first collective
            error = exc
        u = (state["u"][0], state["u"][1]) if state is not None else (None, None)
        out, index_host = _step(img, txt, logit_scale, *u, self._step_options(), ref_img=ref_img, ref_txt=ref_txt,
                                index=index, data_size=self.data_size, scheme=self.distributed_scheme, group=group,
                                local_error=error, tau_state=tau_state, fetch_state=fetch, index_checked=True)
        # every sample of the global batch (its indices on the host, where the dataloader's were)
        index_all = index_host if index_host is not None else out.index_all
        state_all = out.state_all
        if self._layout is not None:                              # ... of which this rank keeps its own
            index_all, state_all = self._layout.owned(index_all, state_all)
        self._write_state(index_all, state_all)
        return out.loss

    def extra_repr(self) -> str:
        return (f"data_size={self.data_size}, gamma={self.gamma_final}, gamma_schedule={self.gamma_schedule!r}, "
                f"gamma_decay_epochs={self.gamma_decay_epochs}, rho={self.rho}, eps={self.eps}, "
                f"backend={self.backend!r}, state_device={self.state_device}, epoch={self._epoch}, "
                f"temperature={self.temperature!r}"
                + (f", state_sharding='sharded' (rank {self._layout.rank} of {self._layout.world_size})"
                   if self._layout is not None else "")
                + (f", tau_init={self.tau_init}, {', '.join(f'{k}={v}' for k, v in self.tau_hyper.items())}"
                   if self.temperature == "individual" else f", multiply_tau={self.multiply_tau}"))
