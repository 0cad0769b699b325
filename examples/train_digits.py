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

Single process::

    python examples/train_digits.py --epochs 30 --seed 0

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
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import drrho_kernels as dk
from drrho_kernels.distributed import SCHEMES

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

class TinyCLIP(nn.Module):
    """MLP image encoder on the 64 pixels, bag-of-words text encoder, learnable temperature."""

    def __init__(self, vocab_size: int, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, dim))
        self.word = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.text = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # CLIP's temperature: logit_scale = exp(param), initialised at 1 / 0.07, clamped at 100.
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, tokens):
        mask = (tokens != PAD).unsqueeze(-1).float()
        bag = (self.word(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(self.text(bag), dim=-1)

    def forward(self, x, tokens):
        return self.encode_image(x), self.encode_text(tokens), self.log_scale.exp()

    @torch.no_grad()
    def clamp_scale(self):
        self.log_scale.clamp_(0.0, math.log(100.0))


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


def train(name: str, x, tokens, splits: Splits, args, tok: Tokenizer, ddp: Dist, dim: int,
          reference: TinyCLIP | None = None, epochs: int | None = None, progress=None):
    """Train one TinyCLIP; returns the model and its history (loss and zero-shot accuracy per epoch)."""
    epochs = args.epochs if epochs is None else epochs
    torch.manual_seed(args.seed)                      # the same initialisation for both targets
    model = TinyCLIP(len(tok.vocab) + 1, dim=dim)
    net = model
    if ddp.active:
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = x.shape[0]
    crit = dk.DRRhoCLIPLoss(n, gamma=args.gamma, gamma_decay_epochs=max(1, epochs // 2), rho=args.rho,
                            backend=args.backend, process_group="world" if ddp.active else None,
                            distributed_scheme=args.scheme)
    global_batch = args.batch_size
    if global_batch % ddp.world:
        raise SystemExit(f"--batch-size {global_batch} must be divisible by the number of processes {ddp.world}")
    local = global_batch // ddp.world
    steps = n // global_batch                         # drop the last partial batch: equal B on every rank
    if args.quick:
        steps = min(steps, 3)
    rng = np.random.default_rng(args.seed + 1)        # the same batches for both targets
    hist = dict(epoch=[], step=[], loss=[], accuracy=[])
    step = 0
    for epoch in range(epochs):
        crit.set_epoch(epoch)
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for k in range(steps):
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
            step += 1
            if progress is not None:
                progress.update(1)
        acc = zero_shot_accuracy(model, splits)
        hist["epoch"].append(epoch + 1)
        hist["step"].append(step)
        hist["loss"].append(total / max(steps, 1))
        hist["accuracy"].append(acc)
        if progress is not None:
            progress.set_postfix_str(f"{name} ep {epoch + 1} loss {hist['loss'][-1]:.3f} acc {acc:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, hist


def plot(path: str, hist: dict, ref_acc: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(target_drrho="tab:red", target_plain="tab:blue", reference="tab:gray")
    labels = dict(target_drrho="target, DRRho (with reference)", target_plain="target, plain (no reference)",
                  reference="reference (clean split)")
    for key in ("target_plain", "target_drrho"):
        ax_loss.plot(hist[key]["step"], hist[key]["loss"], color=colors[key], label=labels[key])
        ax_acc.plot(hist[key]["step"], hist[key]["accuracy"], color=colors[key], label=labels[key])
    ax_acc.axhline(ref_acc, color=colors["reference"], linestyle="--", label=f"reference ({ref_acc:.3f})")
    ax_loss.set(xlabel="step", ylabel="training loss (epoch mean)",
                title="training loss (the two losses differ by the RHO shift)")
    ax_acc.set(xlabel="step", ylabel="zero-shot test accuracy", title="zero-shot accuracy on the test digits",
               ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="epochs of each target run")
    p.add_argument("--ref-epochs", type=int, default=None, help="epochs of the reference run (default: 3x --epochs, "
                   "its split is small)")
    p.add_argument("--seed", type=int, default=0)
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
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.ref_epochs = 2
    if args.ref_epochs is None:
        args.ref_epochs = 3 * args.epochs
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    ddp = init_distributed()
    torch.use_deterministic_algorithms(True)
    tok = Tokenizer()
    splits = make_splits(args.seed, args.n_test, args.n_ref, args.noise, tok)

    n_ref, n_train = splits.ref_x.shape[0], splits.train_x.shape[0]
    steps = lambda n, e: e * (min(n // args.batch_size, 3) if args.quick else n // args.batch_size)  # noqa: E731
    total_steps = steps(n_ref, args.ref_epochs) + 2 * steps(n_train, args.epochs)
    progress = None
    if ddp.main and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, desc="digits CLIP", unit="step", dynamic_ncols=True, file=sys.stderr)

    reference, ref_hist = train("reference", splits.ref_x, splits.ref_tokens, splits, args, tok, ddp,
                                args.ref_dim, epochs=args.ref_epochs, progress=progress)
    ref_acc = zero_shot_accuracy(reference, splits)
    _, plain_hist = train("plain", splits.train_x, splits.train_tokens, splits, args, tok, ddp, args.dim,
                          progress=progress)
    _, drrho_hist = train("drrho", splits.train_x, splits.train_tokens, splits, args, tok, ddp, args.dim,
                          reference=reference, progress=progress)
    if progress is not None:
        progress.close()

    results = dict(
        reference_accuracy=ref_acc,
        target_plain_accuracy=plain_hist["accuracy"][-1],
        target_drrho_accuracy=drrho_hist["accuracy"][-1],
        # The best epoch of each target run (what early stopping on the test set would pick; for
        # information only, the headline numbers are the final ones above).
        target_plain_peak_accuracy=max(plain_hist["accuracy"]),
        target_drrho_peak_accuracy=max(drrho_hist["accuracy"]),
        config=dict(vars(args), world_size=ddp.world, n_ref=n_ref, n_train=n_train, n_test=int(splits.test_y.numel()),
                    noisy_pairs=int(splits.train_noisy.sum()),
                    resolved_backend=dk.backends.resolve(args.backend, torch.device("cpu"))),
        history=dict(reference=ref_hist, target_plain=plain_hist, target_drrho=drrho_hist),
        runtime_s=round(time.time() - start, 2),
    )
    if ddp.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot(os.path.join(args.out, "curves.png"), results["history"], ref_acc)
        print(f"zero-shot test accuracy ({results['config']['n_test']} test digits, seed {args.seed}, "
              f"{ddp.world} process{'es' if ddp.world > 1 else ''}, {results['runtime_s']:.0f} s):")
        rows = [(f"reference (clean split of {n_ref})", ref_acc),
                ("target, plain global contrastive loss", results["target_plain_accuracy"]),
                ("target, DRRho (steered by the reference)", results["target_drrho_accuracy"])]
        for label, acc in rows:
            print(f"  {label:<44s}{acc:.4f}")
        print(f"saved {os.path.join(args.out, 'results.json')} and curves.png")
    if ddp.active:
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
