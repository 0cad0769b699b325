"""Figures of sweep results (PNG: time, memory, speedup) per ``(dtype, d, dr, ref, N/B)`` group."""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import RESULTS_DIR  # noqa: E402

STYLE = {"triton": ("tab:red", "o"), "cpp": ("tab:purple", "D"), "torch": ("tab:blue", "s"),
         "reference": ("tab:gray", "v"), "unfused": ("tab:orange", "^"), "clip_ce": ("tab:green", "P"),
         "authors": ("tab:pink", "*"), "gemm_floor": ("black", "_")}
MODE_TITLES = {"forward": "forward", "backward": "backward", "forward_backward": "forward + backward"}
MIB = 2 ** 20
KINDS = {   # kind: (value, scale, y label, log base of y, title)
    "time": ("median_s", 1e3, "time per step (ms)", 10, "DRRho-CLIP loss: time per step vs B"),
    "memory": ("peak_extra_bytes", 1 / MIB, "MiB (gradients excluded)", 10, "peak extra memory (forward + backward)"),
    "speedup": ("speedup_vs_unfused", 1, "t_unfused / t", 2, "speedup over the unfused loss (forward + backward)")}


def load(path) -> dict:
    return json.loads(Path(path).read_text())                # a sweep's JSON: meta, config, rows


def groups(rows: list[dict]) -> dict:
    """Rows by (dtype, d, dr, ref, N/B); a baseline without reference joins every group of its shape."""
    out: dict = {}
    for r in sorted(rows, key=lambda r: r["ref"] is None):
        ratio = round(r["N"] / r["B"], 3)
        shared = [k for k in out if (k[0], k[1], k[4]) == (r["dtype"], r["d"], ratio)] if r["ref"] is None else []
        for k in shared or [(r["dtype"], r["d"], r["dr"], r["ref"], ratio)]:
            out.setdefault(k, []).append(r)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def figure(meta, key, kind, rows, path, written, guard=None):
    """A figure (``KINDS``; time: a panel per mode): a line per implementation, OOM as ``x``, the memory guard."""
    (value, scale, ylabel, base, what), present = KINDS[kind], {r["impl"] for r in rows}
    modes = [m for m in MODE_TITLES if any(r["mode"] == m for r in rows)] if kind == "time" else ["forward_backward"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.9) if kind == "time" else (6.8, 5.2),
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        drawn, top = 0, ax.get_xaxis_transform()           # x in data, y in axes fractions
        for impl in [i for i in STYLE if i in present] + sorted(present - set(STYLE)):
            (color, marker), floor = STYLE.get(impl, ("tab:cyan", "*")), impl == "gemm_floor"
            sel = [r for r in rows if r["impl"] == impl and r["mode"] == mode]
            ok = sorted((r for r in sel if r["status"] == "ok" and (r.get(value) or 0) > 0), key=lambda r: r["B"])
            label = ("GEMM floor" + (f" ({ok[0]['floor_gemms']} products)" if ok and ok[0].get("floor_gemms") else "")
                     if floor else impl + " (interpreter)" * any(r.get("interpreter") for r in ok))
            bs, ooms, drawn = [r["B"] for r in ok], {r["B"] for r in sel if r["status"] == "OOM"}, drawn + len(ok)
            ax.plot(bs, [r[value] * scale for r in ok], "--" if floor else "-", marker=marker, ms=12 if floor else 5,
                    color=color, label=label if ok or ooms else None, lw=1.5)
            if kind == "time" and ok and all(r.get("p20_s") is not None and r.get("p80_s") is not None for r in ok):
                ax.fill_between(bs, [r["p20_s"] * scale for r in ok], [r["p80_s"] * scale for r in ok], color=color,
                                alpha=0.15, lw=0)
            for b in ooms:
                ax.plot([b], [0.96], marker="x", color=color, ms=9, mew=2, transform=top, clip_on=False)
                ax.text(b, 0.91, "OOM", color=color, fontsize=7, ha="center", va="top", transform=top)
        derived = kind == "time" and any(r.get("derived") for r in rows if r["mode"] == mode)
        ax.set(xlabel="B (rows per process)", ylabel=ylabel, **({} if drawn else dict(ylim=(1e-3, 1e3))),
               title=MODE_TITLES[mode] + " (derived: fwd+bwd - fwd)" * derived if kind == "time" else "")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=base)
        ax.grid(True, which="both", alpha=0.3)
        if guard or kind == "speedup":                 # the run's memory guard, dotted; speedup 1
            ax.axhline(guard / MIB if guard else 1.0, color="gray", ls=":" if guard else "-", lw=1,
                       label=f"the run's guard ({guard / 2**30:.0f} GiB)" if guard else None)
        ax.legend(fontsize=8, loc="best")
    (dtype, d, dr, ref, ratio), cpu = key, f"{meta.get('cpu')}, {meta.get('torch_threads')} threads"
    refs = f"with reference (dr={dr})" if ref else ("without reference" if ref is False else "")
    fig.suptitle(f"{what}\n{meta.get('gpu') or cpu} | {meta.get('date', '')[:10]} | commit {meta.get('commit')}\n"
                 f"{dtype}, d={d}, {refs}, " + ("N = B (one process)" if ratio == 1 else f"N = {ratio:g} B (a shard)"),
                 fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        written.append(path)
    plt.close(fig)
    return fig


def plot_file(path, out_dir: Path) -> list[Path]:
    """The time figure of each group, the memory (RSS: a page at least) and speedup figures where measured."""
    payload, written = load(path), []
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, rows in groups(payload["rows"]).items():
        dtype, d, dr, ref, ratio = key
        fb = [r for r in rows if r["mode"] == "forward_backward"]
        name = f"{Path(path).stem}_{{}}_{dtype}_d{d}_{f'ref{dr}' if ref else 'noref'}_N{ratio:g}B.png"
        figure(payload["meta"], key, "time", rows, out_dir / name.format("time"), written)
        if any(r.get("peak_extra_bytes") is not None or r["status"] == "OOM" for r in fb):
            figure(payload["meta"], key, "memory", [dict(r, peak_extra_bytes=max(r["peak_extra_bytes"], 4096)) if r.get(
                "peak_extra_bytes") is not None else r for r in fb if r["impl"] != "gemm_floor"],
                out_dir / name.format("memory"), written, payload["config"].get("ram_guard_bytes"))
        if any(r.get("speedup_vs_unfused") for r in fb):       # the unfused loss's OOM points: the fused still run
            figure(payload["meta"], key, "speedup", [r if r["impl"] == "unfused" else dict(r, status="ok") for r in fb
                                                     if r["impl"] != "unfused" or r["status"] == "OOM"],
                   out_dir / name.format("speedup"), written)
    return written


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="*", type=Path, help="sweep result files (default: every results/sweep_*.json)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where PNGs go (default benchmarks/results/)")
    args = ap.parse_args(argv)
    if not (files := args.json or sorted(RESULTS_DIR.glob("sweep_*.json"))):
        ap.error(f"no sweep_*.json in {RESULTS_DIR}: give sweep result files")
    written = [p for path in files for p in plot_file(path, args.out_dir)]
    print("\n".join(map(str, written)))
    return written


if __name__ == "__main__":
    main()
