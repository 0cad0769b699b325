"""Host tensors onto a device without making the host wait (SPEC 3.2).

A copy from pageable host memory makes the host wait for the device; from pinned (page-locked) memory
with ``non_blocking=True`` it is queued on the current stream like a kernel, and the caching host
allocator keeps the pinned buffer alive until the copy has run. Used for everything a step moves from
the host to the device: dataset indices, state kept in host memory, cached reference features.
"""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``: itself if it is there; from a host tensor through pinned memory, not blocking."""
    device = torch.device(device)
    if x.device == device or (device.index is None and x.device.type == device.type):
        return x
    if x.device.type == "cpu" and device.type != "cpu":
        return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    return x.to(device)
