"""Count what a step reads on the host, at the aten level (SPEC 3.2).

On a GPU each of these ops copies a device value to the host and waits for the stream: the host can no
longer run ahead of the device. On the CPU they cost nothing, so the tests count them instead: reads of
tensor data (``_local_scalar_dense``: ``item``, ``bool``, ``int``, ``float``; ``equal``), data-dependent
shapes (``nonzero``, which boolean-mask indexing runs too, ``unique``, ``masked_select``, ``bincount``).
Copies between devices do not exist on the CPU: on a GPU the step runs under
``torch.cuda.set_sync_debug_mode("error")`` instead (tests/test_triton_gpu.py).

The dispatcher's profiler sees every aten op, also those inside the package's own ops (a Python
``TorchDispatchMode`` would not: it is switched off inside the ops it intercepts). The tests compare the
count with the checks a step may make of host data (the CPU index, CPU embeddings): any other read
makes it larger.
"""
from __future__ import annotations

import collections
import os

from torch.profiler import ProfilerActivity, profile

READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
         "aten::unique_consecutive", "aten::masked_select", "aten::bincount", "aten::equal")

os.environ.setdefault("KINETO_LOG_LEVEL", "5")      # the profiler's start/stop lines are noise here


class HostReads:
    """``with HostReads() as reads: step()``; then ``reads.counts`` (op -> count) and ``reads.total``."""

    def __enter__(self):
        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.counts = collections.Counter(e.name for e in self._prof.events() if e.name in READS)
        return False

    @property
    def total(self) -> int:
        return sum(self.counts.values())
