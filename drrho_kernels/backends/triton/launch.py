"""What every kernel launch shares: interpreter or GPU (decided once), the GPU target, the dot
precision, the autotuned or fixed launch, and the contiguous operands.

Float32 dots: the precision depends on the target, chosen here in one place (:func:`fp32_precision`,
used by the launches and by ``benchmarks/aot_report.py``). NVIDIA: ``"tf32x3"`` (three TF32
tensor-core products, about float32 accuracy): SPEC's 1e-4 against float64 rules out plain TF32
(docs/DESIGN.md, "Numerics"). AMD has no tf32x3 (its Triton backend accepts ieee, bf16x3, bf16x6, and
tf32 on gfx942 only): ``FP32_PRECISION_AMD`` per architecture, the fastest precision whose measured
error on realistic inputs stays a factor 4 below SPEC's tolerance and that passes the float32
conformance suite (the precision study, since retired: ``git show 82830af:benchmarks/precision_study.py``
restores it; its figures stay in ``benchmarks/results/precision_study.json``). Half-precision dots take
the tensor / matrix cores directly. Triton's interpreter ignores ``input_precision`` (it computes in
float32) and accepts only tf32, tf32x3 and ieee: the interpreter gets ``FP32_PRECISION_NVIDIA``; the
precision study emulated each precision instead, and the AOT report checks the precision in the compiled code.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from . import helpers
from .tiles import INTERPRETER_SMS, INTERPRETER_TILES, TUNE_KEYS, Tiles, candidates, every_candidate

FP32_PRECISION_NVIDIA = "tf32x3"
FP32_PRECISION = FP32_PRECISION_NVIDIA          # the name earlier releases exported
# AMD: per architecture (gfx name without target features), from the retired precision study (figures in
# benchmarks/results/precision_study.json; git show 82830af:benchmarks/precision_study.py restores it):
# bf16x6 = six bfloat16 matrix-core products of a = hi + mid + lo (bf16 parts): float32-level errors (worst
# 3.3e-6 at s = 100; ieee 3.0e-6), the whole float32 conformance suite passes; 1.3x (gfx942: 218 against
# 163 TFLOP/s) to 2.7x (gfx950: 419 against 157) the peak of ieee's float32 MFMA. gfx90a: ieee, bf16x6
# would run at 64 against 96.
# Rejected: tf32 (gfx942 only; 1.1e-3 on realistic inputs) and bf16x3 (1.7e-5 on realistic inputs
# at d = 512, but 1.8e-4 on the gradients in the conformance suite's s = 100, d = 16 cases).
FP32_PRECISION_AMD = {"gfx90a": "ieee", "gfx942": "bf16x6", "gfx950": "bf16x6"}
FP32_PRECISION_AMD_OTHER = "ieee"               # an AMD architecture the study did not cover: exact float32
# Contraction of a * b + c into one fused multiply-add, stated for every launch rather than left to
# Triton's default (which flips from on to off in Triton 3.10): on, as every release so far compiled
# these kernels, so speed and rounding do not change with the Triton version. Compile-time only; the
# interpreter computes in NumPy either way.
FP_FUSION = True

# Triton fixes interpreter or compiler when a kernel is defined (TRITON_INTERPRET at the import of the
# kernel modules); this reads that decision once, from a kernel object.
INTERPRETING = not isinstance(helpers._dot, triton.runtime.JITFunction)


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device while the kernels of one op launch (SPEC 3.2: every kernel
    runs on its inputs' device, on that device's current stream); nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def sm_count(device: torch.device) -> int:
    """The device's SMs (CUs on AMD); in the interpreter the pretend GPU of ``tiles.INTERPRETER_SMS``."""
    if INTERPRETING:
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def largest_blocks(kernel: str, D: int, DR: int, dtype: torch.dtype, arch: int | str | None,
                   flags: dict | None = None) -> tuple[int, int, int | None]:
    """(BM, BN, BD) maxima over the configurations ``kernel`` may run with on ``arch`` (None: the interpreter's
    fixed tiles): a plan or a split must hold for every one the autotuner tries, and the largest blocks
    give the fewest programs."""
    tiles = [INTERPRETER_TILES[kernel]] if arch is None else candidates(kernel, D, DR, dtype, arch, flags)
    bd = [t.BD for t in tiles if t.BD is not None]
    return max(t.BM for t in tiles), max(t.BN for t in tiles), max(bd) if bd else None


def target_of(device: torch.device) -> tuple[int | str | None, int]:
    """``(arch, SMs)`` the launches on ``device`` are planned for (the interpreter: ``(None, INTERPRETER_SMS)``)."""
    return (None, INTERPRETER_SMS) if INTERPRETING else (device_arch(device), sm_count(device))


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors)."""
    return INTERPRETING


def device_arch(device: torch.device | None = None) -> int | str:
    """The GPU target of ``device`` (default: the current device), as the tile tables and
    :func:`fp32_precision` name it: on CUDA the compute capability as an int (90 for sm_90), on ROCm
    the gfx architecture (``"gfx942"``, target features such as ``:sramecc+`` removed). Touches the
    device only when called, never at import."""
    if torch.version.hip:
        return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def is_amd(arch: int | str) -> bool:
    """Whether ``arch`` (from :func:`device_arch`) names an AMD target ("gfx...")."""
    return isinstance(arch, str) and arch.startswith("gfx")


def fp32_precision(arch: int | str) -> str:
    """The ``input_precision`` of float32 dots on target ``arch`` (an int compute capability or a
    "gfx..." name): the one place that decides it, for the launches and for the AOT report."""
    if is_amd(arch):
        return FP32_PRECISION_AMD.get(arch.split(":")[0], FP32_PRECISION_AMD_OTHER)
    return FP32_PRECISION_NVIDIA


def dot_flags(dtype: torch.dtype, arch: int | str | None = None) -> dict:
    """``PREC``: the float32 dot precision on ``arch`` (default: the current device's, the one Triton
    compiles for; None for half dtypes: the option only concerns float32); ``UPCAST``: widen bfloat16
    operands (interpreter only)."""
    prec = None
    if dtype == torch.float32:
        if INTERPRETING:
            prec = FP32_PRECISION_NVIDIA        # ignored by the interpreter, and among the values it accepts
        else:
            prec = fp32_precision(device_arch() if arch is None else arch)
    return dict(PREC=prec, UPCAST=INTERPRETING and dtype == torch.bfloat16)


def default_tiles(kernel: str, D: int, DR: int, dtype: torch.dtype, arch: int | str,
                  flags: dict | None = None) -> Tiles:
    """What runs without autotuning: the first candidate (the fixed small tiles in the interpreter)."""
    if INTERPRETING:
        return INTERPRETER_TILES[kernel]
    return candidates(kernel, D, DR, dtype, arch, flags)[0]


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        # the launch's arguments and constexprs: D, DR, the dtype of p_x and the path flags (EXTRA,
        # DISTILL) pick the candidates, through tiles.candidates alone
        args = {**named_args, **kwargs}
        x = args["p_x"]
        return [c.config() for c in candidates(kernel, args["D"], args["DR"], x.dtype, device_arch(x.device), args)]
    return prune


@functools.lru_cache(maxsize=None)
def _tuned(fn, kernel: str):
    # pruning replaces the full list by the candidates of the dtype, d, dr and GPU of each call
    return triton.autotune(configs=[t.config() for t in every_candidate(kernel)], key=TUNE_KEYS[kernel],
                           prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


# Autotuning on a GPU (default), or every kernel at its default tile (the first candidate): one compile per
# kernel variant and shape class, no benchmarking runs. ``DRRHO_KERNELS_AUTOTUNE=0`` sets the default;
# :func:`pinned_tiles` pins them for a block (the GPU tests' correctness checks).
AUTOTUNE = os.environ.get("DRRHO_KERNELS_AUTOTUNE", "1") not in ("0", "")


@contextlib.contextmanager
def pinned_tiles():
    """Launch every kernel at its default tile, without autotuning, while the block runs."""
    global AUTOTUNE
    before, AUTOTUNE = AUTOTUNE, False
    try:
        yield
    finally:
        AUTOTUNE = before


def launch(fn, kernel: str, grid_of, args: tuple, flags: dict) -> None:
    """Run ``fn`` (of tile table ``kernel``): fixed interpreter tiles, autotuned on a GPU, or its default tile
    there when autotuning is off (:data:`AUTOTUNE`). ``grid_of(tiles)`` gives the grid of a configuration."""
    if INTERPRETING or not AUTOTUNE:
        x = args[0]
        t = default_tiles(kernel, flags["D"], flags["DR"], x.dtype, None if INTERPRETING else device_arch(x.device),
                          flags)
        options = {} if INTERPRETING else dict(enable_fp_fusion=FP_FUSION)
        fn[grid_of(t)](*args, **flags, **t.meta(), num_warps=t.num_warps, num_stages=t.num_stages, **options)
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
