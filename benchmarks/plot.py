"""PNG figures from sweep JSON files (``python -m benchmarks.sweep``).

    python -m benchmarks.plot benchmarks/results/sweep_<tag>_<date>.json [more.json ...] [--out-dir DIR]

Per JSON file (one machine, one run) and per group of points sharing ``(dtype, d, dr, ref, N/B)``:

- ``*_time_*.png``: time vs B, log-log, one line per implementation (median, band from the 20th to
  the 80th percentile), the GEMM floor as a dashed black line; panels forward, backward (derived)
  and forward + backward. OOM points are marked ``x`` at the top edge, with the word OOM.
- ``*_memory_*.png``: peak extra memory vs B (forward + backward), log-log, OOM marked, the RAM
  guard of the run as a dotted line.
- ``*_speedup_*.png``: speedup over the unfused loss (t_unfused / t) vs B, forward + backward.
- ``*_hbm_*.png``: the Triton cost model's HBM bytes per step vs B beside the unfused loss's and the
  floor's (``benchmarks/cost_model.py``; skipped with a message when that module is absent). This
  is a model, not a measurement: it needs no GPU.

Every figure is titled with the machine, the date, the dtype and d. Figures go to
``benchmarks/results/`` unless ``--out-dir`` says otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STYLE = {"triton": ("tab:red", "o"), "cpp": ("tab:purple", "D"), "torch": ("tab:blue", "s"),
         "reference": ("tab:gray", "v"), "unfused": ("tab:orange", "^"), "clip_ce": ("tab:green", "P"),
         "inf_cl": ("tab:brown", "X"), "gemm_floor": ("black", None)}
ORDER = list(STYLE)
MODE_TITLES = {"forward": "forward", "backward": "backward (derived: fwd+bwd - fwd)",
               "forward_backward": "forward + backward"}


def load(path: Path) -> dict:
    payload = json.loads(Path(path).read_text())
    for key in ("meta", "config", "rows"):
        if key not in payload:
            raise SystemExit(f"{path}: not a sweep result (no {key!r})")
    return payload


def machine_label(meta: dict) -> str:
    if meta.get("device") == "cuda" or meta.get("gpu"):
        return meta.get("gpu", "GPU")
    return f"{meta.get('cpu', 'CPU')}, {meta.get('torch_threads')} threads"


def group_key(r: dict):
    ratio = round(r["N"] / r["B"], 3)
    return (r["dtype"], r["d"], r["dr"], r["ref"], ratio)


def groups(rows: list[dict]) -> dict:
    """Rows by (dtype, d, dr, ref, N/B). Ref-free baselines (ref None) join every group of their shape."""
    out: dict = {}
    for r in rows:
        if r["ref"] is not None:
            out.setdefault(group_key(r), []).append(r)
    for r in rows:
        if r["ref"] is None:
            shared = [k for k in out if k[0] == r["dtype"] and k[1] == r["d"] and k[4] == round(r["N"] / r["B"], 3)]
            for k in shared or [group_key(r)]:
                out.setdefault(k, []).append(r)
    return out


def describe(key) -> str:
    dtype, d, dr, ref, ratio = key
    refs = f"with reference (dr={dr})" if ref else ("without reference" if ref is False else "")
    cols = "N = B (one process)" if ratio == 1 else f"N = {ratio:g} B (distributed shard)"
    return f"{dtype}, d={d}, {refs}, {cols}"


def file_tag(key) -> str:
    dtype, d, dr, ref, ratio = key
    ref_tag = f"ref{dr}" if ref else "noref"
    return f"{dtype}_d{d}_{ref_tag}_N{ratio:g}B"


def title(meta: dict, key, what: str) -> str:
    return (f"{what}\n{machine_label(meta)} | {meta.get('date', '')[:10]} | commit {meta.get('commit')}\n"
            f"{describe(key)}")


def _series(rows, impl, mode, value, positive=True):
    """Measured rows (sorted by B; non-positive values dropped for log axes) and the B of OOM points."""
    ok = sorted((r for r in rows if r["impl"] == impl and r["mode"] == mode and r["status"] == "ok"
                 and r.get(value) is not None and (r[value] > 0 or not positive)), key=lambda r: r["B"])
    ooms = sorted({r["B"] for r in rows if r["impl"] == impl and r["mode"] == mode and r["status"] == "OOM"})
    return ok, ooms


def _mark_oom(ax, bs, color, marker_y=0.96, label=True):
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for b in bs:
        ax.plot([b], [marker_y], marker="x", color=color, markersize=9, mew=2, transform=trans, clip_on=False)
        if label:
            ax.text(b, marker_y - 0.05, "OOM", color=color, fontsize=7, ha="center", va="top", transform=trans)


def _impls(rows):
    present = {r["impl"] for r in rows}
    return [i for i in ORDER if i in present] + sorted(present - set(ORDER))


def _empty_log_axis(ax):
    """An axis with nothing measured (only OOM marks): give the log scale finite limits."""
    if not ax.lines or all(len(line.get_xdata()) == 0 or line.get_transform() != ax.transData for line in ax.lines):
        ax.set_ylim(1e-3, 1e3)
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", color="gray", fontsize=8)


def _finish(fig, path: Path, written: list):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def plot_time(meta, key, rows, out: Path, written):
    modes = [m for m in ("forward", "backward", "forward_backward") if any(r["mode"] == m for r in rows)]
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.9), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for impl in _impls(rows):
            color, marker = STYLE.get(impl, ("tab:cyan", "*"))
            ok, ooms = _series(rows, impl, mode, "median_s")
            bs = [r["B"] for r in ok]
            ys = [r["median_s"] * 1e3 for r in ok]
            if impl == "gemm_floor":
                label = "GEMM floor"
                if ok and ok[0].get("floor_gemms"):
                    label += f" ({ok[0]['floor_gemms']} products)"
                ax.plot(bs, ys, "--", marker="_", ms=12, color="black", lw=1.5, label=label)
                continue
            interp = any(r.get("interpreter") for r in ok)
            label = impl + (" (interpreter)" if interp else "")
            if ok:
                ax.plot(bs, ys, marker=marker, color=color, label=label, lw=1.5, ms=5)
                lo = [r["p20_s"] * 1e3 for r in ok if r.get("p20_s") is not None]
                hi = [r["p80_s"] * 1e3 for r in ok if r.get("p80_s") is not None]
                if len(lo) == len(ok) and len(hi) == len(ok):
                    ax.fill_between(bs, lo, hi, color=color, alpha=0.15, lw=0)
            elif ooms:
                ax.plot([], [], marker=marker, color=color, label=label)
            _mark_oom(ax, ooms, color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("B (rows per process)")
        ax.set_ylabel("time per step (ms)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        _empty_log_axis(ax)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title(meta, key, "DRRho-CLIP loss: time per step vs B"), fontsize=10)
    _finish(fig, out, written)


def plot_memory(meta, key, rows, guard, out: Path, written):
    mode = "forward_backward" if any(r["mode"] == "forward_backward" for r in rows) else "forward"
    if not any(r["mode"] == mode and (r.get("peak_extra_bytes") is not None or r["status"] == "OOM") for r in rows):
        return
    fig, ax = plt.subplots(figsize=(6.8, 5.2))
    floor_bytes = 4096                                  # a page: RSS cannot see less; zeros are drawn here
    for impl in _impls(rows):
        if impl == "gemm_floor":
            continue
        color, marker = STYLE.get(impl, ("tab:cyan", "*"))
        ok, ooms = _series(rows, impl, mode, "peak_extra_bytes", positive=False)
        bs = [r["B"] for r in ok]
        ys = [max(r["peak_extra_bytes"], floor_bytes) / 2**20 for r in ok]
        if ok:
            ax.plot(bs, ys, marker=marker, color=color, label=impl, lw=1.5, ms=5)
        elif ooms:
            ax.plot([], [], marker=marker, color=color, label=impl)
        _mark_oom(ax, ooms, color)
    if guard:
        ax.axhline(guard / 2**20, color="gray", ls=":", lw=1)
        ax.text(0.01, guard / 2**20, f" memory limit of the run ({guard / 2**30:.0f} GiB)", color="gray", fontsize=7,
                va="bottom", transform=blended_transform_factory(ax.transAxes, ax.transData))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("B (rows per process)")
    ax.set_ylabel("peak extra memory (MiB), gradients excluded")
    _empty_log_axis(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title(meta, key, f"peak extra memory vs B ({MODE_TITLES[mode]})"), fontsize=9)
    _finish(fig, out, written)


def plot_speedup(meta, key, rows, out: Path, written):
    mode = "forward_backward"
    sel = [r for r in rows if r["mode"] == mode]
    if not any(r.get("speedup_vs_unfused") for r in sel if r["impl"] != "unfused"):
        return
    unfused_oom = sorted({r["B"] for r in sel if r["impl"] == "unfused" and r["status"] == "OOM"})
    fig, ax = plt.subplots(figsize=(6.8, 5.2))
    for impl in _impls(sel):
        if impl == "unfused":
            continue
        color, marker = STYLE.get(impl, ("tab:cyan", "*"))
        ok = sorted((r for r in sel if r["impl"] == impl and r.get("speedup_vs_unfused")), key=lambda r: r["B"])
        if not ok:
            continue
        ls = "--" if impl == "gemm_floor" else "-"
        ax.plot([r["B"] for r in ok], [r["speedup_vs_unfused"] for r in ok], ls, marker=marker, color=color,
                label="GEMM floor (speedup ceiling)" if impl == "gemm_floor" else impl, lw=1.5, ms=5)
    ax.axhline(1.0, color="gray", lw=1)
    if unfused_oom:
        _mark_oom(ax, unfused_oom, STYLE["unfused"][0], label=False)
        ax.text(0.99, 0.86, "x: unfused OOM (fused still runs)", transform=ax.transAxes, ha="right", fontsize=7,
                color=STYLE["unfused"][0])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("B (rows per process)")
    ax.set_ylabel("speedup over the unfused loss (t_unfused / t)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title(meta, key, "speedup over the unfused loss (forward + backward)"), fontsize=9)
    _finish(fig, out, written)


def load_cost_model():
    """``benchmarks.cost_model`` or None (with the reason), never an exception."""
    try:
        return importlib.import_module("benchmarks.cost_model"), None
    except Exception as exc:                            # absent, or half-written
        return None, f"{type(exc).__name__}: {exc}"


def _cost(fn, B, N, d, dr, dtype, ref):
    """Call a cost function with a dtype name, falling back to a torch dtype."""
    try:
        return fn(B, N, d, dr, dtype, ref)
    except (TypeError, KeyError, AttributeError, ValueError):
        import torch
        return fn(B, N, d, dr, getattr(torch, dtype), ref)


def plot_hbm(meta, key, rows, cost_model, out: Path, written):
    dtype, d, dr, ref, ratio = key
    # A model needs no measurement: draw it over the measured B and on to 2^18 (the GPU range).
    measured = sorted({r["B"] for r in rows})
    bs = sorted(set(measured) | {1 << k for k in range(9, 19)})
    lines = {"triton (cost model)": ("triton_cost", "tab:red", "-"),
             "unfused loss": ("unfused_cost", "tab:orange", "-"),
             "GEMM floor": ("floor_cost", "black", "--")}
    fig, ax = plt.subplots(figsize=(6.8, 5.2))
    drawn = 0
    for label, (name, color, ls) in lines.items():
        fn = getattr(cost_model, name, None)
        if fn is None:
            continue
        ys = []
        for b in bs:
            n = max(b, int(round(ratio * b)))
            try:
                ys.append(_cost(fn, b, n, d, dr or d, dtype, bool(ref))["hbm_bytes"])
            except Exception as exc:
                print(f"plot: cost_model.{name}({b}, ...) failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                ys = []
                break
        if ys:
            ax.plot(bs, [y / 2**30 for y in ys], ls, color=color, label=label, lw=1.8, marker="o", ms=4)
            drawn += 1
    if not drawn:
        plt.close(fig)
        print("plot: benchmarks.cost_model has none of triton_cost / unfused_cost / floor_cost usable; "
              "HBM figure skipped", file=sys.stderr)
        return
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("B (rows per process)")
    ax.set_ylabel("HBM traffic per step (GiB), model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    hw = getattr(cost_model, "H100", {}).get("name", "the GPU")
    ax.set_title(f"HBM bytes per forward + backward step: cost model for {hw}, not measured\n"
                 f"beside {machine_label(meta)} | {meta.get('date', '')[:10]} | commit {meta.get('commit')}\n"
                 f"{describe(key)}", fontsize=9)
    _finish(fig, out, written)


def _cell(row) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    ms = f"{row['median_s'] * 1e3:,.0f} ms" if row["median_s"] >= 0.1 else f"{row['median_s'] * 1e3:.1f} ms"
    mem = row.get("peak_extra_bytes")
    return ms + (f" / {mem / 2**20:,.1f} MiB" if mem is not None else "")


def markdown_table(key, rows, mode: str = "forward_backward") -> str:
    """One markdown table for a group: per B, each implementation's median time / peak extra memory."""
    impls = _impls(rows)
    by = {(r["impl"], r["B"]): r for r in rows if r["mode"] == mode}
    lines = [f"{describe(key)}, {MODE_TITLES.get(mode, mode)} (median time / peak extra memory):", "",
             "| B | N | " + " | ".join(impls) + " |", "|" + " --- |" * (2 + len(impls))]
    own = {r["B"] for r in rows if r["mode"] == mode and r["ref"] is not None}    # shared baselines join these
    for b in sorted(own or {r["B"] for r in rows if r["mode"] == mode}):
        n = next(r["N"] for r in rows if r["B"] == b)
        lines.append(f"| {b} | {n} | " + " | ".join(_cell(by.get((i, b))) for i in impls) + " |")
    return "\n".join(lines) + "\n"


def plot_file(path: Path, out_dir: Path, hbm: bool = True) -> list[Path]:
    payload = load(path)
    meta, rows = payload["meta"], payload["rows"]
    guard = payload["config"].get("ram_guard_bytes")
    stem = Path(path).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    cost_model, why = load_cost_model() if hbm else (None, "--no-hbm")
    if cost_model is None:
        print(f"plot: benchmarks.cost_model not importable ({why}); HBM figures skipped", file=sys.stderr)
    for key, grp in sorted(groups(rows).items(), key=lambda kv: str(kv[0])):
        tag = file_tag(key)
        plot_time(meta, key, grp, out_dir / f"{stem}_time_{tag}.png", written)
        plot_memory(meta, key, grp, guard, out_dir / f"{stem}_memory_{tag}.png", written)
        plot_speedup(meta, key, grp, out_dir / f"{stem}_speedup_{tag}.png", written)
        if cost_model is not None:
            plot_hbm(meta, key, grp, cost_model, out_dir / f"{stem}_hbm_{tag}.png", written)
    return written


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path, help="sweep result files")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where PNGs go (default benchmarks/results/)")
    ap.add_argument("--no-hbm", action="store_true", help="skip the cost-model (HBM bytes) figures")
    ap.add_argument("--markdown", action="store_true",
                    help="print markdown tables (forward + backward time and memory per B) instead of plotting")
    args = ap.parse_args(argv)
    if args.markdown:
        for path in args.json:
            payload = load(path)
            print(f"`{Path(path).name}`: {machine_label(payload['meta'])}, {payload['meta'].get('date', '')[:10]}, "
                  f"commit {payload['meta'].get('commit')}\n")
            for key, grp in sorted(groups(payload["rows"]).items(), key=lambda kv: str(kv[0])):
                print(markdown_table(key, grp))
        return []
    written = []
    for path in args.json:
        written += plot_file(path, args.out_dir, hbm=not args.no_hbm)
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
