"""The earlier public path of :mod:`drrho_kernels.reference.selection`, which it now names (every import keeps working)."""
import sys

from .reference import selection

sys.modules[__name__] = selection
