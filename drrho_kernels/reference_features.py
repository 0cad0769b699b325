"""The earlier public path of :mod:`drrho_kernels.reference.cache`, which it now names (every import keeps working)."""
import sys

from .reference import cache

sys.modules[__name__] = cache
