"""Learn digits from noisy labels: plain ERM against DRRho risk minimization, for any per-sample loss.

Everything runs on the CPU in well under two minutes, with no download:

1. scikit-learn's 1797 8x8 digits are split into a test set, a small clean split and a training split,
   where a fraction of the labels (30% by default) is flipped to a different digit, uniformly.
2. A small *reference* classifier is trained with plain cross-entropy on the clean split.
3. A *target* classifier is trained on the noisy split, once with plain ERM (the mean cross-entropy)
   and once with each DRRho form (``dk.DRRhoRisk``) of the RHO loss ``l(w, z) - l(w_ref, z)``: CVaR,
   KL-regularized, KL-constrained and chi-square. Every run of a seed starts from the same
   initialisation and sees the same batches for the same number of steps.
4. Reported, over ``--seeds`` seeds: the final test accuracy of each run; the average weight each form
   gives to clean and to flipped training samples through training (a sample's share of its batch's
   total weight times ``B``: 1 is the uniform weight of ERM); and, at the end, on the training split,
   ``Var(l - l_ref)`` against ``Var(l)`` (the variance in the generalization bound of DRRho).

The results are printed and saved (``results.json``, ``results.png``)::

    python examples/noisy_labels.py                  # 5 seeds
    python examples/noisy_labels.py --quick          # a few steps, 1 seed (for tests)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import drrho_kernels as dk

METHODS = ("erm", "cvar", "kl", "kl_constrained", "chi2")
LABELS = dict(erm="ERM (mean loss)", cvar="DRRho, CVaR", kl="DRRho, KL-regularized",
              kl_constrained="DRRho, KL-constrained", chi2="DRRho, chi-square")


# ------------------------------------------------------------------------------------------------
# Data and models

def make_splits(seed: int, n_test: int, n_ref: int, noise: float) -> dict:
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    perm = torch.from_numpy(rng.permutation(len(y)))
    test, ref, train = perm[:n_test], perm[n_test:n_test + n_ref], perm[n_test + n_ref:]
    train_y = y[train].clone()
    flipped = torch.from_numpy(rng.random(len(train)) < noise)
    shift = torch.from_numpy(rng.integers(1, 10, size=len(train)))      # a different digit, uniformly
    train_y[flipped] = (train_y[flipped] + shift[flipped]) % 10
    return dict(ref_x=x[ref], ref_y=y[ref], train_x=x[train], train_y=train_y, flipped=flipped,
                test_x=x[test], test_y=y[test])


def classifier(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def make_risk(method: str, args):
    if method == "erm":
        return None
    if method == "cvar":
        return dk.DRRhoRisk("cvar", alpha=args.alpha)
    if method == "kl":
        return dk.DRRhoRisk("kl", tau=args.tau, gamma=args.gamma)
    if method == "kl_constrained":
        return dk.DRRhoRisk("kl_constrained", radius=args.kl_radius, tau=args.tau, tau_floor=args.tau_floor,
                            gamma=args.gamma)
    return dk.DRRhoRisk("chi2", radius=args.chi2_radius, gamma=args.gamma)


# ------------------------------------------------------------------------------------------------
# Training

def train_reference(splits: dict, args, seed: int, progress=None) -> nn.Module:
    torch.manual_seed(seed + 1000)
    model = classifier(args.ref_hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    x, y = splits["ref_x"], splits["ref_y"]
    rng = np.random.default_rng(seed + 1000)
    for _ in range(args.ref_steps):
        batch = torch.from_numpy(rng.choice(len(y), size=min(args.batch_size, len(y)), replace=False))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_target(method: str, splits: dict, reference: nn.Module, args, seed: int, progress=None) -> dict:
    """One target run; returns its final test accuracy, curve, weight statistics and variances."""
    torch.manual_seed(seed)                                 # the same initialisation for every method
    model = classifier(args.hidden)
    risk = make_risk(method, args)
    params = [dict(params=model.parameters(), lr=args.lr)]
    if risk is not None and list(risk.parameters()):
        params.append(dict(params=risk.parameters(), lr=args.scalar_lr))   # mu, tau or eta
    opt = torch.optim.Adam(params)
    x, y, flipped = splits["train_x"], splits["train_y"], splits["flipped"]
    with torch.no_grad():
        ref_loss_all = F.cross_entropy(reference(x), y, reduction="none")
    rng = np.random.default_rng(seed + 1)                   # the same batches for every method
    n = len(y)
    steps_per_epoch = n // args.batch_size
    weight_sum = dict(clean=0.0, flipped=0.0)
    weight_count = dict(clean=0, flipped=0)
    curve = dict(step=[], test_accuracy=[])
    step = 0
    for epoch in range(args.epochs):
        perm = torch.from_numpy(rng.permutation(n))
        for k in range(min(steps_per_epoch, args.max_steps_per_epoch)):
            batch = perm[k * args.batch_size:(k + 1) * args.batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch], reduction="none")
            if risk is None:
                objective, weights = loss.mean(), torch.full_like(loss, 1.0 / len(batch))
            else:
                objective = risk(loss, ref_loss_all[batch])
                weights = risk.weights
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            total = float(weights.sum())
            if total > 0:
                relative = (weights * len(batch) / total).double()
                is_flipped = flipped[batch]
                weight_sum["flipped"] += float(relative[is_flipped].sum())
                weight_sum["clean"] += float(relative[~is_flipped].sum())
                weight_count["flipped"] += int(is_flipped.sum())
                weight_count["clean"] += int((~is_flipped).sum())
            step += 1
            if progress is not None:
                progress.update(1)
        curve["step"].append(step)
        curve["test_accuracy"].append(accuracy(model, splits["test_x"], splits["test_y"]))
        if progress is not None:
            progress.set_postfix_str(f"seed {seed} {method} ep {epoch + 1} acc {curve['test_accuracy'][-1]:.3f}")
    with torch.no_grad():
        final_loss = F.cross_entropy(model(x), y, reduction="none")
    rho_loss = final_loss - ref_loss_all
    return dict(
        test_accuracy=curve["test_accuracy"][-1],
        curve=curve,
        mean_weight_clean=weight_sum["clean"] / max(weight_count["clean"], 1),
        mean_weight_flipped=weight_sum["flipped"] / max(weight_count["flipped"], 1),
        var_rho_loss=float(rho_loss.var(unbiased=False)),
        var_loss=float(final_loss.var(unbiased=False)),
        risk_state={k: float(v) for k, v in risk.state_dict().items()} if risk is not None else {},
    )


# ------------------------------------------------------------------------------------------------
# Report

def summarize(runs: dict) -> dict:
    out = {}
    for method, per_seed in runs.items():
        acc = np.array([r["test_accuracy"] for r in per_seed])
        out[method] = dict(
            test_accuracy_mean=float(acc.mean()), test_accuracy_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            test_accuracy=acc.tolist(),
            mean_weight_clean=float(np.mean([r["mean_weight_clean"] for r in per_seed])),
            mean_weight_flipped=float(np.mean([r["mean_weight_flipped"] for r in per_seed])),
            var_rho_loss=float(np.mean([r["var_rho_loss"] for r in per_seed])),
            var_loss=float(np.mean([r["var_loss"] for r in per_seed])),
        )
    return out


def plot(path: str, summary: dict, runs: dict, ref_accuracy: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = dict(erm="tab:gray", cvar="tab:red", kl="tab:blue", kl_constrained="tab:green", chi2="tab:purple")
    fig, (ax_curve, ax_acc, ax_weight) = plt.subplots(1, 3, figsize=(16, 4.2))
    for method in METHODS:
        curves = np.array([r["curve"]["test_accuracy"] for r in runs[method]])
        ax_curve.plot(runs[method][0]["curve"]["step"], curves.mean(0), color=colors[method], label=LABELS[method])
    ax_curve.axhline(ref_accuracy, color="black", linestyle="--", linewidth=1, label=f"reference ({ref_accuracy:.3f})")
    ax_curve.set(xlabel="step", ylabel="test accuracy (mean over seeds)", title="test accuracy during training")
    xs = np.arange(len(METHODS))
    ax_acc.bar(xs, [summary[m]["test_accuracy_mean"] for m in METHODS],
               yerr=[summary[m]["test_accuracy_std"] for m in METHODS], color=[colors[m] for m in METHODS], capsize=4)
    low = min(summary[m]["test_accuracy_mean"] - summary[m]["test_accuracy_std"] for m in METHODS)
    ax_acc.set(xticks=xs, ylim=(max(0.0, low - 0.05), 1.0), ylabel="final test accuracy",
               title=f"final test accuracy ({len(runs['erm'])} seeds, mean +- std)")
    ax_acc.set_xticklabels([m.replace("_", "\n") for m in METHODS])
    width = 0.38
    ax_weight.bar(xs - width / 2, [summary[m]["mean_weight_clean"] for m in METHODS], width, label="clean labels",
                  color="tab:green")
    ax_weight.bar(xs + width / 2, [summary[m]["mean_weight_flipped"] for m in METHODS], width, label="flipped labels",
                  color="tab:red")
    ax_weight.axhline(1.0, color="black", linewidth=0.8)
    ax_weight.set(xticks=xs, ylabel="average relative weight (1 = uniform)", title="weight through training")
    ax_weight.set_xticklabels([m.replace("_", "\n") for m in METHODS])
    for ax in (ax_curve, ax_acc, ax_weight):
        ax.grid(alpha=0.3)
    ax_curve.legend(fontsize=7)
    ax_weight.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of each target run")
    p.add_argument("--ref-steps", type=int, default=300, help="steps of the reference run on the clean split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the models")
    p.add_argument("--scalar-lr", type=float, default=1e-2, help="Adam learning rate of mu, tau and eta")
    p.add_argument("--hidden", type=int, default=128, help="hidden width of the target")
    p.add_argument("--ref-hidden", type=int, default=32, help="hidden width of the (small) reference")
    p.add_argument("--noise", type=float, default=0.3, help="fraction of training labels flipped")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-ref", type=int, default=200, help="size of the clean split of the reference model")
    p.add_argument("--alpha", type=float, default=0.5, help="CVaR fraction")
    p.add_argument("--tau", type=float, default=1.0, help="KL temperature (initial one for kl_constrained)")
    p.add_argument("--tau-floor", type=float, default=0.05, help="floor of the learned KL-constrained temperature")
    p.add_argument("--kl-radius", type=float, default=0.5, help="radius of the KL ball")
    p.add_argument("--chi2-radius", type=float, default=1.0, help="radius of the chi-square ball")
    p.add_argument("--gamma", type=float, default=0.9, help="moving-average rate of u")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output", "noisy_labels"),
                   help="output directory for results.json and results.png")
    p.add_argument("--quick", action="store_true", help="a few steps and 1 seed (for tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.max_steps_per_epoch = 10 ** 9
    if args.quick:
        args.seeds, args.epochs, args.ref_steps, args.max_steps_per_epoch = 1, 2, 5, 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    seeds = list(range(args.seeds))
    n_train = 1797 - args.n_test - args.n_ref
    steps_per_run = args.epochs * min(n_train // args.batch_size, args.max_steps_per_epoch)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=len(seeds) * (args.ref_steps + len(METHODS) * steps_per_run), desc="noisy digits",
                        unit="step", dynamic_ncols=True, file=sys.stderr)
    runs = {m: [] for m in METHODS}
    ref_accuracy, noisy = [], []
    for seed in seeds:
        splits = make_splits(seed, args.n_test, args.n_ref, args.noise)
        reference = train_reference(splits, args, seed, progress)
        ref_accuracy.append(accuracy(reference, splits["test_x"], splits["test_y"]))
        noisy.append(int(splits["flipped"].sum()))
        for method in METHODS:
            runs[method].append(train_target(method, splits, reference, args, seed, progress))
    if progress is not None:
        progress.close()

    summary = summarize(runs)
    results = dict(
        summary=summary,
        reference_test_accuracy=float(np.mean(ref_accuracy)),
        reference_test_accuracy_per_seed=ref_accuracy,
        runs=runs,
        config=dict(vars(args), seeds=seeds, n_train=n_train, flipped_per_seed=noisy, steps_per_run=steps_per_run,
                    torch=torch.__version__),
        runtime_s=round(time.time() - start, 2),
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(os.path.join(args.out, "results.png"), summary, runs, results["reference_test_accuracy"])

    print(f"digits with {args.noise:.0%} flipped training labels: {n_train} training, {args.n_ref} clean reference, "
          f"{args.n_test} test samples; {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, {steps_per_run} steps per "
          f"run, {results['runtime_s']:.0f} s")
    print(f"reference (clean split, hidden {args.ref_hidden}): test accuracy {results['reference_test_accuracy']:.4f}")
    print(f"{'target':<24s}{'test accuracy':>18s}{'weight clean':>14s}{'weight flipped':>16s}"
          f"{'Var(l-l_ref)':>14s}{'Var(l)':>9s}")
    for method in METHODS:
        s = summary[method]
        print(f"{LABELS[method]:<24s}{s['test_accuracy_mean']:>10.4f} +- {s['test_accuracy_std']:.4f}"
              f"{s['mean_weight_clean']:>14.3f}{s['mean_weight_flipped']:>16.3f}{s['var_rho_loss']:>14.3f}"
              f"{s['var_loss']:>9.3f}")
    print(f"saved {os.path.join(args.out, 'results.json')} and results.png")
    return results


if __name__ == "__main__":
    main()
