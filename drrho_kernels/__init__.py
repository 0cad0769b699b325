"""Fused kernels for DRRho-CLIP: CLIP training steered by a reference model (arXiv 2505.06699).

Public API: :func:`drrho_clip_loss` (functional, pure), :class:`DRRhoCLIPLoss` (module owning the
per-sample state) and :func:`available_backends`. Importing touches no GPU.

Layers, each importing only the ones before it (docs/DESIGN.md): ``core`` (inputs, options, epilogue,
ops), ``backends``, ``loss`` (the functional path and its checks), ``parallel`` (collectives, schemes,
sharded state), then ``module``, ``risk`` and ``reference`` (selection, the embedding cache), and
``integrations`` on top.
"""
from ._version import __version__
from .backends import available_backends
from .loss.functional import LossOutput, PerSample, drrho_clip_loss
from .module import DRRhoCLIPLoss
from .parallel.sharded_state import merge_state_shards, split_state
from .reference.cache import ReferenceFeatures
from .reference.selection import jest_select, rho_select
from .risk import DRRhoRisk, drrho_risk
from . import distributed, functional, reference_features, selection, sharded_state  # noqa: F401 (earlier paths)

__all__ = ["drrho_clip_loss", "DRRhoCLIPLoss", "available_backends", "PerSample", "LossOutput", "ReferenceFeatures",
           "drrho_risk", "DRRhoRisk", "jest_select", "rho_select", "merge_state_shards", "split_state"]
