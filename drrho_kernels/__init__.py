"""Fused kernels for DRRho-CLIP: CLIP training steered by a reference model (arXiv 2505.06699).

Public API: :func:`drrho_clip_loss` (functional, pure), :class:`DRRhoCLIPLoss` (module owning the
per-sample state) and :func:`available_backends`. Importing touches no GPU.
"""
from .backends import available_backends
from .functional import LossOutput, PerSample, drrho_clip_loss
from .module import DRRhoCLIPLoss
from .reference_features import ReferenceFeatures
from .risk import DRRhoRisk, drrho_risk
from .selection import jest_select, rho_select
from .sharded_state import merge_state_shards, split_state

__all__ = ["drrho_clip_loss", "DRRhoCLIPLoss", "available_backends", "PerSample", "LossOutput", "ReferenceFeatures", "drrho_risk", "DRRhoRisk",
           "jest_select", "rho_select", "merge_state_shards", "split_state"]
__version__ = "0.1.0"
