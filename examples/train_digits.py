"""Train a tiny CLIP on scikit-learn's bundled digits, with and without a reference model (DRRho-CLIP).

Everything runs on the CPU in a couple of minutes, with no download:

1. The 1797 8x8 digits are split into a test set, a small clean split and a larger training split.
2. A *reference* CLIP is trained on the small clean split with the plain global contrastive loss
   (``DRRhoCLIPLoss`` without a reference model).
3. A *target* CLIP is trained on the training split, where a fraction of the pairs (30% by default)
   carry a wrong caption (a random other digit). It is trained twice, with the same seed, the same
   initialisation and the same batches: once with DRRho (``DRRhoCLIPLoss`` given the frozen reference
   model's embeddings) and once with the plain global contrastive loss.
4. Zero-shot test accuracy: a test image is classified by the most similar of the ten class captions
   ("a photo of the digit seven", ...).

The accuracies and the training curves are printed and saved (``results.json``, ``curves.png``).

Temperatures (``--temperature``, every form learned; applied to both targets, the reference model always
uses ``global``):

- ``global`` (default): one learnable logit scale of the model, ``s = exp(param)``, clamped to [1, 100];
- ``per_direction``: two learnable logit scales of the model, one for the image anchors and one for the text
  anchors, passed to the loss as a pair ``(s_img, s_txt)``;
- ``individual``: per-sample temperatures owned by the loss (``DRRhoCLIPLoss(temperature="individual")``,
  updated by the loss itself at each step, within [0.01, 1]); the model has no logit scale.

Every form starts at the temperature ``--tau-init`` (0.07, CLIP's). ``results.json`` records the form and
the learned temperatures; ``curves.png`` shows them over training.

Other uses of the reference model (each adds one more target, trained from the same initialisation;
``--distill`` and ``--select`` may be given together):

- ``--distill``: DRRho plus the distillation term with the reference model as the teacher
  (``DRRhoCLIPLoss(distill_weight=--distill-weight, distill_scale=--distill-scale)``, 1.0 and 100 as in
  the authors' ``train.py``): the ``target_drrho_distill`` run.
- ``--select``: DRRho on sub-batches chosen from super-batches by joint example selection
  (``dk.jest_select``, the authors' ``jointly_sample_batch_softmax``): each step draws a super-batch of
  ``S = ceil(B / (1 - --filter-ratio))`` distinct random training pairs, scores it without gradient with
  the target (its own logit scale) and the reference (scale ``--select-ref-scale``, 100 as the authors'),
  keeps the ``floor(S (1 - f)) = B`` pairs drawn in ``--select-chunks`` chunks, and takes the DRRho step on
  them (their dataset indices index the loss's state): the ``target_drrho_select`` run. It takes as many
  steps of ``B`` pairs as the other targets; ``results.json`` records the sub-batch sizes, the pairs
  trained on and the share of wrong captions among the candidates and among the pairs kept.

Single process::

    python examples/train_digits.py --epochs 30 --seed 0
    python examples/train_digits.py --temperature individual

Several seeds and forms (each run in ``OUT/<form>/seed<k>/``; mean +- std in ``OUT/summary.json``)::

    python examples/train_digits.py --temperature all --seeds 5
    python examples/train_digits.py --distill --select --seeds 5      # + DRRho with distillation, with selection

Data parallel on the CPU (gloo); each global batch is split across the processes, the loss uses
the whole global batch (``process_group="world"``) and the models are wrapped in DDP::

    torchrun --nproc_per_node 2 examples/train_digits.py --epochs 30 --seed 0

The same seed and the same global batch give the same run (up to floating-point reordering).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import drrho_kernels as dk
from drrho_kernels.parallel.schemes import SCHEMES
from drrho_kernels.reference.selection import selection_sizes

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# {w}: the digit's name, {n}: its numeral. Varied so that a caption is not a single token.
TEMPLATES = [
    "a photo of the digit {w}",
    "a handwritten {w}",
    "the number {n}",
    "an image of a {w}",
    "a scan showing the digit {n}",
    "{w} written by hand",
    "a blurry photo of a {w}",
    "a picture of the number {w}",
    "a small grayscale {n}",
    "a digit {w} on a white page",
]
CLASS_TEMPLATE = "a photo of the digit {w}"
PAD = 0


# ------------------------------------------------------------------------------------------------
# Data

class Tokenizer:
    """A fixed vocabulary: every word of the templates, the digit names and the numerals."""

    def __init__(self):
        words = set(DIGIT_WORDS) | {str(i) for i in range(10)}
        for t in TEMPLATES + [CLASS_TEMPLATE]:
            words |= {w for w in t.split() if not w.startswith("{")}
        self.vocab = {w: i + 1 for i, w in enumerate(sorted(words))}     # 0 is padding
        self.max_len = max(len(t.split()) for t in TEMPLATES + [CLASS_TEMPLATE])

    def __call__(self, captions: list[str]) -> torch.Tensor:
        out = torch.full((len(captions), self.max_len), PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            ids = [self.vocab[w] for w in caption.split()]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def caption(digit: int, template: int) -> str:
    return TEMPLATES[template].format(w=DIGIT_WORDS[digit], n=str(digit))


@dataclass
class Splits:
    ref_x: torch.Tensor           # clean split for the reference model
    ref_tokens: torch.Tensor
    train_x: torch.Tensor         # target's training split, some captions wrong
    train_tokens: torch.Tensor
    train_noisy: np.ndarray       # which training pairs got a wrong caption
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_tokens: torch.Tensor    # the ten class captions


def make_splits(seed: int, n_test: int, n_ref: int, noise: float, tok: Tokenizer) -> Splits:
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    test, ref, train = perm[:n_test], perm[n_test:n_test + n_ref], perm[n_test + n_ref:]

    def captions_for(idx, noise_rate):
        labels = y[idx].copy()
        noisy = rng.random(len(idx)) < noise_rate
        shift = rng.integers(1, 10, size=len(idx))             # a different digit, uniformly
        labels[noisy] = (labels[noisy] + shift[noisy]) % 10
        templates = rng.integers(0, len(TEMPLATES), size=len(idx))
        return tok([caption(int(d), int(t)) for d, t in zip(labels, templates)]), noisy

    ref_tokens, _ = captions_for(ref, 0.0)
    train_tokens, train_noisy = captions_for(train, noise)
    class_tokens = tok([CLASS_TEMPLATE.format(w=w) for w in DIGIT_WORDS])
    return Splits(x[ref], ref_tokens, x[train], train_tokens, train_noisy, x[test], torch.tensor(y[test]),
                  class_tokens)


# ------------------------------------------------------------------------------------------------
# Model

TEMPERATURES = ("global", "per_direction", "individual")
# The target runs: always plain and DRRho; --distill and --select each add one.
TARGETS = ("target_plain", "target_drrho", "target_drrho_distill", "target_drrho_select")
TARGET_LABELS = dict(target_plain="target, plain (no reference)", target_drrho="target, DRRho (with reference)",
                     target_drrho_distill="target, DRRho + distillation",
                     target_drrho_select="target, DRRho on selected pairs")
TARGET_ROWS = dict(target_plain="target, plain global contrastive loss",
                   target_drrho="target, DRRho (steered by the reference)",
                   target_drrho_distill="target, DRRho + distillation from the reference",
                   target_drrho_select="target, DRRho on sub-batches chosen by jest_select")
TARGET_SHORT = dict(target_plain="plain", target_drrho="DRRho", target_drrho_distill="DRRho+distill",
                    target_drrho_select="DRRho+select")


def targets_of(args) -> tuple[str, ...]:
    return ("target_plain", "target_drrho") + (("target_drrho_distill",) if args.distill else ()) \
        + (("target_drrho_select",) if args.select else ())


class TinyCLIP(nn.Module):
    """MLP image encoder on the 64 pixels, bag-of-words text encoder, learnable temperature(s).

    ``temperature``: ``"global"`` (one logit scale), ``"per_direction"`` (two: image anchors, text anchors)
    or ``"individual"`` (none here: the loss module owns per-sample temperatures)."""

    def __init__(self, vocab_size: int, dim: int = 64, hidden: int = 256, temperature: str = "global",
                 tau_init: float = 0.07):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, dim))
        self.word = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.text = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.temperature = temperature
        # CLIP's temperature: logit_scale = exp(param), initialised at 1 / tau_init (1 / 0.07), clamped at 100.
        if temperature == "global":
            self.log_scale = nn.Parameter(torch.tensor(math.log(1 / tau_init)))
        elif temperature == "per_direction":
            self.log_scale = nn.Parameter(torch.full((2,), math.log(1 / tau_init)))
        elif temperature == "individual":
            self.register_parameter("log_scale", None)
        else:
            raise ValueError(f"temperature: expected one of {TEMPERATURES}, got {temperature!r}")

    def encode_image(self, x):
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, tokens):
        mask = (tokens != PAD).unsqueeze(-1).float()
        bag = (self.word(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(self.text(bag), dim=-1)

    def logit_scale(self):
        """What the loss takes: one scale, a pair ``(s_img, s_txt)``, or None (individual)."""
        if self.log_scale is None:
            return None
        scale = self.log_scale.exp()
        return (scale[0], scale[1]) if self.temperature == "per_direction" else scale

    def forward(self, x, tokens):
        return self.encode_image(x), self.encode_text(tokens), self.logit_scale()

    @torch.no_grad()
    def clamp_scale(self):
        if self.log_scale is not None:
            self.log_scale.clamp_(0.0, math.log(100.0))


@torch.no_grad()
def temperatures(model: TinyCLIP, crit: dk.DRRhoCLIPLoss, seen: torch.Tensor | None = None) -> dict:
    """The current temperatures tau = 1 / s: the model's scale(s), or statistics of the per-sample
    temperatures of the samples the loss has updated (``seen``)."""
    if model.temperature == "individual":
        out = dict(samples=int(seen.sum()) if seen is not None else crit.data_size)
        for k in ("img", "txt"):
            tau = getattr(crit, f"tau_{k}")
            tau = tau[seen.to(tau.device)] if seen is not None and bool(seen.any()) else tau
            out[f"tau_{k}"] = dict(mean=float(tau.mean()), min=float(tau.min()), max=float(tau.max()),
                                   std=float(tau.std()) if tau.numel() > 1 else 0.0)
        return out
    scale = model.log_scale.detach().exp()
    if model.temperature == "per_direction":
        return dict(logit_scale_img=float(scale[0]), logit_scale_txt=float(scale[1]),
                    tau_img=float(1 / scale[0]), tau_txt=float(1 / scale[1]))
    return dict(logit_scale=float(scale), tau=float(1 / scale))


@torch.no_grad()
def zero_shot_accuracy(model: TinyCLIP, splits: Splits) -> float:
    model.eval()
    img = model.encode_image(splits.test_x)
    cls = model.encode_text(splits.class_tokens)
    pred = (img @ cls.T).argmax(1)
    model.train()
    return int((pred == splits.test_y).sum()) / splits.test_y.numel()


# ------------------------------------------------------------------------------------------------
# Training

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT; then use gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def super_batch_size(local: int, filter_ratio: float) -> int:
    """The smallest super-batch from which selection keeps ``local`` pairs: ``ceil(local / (1 - f))``
    (exact: then ``floor(S (1 - f)) = local``, as ``drrho_kernels.reference.selection.selection_sizes`` computes it)."""
    keep = 1 - Fraction(repr(float(filter_ratio)))
    return math.ceil(local / keep)


@torch.no_grad()
def select_sub_batch(model: TinyCLIP, reference: TinyCLIP, x, tokens, candidates: torch.Tensor, args,
                     generator: torch.Generator, ddp: Dist) -> torch.Tensor:
    """The dataset indices, among this process's ``candidates`` (its share of the super-batch), that joint
    example selection keeps: ``floor(len(candidates) (1 - f))`` of them, chunk by chunk."""
    img, txt = model.encode_image(x[candidates]), model.encode_text(tokens[candidates])
    ref_img, ref_txt = reference.encode_image(x[candidates]), reference.encode_text(tokens[candidates])
    keep = dk.jest_select(img, txt, ref_img, ref_txt, model.logit_scale().detach(), ref_scale=args.select_ref_scale,
                          filter_ratio=args.filter_ratio, n_chunks=args.select_chunks, generator=generator,
                          process_group="world" if ddp.active else None, backend=args.backend)
    return candidates[keep]


def train(name: str, x, tokens, splits: Splits, args, tok: Tokenizer, ddp: Dist, dim: int,
          reference: TinyCLIP | None = None, epochs: int | None = None, progress=None,
          temperature: str = "global", distill: bool = False, select: bool = False):
    """Train one TinyCLIP; returns the model, its history (loss, zero-shot accuracy and temperatures per
    epoch), its final temperatures and, with ``select``, the selection's record (else None).

    ``distill``: the loss adds the distillation term with the reference as the teacher. ``select``: each step
    trains on the pairs :func:`select_sub_batch` keeps from a super-batch of random distinct pairs."""
    if (distill or select) and reference is None:
        raise ValueError(f"{name}: distillation and selection need the reference model")
    epochs = args.epochs if epochs is None else epochs
    torch.manual_seed(args.seed)                      # the same initialisation for every target
    model = TinyCLIP(len(tok.vocab) + 1, dim=dim, temperature=temperature, tau_init=args.tau_init)
    net = model
    if ddp.active:
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = x.shape[0]
    crit = dk.DRRhoCLIPLoss(n, gamma=args.gamma, gamma_decay_epochs=max(1, epochs // 2), rho=args.rho,
                            backend=args.backend, process_group="world" if ddp.active else None,
                            distributed_scheme=args.scheme,
                            **(dict(temperature="individual", tau_init=args.tau_init, tau_lr=args.tau_lr)
                               if temperature == "individual" else {}),
                            **(dict(distill_weight=args.distill_weight, distill_scale=args.distill_scale)
                               if distill else {}))
    global_batch = args.batch_size
    if global_batch % ddp.world:
        raise SystemExit(f"--batch-size {global_batch} must be divisible by the number of processes {ddp.world}")
    local = global_batch // ddp.world
    steps = n // global_batch                         # drop the last partial batch: equal B on every rank
    if args.quick:
        steps = min(steps, 3)
    rng = np.random.default_rng(args.seed + 1)        # the same batches for every target (but selection's)
    hist = dict(epoch=[], step=[], loss=[], accuracy=[], tau_img=[], tau_txt=[])
    if temperature == "individual":
        hist.update(tau_img_min=[], tau_img_max=[], tau_txt_min=[], tau_txt_max=[])
    seen = torch.zeros(n, dtype=torch.bool)           # samples the loss updated (trained on)
    selection = None
    if select:
        local_super = super_batch_size(local, args.filter_ratio)
        global_super = local_super * ddp.world
        noisy = torch.from_numpy(splits.train_noisy)
        candidate = torch.zeros(n, dtype=torch.bool)  # samples that were in some super-batch
        generator = torch.Generator().manual_seed(args.seed + 2 + 1000 * ddp.rank)
        selection = dict(filter_ratio=args.filter_ratio, n_chunks=args.select_chunks, ref_scale=args.select_ref_scale,
                         super_batch=global_super, super_batch_per_process=local_super,
                         sub_batch=selection_sizes(local_super, args.filter_ratio, 1)[0] * ddp.world,
                         sub_batch_sizes=[])
        hist.update(candidate_noisy_fraction=[], selected_noisy_fraction=[])
    step, run_counts = 0, [0, 0, 0, 0]
    for epoch in range(epochs):
        crit.set_epoch(epoch)
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        noisy_counts = [0, 0, 0, 0]                   # selection, this epoch: wrong captions and pairs, drawn then kept
        for k in range(steps):
            if select:                                # S distinct random pairs; each process scores its share
                batch = torch.from_numpy(rng.choice(n, global_super, replace=False))
                mine = select_sub_batch(model, reference, x, tokens,
                                        batch[ddp.rank * local_super:(ddp.rank + 1) * local_super], args,
                                        generator, ddp)
                kept = mine
                if ddp.active:                        # the whole global sub-batch, for the records
                    parts = [torch.empty_like(mine) for _ in range(ddp.world)]
                    dist.all_gather(parts, mine)
                    kept = torch.cat(parts)
                selection["sub_batch_sizes"].append(int(kept.numel()))
                noisy_counts[0] += int(noisy[batch].sum())
                noisy_counts[1] += int(batch.numel())
                noisy_counts[2] += int(noisy[kept].sum())
                noisy_counts[3] += int(kept.numel())
                candidate[batch] = True
                batch = kept
            else:
                batch = perm[k * global_batch:(k + 1) * global_batch]
                mine = batch[ddp.rank * local:(ddp.rank + 1) * local]    # this process's share
            img, txt, scale = net(x[mine], tokens[mine])
            refs = {}
            if reference is not None:
                with torch.no_grad():
                    refs = dict(ref_img=reference.encode_image(x[mine]), ref_txt=reference.encode_text(tokens[mine]))
            loss = crit(img, txt, mine, scale, **refs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.clamp_scale()
            lv = loss.detach()
            if ddp.active:                            # the global batch's loss: mean of the ranks' L_r
                dist.all_reduce(lv)
                lv /= ddp.world
            total += float(lv)
            seen[batch] = True                        # the loss updates the state of the whole global batch
            step += 1
            if progress is not None:
                progress.update(1)
        acc = zero_shot_accuracy(model, splits)
        hist["epoch"].append(epoch + 1)
        hist["step"].append(step)
        hist["loss"].append(total / max(steps, 1))
        hist["accuracy"].append(acc)
        temp = temperatures(model, crit, seen)
        if temperature == "individual":
            for k in ("img", "txt"):
                for stat in ("mean", "min", "max"):
                    hist[f"tau_{k}" + ("" if stat == "mean" else f"_{stat}")].append(temp[f"tau_{k}"][stat])
        else:
            hist["tau_img"].append(temp.get("tau_img", temp.get("tau")))
            hist["tau_txt"].append(temp.get("tau_txt", temp.get("tau")))
        if select:
            hist["candidate_noisy_fraction"].append(noisy_counts[0] / max(noisy_counts[1], 1))
            hist["selected_noisy_fraction"].append(noisy_counts[2] / max(noisy_counts[3], 1))
            run_counts = [a + b for a, b in zip(run_counts, noisy_counts)]
        if progress is not None:
            progress.set_postfix_str(f"{name} ep {epoch + 1} loss {hist['loss'][-1]:.3f} acc {acc:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if select:
        # Which pairs the loss saw: its state u is set (non-zero) exactly for the samples it was given.
        updated = (crit.u_img.cpu() != 0) | (crit.u_txt.cpu() != 0)
        selection.update(candidate_samples=int(candidate.sum()), trained_samples=int(seen.sum()),
                         state_updated_samples=int(updated.sum()),
                         state_updated_only_trained=bool(not (updated & ~seen).any()),
                         # Over all steps, each pair counted as often as it was drawn / trained on:
                         candidate_noisy_fraction=run_counts[0] / max(run_counts[1], 1),
                         selected_noisy_fraction=run_counts[2] / max(run_counts[3], 1),
                         steps=step, sub_batch_sizes=sorted(set(selection["sub_batch_sizes"])))
    return model, hist, temperatures(model, crit, seen), selection


def plot(path: str, hist: dict, ref_acc: float, temperature: str = "global", tau_init: float = 0.07) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc, ax_tau) = plt.subplots(1, 3, figsize=(16, 4))
    colors = dict(target_drrho="tab:red", target_plain="tab:blue", reference="tab:gray",
                  target_drrho_distill="tab:purple", target_drrho_select="tab:green")
    labels = dict(TARGET_LABELS, reference="reference (clean split)")
    for key in TARGETS:
        if key not in hist:
            continue
        h = dict(hist[key])
        for name in ("tau_img", "tau_txt", "tau_img_min", "tau_img_max", "tau_txt_min", "tau_txt_max"):
            if name in h:                             # the temperature curves start at step 0, tau_init
                h[name] = [tau_init] + h[name]
        h["tau_step"] = [0] + h["step"]
        ax_loss.plot(h["step"], h["loss"], color=colors[key], label=labels[key])
        ax_acc.plot(h["step"], h["accuracy"], color=colors[key], label=labels[key])
        if temperature == "global":
            ax_tau.plot(h["tau_step"], h["tau_img"], color=colors[key], label=labels[key])
        else:
            what = "mean " if temperature == "individual" else ""
            ax_tau.plot(h["tau_step"], h["tau_img"], color=colors[key], label=f"{labels[key]}: {what}image anchors")
            ax_tau.plot(h["tau_step"], h["tau_txt"], color=colors[key], linestyle="--", label=f"{what}text anchors")
        if temperature == "individual":
            for k in ("img", "txt"):
                ax_tau.fill_between(h["tau_step"], h[f"tau_{k}_min"], h[f"tau_{k}_max"], color=colors[key],
                                    alpha=0.1)
    ax_acc.axhline(ref_acc, color=colors["reference"], linestyle="--", label=f"reference ({ref_acc:.3f})")
    ax_loss.set(xlabel="step", ylabel="training loss (epoch mean)",
                title="training loss (DRRho's differs by the RHO shift" + (", distillation's by its term too)"
                                                                       if "target_drrho_distill" in hist else ")"))
    ax_acc.set(xlabel="step", ylabel="zero-shot test accuracy", title="zero-shot accuracy on the test digits",
               ylim=(0, 1))
    ax_tau.set(xlabel="step", ylabel="temperature tau = 1 / s (end of epoch)", yscale="log",
               title=f"temperature ({temperature}" + (", mean and min-max band)" if temperature == "individual"
                                                      else ")"))
    for ax in (ax_loss, ax_acc, ax_tau):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None (the options whose default depends on others say it in their help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# The options of --distill and --select: (flag, attribute, default); None in args means "not given".
DISTILL_OPTIONS = (("--distill-weight", "distill_weight", 1.0), ("--distill-scale", "distill_scale", 100.0))
SELECT_OPTIONS = (("--filter-ratio", "filter_ratio", 0.5), ("--select-chunks", "select_chunks", 2),
                  ("--select-ref-scale", "select_ref_scale", 100.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="epochs of each target run")
    p.add_argument("--ref-epochs", type=int, default=None, help="epochs of the reference run (default: 3x --epochs, "
                   "its split is small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (with --seeds K: the first of K)")
    p.add_argument("--seeds", type=int, default=1, help="run K seeds (--seed, --seed + 1, ...) per temperature "
                   "form and write the mean +- std of the accuracies to OUT/summary.json")
    p.add_argument("--temperature", default="global", choices=list(TEMPERATURES) + ["all"],
                   help="learnable temperature form of the targets: one logit scale, one per direction (image "
                   "anchors, text anchors), or per-sample temperatures owned by the loss; 'all' runs the three")
    p.add_argument("--tau-init", type=float, default=0.07, help="initial temperature of every form")
    p.add_argument("--tau-lr", type=float, default=0.0133, help="step size of the per-sample temperatures "
                   "(--temperature individual)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton", "reference"])
    p.add_argument("--scheme", default="gather_u", choices=list(SCHEMES), help="distributed scheme (torchrun only)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"),
                   help="output directory for results.json and curves.png")
    p.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=0.8, help="final moving-average rate (cosine schedule)")
    p.add_argument("--rho", type=float, default=8.0)
    p.add_argument("--noise", type=float, default=0.3, help="fraction of training pairs with a wrong caption")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-ref", type=int, default=250, help="size of the clean split of the reference model")
    p.add_argument("--dim", type=int, default=64, help="target embedding width")
    p.add_argument("--ref-dim", type=int, default=32, help="reference embedding width (may differ)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("other uses of the reference model (each adds a target run)")
    g.add_argument("--distill", action="store_true", help="also train the target with DRRho plus the distillation "
                   "term, the reference model's embeddings as the teacher (target_drrho_distill)")
    g.add_argument("--distill-weight", type=float, default=None, help="--distill: weight lambda > 0 of the "
                   "distillation term (default 1.0, the authors')")
    g.add_argument("--distill-scale", type=float, default=None, help="--distill: the teacher's logit scale > 0 "
                   "(default 100, the authors')")
    g.add_argument("--select", action="store_true", help="also train the target with DRRho on the sub-batches "
                   "dk.jest_select keeps from super-batches of ceil(B / (1 - f)) pairs (target_drrho_select)")
    g.add_argument("--filter-ratio", type=float, default=None, help="--select: share f in (0, 1) of each "
                   "super-batch left out (default 0.5: super-batches of 2 B; the authors' train.py defaults to 0.8)")
    g.add_argument("--select-chunks", type=int, default=None, help="--select: chunks of the joint draw, 1..B "
                   "(default 2, the authors')")
    g.add_argument("--select-ref-scale", type=float, default=None, help="--select: the reference's logit scale in "
                   "the learnability scores (default 100, what the authors' train.py passes)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected at least 1, got {args.seeds}")
    if not 0.01 <= args.tau_init <= 1.0:
        p.error(f"--tau-init: expected a temperature in [0.01, 1] (the clamp range of every form), got {args.tau_init}")
    for mode, options in (("--distill", DISTILL_OPTIONS), ("--select", SELECT_OPTIONS)):
        on = getattr(args, mode[2:])
        for flag, name, default in options:
            if getattr(args, name) is None:
                setattr(args, name, default if on else None)
            elif not on:
                p.error(f"{flag}: applies to {mode} only, which was not given")
    if args.distill or args.select:
        what = "--distill" if args.distill else "--select"
        if args.n_ref < args.batch_size:
            p.error(f"{what} needs a trained reference model: --n-ref {args.n_ref} is smaller than --batch-size "
                    f"{args.batch_size}, so the reference would take no training step")
    if args.distill and args.temperature in ("individual", "all"):
        p.error(f"--distill: expected --temperature global or per_direction (the distillation term is defined for the "
                f"model's logit scale(s), not for per-sample temperatures), got {args.temperature!r}")
    if args.distill:
        for flag, value in (("--distill-weight", args.distill_weight), ("--distill-scale", args.distill_scale)):
            if not (math.isfinite(value) and value > 0):
                p.error(f"{flag}: expected a finite value > 0, got {value}"
                        + (" (weight 0 is the DRRho run without distillation, always trained)"
                           if flag == "--distill-weight" else ""))
    if args.select:
        if args.temperature != "global":
            p.error(f"--select: expected --temperature global (joint example selection scores the learner with one "
                    f"logit scale), got {args.temperature!r}")
        if not (math.isfinite(args.filter_ratio) and 0 < args.filter_ratio < 1):
            p.error(f"--filter-ratio: expected the share of each super-batch left out, in (0, 1), got "
                    f"{args.filter_ratio}")
        if not (math.isfinite(args.select_ref_scale) and args.select_ref_scale > 0):
            p.error(f"--select-ref-scale: expected a finite logit scale > 0, got {args.select_ref_scale}")
        if not 1 <= args.select_chunks <= args.batch_size:
            p.error(f"--select-chunks: expected 1 to --batch-size ({args.batch_size}) chunks (each draws at least "
                    f"one pair), got {args.select_chunks}")
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.ref_epochs = 2
    if args.ref_epochs is None:
        args.ref_epochs = 3 * args.epochs
    return args


def run(args, ddp: Dist) -> dict:
    """One seed and one temperature form (``args.seed``, ``args.temperature``): train the reference and the
    two targets, write ``results.json`` and ``curves.png`` to ``args.out``; returns the results."""
    start = time.time()
    tok = Tokenizer()
    splits = make_splits(args.seed, args.n_test, args.n_ref, args.noise, tok)

    n_ref, n_train = splits.ref_x.shape[0], splits.train_x.shape[0]
    if args.select:
        size = super_batch_size(args.batch_size // ddp.world, args.filter_ratio) * ddp.world
        if size > n_train:
            raise SystemExit(f"--filter-ratio {args.filter_ratio}: the super-batch of {size} pairs (ceil(B / (1 - f)) "
                             f"per process) exceeds the {n_train} training pairs")
    steps = lambda n, e: e * (min(n // args.batch_size, 3) if args.quick else n // args.batch_size)  # noqa: E731
    targets = targets_of(args)
    total_steps = steps(n_ref, args.ref_epochs) + len(targets) * steps(n_train, args.epochs)
    progress = None
    if ddp.main and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, desc=f"digits CLIP ({args.temperature}, seed {args.seed})", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    reference, ref_hist, ref_temp, _ = train("reference", splits.ref_x, splits.ref_tokens, splits, args, tok, ddp,
                                             args.ref_dim, epochs=args.ref_epochs, progress=progress)
    ref_acc = zero_shot_accuracy(reference, splits)
    hist, temp, selection = dict(reference=ref_hist), {}, None
    for target in targets:                            # the same seed, initialisation and (but selection) batches
        _, hist[target], temp[target], sel = train(
            target.removeprefix("target_"), splits.train_x, splits.train_tokens, splits, args, tok, ddp, args.dim,
            reference=None if target == "target_plain" else reference, progress=progress,
            temperature=args.temperature, distill=target == "target_drrho_distill",
            select=target == "target_drrho_select")
        selection = sel if sel is not None else selection
    if progress is not None:
        progress.close()

    results = dict(
        reference_accuracy=ref_acc,
        **{f"{t}_accuracy": hist[t]["accuracy"][-1] for t in targets},
        # The best epoch of each target run (what early stopping on the test set would pick; for
        # information only, the headline numbers are the final ones above).
        **{f"{t}_peak_accuracy": max(hist[t]["accuracy"]) for t in targets},
        # The learned temperatures at the end (tau = 1 / s): the model's scale(s), or for "individual"
        # statistics of the per-sample temperatures held by the loss (over the samples it updated).
        temperature=dict(form=args.temperature, init=args.tau_init, applies_to=list(targets),
                         reference=dict(form="global", **ref_temp), **temp),
        config=dict(vars(args), world_size=ddp.world, n_ref=n_ref, n_train=n_train, n_test=int(splits.test_y.numel()),
                    noisy_pairs=int(splits.train_noisy.sum()), targets=list(targets),
                    resolved_backend=dk.backends.resolve(args.backend, torch.device("cpu"))),
        history=hist,
        runtime_s=round(time.time() - start, 2),
    )
    if args.distill:
        results["distillation"] = dict(weight=args.distill_weight, teacher_scale=args.distill_scale,
                                       teacher="the reference model's embeddings")
    if selection is not None:
        results["selection"] = selection
    if ddp.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot(os.path.join(args.out, "curves.png"), results["history"], ref_acc, args.temperature, args.tau_init)
        print(f"zero-shot test accuracy ({results['config']['n_test']} test digits, seed {args.seed}, "
              f"temperature {args.temperature}, {ddp.world} process{'es' if ddp.world > 1 else ''}, "
              f"{results['runtime_s']:.0f} s):")
        rows = [(f"reference (clean split of {n_ref})", ref_acc)]
        rows += [(TARGET_ROWS[t], results[f"{t}_accuracy"]) for t in targets]
        for label, acc in rows:
            print(f"  {label:<52s}{acc:.4f}")
        print(f"learned temperature (from {args.tau_init}): "
              + ", ".join(f"{TARGET_SHORT[t]} {describe_temperature(temp[t])}" for t in targets))
        if selection is not None:
            print(f"selection: sub-batches of {selection['sub_batch']} from super-batches of "
                  f"{selection['super_batch']}; wrong captions {selection['candidate_noisy_fraction']:.3f} of the "
                  f"candidates drawn, {selection['selected_noisy_fraction']:.3f} of the pairs kept (over all steps)")
        print(f"saved {os.path.join(args.out, 'results.json')} and curves.png")
    return results


def describe_temperature(temp: dict) -> str:
    if "tau" in temp:
        return f"tau {temp['tau']:.4f}"
    if "logit_scale_img" in temp:
        return f"tau_img {temp['tau_img']:.4f}, tau_txt {temp['tau_txt']:.4f}"
    return ", ".join(f"{k} mean {temp[k]['mean']:.4f} [{temp[k]['min']:.4f}, {temp[k]['max']:.4f}]"
                     for k in ("tau_img", "tau_txt"))


ACCURACY_KEYS = dict(reference="reference_accuracy", target_plain="target_plain_accuracy",
                     target_drrho="target_drrho_accuracy", target_drrho_distill="target_drrho_distill_accuracy",
                     target_drrho_select="target_drrho_select_accuracy")


def mean_temperature(temps: list[dict]) -> dict:
    """The final temperatures of one target over seeds: the mean of each scalar; for per-sample
    temperatures the mean of the means, the smallest minimum and the largest maximum."""
    out = {}
    for key, value in temps[0].items():
        if isinstance(value, dict):
            out[key] = dict(mean=float(np.mean([t[key]["mean"] for t in temps])),
                            min=min(t[key]["min"] for t in temps), max=max(t[key]["max"] for t in temps))
        elif key != "samples":
            out[key] = float(np.mean([t[key] for t in temps]))
    return out


def summarize(runs: dict) -> dict:
    """Mean and sample standard deviation (ddof = 1) of the accuracies of each form over its seeds."""
    out = {}
    for form, by_seed in runs.items():
        entry = dict(seeds=sorted(by_seed))
        targets = by_seed[entry["seeds"][0]]["config"]["targets"]
        for name, key in ACCURACY_KEYS.items():
            if name != "reference" and name not in targets:
                continue
            values = [by_seed[seed][key] for seed in entry["seeds"]]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            entry[name] = dict(mean=float(np.mean(values)), std=std, values=values)
        entry["final_temperature"] = {target: mean_temperature([by_seed[seed]["temperature"][target]
                                                                 for seed in entry["seeds"]])
                                      for target in targets}
        if "target_drrho_select" in targets:          # the share of wrong captions, candidates vs kept
            sel = [by_seed[seed]["selection"] for seed in entry["seeds"]]
            entry["selection"] = dict(
                super_batch=sel[0]["super_batch"], sub_batch=sel[0]["sub_batch"],
                candidate_noisy_fraction=float(np.mean([x["candidate_noisy_fraction"] for x in sel])),
                selected_noisy_fraction=float(np.mean([x["selected_noisy_fraction"] for x in sel])))
        entry["temperature"] = {seed: by_seed[seed]["temperature"] for seed in entry["seeds"]}
        entry["runtime_s"] = dict(total=round(sum(r["runtime_s"] for r in by_seed.values()), 2),
                                  per_run=[by_seed[seed]["runtime_s"] for seed in entry["seeds"]])
        out[form] = entry
    return out


def main(argv=None) -> dict:
    """One run (the default), or with ``--seeds K`` / ``--temperature all`` every form x seed, each in
    ``OUT/<form>/seed<k>/``, and the summary in ``OUT/summary.json`` (returned)."""
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    ddp = init_distributed()
    torch.use_deterministic_algorithms(True)
    forms = list(TEMPERATURES) if args.temperature == "all" else [args.temperature]
    if len(forms) == 1 and args.seeds == 1:
        results = run(args, ddp)
    else:
        runs = {}
        for form in forms:
            for seed in range(args.seed, args.seed + args.seeds):
                one = argparse.Namespace(**dict(vars(args), temperature=form, seed=seed, seeds=1,
                                                out=os.path.join(args.out, form, f"seed{seed}")))
                runs.setdefault(form, {})[seed] = run(one, ddp)
        results = dict(forms=summarize(runs), config=dict(vars(args), world_size=ddp.world),
                       runtime_s=round(time.time() - start, 2),
                       note="accuracies: final epoch, zero-shot on the test digits; std: sample std (ddof 1) "
                            "over the seeds; each seed also draws its own split and wrong captions")
        if ddp.main:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "summary.json"), "w") as f:
                json.dump(results, f, indent=2)
            print(f"\nzero-shot test accuracy over {args.seeds} seed{'s' if args.seeds > 1 else ''} "
                  f"({args.seed}..{args.seed + args.seeds - 1}), mean +- std, {results['runtime_s']:.0f} s:")
            columns = ("reference",) + targets_of(args)
            heads = "".join((k if k == "reference" else TARGET_SHORT[k]).rjust(18) for k in columns)
            print(f"  {'temperature':<15s}{heads}")
            for form, entry in results["forms"].items():
                cells = "".join(f"{entry[k]['mean']:.4f} +- {entry[k]['std']:.4f}".rjust(18) for k in columns)
                print(f"  {form:<15s}{cells}")
            print(f"saved {os.path.join(args.out, 'summary.json')}")
    if ddp.active:
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
