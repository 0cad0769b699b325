"""Test configuration. Without a CUDA device the Triton kernels run in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, set before triton is imported); with one, they are compiled and the
GPU tests run (``TRITON_INTERPRET`` set explicitly wins either way)."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield

# The benchmarks package (measurement harness) lives beside the tests.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
