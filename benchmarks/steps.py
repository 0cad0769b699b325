"""The step factory: one loss step per implementation, shape and mode, returned as ``(step, output_bytes)``.

Implementations (each list defined here, once): the fused backends of :func:`drrho_kernels.drrho_clip_loss`,
the baselines (:mod:`benchmarks.baselines`, :class:`Floor`), third-party code run only when present
(``inf_cl``: Inf-CL, CUDA; ``authors``: :mod:`benchmarks.authors`). ``N > B``: one process of a distributed
step. Every run makes fresh leaves: the gradients are allocated in the step (``output_bytes``).

``step()`` runs the whole step (a fresh forward, then ``loss.backward()`` unless the mode is
``forward``); ``step.prepare()`` does the untimed part and returns the callable to time: in mode
``backward`` a fresh forward, returning its ``loss.backward``; otherwise nothing, returning the step.
"""
from __future__ import annotations

import torch

from . import baselines

FUSED = ("torch", "cpp", "triton", "reference")
BASELINES = ("unfused", "clip_ce", "gemm_floor")
OPTIONAL = ("inf_cl", "authors")          # third-party code, run only when importable (never a dependency)
IMPLS = FUSED + BASELINES + OPTIONAL
NO_REF = ("clip_ce", "inf_cl")            # they have no reference model
SQUARE_ONLY = ("clip_ce", "inf_cl", "authors")   # defined for one process only (N == B)
MODES = ("forward", "backward", "forward_backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class Step:
    """``loss(grad)`` builds a fresh forward (with autograd when ``grad``) and returns its loss."""

    def __init__(self, loss, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.loss, self.mode = loss, mode

    def prepare(self):
        return self.loss(True).backward if self.mode == "backward" else self

    def __call__(self):
        loss = self.loss(self.mode != "forward")
        if self.mode != "forward":
            loss.backward()


class Floor:
    """The GEMM floor: the forward's similarities per direction; ``backward()`` recomputes them and does
    the two weighted products ``P T``, ``P^T x`` (:func:`floor_gemm_count`)."""

    def __init__(self, directions):
        self.directions = directions
        for d in directions:
            self.similarities(*d)

    @staticmethod
    def similarities(rows, cols, ref_rows, ref_cols):
        if ref_rows is not None:
            ref_rows @ ref_cols.T
        return rows @ cols.T

    def backward(self):
        for rows, cols, ref_rows, ref_cols in self.directions:
            sim = self.similarities(rows, cols, ref_rows, ref_cols)
            sim @ cols, sim.T @ rows


def floor_gemm_count(B: int, N: int, ref: bool = True, mode: str = "forward_backward") -> int:
    """``[B, d] x [d, N]``-sized products of the floor: per direction, the forward's similarities (2 with a
    reference, 1 without), the backward's recomputation and two weighted products (4, 3). One process has
    one direction (the text anchors' matrix is the transpose); a distributed shard two."""
    per_direction = {"forward": 2 if ref else 1, "backward": 4 if ref else 3}
    count = per_direction.get(mode) or per_direction["forward"] + per_direction["backward"]
    return count * (1 if N == B else 2)


def make_inputs(B, N, d, dr, dtype, ref, device, seed=0):
    """The columns ``{img_all, txt_all[, ref_img_all, ref_txt_all]}`` (unit rows) and the rows' offset."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    widths = {"img_all": d, "txt_all": d, **({"ref_img_all": dr, "ref_txt_all": dr} if ref else {})}
    return {k: torch.nn.functional.normalize(torch.randn(N, w, generator=g), dim=1).to(device=device, dtype=dtype)
            for k, w in widths.items()}, (N - B) // 2


def make_step(impl: str, B: int, N: int, d: int = 512, dr: int = 512, dtype: str = "float32", ref: bool = True,
              device: str = "cpu", mode: str = "forward_backward", seed: int = 0):
    """Build the inputs once; return ``(step, output_bytes)`` (module doc)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    distributed = N != B
    if distributed and impl in SQUARE_ONLY:
        raise ValueError(f"{impl}: only the single-process shape (N == B) is benchmarked")
    cols, offset = make_inputs(B, N, d, dr, DTYPES[dtype], ref, device, seed)
    rows = {k.replace("_all", ""): v[offset:offset + B] for k, v in cols.items()}
    refs = {k: v for k, v in rows.items() if k.startswith("ref_")}
    ref_cols = {k: v for k, v in cols.items() if k.startswith("ref_")} if distributed else {}
    u = torch.zeros(B, device=device)
    elem = DTYPES[dtype].itemsize
    column_grads = distributed and impl in FUSED + ("unfused",)
    output_bytes = 0 if mode == "forward" else (2 * B * d + (2 * N * d if column_grads else 0)) * elem

    def with_leaves(fn):
        # detach(): new leaves sharing the inputs' storage, so every run allocates fresh gradients but
        # neither copies nor counts the inputs.
        def loss(grad):
            x, t = (rows[k].detach().requires_grad_(grad) for k in ("img", "txt"))
            col = {k: cols[k].detach().requires_grad_(grad) for k in ("img_all", "txt_all")} if distributed else {}
            return fn(x, t, torch.tensor(14.0, device=device, requires_grad=grad), col)
        return loss

    if impl in FUSED:
        import drrho_kernels as dk
        loss = with_leaves(lambda x, t, s, col: dk.drrho_clip_loss(
            x, t, s, u, u, **refs, **col, **ref_cols, offset=offset, backend=impl)[0])
    elif impl == "unfused":
        loss = with_leaves(lambda x, t, s, col: baselines.unfused_drrho_loss(
            x, t, s, u, u, refs.get("ref_img"), refs.get("ref_txt"), **col, **ref_cols, offset=offset)[0])
    elif impl == "clip_ce":
        loss = with_leaves(lambda x, t, s, col: baselines.clip_cross_entropy(x, t, s))
    elif impl == "gemm_floor":
        directions = [(rows["img"], cols["txt_all"], refs.get("ref_img"), cols.get("ref_txt_all"))]
        if distributed:
            directions.append((rows["txt"], cols["img_all"], refs.get("ref_txt"), cols.get("ref_img_all")))
        output_bytes = 0 if mode == "forward" else len(directions) * (B + N) * d * elem
        loss = lambda grad: Floor(directions)                        # noqa: E731
    elif impl == "inf_cl":
        from inf_cl import cal_inf_loss                              # optional; ImportError when absent
        head = next(h for h in (256, 128, 64, 32, 16) if d % h == 0)
        # CLIP needs both directions: Inf-CL computes one cross-entropy per call.
        loss = with_leaves(lambda x, t, s, col: (cal_inf_loss(x, t, scale=s, head_dim=head)
                                                 + cal_inf_loss(t, x, scale=s, head_dim=head)) / 2)
    else:                                                            # authors
        from .authors import load_module
        module, where = load_module()
        if module is None:
            raise ImportError(f"authors: {where}")
        crit = module.SogCLRLoss(B, gamma=0.8, gamma_schedule="cosine", gamma_decay_epochs=10, rho=8.0,
                                 device=torch.device(device))
        index = torch.arange(B, device=device)
        ref_features = (refs["ref_img"], refs["ref_txt"]) if refs else None
        loss = with_leaves(lambda x, t, s, col: crit(features=(x, t), indices=(index, index), logit_scale=s,
                                                     offset=0, ref_features=ref_features)[0])
    return Step(loss, mode), output_bytes
