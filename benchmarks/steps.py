"""One benchmark step per implementation: built from a shape, returned as ``(step, output_bytes)``.

Implementations: the fused backends (``torch``, ``cpp``, ``triton``, ``reference``) through
:func:`drrho_kernels.drrho_clip_loss`, and the baselines of :mod:`benchmarks.baselines`
(``unfused``, ``clip_ce``, ``gemm_floor``), plus ``inf_cl`` (Inf-CL's ``cal_inf_loss``, CUDA only,
used when the ``inf_cl`` package is importable; never a dependency) and ``authors`` (the authors'
released ``SogCLRLoss`` from a local snapshot, :mod:`benchmarks.authors`; single process). ``mode`` is ``"forward"`` or
``"forward_backward"``; the GEMM floor does the products of that mode at that shape
(:func:`floor_gemm_count`).
``N > B`` is the shape of one process of a distributed run: B local rows against N gathered columns.
Every step creates fresh leaves, so gradients are allocated inside the step (and counted in
``output_bytes``, which memory measurements subtract).
"""
from __future__ import annotations

import torch

from . import baselines

FUSED = ("torch", "cpp", "triton", "reference")
BASELINES = ("unfused", "clip_ce", "gemm_floor")
OPTIONAL = ("inf_cl", "authors")  # third-party code, run only when importable (never a dependency)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def make_inputs(B, N, d, dr, dtype, ref, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    def emb(n, width):
        x = torch.nn.functional.normalize(torch.randn(n, width, generator=g), dim=1)
        return x.to(device=device, dtype=dtype)
    cols = {"img_all": emb(N, d), "txt_all": emb(N, d)}
    if ref:
        cols.update(ref_img_all=emb(N, dr), ref_txt_all=emb(N, dr))
    offset = (N - B) // 2
    return cols, offset


def make_step(impl: str, B: int, N: int, d: int = 512, dr: int = 512, dtype: str = "float32", ref: bool = True,
              device: str = "cpu", mode: str = "forward_backward", seed: int = 0):
    """Build inputs once; return ``(step, output_bytes)`` where ``step()`` runs one loss evaluation."""
    torch_dtype = DTYPES[dtype]
    cols, offset = make_inputs(B, N, d, dr, torch_dtype, ref, device, seed)
    rows = {k.replace("_all", ""): v[offset:offset + B] for k, v in cols.items()}
    distributed = N != B
    u = torch.zeros(B, device=device)
    backward = mode == "forward_backward"
    if mode not in ("forward", "forward_backward"):
        raise ValueError(f"mode: expected 'forward' or 'forward_backward', got {mode!r}")
    elem = torch.empty((), dtype=torch_dtype).element_size()
    grads = 2 * B * d * elem + (2 * N * d * elem if distributed and impl in FUSED + ("unfused",) else 0)
    output_bytes = grads if backward else 0

    def leaves():
        # detach(): new leaf objects sharing the inputs' storage, so every step allocates fresh
        # gradients but neither copies nor counts the inputs (a clone would add 2 B d elements).
        x = rows["img"].detach().requires_grad_(backward)
        t = rows["txt"].detach().requires_grad_(backward)
        if not distributed:
            return x, t, {}
        X = cols["img_all"].detach().requires_grad_(backward)
        T = cols["txt_all"].detach().requires_grad_(backward)
        return x, t, {"img_all": X, "txt_all": T}

    refs = {k: v for k, v in rows.items() if k.startswith("ref_")}
    ref_cols = {k: v for k, v in cols.items() if k.startswith("ref_")} if distributed else {}

    if impl in FUSED:
        import drrho_kernels as dk

        def step():
            x, t, col = leaves()
            s = torch.tensor(14.0, device=device, requires_grad=backward)
            loss, _, _ = dk.drrho_clip_loss(x, t, s, u, u, **refs, **col, **ref_cols, offset=offset if distributed else 0,
                                            backend=impl)
            if backward:
                loss.backward()
    elif impl == "unfused":
        def step():
            x, t, col = leaves()
            s = torch.tensor(14.0, device=device, requires_grad=backward)
            loss, _, _ = baselines.unfused_drrho_loss(x, t, s, u, u, refs.get("ref_img"), refs.get("ref_txt"),
                                                      **col, **ref_cols, offset=offset if distributed else 0)
            if backward:
                loss.backward()
    elif impl == "clip_ce":
        output_bytes = 2 * B * d * elem if backward else 0
        if distributed:
            raise ValueError("clip_ce: only the single-process shape (N == B) is defined")

        def step():
            x, t, _ = leaves()
            s = torch.tensor(14.0, device=device, requires_grad=backward)
            loss = baselines.clip_cross_entropy(x, t, s)
            if backward:
                loss.backward()
    elif impl == "gemm_floor":
        # One direction (image anchors vs text columns) in one process, where the text-anchor
        # matrix is the transpose of the same product; both directions for a distributed shard.
        directions = [(rows["img"], cols["txt_all"], refs.get("ref_img"), cols.get("ref_txt_all"))]
        if distributed:
            directions.append((rows["txt"], cols["img_all"], refs.get("ref_txt"), cols.get("ref_img_all")))
        output_bytes = len(directions) * (B + N) * d * elem if backward else 0

        def step():
            for rows_, cols_, ref_rows, ref_cols in directions:
                if backward:
                    baselines.gemm_floor(rows_, cols_, ref_rows, ref_cols)
                else:                                        # forward: the similarities only
                    rows_ @ cols_.T
                    if ref_rows is not None:
                        ref_rows @ ref_cols.T
    elif impl == "inf_cl":
        if distributed:
            raise ValueError("inf_cl: only the single-process shape (N == B) is benchmarked")
        from inf_cl import cal_inf_loss                      # optional; ImportError when absent
        output_bytes = 2 * B * d * elem if backward else 0
        head_dim = next(h for h in (256, 128, 64, 32, 16) if d % h == 0)

        def step():
            x, t, _ = leaves()
            s = torch.tensor(14.0, device=device, requires_grad=backward)
            # CLIP needs both directions: Inf-CL computes one cross-entropy per call.
            loss = (cal_inf_loss(x, t, scale=s, head_dim=head_dim)
                    + cal_inf_loss(t, x, scale=s, head_dim=head_dim)) / 2
            if backward:
                loss.backward()
    elif impl == "authors":
        from .authors import load_module
        module, where = load_module()
        if module is None:
            raise ImportError(f"authors: {where}")
        if distributed:
            raise ValueError("authors: only the single-process shape (N == B) is benchmarked")
        output_bytes = 2 * B * d * elem if backward else 0
        crit = module.SogCLRLoss(B, gamma=0.8, gamma_schedule="cosine", gamma_decay_epochs=10, rho=8.0,
                                 device=torch.device(device))
        index = torch.arange(B, device=device)
        ref_features = (refs["ref_img"], refs["ref_txt"]) if refs else None

        def step():
            x, t, _ = leaves()
            s = torch.tensor(14.0, device=device, requires_grad=backward)
            loss = crit(features=(x, t), indices=(index, index), logit_scale=s, offset=0,
                        ref_features=ref_features)[0]
            if backward:
                loss.backward()
    else:
        raise ValueError(f"impl: expected one of {FUSED + BASELINES + OPTIONAL}, got {impl!r}")
    return step, output_bytes


def floor_gemm_count(B: int, N: int, ref: bool = True, mode: str = "forward_backward") -> int:
    """Number of ``[B, d] x [d, N]``-sized products the ``gemm_floor`` step does (and a fused step needs).

    One process (``N == B``): the forward needs the target (and reference) similarity, the backward
    recomputes them and does the two weighted products (``P T`` and ``P^T x``): 6 with a reference, 4
    without; the forward alone 2 (1). A distributed shard (``N != B``) has two distinct directions
    (``x T^T`` and ``t X^T`` are no longer transposes of each other), so every count doubles: 12 (8)
    for forward + backward, 4 (2) for the forward.
    """
    per_direction = (2 if ref else 1) if mode == "forward" else (6 if ref else 4)
    return per_direction * (1 if N == B else 2)
