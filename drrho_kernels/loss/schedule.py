"""The moving-average rate of each epoch (the module's ``gamma_schedule``)."""
from __future__ import annotations

import math

GAMMA_SCHEDULES = ("cosine", "constant")


def gamma_at_epoch(epoch: int, gamma: float, schedule: str, decay_epochs: int) -> float:
    """The moving-average rate used during ``epoch``.

    ``"cosine"`` follows the authors' ``adjust_gamma``: epoch 0 uses 1.0 (``u`` is set from scratch),
    epochs ``1 .. decay_epochs - 1`` decay from 1 to ``gamma`` along a half cosine, later epochs use
    ``gamma``. ``"constant"`` always uses ``gamma``.
    """
    if schedule == "constant":
        return float(gamma)
    if schedule != "cosine":
        raise ValueError(f"gamma_schedule: expected 'cosine' or 'constant', got {schedule!r}")
    if epoch <= 0:
        return 1.0
    if epoch >= decay_epochs:
        return float(gamma)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs)) * (1.0 - gamma) + gamma
