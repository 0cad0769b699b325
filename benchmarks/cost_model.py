"""Analytic cost of one DRRho-CLIP step (forward + backward): fused Triton kernels, unfused loss, GEMM floor.

A static tool (no timing). :func:`triton_cost`: the kernels as ``kernels.VARIANTS`` launches them (the
path's variants, their default tiles, grids and score tiles; one process runs the transposed forward
where its path has a tile), FLOPs as the tensor cores execute them (partial tiles padded; the backward
recomputes the score tiles for each of its d-slices); HBM: the outer block read once, the inner vectors
once per wave of resident programs, per-row vectors and outputs once. :func:`unfused_cost`:
``baselines.unfused_drrho_loss`` traced at a proxy shape (every aten op reads its inputs from and writes
its outputs to HBM); :func:`floor_cost`: the GEMM floor. Roofline from ``kernels.HW`` (default sm_90).
Two designs not built are priced too. ``python -m benchmarks.cost_model`` writes ``results/cost_model.json``."""
from __future__ import annotations

import argparse
import functools
import math

import torch

from . import harness
from . import kernels as K

F32 = 4
DISTILL_EXPS = 2     # per score and direction: exp(s <x, T>) of the student, exp(t_d <xr, Tr>) of the teacher


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(n: int, block: int) -> int:
    return _cdiv(n, block) * block


def _launch(role, v, s, t, *, exps_per_score=1, hbm_bytes, ppu=1, **extra):
    """FLOPs (tensor-core, executed), exponentials and HBM bytes of one launch of variant ``v``;
    ``hbm_bytes(waves)`` counts the inner vectors once per wave of resident row programs (a split's parts
    share the inner vectors out: they count as one program there)."""
    grid, waves = v.grid(s, t), v.waves(s, t, ppu)
    row_waves = _cdiv(math.prod(grid) // v.parts(s, t), K.HW[s.arch].units * ppu)
    n, score, weighted = (v.tiles_of(s, t, v), *v.tile_flops(t, s.d, s.dr)) if v.has_dot else (0, 0, 0)
    return dict(kernel=role, grid=list(grid), tiles=t.name, programs=math.prod(grid), waves=waves,
                flops=n * (score + weighted), score_flops=n * score, weighted_flops=n * weighted,
                exps=n * t.BM * t.BN * exps_per_score if n else 0, hbm_bytes=hbm_bytes(row_waves),
                parts=v.parts(s, t), **extra)


def triton_kernels(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90,
                   programs_per_sm=1, tiles=None, distill=False):
    """Per-kernel costs of one forward + backward. ``column_grads`` (default ``N != B``): the scheme that gathers
    with gradient (row kernel without fold + column kernel); else the row kernel folds the column anchors' terms.
    ``tiles``: ``{"fwd" | "fwdt" | "bwd": Tiles}`` instead of the default (first) candidates. ``distill`` (needs
    ``ref``): the distillation path (SPEC 2.2): the same products, ``DISTILL_EXPS`` more exponentials per score
    and the rows' two log-sum-exps per direction as extra per-row vectors."""
    if distill and not ref:
        raise ValueError("distill: the teacher is the reference model (ref=True)")
    extra = DISTILL_EXPS * distill
    dr = d if dr is None else dr
    s = K.Shape(B, N, d, dr if ref else 0, getattr(torch, dtype), arch)
    column_grads = (N != B) if column_grads is None else column_grads
    v = {role: K.VARIANTS[name] for role, name in K.PATHS["distill" if distill else "plain"].items()}

    def tile(role):
        return (tiles or {}).get(v[role].kernel) or v[role].candidates(d, s.dr, s.dtype, arch)[0]
    vec = lambda n: n * (d + s.dr) * s.dtype.itemsize            # noqa: E731  target + reference vectors
    if N == B and not column_grads and K.tiles.transposed_forward_runs(s.dtype, arch, distill):
        # margins, then each score tile once for both directions (two exps per score), then the merge. HBM: the
        # columns once (a group's panel is shared in L2), the rows once per panel, scale [2, B] and margins [B],
        # the partials written once and read by the merge; the slots' read-modify-writes stay in L2
        plan, tt = K.plan(s, v["fwd_t"]), tile("fwd_t")
        n_bm, n_panels = _cdiv(B, tt.BM), _cdiv(_cdiv(_cdiv(B, tt.BN), plan.groups), max(1, plan.panel_cols // tt.BN))
        partial, merge = plan.partial_bytes(B), tile("fwd_t_merge")
        ks = [_launch("fwd_t_margin", v["fwd_t_margin"], s, tile("fwd_t_margin"), hbm_bytes=lambda w: 2 * vec(B) + 3 * F32 * B),
              _launch("fwd_t", v["fwd_t"], s, tt, exps_per_score=2 * (1 + extra), ppu=programs_per_sm,
                      hbm_bytes=lambda w: vec(B) + n_panels * vec(B) + 3 * F32 * B + partial,
                      plan=dict(groups=plan.groups, splits=plan.splits, panel_cols=plan.panel_cols, panels=n_panels),
                      partial_bytes=partial, l2_partial_bytes=2 * 3 * F32 * (v["fwd_t"].tiles_of(s, tt, v["fwd_t"]) * tt.BN
                                                                             + n_panels * plan.groups * n_bm * tt.BM)),
              _launch("fwd_t_merge", v["fwd_t_merge"], s, merge, hbm_bytes=lambda w: partial + 6 * F32 * B)]
        ks[2]["exps"] = 2 * (plan.groups + plan.splits) * B
    else:
        # each direction reads its rows, its margin prologue the partner rows; scale [2, B] read, statistics
        # [2, 3, B] and margins [B] written; then the positives [2, B], one pass over the rows in PyTorch
        ks = [_launch("fwd", v["fwd"], s, tile("fwd"), exps_per_score=1 + extra, ppu=programs_per_sm,
                      hbm_bytes=lambda w: 4 * vec(B) + w * 2 * vec(N) + F32 * B * (2 + 6 + 1 + 3 * extra)),
              dict(kernel="fwd_positives", grid=[1], tiles=tile("fwd").name, programs=1, waves=1, flops=0, score_flops=0,
                   weighted_flops=0, exps=0, hbm_bytes=2 * vec(B) + 2 * F32 * B)]
    fold, tb = not column_grads, tile("bwd_row")
    slices = _cdiv(d, tb.BD)
    # every d-slice program re-reads its outer rows, and the partner rows once per slice in the epilogue. Per
    # row: scale, norm, gain, wsum [2, B] and margins [B]; a fold's columns (one process: the rows' own):
    # scale, norm, gain [2, N], margins [N]
    ks.append(_launch("bwd_row_fold" if fold else "bwd_row", v["bwd_row_fold" if fold else "bwd_row"], s, tb,
                      exps_per_score=(2 if fold else 1) * (1 + extra), ppu=programs_per_sm,
                      hbm_bytes=lambda w: slices * (2 * vec(B) + 2 * B * tb.BD * s.dtype.itemsize) + w * 2 * vec(N)
                      + F32 * (9 * B + (7 * N if fold else 0) + 2 * extra * (B + (N if fold else 0)))
                      + 2 * B * d * s.dtype.itemsize))
    if column_grads:
        ks.append(_launch("bwd_col", v["bwd_col"], s, tile("bwd_col"), exps_per_score=1 + extra, ppu=programs_per_sm,
                          hbm_bytes=lambda w: slices * 2 * vec(N) + w * 2 * vec(B) + F32 * (7 + 2 * extra) * B
                          + 2 * N * d * s.dtype.itemsize))
    return ks


def _roofline(flops, hbm_bytes, exps, dtype, arch=90):
    hw = K.HW[arch]
    peak = K.fp32_dot_flops(arch) if dtype == "float32" else hw.peak_flops["bf16"]
    t_mma, t_hbm = flops / peak, hbm_bytes / hw.hbm_bytes_per_s
    t_exp = exps / (hw.units * hw.clock_hz * hw.exp_per_clk) if exps else 0.0
    bound = max((t_mma, "tensor cores"), (t_hbm, "HBM"), (t_exp, "exp (MUFU)"))
    return dict(intensity_flop_per_byte=flops / hbm_bytes if hbm_bytes else math.inf,
                ridge_flop_per_byte=peak / hw.hbm_bytes_per_s, t_tensor_s=t_mma, t_hbm_s=t_hbm,
                t_exp_s=t_exp, t_bound_s=bound[0], bound_by=bound[1])


def triton_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90, **kw) -> dict:
    """FLOPs and HBM bytes of one fused forward + backward, per kernel, and a roofline (``distill=True``:
    with the distillation term, see :func:`triton_kernels`)."""
    ks = triton_kernels(B, N, d, dr, dtype, ref, column_grads, arch, **kw)
    flops, hbm, exps = (sum(k[f] for k in ks) for f in ("flops", "hbm_bytes", "exps"))
    return dict(impl="triton", flops=flops, hbm_bytes=hbm, exps=exps, kernels=ks, **_roofline(flops, hbm, exps, dtype, arch))


def floor_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None) -> dict:
    """The GEMM floor (``steps.Floor``) and the compulsory traffic: per distinct score matrix (one in one process,
    two for a shard) the similarities, their recomputation and the two weighted products; the scheme that
    gathers ``u`` needs no column product. Every input read once per pass, gradients written once."""
    dr_eff = (d if dr is None else dr) if ref else 0
    column_grads = (N != B) if column_grads is None else column_grads
    elem = getattr(torch, dtype).itemsize
    matrices = 1 if N == B else 2
    weighted = 2 if (N == B or column_grads) else 1
    flops = matrices * (2 * (2 * B * N * (d + dr_eff)) + weighted * (2 * B * N * d))
    inputs = (B * (d + dr_eff) * 2 + (N * (d + dr_eff) * 2 if N != B else 0)) * elem
    hbm = 2 * inputs + (2 * B * d + (2 * N * d if column_grads else 0)) * elem
    exps = 2 * matrices * B * N        # every weight once in the forward, once recomputed
    return dict(impl="gemm_floor", flops=flops, hbm_bytes=hbm, exps=exps, score_matrices=matrices,
                **_roofline(flops, hbm, exps, dtype))


_PROXY = dict(B=6, N=14, d=5, dr=9)     # distinct values: every tensor dimension names its symbol


@functools.lru_cache(maxsize=None)
def _unfused_trace(dtype: str, ref: bool, distributed: bool):
    """Aten ops of one unfused forward + backward at the proxy shape: ``(op, reads, writes, mm)`` with
    ``(symbols, itemsize)`` per tensor; views move no data, a broadcast (stride 0) dimension is not read."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from . import baselines, steps
    P = dict(_PROXY, **({} if distributed else {"N": _PROXY["B"]}))
    names = {P["B"]: "B", P["N"]: "N", P["d"]: "d", P["dr"]: "dr"}

    def symbols(t, read):
        return tuple(names.get(s, s) for s, st in zip(t.shape, t.stride()) if not (read and st == 0))
    ops = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "is_view", False) or func.__name__.split(".")[0] in ("detach", "alias", "lift_fresh"):
                return out
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            mm = None
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
                a, b = flat_in[-2], flat_in[-1]
                mm = tuple(names.get(n, n) for n in (a.shape[-2], a.shape[-1], b.shape[-1]))
            ops.append((func.__name__, [(symbols(a, True), a.element_size()) for a in flat_in if a.numel() > 1],
                        [(symbols(o, False), o.element_size()) for o in flat_out if o.numel() > 1], mm))
            return out

    cols, off = steps.make_inputs(P["B"], P["N"], P["d"], P["dr"], getattr(torch, dtype), ref, "cpu")
    x, t = (cols[k][off:off + P["B"]].clone().requires_grad_() for k in ("img_all", "txt_all"))
    rx, rt = (cols[k][off:off + P["B"]] if ref else None for k in ("ref_img_all", "ref_txt_all"))
    for k in ("img_all", "txt_all"):
        cols[k].requires_grad_(distributed)
    u = torch.zeros(P["B"])
    s = torch.tensor(14.0, requires_grad=True)
    with Trace():
        loss, _, _ = baselines.unfused_drrho_loss(x, t, s, u, u, rx, rt, offset=off, **(cols if distributed else {}))
        loss.backward()
    return ops


def unfused_cost(B, N, d, dr=None, dtype="bfloat16", ref=True) -> dict:
    """FLOPs and HBM bytes of ``baselines.unfused_drrho_loss`` forward + backward at this shape."""
    real = dict(B=B, N=N, d=d, dr=d if dr is None else dr)
    size = lambda syms: math.prod(real.get(s, s) if isinstance(s, str) else s for s in syms)  # noqa: E731
    flops = hbm = bn_bytes = n_bn = 0
    for _name, reads, writes, mm in _unfused_trace(dtype, ref, N != B):
        for syms, item in reads + writes:
            hbm += size(syms) * item
            if sum(s in ("B", "N") for s in syms) >= 2:       # a [B, N] matrix (B and N coincide in one process)
                bn_bytes, n_bn = bn_bytes + size(syms) * item, n_bn + 1
        flops += 2 * size(mm) if mm is not None else 0
    return dict(impl="unfused", flops=flops, hbm_bytes=hbm, bn_matrix_bytes=bn_bytes, bn_matrix_passes=n_bn,
                bn_matrix_bytes_each=B * N * 4, exps=4 * B * N, **_roofline(flops, hbm, 4 * B * N, dtype))


def _bwd_tiles(d, dr, dtype, ref, arch):
    return K.VARIANTS["bwd_row"].candidates(d, dr if ref else 0, getattr(torch, dtype), arch)[0]


def grad_in_forward_flops(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90) -> dict:
    """The design not built, for the record: the forward also accumulates the row gradient (flash-attention
    style, same tiles and d-slices as the backward), the backward only the column terms."""
    dr = d if dr is None else dr
    t = _bwd_tiles(d, dr, dtype, ref, arch)
    slices = _cdiv(d, t.BD)
    S = lambda rows, cols: 2 * _pad(rows, t.BM) * _pad(cols, t.BN) * (  # noqa: E731
        _pad(d, t.BK) + (_pad(dr, t.BKR) if ref else 0))
    W = lambda rows, cols: 2 * _pad(rows, t.BM) * _pad(cols, t.BN) * slices * t.BD  # noqa: E731
    fwd = 2 * (slices * S(B, N) + W(B, N))    # per direction: each slice recomputes the scores, plus the row product
    outer, inner = (N, B) if ((N != B) if column_grads is None else column_grads) else (B, N)
    bwd = 2 * (slices * S(outer, inner) + W(outer, inner))
    return dict(design="gradient in forward", flops=fwd + bwd, fwd_flops=fwd, bwd_flops=bwd)


def transposed_backward_alternative(B, d, dr=None, dtype="bfloat16", ref=True, arch=90) -> dict:
    """The backward with the transpose trick, for the record (one process): each tile S_ij computed once feeds
    d x_i += P_ij t_j and d t_j += P_ij^T x_i. ``atomic_bytes``: float32 atomics into d t (non-deterministic);
    ``partial_bytes``: one [N, d] float32 accumulator per row group instead, ``partial_rmw_bytes`` its per-tile
    read-modify-write. ``flops``: both accumulators in registers halve BD; ``flops_same_bd``: today's BD,
    needing ``acc_regs_same_bd`` registers per thread."""
    dr = d if dr is None else dr
    t = _bwd_tiles(d, dr, dtype, ref, arch)
    n_bm, n_bn = _cdiv(B, t.BM), _cdiv(B, t.BN)
    tile_s = 2 * t.BM * t.BN * (_pad(d, t.BK) + (_pad(dr, t.BKR) if ref else 0))
    tile_w = 2 * t.BM * t.BN * _pad(d, t.BD)            # one weighted product over all of d
    hw = K.HW[arch]
    groups = K.tiles.transposed_plan(B, t.BM, t.BN, (d + (dr if ref else 0)) * getattr(torch, dtype).itemsize,
                                     hw.units, hw.l2_bytes).splits          # row groups: the forward plan's splits
    return dict(design="backward with the transpose trick", tiles=t.name,
                flops=n_bm * n_bn * (_cdiv(d, max(16, t.BD // 2)) * tile_s + 2 * tile_w),
                flops_same_bd=n_bm * n_bn * (_cdiv(d, t.BD) * tile_s + 2 * tile_w),
                acc_regs_same_bd=(t.BM + t.BN) * t.BD // (32 * t.num_warps), atomic_bytes=2 * 4 * n_bm * B * d,
                row_groups=groups, partial_bytes=4 * groups * B * d, partial_rmw_bytes=2 * 4 * n_bm * n_bn * t.BM * d)


SHAPES = (
    dict(B=32768, N=32768, d=512, dr=512),
    dict(B=262144, N=262144, d=512, dr=512),
    dict(B=4096, N=65536, d=512, dr=512),                        # one of 16 processes, gather with grad
    dict(B=4096, N=65536, d=512, dr=512, column_grads=False),    # same, the scheme that gathers u (fold)
    dict(B=4096, N=16384, d=768, dr=768),
    dict(B=32768, N=32768, d=1024, dr=1024),
    # the widest common CLIP embeddings (ViT-L 768, ViT-H 1024, ViT-bigG 1280) with a ViT-B reference (512)
    dict(B=32768, N=32768, d=768, dr=512),
    dict(B=32768, N=32768, d=1024, dr=512),
    dict(B=32768, N=32768, d=1280, dr=512),
)


def report(shapes=SHAPES, dtypes=("bfloat16", "float32")) -> dict:
    rows = []
    for shape, dtype in ((s, t) for s in shapes for t in dtypes):
        row = dict(shape=shape, dtype=dtype, triton=triton_cost(**shape, dtype=dtype),
                   triton_distill=triton_cost(**shape, dtype=dtype, distill=True),
                   unfused=unfused_cost(**{k: shape[k] for k in ("B", "N", "d", "dr")}, dtype=dtype),
                   floor=floor_cost(**shape, dtype=dtype), grad_in_forward=grad_in_forward_flops(**shape, dtype=dtype))
        if shape["B"] == shape["N"]:
            row["transposed_backward"] = transposed_backward_alternative(shape["B"], shape["d"], shape["dr"], dtype)
        rows.append(row)
    return dict(hardware=K.HW[90].__dict__, model=__doc__.split("\n\n")[0], rows=rows)


def _fmt(x, unit):
    for k, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= k:
            return f"{x / k:.2f} {s}{unit}"
    return f"{x:.0f} {unit}"


def table(rep: dict) -> str:
    lines = [f"{'shape':<30}{'dtype':<9}{'impl':<9}{'FLOP':>12}{'HBM':>11}{'FLOP/B':>9}{'t_mma':>9}{'t_hbm':>9}"
             f"{'t_exp':>9}  bound"]
    for r in rep["rows"]:
        s, tri, dis = r["shape"], r["triton"], r["triton_distill"]
        label = f"B={s['B']} N={s['N']} d={s['d']}" + (" fold" if s.get("column_grads") is False else "")
        for impl in ("floor", "triton", "unfused"):
            c = r[impl]
            lines.append(f"{label:<30}{r['dtype']:<9}{impl:<9}{_fmt(c['flops'], 'F'):>12}{_fmt(c['hbm_bytes'], 'B'):>11}"
                         f"{c['intensity_flop_per_byte']:>9.0f}"
                         + "".join(f"{c[k] * 1e3:>8.2f}m" for k in ("t_tensor_s", "t_hbm_s", "t_exp_s"))
                         + f"  {c['bound_by']}")
        lines.append(f"{'':<39}triton/floor FLOP {tri['flops'] / r['floor']['flops']:.2f}x; unfused/triton HBM "
                     f"{r['unfused']['hbm_bytes'] / tri['hbm_bytes']:.0f}x; grad-in-forward design "
                     f"{r['grad_in_forward']['flops'] / tri['flops']:.2f}x the FLOPs; kernels: "
                     + ", ".join(f"{k['kernel']} {k['tiles']} grid {k['grid']}" + (f" plan {k['plan']}" if "plan" in k
                                                                                    else "") for k in tri["kernels"]))
        lines.append(f"{'':<39}with distillation: FLOP {dis['flops'] / tri['flops']:.2f}x (no extra product), exps "
                     f"{dis['exps'] / tri['exps']:.2f}x, t_exp {dis['t_exp_s'] * 1e3:.2f}m, bound "
                     f"{dis['t_bound_s'] / tri['t_bound_s']:.2f}x ({dis['bound_by']})")
    return "\n".join(lines)


def markdown(rep: dict) -> str:
    """The README's table: every shape and dtype, modelled H100 time of each path and the ratios."""
    lines = ["| shape | dtype | Triton: modelled time (bound) | / GEMM floor | / unfused loss | with distillation |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rep["rows"]:
        s, tri = r["shape"], r["triton"]
        shape = (f"B = {s['B']}, N = {s['N']}, d = {s['d']}, dr = {s['dr']}"
                 + (", `gather_u`" if s.get("column_grads") is False else (", `gather_grad`" if s["N"] != s["B"] else "")))
        ratio_u = tri["t_bound_s"] / r["unfused"]["t_bound_s"]
        bold = "**" if ratio_u > 1 else ""
        lines.append(f"| {shape} | {r['dtype']} | {tri['t_bound_s'] * 1e3:.1f} ms ({tri['bound_by']}) | "
                     f"{tri['t_bound_s'] / r['floor']['t_bound_s']:.2f}x | {bold}{ratio_u:.2f}x{bold} | "
                     f"{r['triton_distill']['t_bound_s'] / tri['t_bound_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=harness.RESULTS_DIR / "cost_model.json")
    parser.add_argument("--markdown", action="store_true", help="print the README's table instead of the text one")
    args = parser.parse_args(argv)
    rep = report()
    print(markdown(rep) if args.markdown else table(rep))
    print(f"written {harness.write_json(args.out, rep)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
