"""Adapters for training stacks (imported on demand; none of them imports its stack at import time).

- :mod:`drrho_kernels.integrations.open_clip`: a loss with open_clip's calling convention
  (``loss(**model_out, index=..., output_dict=True)``), the dataset-index plumbing and the checkpoint
  helpers. See docs/INTEGRATIONS.md.
"""
