"""The earlier public path of :mod:`drrho_kernels.loss.functional`, which it now names (every import keeps working)."""
import sys

from .loss import functional

sys.modules[__name__] = functional
