"""DRRho-CLIP in open_clip's training loop: a loss with open_clip's calling convention.

open_clip calls its loss as ``losses = loss(**model_out, output_dict=True)`` and back-propagates
``sum(losses.values())`` (3.x ``train_one_epoch``; the task API sums the ``*_loss`` entries), where
``model_out`` is the model's dict: ``image_features``, ``text_features``, ``logit_scale`` and, for
SigLIP-style models, ``logit_bias``; with ``--distill`` the teacher's outputs are added as
``dist_image_features``, ``dist_text_features``, ``dist_logit_scale``. What it lacks, and this module
adds:

- the dataset index of every pair: :class:`DRRhoOpenCLIPLoss` takes ``index=`` (a tensor of indices, or
  the batch's webdataset ``__key__`` strings, converted by ``key_to_index``); :class:`IndexedDataset`
  makes a map-style dataset (open_clip's ``CsvDataset``) return its row; :class:`KeyIndex` maps
  arbitrary keys to indices;
- ``set_epoch`` (the gamma schedule) and the per-sample state in the checkpoint
  (:func:`save_loss_state` / :func:`load_loss_state`, under the checkpoint key ``"drrho_loss"``);
- the reference embeddings: from a :class:`drrho_kernels.ReferenceFeatures` cache looked up by index,
  from a reference model run by the loop (open_clip's ``--distill`` outputs ``dist_*``), or passed as
  ``ref_image_features=`` / ``ref_text_features=``.

Gathering across ranks stays inside the loss (``process_group="world"``); DDP wraps the model only.
Nothing here imports open_clip. The recipes (3.x ``train_one_epoch`` and the task API's ``CLIPTask``)
are in docs/INTEGRATIONS.md.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..module import DRRhoCLIPLoss

__all__ = ["DRRhoOpenCLIPLoss", "IndexedDataset", "KeyIndex", "parse_int_keys", "save_loss_state",
           "load_loss_state", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "drrho_loss"
_DOCS = "see docs/INTEGRATIONS.md, 'open_clip'"


def parse_int_keys(keys: Sequence[str]) -> torch.Tensor:
    """Dataset indices from decimal sample keys (webdataset ``__key__`` such as ``"000012345"``)."""
    out = []
    for key in keys:
        text = str(key)
        if not text.isdigit():            # no sign, no spaces, no hex: a key is an index or it is not
            raise ValueError(f"index: sample key {text!r} is not a decimal integer; number the samples "
                             f"0..N-1 in their keys, or pass key_to_index=KeyIndex(all_keys) ({_DOCS})")
        out.append(int(text, 10))
    return torch.tensor(out, dtype=torch.int64)


class KeyIndex:
    """Maps sample keys (webdataset ``__key__``, file names, ids) to the dataset indices ``0..n-1``.

    ``KeyIndex(keys)`` numbers the keys in the order given; ``key_index(batch_keys)`` returns their
    indices as an int64 tensor and raises ``KeyError`` naming keys it does not know. Stored as plain
    text, one key per line (:meth:`save`, :meth:`load`).
    """

    def __init__(self, keys: Iterable):
        self._index: dict[str, int] = {}
        for i, key in enumerate(keys):
            key = str(key)
            if "\n" in key or "\r" in key:
                raise ValueError(f"KeyIndex: key {key!r} contains a line break")
            if key in self._index:
                raise ValueError(f"KeyIndex: key {key!r} appears twice (rows {self._index[key]} and {i})")
            self._index[key] = i
        self._keys = list(self._index)

    def __len__(self) -> int:
        return len(self._keys)

    def __call__(self, keys: Sequence) -> torch.Tensor:
        out, unknown = [], []
        for key in keys:
            i = self._index.get(str(key))
            if i is None:
                unknown.append(str(key))
            out.append(-1 if i is None else i)
        if unknown:
            raise KeyError(f"KeyIndex: {len(unknown)} key(s) not in the index, e.g. {unknown[:5]}")
        return torch.tensor(out, dtype=torch.int64)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(key + "\n" for key in self._keys)

    @classmethod
    def load(cls, path) -> "KeyIndex":
        with open(path, encoding="utf-8", newline="\n") as f:
            return cls(line[:-1] if line.endswith("\n") else line for line in f)


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose samples also carry their index (e.g. around open_clip's ``CsvDataset``).

    A tuple sample ``(image, text)`` becomes ``(image, text, index)`` (open_clip 3.x); a dict sample
    ``{"image", "text"}`` gets ``key`` (default ``"index"``) added (open_clip's main branch). After the
    ``DataLoader``'s default collation the batch carries an int64 tensor of the rows.
    """

    def __init__(self, dataset, key: str = "index"):
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if isinstance(item, dict):
            if self.key in item:
                raise KeyError(f"IndexedDataset: the sample already has a {self.key!r} entry")
            return {**item, self.key: i}
        if isinstance(item, (tuple, list)):
            return (*item, i)
        return item, i


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


class DRRhoOpenCLIPLoss(nn.Module):
    """:class:`drrho_kernels.DRRhoCLIPLoss` with open_clip's loss calling convention.

    ``loss(image_features=..., text_features=..., logit_scale=..., output_dict=True, index=...)`` returns
    ``{loss_key: loss}`` (``output_dict=False``: the loss tensor), so open_clip's
    ``total_loss = sum(losses.values())`` is the DRRho-CLIP loss.

    Args:
        data_size: number of pairs in the dataset (indices ``0..data_size-1``).
        reference_features: a :class:`drrho_kernels.ReferenceFeatures` of the same dataset; each call looks
            up the batch's rows by ``index``. Alternatively the loop passes the reference embeddings
            (``dist_image_features``/``dist_text_features`` from open_clip's ``--distill`` path, or
            ``ref_image_features``/``ref_text_features``).
        require_reference: raise when a call has no reference embeddings (default). ``False`` allows the
            plain global contrastive loss (SogCLR), e.g. to train the reference model itself.
        key_to_index: turns a batch's sample keys (strings) into indices; default :func:`parse_int_keys`.
        ignore_logit_bias: DRRho-CLIP has no logit bias; a ``logit_bias`` (SigLIP-style model) raises
            unless this is ``True`` (it is then ignored: freeze it, or DDP needs
            ``find_unused_parameters=True``).
        pin_memory: look the cached reference rows up into pinned memory and copy them without a wait
            (default None: when the features are on an accelerator; SPEC 3.2).
        loss_key: the key of the returned dict (default ``"drrho_loss"``).
        **loss_kwargs: passed to :class:`drrho_kernels.DRRhoCLIPLoss` (``gamma``, ``gamma_schedule``,
            ``gamma_decay_epochs``, ``rho``, ``eps``, ``backend``, ``state_device``, ``process_group``
            (``"world"`` under ``torch.distributed``), ``distributed_scheme``).

    The state (``u`` of every sample and the epoch) is this module's ``state_dict``; put it in the
    checkpoint with :func:`save_loss_state` and restore it with :func:`load_loss_state`.
    """

    def __init__(self, data_size: int, *, reference_features=None, require_reference: bool = True,
                 key_to_index=None, ignore_logit_bias: bool = False, pin_memory: bool | None = None,
                 loss_key: str = "drrho_loss", **loss_kwargs):
        super().__init__()
        self.criterion = DRRhoCLIPLoss(data_size, **loss_kwargs)
        if reference_features is not None:
            for attr in ("lookup", "num_samples"):
                if not hasattr(reference_features, attr):
                    raise TypeError(f"reference_features: expected a drrho_kernels.ReferenceFeatures, got "
                                    f"{type(reference_features).__name__}")
            if reference_features.num_samples != data_size:
                raise ValueError(f"reference_features: the cache has {reference_features.num_samples} samples, "
                                 f"data_size is {data_size}: not the same dataset")
        if not (isinstance(loss_key, str) and loss_key.endswith("_loss")):
            raise ValueError(f"loss_key: expected a str ending in '_loss' (open_clip sums those), got {loss_key!r}")
        self.reference_features = reference_features
        self.require_reference = bool(require_reference)
        self.key_to_index = parse_int_keys if key_to_index is None else key_to_index
        self.ignore_logit_bias = bool(ignore_logit_bias)
        self.pin_memory = None if pin_memory is None else bool(pin_memory)
        self.loss_key = loss_key

    # The schedule and the state live in the wrapped module.
    def set_epoch(self, epoch: int) -> None:
        self.criterion.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.criterion.epoch

    @property
    def gamma(self) -> float:
        return self.criterion.gamma

    @property
    def data_size(self) -> int:
        return self.criterion.data_size

    def _index(self, index, batch: int) -> torch.Tensor:
        if index is None:
            raise TypeError("index: DRRhoOpenCLIPLoss needs the dataset index of every pair, "
                            "loss(**model_out, index=index, output_dict=True); open_clip's loop does not pass "
                            f"one by itself ({_DOCS}, 'Getting the index into the batch')")
        if isinstance(index, (list, tuple)):
            if index and all(isinstance(k, (str, bytes)) for k in index):
                keys = [k.decode() if isinstance(k, bytes) else k for k in index]
                index = self.key_to_index(keys)
            else:
                try:
                    index = torch.as_tensor(index)
                except (TypeError, ValueError, RuntimeError):
                    kinds = sorted({type(k).__name__ for k in index})
                    raise TypeError("index: expected a tensor of dataset indices or a list of sample keys (str), "
                                    f"got a {type(index).__name__} of {kinds}") from None
        elif not isinstance(index, torch.Tensor):
            try:
                index = torch.as_tensor(index)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"index: expected a tensor of dataset indices or a list of sample keys (str), "
                                f"got {_describe(index)}") from None
        if index.dim() == 1 and index.shape[0] != batch:
            raise ValueError(f"index: {index.shape[0]} indices for {batch} rows of image_features. With open_clip's "
                             "--accum-freq > 1 the loss is called on the concatenated features of several "
                             "batches, which would update each sample's moving average more than once per step: "
                             "use --accum-freq 1 with DRRho-CLIP")
        return index

    def _reference(self, index, device, ref_image_features, ref_text_features, dist_image_features,
                   dist_text_features):
        given = {name: (a, b) for name, a, b in (
            ("ref_image_features/ref_text_features", ref_image_features, ref_text_features),
            ("dist_image_features/dist_text_features", dist_image_features, dist_text_features)) if
            a is not None or b is not None}
        if self.reference_features is not None:
            given["reference_features (the cache)"] = None
        if len(given) > 1:
            raise ValueError(f"reference embeddings: got more than one source ({', '.join(given)}); pass one")
        if not given:
            if self.require_reference:
                raise ValueError("reference embeddings: none given. Pass reference_features=ReferenceFeatures(...) "
                                 "to the constructor, or run the reference model in the loop (open_clip's "
                                 "--distill-model outputs dist_image_features / dist_text_features), or pass "
                                 "ref_image_features= and ref_text_features=; require_reference=False trains "
                                 "without a reference (plain global contrastive loss)")
            return None, None
        (name, pair), = given.items()
        if pair is None:
            # pinned and non-blocking by default when the step runs on an accelerator (SPEC 3.2)
            pin = device.type != "cpu" if self.pin_memory is None else self.pin_memory
            return self.reference_features.lookup(index, device=device, pin_memory=pin)
        if pair[0] is None or pair[1] is None:
            raise ValueError(f"reference embeddings: {name}: both are needed, got only one")
        return pair[0].detach(), pair[1].detach()

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False, *, index=None,
                logit_bias=None, ref_image_features=None, ref_text_features=None, dist_image_features=None,
                dist_text_features=None, dist_logit_scale=None, dist_logit_bias=None, **unexpected):
        if unexpected:
            raise TypeError(f"DRRhoOpenCLIPLoss got unexpected outputs {sorted(unexpected)}: it takes a CLIP model's "
                            "image_features, text_features and logit_scale (plus index=); CoCa/captioning outputs "
                            "are not supported")
        if logit_bias is not None and not self.ignore_logit_bias:
            raise ValueError("logit_bias: the model outputs a logit bias (SigLIP-style, init_logit_bias set), "
                             "DRRho-CLIP has none. Build the model without a logit bias, or pass "
                             "ignore_logit_bias=True to ignore it (freeze it, or DDP needs "
                             "find_unused_parameters=True since it then gets no gradient)")
        # The reference model's own temperature and bias play no part: the DRRho margins are scaled by the
        # target's logit_scale (SPEC.md), so dist_logit_scale / dist_logit_bias are not used.
        del dist_logit_scale, dist_logit_bias
        if not isinstance(image_features, torch.Tensor) or image_features.dim() != 2:
            raise TypeError(f"image_features: expected a [B, d] tensor, got {_describe(image_features)}")
        index = self._index(index, image_features.shape[0])
        ref_img, ref_txt = self._reference(index, image_features.device, ref_image_features, ref_text_features,
                                           dist_image_features, dist_text_features)
        loss = self.criterion(image_features, text_features, index, logit_scale, ref_img=ref_img, ref_txt=ref_txt)
        return {self.loss_key: loss} if output_dict else loss

    def extra_repr(self) -> str:
        ref = "cache" if self.reference_features is not None else "from the loop"
        return f"reference={ref}, require_reference={self.require_reference}, loss_key={self.loss_key!r}"


def save_loss_state(checkpoint: dict, loss: nn.Module, key: str = CHECKPOINT_KEY) -> dict:
    """Add ``loss.state_dict()`` (every sample's ``u`` and the epoch) to an open_clip checkpoint dict."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint: expected the checkpoint dict, got {type(checkpoint).__name__}")
    checkpoint[key] = loss.state_dict()
    return checkpoint


def load_loss_state(loss: nn.Module, checkpoint, *, key: str = CHECKPOINT_KEY, map_location="cpu") -> None:
    """Restore the loss state saved by :func:`save_loss_state`.

    ``checkpoint``: the loaded checkpoint dict, or a path (read with ``torch.load(..., weights_only=True)``:
    a checkpoint cannot run code). A checkpoint without ``key`` raises ``KeyError``: resuming would
    silently restart every sample's moving average.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint: expected a dict or a path, got {type(checkpoint).__name__}")
    if key not in checkpoint:
        raise KeyError(f"checkpoint has no {key!r} entry (saved without the DRRho loss state: add "
                       f"save_loss_state(checkpoint_dict, loss) where the checkpoint is saved; {_DOCS}); "
                       f"its keys: {sorted(checkpoint)}")
    loss.load_state_dict(checkpoint[key])
