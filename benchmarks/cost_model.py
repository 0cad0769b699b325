"""Modelled cost of one DRRho-CLIP forward + backward on an H100, no timing: our Triton kernels (with and without
the column split), the unfused loss (also under autocast) and the GEMM floor: FLOPs, exponentials, HBM bytes,
launches, time in waves (docs/RESULTS.md, "The cost model"). -> results/cost_model.json"""

import argparse
import functools
import json
import math

import torch

import drrho_kernels as dk

from . import harness
from . import kernels as K

F32, DISTILL_EXPS = 4, 2     # DISTILL_EXPS per score and direction: exp(s <x, T>), exp(t_d <xr, Tr>) of the teacher
LAUNCH_S = 4e-6     # per launch, an assumption (~3-4 us in NVIDIA's "Getting Started with CUDA Graphs")
OCCUPANCY = harness.RESULTS_DIR / "triton_aot_default_tiles_sm90_3.9.0.json"
_PROXY = dict(B=6, N=14, d=5, dr=9)     # distinct values: every tensor dimension names its symbol


@functools.lru_cache(maxsize=None)
def _occupancy() -> dict:
    """(variant, dtype, arch, D, DR, tiles) -> programs per SM, from the AOT report of the default tiles."""
    rows = json.loads(OCCUPANCY.read_text())["rows"] if OCCUPANCY.exists() else []
    return {(r["kernel"], r["dtype"], K.parse_arch(r["arch"]), r["D"], r["DR"], r["config"]): r["programs_per_unit"]
            for r in rows if "programs_per_unit" in r}


def wave_time(programs: int, per_sm: int, sms: int, t_bound: float) -> float:
    """Seconds of ``programs`` taking ``t_bound`` on the GPU: whole waves, each the busiest SM's share."""
    return K._cdiv(programs, sms * per_sm) * min(per_sm, K._cdiv(programs, sms)) * sms / programs * t_bound


def _roofline(flops, hbm_bytes, exps, dtype, arch=90) -> dict:
    hw = K.HW[arch]
    peak = K.fp32_dot_flops(arch) if dtype in ("float32", "fp32") else hw.peak_flops["bf16"]
    t = {"t_tensor_s": flops / peak, "t_hbm_s": hbm_bytes / hw.hbm_bytes_per_s,
         "t_exp_s": exps / (hw.units * hw.clock_hz * hw.exp_per_clk)}
    bound = max(t, key=t.get)
    names = {"t_tensor_s": "tensor cores", "t_hbm_s": "HBM", "t_exp_s": "exp (MUFU)"}
    return dict(t, t_bound_s=t[bound], bound_by=names[bound] if t[bound] else "launches")


def _launch(role, v, s, t, *, exps_per_score=1, hbm_bytes, ppu=None, launches=1, **extra):
    """Executed FLOPs, exponentials, HBM bytes and time of a launch of ``v`` (None: ``launches`` torch ops)."""
    dt = {v: k for k, v in K.DTYPES.items()}[s.dtype]
    units, grid = K.HW[s.arch].units, v.grid(s, t) if v else (K.HW[s.arch].units,)
    has_d = v is not None and "D" in v.fn.arg_names
    ppu = ppu or (_occupancy().get((v.name, dt, s.arch, s.d if has_d else None, (s.dr or 0) if has_d else None,
                                    t.name), 1) if v else 1)
    programs, parts = math.prod(grid), v.parts(s, t) if v else 1
    n, score, weighted = (v.tiles_of(s, t, v), *v.tile_flops(t, s.d, s.dr)) if v and v.has_dot else (0, 0, 0)
    cost = dict(flops=n * (score + weighted), score_flops=n * score, weighted_flops=n * weighted, exps=n * t.BM *
                t.BN * exps_per_score if n else 0, hbm_bytes=hbm_bytes(K._cdiv(programs // parts, units * ppu)))
    roof = _roofline(cost["flops"], cost["hbm_bytes"], cost["exps"], dt, s.arch)
    return dict(kernel=role, grid=list(grid), tiles=t.name if v else None, programs=programs, programs_per_sm=ppu,
                waves=K._cdiv(programs, units * ppu), parts=parts, launches=launches, **cost, **extra,
                bound_by=roof["bound_by"], t_s=wave_time(programs, ppu, units, roof["t_bound_s"]) + launches * LAUNCH_S)


def triton_kernels(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90,
                   programs_per_sm=None, tiles=None, distill=False, split=True):
    """Per-launch costs of one forward + backward. ``column_grads`` (default ``N != B``): row and column kernels,
    else the row kernel folds the columns' terms; ``tiles``: ``{"fwd" | "fwdt" | "bwd": Tiles}`` instead of the
    first candidates; ``split=False``: no column split; ``distill`` (needs ``ref``): more exponentials and vectors."""
    if distill and not ref:
        raise ValueError("distill: the teacher is the reference model (ref=True)")
    extra, nstat = DISTILL_EXPS * distill, 12 if distill else 3
    dr = d if dr is None else dr
    s = K.Shape(B, N, d, dr if ref else 0, getattr(torch, dtype), arch, split)
    column_grads = (N != B) if column_grads is None else column_grads
    v = {role: K.VARIANTS[name] for role, name in K.PATHS["distill" if distill else "plain"].items()}
    tile = lambda var: (tiles or {}).get(var.kernel) or var.candidates(d, s.dr, s.dtype, arch)[0]    # noqa: E731
    launch = lambda role, var, **kw: _launch(role, var, s, tile(var), ppu=programs_per_sm, **kw)  # noqa: E731
    vec = lambda n: n * (d + s.dr) * s.dtype.itemsize            # noqa: E731  target + reference vectors
    epilogue = _trace("ours", "float32", ref, N != B, distill=distill)
    ks = [_launch("epilogue (torch)", None, s, None, launches=len(epilogue), hbm_bytes=lambda w: 0)]
    if N == B and not column_grads and K.tiles.transposed_forward_runs(s.dtype, arch, distill):
        # margins, each score tile once for both directions, the merge. HBM: the columns once (a panel is shared in
        # L2), the rows once per panel, scale and margins, the partials written and merged
        plan, tt = K.plan(s, v["fwd_t"]), tile(v["fwd_t"])
        n_panels = K._cdiv(K._cdiv(K._cdiv(B, tt.BN), plan.groups), max(1, plan.panel_cols // tt.BN))
        partial = plan.partial_bytes(B)
        ks += [launch("fwd_t_margin", v["fwd_t_margin"], hbm_bytes=lambda w: 2 * vec(B) + 3 * F32 * B),
               launch("fwd_t", v["fwd_t"], exps_per_score=2 * (1 + extra),
                      hbm_bytes=lambda w: vec(B) + n_panels * vec(B) + 3 * F32 * B + partial,
                      plan=dict(groups=plan.groups, splits=plan.splits, panel_cols=plan.panel_cols, panels=n_panels)),
               launch("fwd_t_merge", v["fwd_t_merge"], hbm_bytes=lambda w: partial + 6 * F32 * B)]
        ks[-1]["exps"] = 2 * (plan.groups + plan.splits) * B
    else:       # scale [2, B] read, margins [B] and the statistics [S, 2, nstat, B] written, merged when S > 1
        parts = v["fwd"].parts(s, tile(v["fwd"]))
        ks.append(launch("fwd", v["fwd"], exps_per_score=1 + extra,
                         hbm_bytes=lambda w: 4 * vec(B) + w * 2 * vec(N) + F32 * B * (3 + 2 * nstat * parts)))
        if parts > 1:
            merge = "fwd_merge_extra" if distill else "fwd_merge"
            ks.append(launch(merge, K.VARIANTS[merge], hbm_bytes=lambda w: F32 * 2 * nstat * B * (parts + 1)))
        ks.append(_launch("fwd_positives", None, s, None, hbm_bytes=lambda w: 2 * vec(B) + 2 * F32 * B))
    # backward: per-row vectors (a fold: the columns' too); each d-slice re-reads its outer rows, the inner ones
    # once per wave; split: float32 partials [S, n, d] summed (and cast) by torch
    for role, n_out, n_in in (("bwd_row", B, N), *((("bwd_col", N, B),) if column_grads else ())):
        fold = role == "bwd_row" and not column_grads
        var = v[role + "_fold" * fold]
        if K.split_parts(s, role == "bwd_row", distill) > 1:
            var = K.VARIANTS[var.name + "_split"]
        t, parts = tile(var), var.parts(s, tile(var))
        out = 2 * n_out * d * (F32 * parts if parts > 1 else s.dtype.itemsize)
        rows = F32 * (9 * B + (7 * N if fold else 0) + 2 * extra * (B + (N if fold else 0))) if role == "bwd_row" \
            else F32 * (7 + 2 * extra) * B
        ks.append(launch(var.name, var, exps_per_score=(2 if fold else 1) * (1 + extra), hbm_bytes=lambda w: K._cdiv(
            d, t.BD) * (2 * vec(n_out) + 2 * n_out * t.BD * s.dtype.itemsize) + w * 2 * vec(n_in) + rows + out))
        if parts > 1:
            half = s.dtype.itemsize < F32
            ks.append(_launch(var.name + " sum", None, s, None, launches=2 * (1 + half), hbm_bytes=lambda w: 2 * n_out
                              * d * (F32 * (parts + 1) + half * (F32 + s.dtype.itemsize))))
    return ks


def triton_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None, arch=90, **kw) -> dict:
    """Totals, per-launch costs and time ``t_s`` of one fused step (``t_bound_s``: the totals' roofline)."""
    ks = triton_kernels(B, N, d, dr, dtype, ref, column_grads, arch, **kw)
    flops, hbm, exps = (sum(k[f] for k in ks) for f in ("flops", "hbm_bytes", "exps"))
    return dict(impl="triton", flops=flops, hbm_bytes=hbm, exps=exps, kernels=ks, t_s=sum(k["t_s"] for k in ks),
                launches=sum(k["launches"] for k in ks), **_roofline(flops, hbm, exps, dtype, arch))


def floor_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, column_grads=None) -> dict:
    """The GEMM floor (``steps.Floor``; ``gather_u``: no column product) and the compulsory traffic."""
    dr_eff, elem = (d if dr is None else dr) if ref else 0, getattr(torch, dtype).itemsize
    column_grads = (N != B) if column_grads is None else column_grads
    matrices, weighted = 1 if N == B else 2, 2 if (N == B or column_grads) else 1
    flops = matrices * (2 * (2 * B * N * (d + dr_eff)) + weighted * (2 * B * N * d))
    inputs = (B * (d + dr_eff) * 2 + (N * (d + dr_eff) * 2 if N != B else 0)) * elem
    hbm = 2 * inputs + (2 * B * d + (2 * N * d if column_grads else 0)) * elem
    exps = 2 * matrices * B * N        # every weight once in the forward, once recomputed
    roof, launches = _roofline(flops, hbm, exps, dtype), matrices * ((2 if ref else 1) * 2 + weighted)
    return dict(impl="gemm_floor", flops=flops, hbm_bytes=hbm, exps=exps, score_matrices=matrices, launches=launches,
                t_s=roof["t_bound_s"] + launches * LAUNCH_S, **roof)


@functools.lru_cache(maxsize=None)
def _trace(kind: str, dtype: str, ref: bool, distributed: bool, autocast: str | None = None, distill=False):
    """Aten ops (each a launch) of the unfused loss or our epilogue ("ours", on meta tensors) at the proxy shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from . import baselines, steps
    P = dict(_PROXY, **({} if distributed else {"N": _PROXY["B"]}))
    names = {P["B"]: "B", P["N"]: "N", P["d"]: "d", P["dr"]: "dr"}
    ops, symbols = [], lambda t, read: tuple(names.get(s, s) for s, st in zip(t.shape, t.stride()) if not (
        read and st == 0))                             # a broadcast (stride 0) dimension is not read

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out, name = func(*args, **(kwargs or {})), func.__name__.split(".")[0]
            if getattr(func, "is_view", False) or name in ("detach", "alias", "lift_fresh") or "drrho" in str(func):
                return out
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            mm = tuple(names.get(n, n) for n in (flat_in[-2].shape[-2], flat_in[-2].shape[-1], flat_in[-1].shape[-1])
                       ) if name in ("mm", "addmm", "bmm") else None
            ops.append((name, [(symbols(a, True), a.element_size()) for a in flat_in if a.numel() > 1],
                        [(symbols(o, False), o.element_size()) for o in flat_out if o.numel() > 1], mm))
            return out

    device = "meta" if kind == "ours" else "cpu"
    cols, off = steps.make_inputs(P["B"], P["N"], P["d"], P["dr"], getattr(torch, dtype), ref, device)
    x, t = (cols[k][off:off + P["B"]].clone().requires_grad_() for k in ("img_all", "txt_all"))
    rx, rt = (cols[k][off:off + P["B"]] if ref else None for k in ("ref_img_all", "ref_txt_all"))
    cols.update({k: cols[k].requires_grad_(distributed) for k in ("img_all", "txt_all")})
    u, s = torch.zeros(P["B"], device=device), torch.tensor(14.0, requires_grad=True, device=device)
    with Trace(), torch.autocast("cpu", dtype=getattr(torch, autocast or "bfloat16"), enabled=autocast is not None):
        if kind == "ours":
            loss = dk.drrho_clip_loss(x, t, s, u, u, ref_img=rx, ref_txt=rt, offset=off, backend="torch",
                                      distill_weight=float(distill), **(cols if distributed else {}))[0]
        else:
            loss = baselines.unfused_drrho_loss(x, t, s, u, u, rx, rt, offset=off, **(cols if distributed else {}))[0]
        loss.backward()
    return ops


def unfused_cost(B, N, d, dr=None, dtype="bfloat16", ref=True, autocast=None) -> dict:
    """FLOPs, HBM bytes, launches and time of the unfused loss on ``dtype`` inputs under ``autocast``."""
    real = dict(B=B, N=N, d=d, dr=d if dr is None else dr)
    size = lambda syms: math.prod(real.get(s, s) if isinstance(s, str) else s for s in syms)  # noqa: E731
    ops = _trace("unfused", dtype, ref, N != B, autocast)
    hbm = sum(size(syms) * item for _, reads, writes, _ in ops for syms, item in reads + writes)
    flops = sum(2 * size(mm) for *_, mm in ops if mm is not None)
    roof = _roofline(flops, hbm, 4 * B * N, autocast or dtype)
    return dict(impl="unfused" + (f" under {autocast} autocast" if autocast else ""), flops=flops, hbm_bytes=hbm,
                exps=4 * B * N, launches=len(ops), t_s=roof["t_bound_s"] + len(ops) * LAUNCH_S, **roof)


# T1-T4, T5, T6 (one of 16 processes; gather_grad, and gather_u: no column gradients), the paper's and FastCLIP's
# per-rank shapes (gather_u), and the widest common CLIP embeddings (ViT-L, ViT-H, ViT-bigG) with a ViT-B reference
SHAPES = tuple(dict(B=B, N=N, d=d, dr=dr, **({} if grads else dict(column_grads=False))) for B, N, d, dr, grads in (
    (32768, 32768, 512, 512, 1), (262144, 262144, 512, 512, 1), (4096, 65536, 512, 512, 1), (4096, 65536, 512, 512, 0),
    (640, 5120, 512, 512, 0), (320, 5120, 512, 512, 0), (4096, 16384, 768, 768, 1), (32768, 32768, 1024, 1024, 1),
    (32768, 32768, 768, 512, 1), (32768, 32768, 1024, 512, 1), (32768, 32768, 1280, 512, 1)))


def report(shapes=SHAPES, dtypes=("bfloat16", "float32")) -> dict:
    """Per shape and dtype: ours (split and not), the floor, the unfused loss (bfloat16: also under autocast)."""
    rows = []
    for shape, dtype in ((s, t) for s in shapes for t in dtypes):
        plain = {k: shape[k] for k in ("B", "N", "d", "dr")}
        rows.append(dict(shape=shape, dtype=dtype, triton=triton_cost(**shape, dtype=dtype), triton_unsplit=
                         triton_cost(**shape, dtype=dtype, split=False), unfused=unfused_cost(**plain, dtype=dtype),
                         floor=floor_cost(**shape, dtype=dtype), **({"unfused_autocast": unfused_cost(
                             **plain, dtype="float32", autocast=dtype)} if dtype == "bfloat16" else {})))
    return dict(hardware=K.HW[90]._asdict(), launch_s=LAUNCH_S, model=__doc__, rows=rows)


def markdown(rep: dict) -> str:
    """Per shape and dtype: our time after and before the split, its ratios; **bold**: slower than theirs."""
    out = []
    for r in rep["rows"]:
        s, tri = r["shape"], r["triton"]
        shape = f"B = {s['B']}, N = {s['N']}, d = {s['d']}, dr = {s['dr']}" + (
            ", `gather_u`" if s.get("column_grads") is False else (", `gather_grad`" if s["N"] != s["B"] else ""))
        ratio = {k: tri["t_s"] / r[k]["t_s"] for k in ("floor", "unfused", "unfused_autocast") if k in r}
        cell = {k: f"**{x:.2f}x**" if x > 1 and k != "floor" else f"{x:.2f}x" for k, x in ratio.items()}
        waves = "/".join(str(k["waves"]) for k in tri["kernels"] if k["tiles"])
        out.append([shape, r["dtype"], f"{tri['t_s'] * 1e3:.3f} ms ({tri['bound_by']}; waves {waves})",
                    f"{r['triton_unsplit']['t_s'] * 1e3:.3f} ms", cell["floor"], cell["unfused"],
                    cell.get("unfused_autocast", "-")])
    head = ["shape", "dtype", "Triton, modelled (bound; waves per kernel)", "before the split", "/ GEMM floor",
            "/ unfused loss", "/ authors' under autocast"]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [head, ["---"] * len(head), *out])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=harness.RESULTS_DIR / "cost_model.json")
    args, rep = parser.parse_args(argv), report()
    print(f"{markdown(rep)}\nwritten {harness.write_json(args.out, rep)}")


if __name__ == "__main__":
    main()
