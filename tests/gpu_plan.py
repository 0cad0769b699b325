"""What the GPU command compiles, counted before it runs (docs/TESTING.md, "The GPU command").

A lease of a GPU is 15 minutes, start-up included, and a cold Triton cache compiles every kernel
variant it meets: the command's cost is counted in compiles. The correctness tests run every kernel at
its default tile (``launch.pinned_tiles``): one compile per kernel variant, dtype and width. The timed
targets autotune: one compile per candidate of the variants they launch. This module lists the cases
of both (the GPU test files take their shapes from here) and counts their distinct compiles on an
H100 (sm_90, 132 SMs: the column splits decided as the launcher decides them), with the registry of
``benchmarks/kernels.py``; tests/test_gpu_checks.py holds the count to the budget.
"""
from __future__ import annotations

import torch

# (B, N or None for one process, d, dr, dtype, path, scheme): the launches of the correctness tests.
# path: plain | per_sample | distill; scheme: "one" (one process), "fold" (gather_u: a shard whose column
# anchors fold in), "columns" (gather_grad: the columns' gradients).
BF, F32, F16 = torch.bfloat16, torch.float32, torch.float16
CORRECTNESS = [
    *((4096, None, 512, 512, dt, "plain", "one") for dt in (BF, F32, F16)),
    *((640, 5120, 512, 512, dt, "plain", "fold") for dt in (BF, F32, F16)),
    *((1000, 3001, 1000, 333, dt, "plain", "columns") for dt in (BF, F32, F16)),
    (4096, None, 512, 512, BF, "distill", "one"), (640, 5120, 512, 512, BF, "distill", "fold"),
    (2048, None, 512, 512, BF, "per_sample", "one"), (2048, None, 512, 512, BF, "distill", "one"),
    (1024, None, 512, 512, BF, "plain", "one"),                   # module, compiled, steady-state steps
    (8, 65536, 64, 32, F16, "plain", "columns"),                  # float16 weights beyond 65504
    (8192, None, 512, 512, BF, "plain", "one"),                   # determinism and memory
]
# The timed targets (autotuned): T1-T4 and T7 B = N = 32768, T5 262144, T6 a shard of 4096 against 65536,
# T8 the paper's rank (640 against 5120, fold) in bfloat16 and float16, T9 a CLIP step at B = 256.
TARGETS = [
    (32768, None, 512, 512, BF, "plain", "one"), (262144, None, 512, 512, BF, "plain", "one"),
    (4096, 65536, 512, 512, BF, "plain", "columns"),
    (640, 5120, 512, 512, BF, "plain", "fold"), (640, 5120, 512, 512, F16, "plain", "fold"),
    (256, None, 512, 512, BF, "plain", "one"),
]
SECONDS_PER_COMPILE = 2.5       # measured here: 134 AOT compiles in 2:01 on 2 cores (sm_80..gfx942, cold cache)
BUDGET_COMPILES = 110           # ~4.6 min of compiles on one core; the H100 host compiles autotune candidates in parallel


def launches(B, N, d, dr, dtype, path, scheme, arch=90):
    """The registry's variants one step of this case launches on ``arch`` (the column splits included)."""
    from benchmarks import kernels as K
    s = K.Shape(B, B if N is None else N, d, dr, dtype, arch)
    roles = K.PATHS[path]
    distill = path == "distill"
    out = []
    if scheme == "one" and K.tiles.transposed_forward_runs(dtype, arch, path != "plain"):
        out += [roles["fwd_t_margin"], roles["fwd_t"], roles["fwd_t_merge"]]
    else:
        fwd = K.VARIANTS[roles["fwd"]]
        out.append(fwd.name)
        if fwd.parts(s, fwd.candidates(d, dr, dtype, arch)[0]) > 1:
            out.append("fwd_merge_extra" if path != "plain" else "fwd_merge")
    rows = roles["bwd_row_fold" if scheme in ("one", "fold") else "bwd_row"]
    split = K.split_parts(s, True, distill) > 1
    out.append(rows + "_split" if split else rows)
    if scheme == "columns":
        out.append(roles["bwd_col"])
    return out


def compiles(arch=90) -> dict:
    """``{"pinned": n, "autotuned": n, "total": n, "keys": [...]}``: the distinct compiles of the command."""
    from benchmarks import kernels as K
    keys = set()
    for case, autotune in [(c, False) for c in CORRECTNESS] + [(c, True) for c in TARGETS]:
        B, N, d, dr, dtype, path, scheme = case
        for name in launches(*case, arch=arch):
            v = K.VARIANTS[name]
            tiles = v.candidates(d, dr, dtype, arch) if v.has_dot else [None]
            for t in tiles if autotune else tiles[:1]:
                keys.add((name, str(dtype), d if v.has_dot or "D" in v.fn.arg_names else 0, dr, t))
    pinned = {k for k in keys}
    return dict(total=len(keys), keys=sorted(map(str, pinned)),
                estimated_s=len(keys) * SECONDS_PER_COMPILE)
