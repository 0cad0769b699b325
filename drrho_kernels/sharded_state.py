"""The earlier public path of :mod:`drrho_kernels.parallel.sharded_state`, which it now names (every import keeps working)."""
import sys

from .parallel import sharded_state

sys.modules[__name__] = sharded_state
