"""Train a Hugging Face ``transformers`` CLIPModel with DRRho-CLIP, the reference read from a feature cache.

Both towers come from ``transformers`` (``CLIPModel`` built from a tiny ``CLIPConfig``: random weights,
no download); the data are the digits pairs of ``train_digits.py`` (an 8x8 digit image, a caption of
which 30% name a wrong digit). Everything runs on the CPU, 1230 steps in about a minute of CPU time
(2.5 minutes on a shared 2-core machine):

1. A *reference* ``CLIPModel`` (smaller than the target) is trained on the small clean split with the
   plain global contrastive loss (``DRRhoCLIPLoss`` without a reference).
2. Its embeddings of every training pair are computed once into a ``drrho_kernels.ReferenceFeatures``
   cache on disk (float16, memory-mapped, a checksum per chunk). A second run with the same reference
   weights finds the cache complete and reuses it; an interrupted build resumes.
3. The *target* ``CLIPModel`` is trained on the noisy split twice from the same initialisation and
   batches: with the plain global contrastive loss, and with ``DRRhoCLIPLoss`` whose reference embeddings
   are looked up in the cache by the batch's dataset indices (no reference forward pass during training).
4. Zero-shot test accuracy as in ``train_digits.py``: a test image is classified by the most similar of
   the ten class captions.

::

    pip install -e ".[hf]"          # transformers (leaves the installed torch alone)
    python examples/train_hf_clip.py --seed 0

Checkpoints (``--save-every``) hold the model, optimizer and loss state (every sample's ``u`` and the
epoch) and are read back with ``torch.load(..., weights_only=True)``; ``--resume`` continues a run
bit-exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # train_digits.py, beside this file

import drrho_kernels as dk  # noqa: E402
from drrho_kernels.reference_features import fingerprint  # noqa: E402
from train_digits import PAD, Tokenizer, make_splits  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Data: the digits pairs as CLIPModel inputs

@dataclass
class Data:
    ref_px: torch.Tensor        # [n, 1, 8, 8] pixel values of the clean split
    ref_ids: torch.Tensor       # [n, L] token ids, EOS-terminated, PAD-padded
    train_px: torch.Tensor
    train_ids: torch.Tensor
    test_px: torch.Tensor
    test_y: torch.Tensor
    class_ids: torch.Tensor     # the ten class captions
    vocab_size: int
    max_len: int
    eos: int
    noisy: int


def make_data(seed: int, n_test: int, n_ref: int, noise: float) -> Data:
    tok = Tokenizer()
    splits = make_splits(seed, n_test, n_ref, noise, tok)
    eos = len(tok.vocab) + 1                        # ids 1..V are words, 0 is padding

    def ids(tokens: torch.Tensor) -> torch.Tensor:  # append EOS after the last word: CLIP pools there
        out = torch.cat([tokens, torch.full((tokens.shape[0], 1), PAD, dtype=tokens.dtype)], dim=1)
        out[torch.arange(tokens.shape[0]), (tokens != PAD).sum(1)] = eos
        return out

    def px(x: torch.Tensor) -> torch.Tensor:        # [n, 64] in [0, 1] -> [n, 1, 8, 8] in [-1, 1]
        return (x.view(-1, 1, 8, 8) - 0.5) / 0.5

    return Data(px(splits.ref_x), ids(splits.ref_tokens), px(splits.train_x), ids(splits.train_tokens),
                px(splits.test_x), splits.test_y, ids(splits.class_tokens), vocab_size=eos + 1,
                max_len=tok.max_len + 1, eos=eos, noisy=int(splits.train_noisy.sum()))


class Pairs(torch.utils.data.Dataset):
    """Map-style dataset of (pixel values, token ids); item i is dataset index i."""

    def __init__(self, px: torch.Tensor, ids: torch.Tensor):
        self.px, self.ids = px, ids

    def __len__(self) -> int:
        return self.px.shape[0]

    def __getitem__(self, i):
        return self.px[i], self.ids[i]


# ------------------------------------------------------------------------------------------------
# Model: transformers' CLIPModel, both towers

def make_clip(data: Data, width: int, layers: int, dim: int, seed: int):
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(
        text_config=dict(vocab_size=data.vocab_size, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=data.max_len,
                         pad_token_id=PAD, bos_token_id=data.eos, eos_token_id=data.eos),
        vision_config=dict(image_size=8, patch_size=2, num_channels=1, hidden_size=width, intermediate_size=2 * width,
                           num_hidden_layers=layers, num_attention_heads=2),
        projection_dim=dim)
    torch.manual_seed(seed)
    return CLIPModel(config)


AMP_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def encode_image(model, px: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.visual_projection(model.vision_model(pixel_values=px).pooler_output), dim=-1)


def encode_text(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.text_model(input_ids=ids, attention_mask=(ids != PAD).long()).pooler_output
    return F.normalize(model.text_projection(out), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model, data: Data) -> float:
    was_training = model.training
    model.eval()
    pred = (encode_image(model, data.test_px) @ encode_text(model, data.class_ids).T).argmax(1)
    model.train(was_training)
    return int((pred == data.test_y).sum()) / data.test_y.numel()


# ------------------------------------------------------------------------------------------------
# Training, with checkpoints of model + optimizer + loss

class Run:
    """One training run: a CLIPModel, AdamW, a DRRhoCLIPLoss over the run's dataset, and the position."""

    def __init__(self, model, pairs: Pairs, data: Data, args, *, epochs: int,
                 cache: dk.ReferenceFeatures | None = None):
        self.model, self.pairs, self.data, self.args, self.epochs, self.cache = model, pairs, data, args, epochs, cache
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.crit = dk.DRRhoCLIPLoss(len(pairs), gamma=args.gamma, gamma_decay_epochs=max(1, epochs // 2),
                                     rho=args.rho, backend=args.backend)
        self.steps_per_epoch = len(pairs) // args.batch_size        # drop the last partial batch
        if args.quick:
            self.steps_per_epoch = min(self.steps_per_epoch, 3)
        self.step = 0                                                # global step, the resume position
        self.history = dict(epoch=[], step=[], loss=[], accuracy=[])
        self._epoch_losses: list[float] = []

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def batch_index(self, step: int) -> torch.Tensor:
        """Dataset indices of global step ``step``: a per-epoch permutation fixed by (seed, epoch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.pairs), generator=g)
        return perm[k * self.args.batch_size:(k + 1) * self.args.batch_size]

    def train_step(self) -> float:
        epoch = self.step // self.steps_per_epoch
        self.crit.set_epoch(epoch)
        index = self.batch_index(self.step)
        px, ids = self.pairs.px[index], self.pairs.ids[index]
        refs = {}
        if self.cache is not None:                  # the reference model's embeddings, from disk
            ref_img, ref_txt = self.cache.lookup(index)
            refs = dict(ref_img=ref_img, ref_txt=ref_txt)
        # as open_clip's --precision: the towers and the loss inside autocast (the loss's tile products then
        # take the embeddings at the autocast dtype, its sums and state stay float32: docs/INTEGRATIONS.md)
        with torch.autocast("cpu", dtype=AMP_DTYPES.get(self.args.precision), enabled=self.args.precision != "fp32"):
            img, txt = encode_image(self.model, px), encode_text(self.model, ids)
            loss = self.crit(img, txt, index, self.model.logit_scale.exp(), **refs)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():                       # CLIP's clamp of the temperature at 100
            self.model.logit_scale.clamp_(0.0, math.log(100.0))
        self.step += 1
        value = float(loss.detach())
        self._epoch_losses.append(value)
        if self.step % self.steps_per_epoch == 0:
            self.history["epoch"].append(self.step // self.steps_per_epoch)
            self.history["step"].append(self.step)
            self.history["loss"].append(sum(self._epoch_losses) / len(self._epoch_losses))
            self.history["accuracy"].append(zero_shot_accuracy(self.model, self.data))
            self._epoch_losses = []
        return value

    def state(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), loss=self.crit.state_dict(),
                    step=self.step, history=self.history, epoch_losses=self._epoch_losses)

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, path)                       # a crash mid-save leaves the previous checkpoint

    def load(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)     # never unpickles code
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.crit.load_state_dict(ckpt["loss"])
        self.step = int(ckpt["step"])
        self.history = ckpt["history"]
        self._epoch_losses = list(ckpt["epoch_losses"])

    def run(self, *, until: int | None = None, progress=None, name: str = "", ckpt: str | None = None):
        until = self.total_steps if until is None else min(until, self.total_steps)
        while self.step < until:
            self.train_step()
            if ckpt is not None and self.args.save_every and self.step % self.args.save_every == 0:
                self.save(ckpt)
            if progress is not None:
                progress.update(1)
                if self.history["loss"] and self.step % self.steps_per_epoch == 0:
                    progress.set_postfix_str(f"{name} ep {self.history['epoch'][-1]} loss "
                                             f"{self.history['loss'][-1]:.3f} acc {self.history['accuracy'][-1]:.3f}")
        return self


# ------------------------------------------------------------------------------------------------
# The reference feature cache

def build_reference_cache(path: str, reference, data: Data, args, progress: bool) -> tuple[dk.ReferenceFeatures, str]:
    """Encode the training pairs once with the frozen reference; reuse (or resume) a matching cache."""
    fp = fingerprint(reference, "digits-train", args.seed, args.n_test, args.n_ref, args.noise)
    status = "built"
    try:
        cache = dk.ReferenceFeatures(path, fingerprint=fp, require_complete=True)
        status = "reused"
    except FileNotFoundError:
        cache = None
    except dk.reference_features.NotBuiltError:
        cache, status = None, "resumed"            # an interrupted build: only the missing chunks are encoded
    except dk.reference_features.CacheMismatchError:
        cache, status = None, "rebuilt"            # another reference or data: start over
    if cache is None:
        def encoder(batch):
            px, ids = batch
            return encode_image(reference, px), encode_text(reference, ids)
        cache = dk.ReferenceFeatures.build(path, encoder, Pairs(data.train_px, data.train_ids), fingerprint=fp,
                                           dtype=args.cache_dtype, chunk_size=args.cache_chunk,
                                           batch_size=256, progress=progress, overwrite=status == "rebuilt")
    return cache, status


# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="epochs of each target run")
    p.add_argument("--ref-epochs", type=int, default=None, help="epochs of the reference (default: 3x --epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton", "reference"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16", "amp_fp16"],
                   help="open_clip's names: the training step inside torch.autocast (CPU) at that dtype")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output", "hf_clip"),
                   help="output directory: results.json, the reference cache, checkpoints")
    p.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=0.8)
    p.add_argument("--rho", type=float, default=8.0)
    p.add_argument("--noise", type=float, default=0.3, help="fraction of training pairs with a wrong caption")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-ref", type=int, default=250)
    p.add_argument("--width", type=int, default=64, help="target towers' hidden size")
    p.add_argument("--layers", type=int, default=2, help="target towers' layers")
    p.add_argument("--dim", type=int, default=64, help="target embedding width")
    p.add_argument("--ref-width", type=int, default=32, help="reference towers' hidden size (smaller model)")
    p.add_argument("--ref-layers", type=int, default=1)
    p.add_argument("--ref-dim", type=int, default=32, help="reference embedding width (may differ)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--cache-chunk", type=int, default=256, help="rows per cache chunk (checksum and resume unit)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint the DRRho target every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the DRRho target from its checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
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
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    data = make_data(args.seed, args.n_test, args.n_ref, args.noise)
    ref_pairs, train_pairs = Pairs(data.ref_px, data.ref_ids), Pairs(data.train_px, data.train_ids)

    reference = make_clip(data, args.ref_width, args.ref_layers, args.ref_dim, seed=args.seed + 1)
    ref_run = Run(reference, ref_pairs, data, args, epochs=args.ref_epochs)
    plain = Run(make_clip(data, args.width, args.layers, args.dim, seed=args.seed), train_pairs, data, args,
                epochs=args.epochs)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=ref_run.total_steps + 2 * plain.total_steps, desc="HF CLIPModel", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    ref_run.run(progress=progress, name="reference")
    reference.eval().requires_grad_(False)
    ref_acc = zero_shot_accuracy(reference, data)
    cache_start = time.time()
    cache, cache_status = build_reference_cache(os.path.join(args.out, "ref_cache"), reference, data, args,
                                                progress=False)
    cache_s = time.time() - cache_start

    plain.run(progress=progress, name="plain")
    drrho = Run(make_clip(data, args.width, args.layers, args.dim, seed=args.seed), train_pairs, data, args,
                epochs=args.epochs, cache=cache)
    ckpt = os.path.join(args.out, "drrho_target.pt")
    if args.resume and os.path.exists(ckpt):
        drrho.load(ckpt)
        if progress is not None:
            progress.update(drrho.step)
    drrho.run(progress=progress, name="drrho", ckpt=ckpt)
    if progress is not None:
        progress.close()

    results = dict(
        reference_accuracy=ref_acc,
        target_plain_accuracy=plain.history["accuracy"][-1],
        target_drrho_accuracy=drrho.history["accuracy"][-1],
        target_plain_peak_accuracy=max(plain.history["accuracy"]),
        target_drrho_peak_accuracy=max(drrho.history["accuracy"]),
        reference_cache=dict(status=cache_status, seconds=round(cache_s, 3), num_samples=cache.num_samples,
                             dim_img=cache.dim_img, dim_txt=cache.dim_txt, dtype=str(cache.dtype),
                             fingerprint=cache.fingerprint),
        parameters=dict(reference=sum(p.numel() for p in reference.parameters()),
                        target=sum(p.numel() for p in drrho.model.parameters())),
        config=dict(vars(args), n_ref=len(ref_pairs), n_train=len(train_pairs), n_test=int(data.test_y.numel()),
                    noisy_pairs=data.noisy),
        history=dict(reference=ref_run.history, target_plain=plain.history, target_drrho=drrho.history),
        runtime_s=round(time.time() - start, 2),
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"zero-shot test accuracy (transformers CLIPModel, {results['config']['n_test']} test digits, seed "
          f"{args.seed}, {results['runtime_s']:.0f} s):")
    rows = [(f"reference (clean split of {len(ref_pairs)}, {results['parameters']['reference']} params)", ref_acc),
            ("target, plain global contrastive loss", results["target_plain_accuracy"]),
            ("target, DRRho (reference from the cache)", results["target_drrho_accuracy"])]
    for label, acc in rows:
        print(f"  {label:<52s}{acc:.4f}")
    print(f"reference cache {cache_status} in {cache_s:.2f} s: {cache.num_samples} x ({cache.dim_img}, "
          f"{cache.dim_txt}) {cache.header['dtype']}; saved {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
