"""The fused Triton backend (``backend="triton"``): ``drrho::triton_fwd`` / ``drrho::triton_bwd``.

- ``kernels.py``: the ``@triton.jit`` kernels, opening with the formulas they compute.
- ``launch.py``: block sizes, grids, autotuning and the launch wrappers.
- ``ops.py``: :func:`fused_ops`, the dispatcher op pair (fake and autograd from ``drrho_kernels.ops``).

Nothing here is imported by ``import drrho_kernels``: the backend registry imports ``ops`` on the
first ``backend="triton"`` call, so importing the package never touches triton or CUDA.
"""
