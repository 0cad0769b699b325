"""The one way the tests start worker processes: :func:`spawn`.

``spawn(worker, world, *args)`` runs ``worker(rank, world, port, *args)`` in ``world`` fresh processes
(``torch.multiprocessing``, start method ``spawn``; ``port``: a free TCP port on 127.0.0.1 for
``init_method=f"tcp://127.0.0.1:{port}"``) and returns the workers' return values, one per rank. It waits
at most ``timeout`` seconds: a hang kills the workers and fails the test instead of the suite. A worker
that raises fails the test with its traceback.

A worker that returns has its value written (``torch.save``, to a temporary directory of the call, removed
afterwards), its process group destroyed if it left one, and then leaves with ``os._exit(0)``: no static
destructor runs. (Under torch 2.13 a gloo process that has imported ``torch.distributed.nn``, as the
authors' loss.py does, can abort in its destructors at exit, "terminate called without an active
exception", which would fail a test whose results were all written.)
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``init_method="tcp://..."``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _main(rank: int, worker, world: int, port: int, args: tuple, outdir: str) -> None:
    """One worker process: run ``worker``, write its value, destroy its group, leave without destructors."""
    result = worker(rank, world, port, *args)
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, world: int, *args, timeout: float = 150.0, what: str = "distributed workers") -> list:
    """``[worker(r, world, port, *args) for r in range(world)]``, each in its own process (see the module's
    docstring); ``worker`` must be a module-level function (it is pickled by name)."""
    with tempfile.TemporaryDirectory(prefix="drrho_spawn_") as outdir:
        ctx = mp.start_processes(_main, args=(worker, world, free_port(), args, outdir), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    pytest.fail(f"{what} (W = {world}) did not finish in {timeout} s (a hang?)")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
