"""What every kernel launch shares: interpreter or GPU (decided once), the dot precision, the
autotuned or fixed launch, and the contiguous operands.

Float32 dots use ``FP32_PRECISION = "tf32x3"`` (three TF32 tensor-core products, about float32
accuracy): SPEC's 1e-4 against float64 rules out plain TF32 (docs/DESIGN.md, "Numerics"). ROCm has
no tf32x3: "ieee" there. Half-precision dots take the tensor cores directly. Triton's interpreter
ignores ``input_precision`` (it computes in float32), so no interpreter test can tell the choices
apart: the AOT report checks the precision in the compiled code.
"""
from __future__ import annotations

import functools

import torch
import triton

from . import helpers
from .tiles import INTERPRETER_TILES, TUNE_KEYS, Tiles, candidates, every_candidate

FP32_PRECISION = "tf32x3"
# Contraction of a * b + c into one fused multiply-add, stated for every launch rather than left to
# Triton's default (which flips from on to off in Triton 3.10): on, as every release so far compiled
# these kernels, so speed and rounding do not change with the Triton version. Compile-time only; the
# interpreter computes in NumPy either way.
FP_FUSION = True

# Triton fixes interpreter or compiler when a kernel is defined (TRITON_INTERPRET at the import of the
# kernel modules); this reads that decision once, from a kernel object.
INTERPRETING = not isinstance(helpers._dot, triton.runtime.JITFunction)


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors)."""
    return INTERPRETING


def device_arch(device: torch.device | None = None) -> int:
    """Compute capability as an int (90 for sm_90) of ``device`` (default: the current CUDA device)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_flags(dtype: torch.dtype) -> dict:
    """``PREC``: the float32 dot precision (None for half dtypes: the option only concerns float32);
    ``UPCAST``: widen bfloat16 operands (interpreter only)."""
    prec = None
    if dtype == torch.float32:
        prec = "ieee" if torch.version.hip else FP32_PRECISION
    return dict(PREC=prec, UPCAST=INTERPRETING and dtype == torch.bfloat16)


def default_tiles(kernel: str, D: int, DR: int, dtype: torch.dtype, arch: int) -> Tiles:
    """What runs without autotuning: the first candidate (the fixed small tiles in the interpreter)."""
    if INTERPRETING:
        return INTERPRETER_TILES[kernel]
    return candidates(kernel, D, DR, dtype, arch)[0]


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        x = args["p_x"]
        return [c.config() for c in candidates(kernel, args["D"], args["DR"], x.dtype, device_arch(x.device))]
    return prune


@functools.lru_cache(maxsize=None)
def _tuned(fn, kernel: str):
    # pruning replaces the full list by the candidates of the dtype, d, dr and GPU of each call
    return triton.autotune(configs=[t.config() for t in every_candidate(kernel)], key=TUNE_KEYS[kernel],
                           prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


def launch(fn, kernel: str, grid_of, args: tuple, flags: dict) -> None:
    """Run ``fn`` (of tile table ``kernel``): fixed interpreter tiles, or autotuned on a GPU.
    ``grid_of(tiles)`` gives the grid of a configuration."""
    if INTERPRETING:
        t = INTERPRETER_TILES[kernel]
        fn[grid_of(t)](*args, **flags, **t.meta(), num_warps=t.num_warps, num_stages=t.num_stages)
    else:
        def grid(meta):
            return grid_of(Tiles(**{k: meta.get(k) for k in ("BM", "BN", "BK", "BKR", "BD")}, num_warps=0,
                                 num_stages=0))
        _tuned(fn, kernel)[grid](*args, **flags, enable_fp_fusion=FP_FUSION)


def launch_fixed(fn, kernel: str, grid, args: tuple, flags: dict, D: int = 0, DR: int = 0) -> None:
    """A kernel with one configuration (margin, merge)."""
    t = default_tiles(kernel, D, DR, torch.float32, 0)
    options = {} if INTERPRETING else dict(enable_fp_fusion=FP_FUSION)
    fn[grid(t)](*args, **flags, **t.meta(), num_warps=t.num_warps, num_stages=t.num_stages, **options)


def operands(k):
    """Contiguous embeddings ``(x, t, X, T, xr, tr, Xr, Tr)`` of a ``TileInputs``; without a reference
    the reference pointers are dummies (never read)."""
    emb = [e.contiguous() for e in (k.img, k.txt, k.img_all, k.txt_all)]
    refs = [r.contiguous() for r in (k.ref_img, k.ref_txt, k.ref_img_all, k.ref_txt_all)] if k.has_ref else emb
    return (*emb, *refs)


def f32(v: torch.Tensor) -> torch.Tensor:
    """A per-row vector as the kernels read it: float32, contiguous."""
    return v.detach().to(torch.float32).contiguous()
