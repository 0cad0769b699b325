"""Run a test's worker in ``world`` gloo processes (``torch.multiprocessing`` with ``spawn``), with a
deadline: a hang fails the test instead of the suite."""
from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``init_method="tcp://..."``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, world: int, *args, timeout: float = 150.0, what: str = "distributed workers") -> None:
    """``worker(rank, world, port, *args)`` in ``world`` processes; waits at most ``timeout`` seconds, then
    kills what still runs and fails the test. A worker that raises fails the test with its traceback."""
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"{what} (W = {world}) did not finish in {timeout} s (a hang?)")
