"""``DRRhoCLIPLoss``: the loss as an ``nn.Module`` that owns the per-sample state ``u``."""
from __future__ import annotations

import torch
from torch import nn

from ._math import gamma_at_epoch
from ._validate import check_backend, check_eps, check_gamma, check_index, check_int, check_rho, check_tensor
from .distributed import check_distributed_args, distributed_drrho_clip_loss, resolve_group
from .functional import drrho_clip_loss

GAMMA_SCHEDULES = ("cosine", "constant")


class DRRhoCLIPLoss(nn.Module):
    r"""DRRho-CLIP loss with its moving-average state for a dataset of ``data_size`` pairs.

    Holds ``u_img`` and ``u_txt``: float32 buffers of length ``data_size`` (in ``state_dict`` together
    with the epoch, so a checkpoint resumes exactly). Each call gathers the entries of the batch's
    samples, computes :func:`drrho_kernels.drrho_clip_loss` and writes the new entries back, only
    after the step succeeded: a call that raises leaves the state bit-identical.

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
            updated for all samples of the global batch (see :mod:`drrho_kernels.distributed`).
        distributed_scheme: ``"gather_u"`` (default: features gathered without gradient plus the new
            ``u``, no collective in the backward) or ``"gather_grad"`` (all-gather with gradient).

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
    """

    def __init__(self, data_size: int, *, gamma: float = 0.8, gamma_schedule: str = "cosine",
                 gamma_decay_epochs: int = 10, rho: float = 8.0, eps: float = 1e-14, backend: str = "auto",
                 state_device=None, process_group=None, distributed_scheme: str = "gather_u"):
        super().__init__()
        data_size = check_int("data_size", data_size, low=1)
        self.gamma_final = check_gamma(gamma)
        if gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"gamma_schedule: expected one of {GAMMA_SCHEDULES}, got {gamma_schedule!r}")
        gamma_decay_epochs = check_int("gamma_decay_epochs", gamma_decay_epochs, low=1)
        self.rho = check_rho(rho)
        self.eps = check_eps(eps)
        self.backend = check_backend(backend)
        check_distributed_args(process_group, distributed_scheme)
        self.data_size = data_size
        self.gamma_schedule = gamma_schedule
        self.gamma_decay_epochs = gamma_decay_epochs
        self.state_device = None if state_device is None else torch.device(state_device)
        self.process_group = process_group
        self.distributed_scheme = distributed_scheme
        self._epoch = 0
        device = self.state_device or "cpu"
        self.register_buffer("u_img", torch.zeros(data_size, dtype=torch.float32, device=device))
        self.register_buffer("u_txt", torch.zeros(data_size, dtype=torch.float32, device=device))

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def gamma(self) -> float:
        """The moving-average rate of the current epoch."""
        return gamma_at_epoch(self._epoch, self.gamma_final, self.gamma_schedule, self.gamma_decay_epochs)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = check_int("epoch", epoch, low=0)

    def get_extra_state(self):
        return {"epoch": self._epoch}

    def set_extra_state(self, state):
        self.set_epoch(int(state["epoch"]))

    def _apply(self, fn, recurse=True):
        # The state stays float32 (a .half() must not round it) and, with a pinned state_device, stays there.
        before = {name: getattr(self, name) for name in ("u_img", "u_txt")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            device = self.state_device or new.device
            if new.dtype != torch.float32 or new.device != device:
                setattr(self, name, old.to(device=device))
        return self

    def _state_for(self, device: torch.device) -> None:
        if self.state_device is None and self.u_img.device != device:
            self.u_img = self.u_img.to(device)
            self.u_txt = self.u_txt.to(device)

    def _read_state(self, img, index):
        """Check ``img`` and ``index``; return ``(index, u_img, u_txt)`` of the batch's samples on img's device."""
        img = check_tensor("img", img, ndim=2)
        index = check_index(index, img.shape[0], self.data_size)
        self._state_for(img.device)
        state_index = index.to(self.u_img.device)
        return index, self.u_img[state_index].to(img.device), self.u_txt[state_index].to(img.device)

    @torch.no_grad()
    def _write_state(self, index, u_img_new, u_txt_new) -> None:
        """Store the new state of the samples ``index`` (only once a step has succeeded)."""
        state_index = index.to(self.u_img.device)
        self.u_img[state_index] = u_img_new.to(device=self.u_img.device, dtype=self.u_img.dtype)
        self.u_txt[state_index] = u_txt_new.to(device=self.u_txt.device, dtype=self.u_txt.dtype)

    def forward(self, img, txt, index, logit_scale, ref_img=None, ref_txt=None):
        options = dict(ref_img=ref_img, ref_txt=ref_txt, gamma=self.gamma, eps=self.eps, rho=self.rho,
                       backend=self.backend)
        if self.process_group is None:
            index, u_img, u_txt = self._read_state(img, index)
            loss, u_img_new, u_txt_new = drrho_clip_loss(img, txt, logit_scale, u_img, u_txt, **options)
            self._write_state(index, u_img_new, u_txt_new)
            return loss
        group = resolve_group(self.process_group)
        error, u_img, u_txt = None, None, None
        try:
            index, u_img, u_txt = self._read_state(img, index)
        except Exception as exc:            # every rank hears of it in the first collective
            error = exc
        out = distributed_drrho_clip_loss(img, txt, logit_scale, u_img, u_txt, index=index, data_size=self.data_size,
                                          scheme=self.distributed_scheme, group=group, local_error=error, **options)
        self._write_state(out.index_all, out.u_img_all, out.u_txt_all)   # every sample of the global batch
        return out.loss

    def extra_repr(self) -> str:
        return (f"data_size={self.data_size}, gamma={self.gamma_final}, gamma_schedule={self.gamma_schedule!r}, "
                f"gamma_decay_epochs={self.gamma_decay_epochs}, rho={self.rho}, eps={self.eps}, "
                f"backend={self.backend!r}, state_device={self.state_device}, epoch={self._epoch}")
