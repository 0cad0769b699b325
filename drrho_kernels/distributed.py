"""The earlier public path of :mod:`drrho_kernels.parallel.schemes`, which it now names (every import keeps working)."""
import sys

from .parallel import schemes

sys.modules[__name__] = schemes
