"""``make_step(impl, B, N, ...) -> (step, output_bytes)``: an implementation's step (N > B: one process's)."""

import contextlib
import os
from unittest import mock

import torch
import torch.distributed as dist

import drrho_kernels as dk

from . import baselines

FUSED = ("torch", "cpp", "triton", "reference")
IMPLS = FUSED + ("unfused", "clip_ce", "gemm_floor", "authors")      # authors: their SogCLRLoss, when readable
VARIANTS = ("module", "per_direction", "individual", "distill", "jest")      # DRRhoCLIPLoss forms, the selection
NO_REF = ("clip_ce",)                     # it has no reference model
SQUARE_ONLY = ("clip_ce", "authors")      # defined for one process only (N == B), as is every variant
MODES = ("forward", "backward", "forward_backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
JEST = dict(filter_ratio=0.8, n_chunks=2, topk=False)     # the function's defaults (train.py passes its args)


def known(impl: str) -> bool:
    backend, _, variant = impl.partition("/")
    return impl in IMPLS if not variant else variant in VARIANTS and (backend in FUSED or impl == "authors/jest")


def square_only(impl: str) -> bool:
    return impl in SQUARE_ONLY or "/" in impl


class Step:
    """``loss(grad)``: a fresh forward on fresh leaves; ``prepare()`` runs the untimed part, returns what to time."""

    def __init__(self, loss, mode: str):
        self.loss, self.mode = loss, mode

    def prepare(self):
        return self.loss(True).backward if self.mode == "backward" else self

    def __call__(self):
        loss = self.loss(self.mode != "forward")
        if self.mode != "forward":
            loss.backward()


class Floor:
    """The GEMM floor: per direction the similarities; ``backward()`` recomputes them, does ``P T`` and ``P^T x``."""

    def __init__(self, directions):
        self.directions = directions
        self.backward(weighted=False)

    def backward(self, weighted=True):
        for rows, cols, ref_rows, ref_cols in self.directions:
            if ref_rows is not None:
                ref_rows @ ref_cols.T
            sim = rows @ cols.T
            if weighted:
                sim @ cols, sim.T @ rows


def floor_gemm_count(B: int, N: int, ref: bool = True, mode: str = "forward_backward") -> int:
    """``[B, d] x [d, N]`` products of the floor (a shard: both directions)."""
    forward, backward = (2, 4) if ref else (1, 3)
    return {"forward": forward, "backward": backward}.get(mode, forward + backward) * (1 if N == B else 2)


def make_inputs(B, N, d, dr, dtype, ref, device, seed=0):
    """The columns ``{img_all, txt_all[, ref_img_all, ref_txt_all]}`` (unit rows), the rows' offset."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    widths = {"img_all": d, "txt_all": d, **({"ref_img_all": dr, "ref_txt_all": dr} if ref else {})}
    return {k: torch.nn.functional.normalize(torch.randn(N, w, generator=g), dim=1).to(device=device, dtype=dtype)
            for k, w in widths.items()}, (N - B) // 2


@contextlib.contextmanager
def process_group_of_one():
    """A process group the body opens is destroyed after it, the environment restored."""
    had = dist.is_available() and dist.is_initialized()
    with mock.patch.dict(os.environ):
        try:
            yield
        finally:
            if not had and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def _theirs(loaded):
    """The authors' code from a loader's ``(code, where)``; ImportError (the reason) without a snapshot."""
    if loaded[0] is None:
        raise ImportError(f"authors: {loaded[1]}")
    return loaded[0]


def _selection(backend, img, txt, ref_img, ref_txt):
    """``dk.jest_select``, or (``backend`` "authors") theirs in a gloo group of one, as their train.py runs it."""
    if backend != "authors":
        g = torch.Generator().manual_seed(0)
        return lambda grad: dk.jest_select(img, txt, ref_img, ref_txt, 14.0, ref_scale=100.0, generator=g,
                                           backend=backend, **JEST)
    import warnings

    from .authors import jest_namespace
    ns = _theirs(jest_namespace())
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def select(grad):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # their torch.distributed.nn.all_gather
            ns["jointly_sample_batch_softmax"]([ref_img, ref_txt], [img, txt], {"t": 100.0}, {"t": 14.0}, **JEST)
    return select


def make_step(impl: str, B: int, N: int, d: int = 512, dr: int = 512, dtype: str = "float32", ref: bool = True,
              device: str = "cpu", mode: str = "forward_backward", seed: int = 0, autocast: str | None = None):
    """``(step, output_bytes)``, the inputs built once; ``autocast``: the forward under it on ``dtype`` inputs."""
    distributed, (backend, _, variant) = N != B, impl.partition("/")
    if not known(impl) or mode not in MODES or (distributed and square_only(impl)):
        raise ValueError(f"impl {impl!r}, mode {mode!r}: expected {IMPLS} or <backend>/<{'|'.join(VARIANTS)}>, {MODES}"
                         f" (N == B only for {SQUARE_ONLY} and every variant)")
    cols, offset = make_inputs(B, N, d, dr, DTYPES[dtype], ref, device, seed)
    if impl == "gemm_floor" and autocast:     # under autocast: the same products on inputs in the autocast dtype
        cols = {k: v.to(DTYPES[autocast]) for k, v in cols.items()}
    rows = {k.replace("_all", ""): v[offset:offset + B] for k, v in cols.items()}
    refs = {k: v for k, v in rows.items() if k.startswith("ref_")}
    ref_cols = {k: v for k, v in cols.items() if k.startswith("ref_")} if distributed else {}
    u, elem, index = torch.zeros(B, device=device), DTYPES[dtype].itemsize, torch.arange(B, device=device)
    column_grads = distributed and impl in FUSED + ("unfused",)
    output_bytes = 0 if mode == "forward" else (2 * B * d + (2 * N * d if column_grads else 0)) * elem

    def with_leaves(fn):    # detach(): new leaves on the inputs' storage: fresh gradients, no copy of the inputs
        def loss(grad):
            x, t = (rows[k].detach().requires_grad_(grad) for k in ("img", "txt"))
            col = {k: cols[k].detach().requires_grad_(grad) for k in ("img_all", "txt_all")} if distributed else {}
            with torch.autocast(device, dtype=DTYPES.get(autocast), enabled=autocast is not None):
                return fn(x, t, torch.tensor(14.0, device=device, requires_grad=grad), col)
        return loss

    if variant == "jest":
        return Step(_selection(backend, *(rows[k] for k in ("img", "txt", "ref_img", "ref_txt"))), mode), 0
    if variant:                                                      # the module's forms, distillation
        crit = dk.DRRhoCLIPLoss(B, gamma=0.8, backend=backend, distill_weight=float(variant == "distill"),
                                temperature="individual" if variant == "individual" else "global")
        crit.set_epoch(1)
        scales = {"individual": lambda s: (), "per_direction": lambda s: (
            (s, torch.tensor(12.0, device=device, requires_grad=s.requires_grad)),)}.get(variant, lambda s: (s,))
        loss = with_leaves(lambda x, t, s, col: crit(x, t, index, *scales(s), **refs))
    elif impl in FUSED:
        loss = with_leaves(lambda x, t, s, col: dk.drrho_clip_loss(
            x, t, s, u, u, **refs, **col, **ref_cols, offset=offset, backend=impl)[0])
    elif impl == "unfused":
        loss = with_leaves(lambda x, t, s, col: baselines.unfused_drrho_loss(
            x, t, s, u, u, refs.get("ref_img"), refs.get("ref_txt"), **col, **ref_cols, offset=offset)[0])
    elif impl == "clip_ce":
        loss = with_leaves(lambda x, t, s, col: baselines.clip_cross_entropy(x, t, s))
    elif impl == "gemm_floor":
        directions = [(rows[a], cols[b + "_all"], rows.get("ref_" + a), cols.get(f"ref_{b}_all"))
                      for a, b in (("img", "txt"), ("txt", "img"))[:1 + distributed]]
        output_bytes = 0 if mode == "forward" else len(directions) * (B + N) * d * elem
        loss = lambda grad: Floor(directions)                        # noqa: E731
    else:                                                            # authors
        from .authors import load_module
        crit = _theirs(load_module()).SogCLRLoss(B, gamma=0.8, gamma_schedule="cosine", gamma_decay_epochs=10,
                                                 rho=8.0, device=torch.device(device))
        crit.adjust_gamma(1)                                         # epoch 1, as the module variants' set_epoch
        ref_features = (refs["ref_img"], refs["ref_txt"]) if refs else None
        loss = with_leaves(lambda x, t, s, col: crit(features=(x, t), indices=(index, index), logit_scale=s,
                                                     offset=0, ref_features=ref_features)[0])
    return Step(loss, mode), output_bytes
