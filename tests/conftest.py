"""Test configuration. Without a CUDA device the Triton kernels run in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, set before triton is imported); with one, they are compiled and the
GPU tests run (``TRITON_INTERPRET=0`` set here, explicitly, so that a test module's own
``setdefault("TRITON_INTERPRET", "1")`` cannot turn the interpreter on halfway through a GPU session).
``TRITON_INTERPRET`` set by the caller wins either way. Spawned worker processes inherit the choice."""
import os
import random

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield

# The benchmarks package (measurement harness) lives beside the tests.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
