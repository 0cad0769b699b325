"""The open_clip adapter, called exactly as open_clip's training loops call a loss.

Contract tests (no open_clip import): open_clip 3.x ``train_one_epoch`` calls
``losses = loss(**model_out, output_dict=True)`` and back-propagates ``sum(losses.values())``; the task
API's ``CLIPTask.training_forward`` sums the ``*_loss`` entries; ``model_out`` is the model's dict
(``image_features``, ``text_features``, ``logit_scale``, ``logit_bias`` for SigLIP-style models, the
teacher's ``dist_*`` with ``--distill``); checkpoints are dicts of ``epoch``, ``name``, ``state_dict``,
``optimizer`` read back with ``torch.load``. The truth for every value is the package's functional
loss with a separately tracked state. The CLIPTask recipe of docs/INTEGRATIONS.md is executed as
written, against a stand-in base class here and against the real ``open_clip.task.CLIPTask`` in the
tests at the end, which import open_clip and run its model code (skipped when it is not importable).
"""
from __future__ import annotations

import re
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import drrho_kernels as dk
from drrho_kernels.integrations.open_clip import (DRRhoOpenCLIPLoss, IndexedDataset, KeyIndex, load_loss_state,
                                                  parse_int_keys, save_loss_state)
from processes import spawn

ROOT = Path(__file__).resolve().parents[1]
N, B, D, DR = 40, 8, 6, 4
HP = dict(gamma=0.8, gamma_decay_epochs=4, rho=8.0, eps=1e-14)


class TinyCLIP(nn.Module):
    """Stands in for open_clip's CLIP(output_dict=True): forward(image, text) -> dict of features."""

    def __init__(self, bias: bool = False, dtype=torch.float64):
        super().__init__()
        self.visual = nn.Linear(10, D, dtype=dtype)
        self.text = nn.Embedding(20, D, dtype=dtype)
        self.logit_scale = nn.Parameter(torch.tensor(2.3, dtype=dtype))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0, dtype=dtype)) if bias else None

    def forward(self, image, text):
        out = {"image_features": nn.functional.normalize(self.visual(image), dim=-1),
               "text_features": nn.functional.normalize(self.text(text).mean(1), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.clone()
        return out


def dataset(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, 10, dtype=torch.float64, generator=g)
    texts = torch.randint(0, 20, (N, 5), generator=g)
    ref_img = nn.functional.normalize(torch.randn(N, DR, dtype=torch.float64, generator=g), dim=1)
    ref_txt = nn.functional.normalize(torch.randn(N, DR, dtype=torch.float64, generator=g), dim=1)
    return images, texts, ref_img, ref_txt


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N, generator=g)[:B] for _ in range(steps)]


class Truth:
    """The functional loss with a state tracked here: the independent statement of every step."""

    def __init__(self):
        self.u_img = torch.zeros(N, dtype=torch.float32)
        self.u_txt = torch.zeros(N, dtype=torch.float32)
        self.epoch = 0

    def __call__(self, img, txt, index, scale, ref_img=None, ref_txt=None, gamma=None):
        loss, ui, ut = dk.drrho_clip_loss(img, txt, scale, self.u_img[index], self.u_txt[index], ref_img=ref_img,
                                          ref_txt=ref_txt, gamma=gamma, rho=HP["rho"], eps=HP["eps"])
        self.u_img[index], self.u_txt[index] = ui.float(), ut.float()
        return loss


def gamma_at(epoch):
    crit = dk.DRRhoCLIPLoss(N, gamma=HP["gamma"], gamma_decay_epochs=HP["gamma_decay_epochs"])
    crit.set_epoch(epoch)
    return crit.gamma


def train_one_epoch_3x(model, data, loss, epoch, optimizer, index_batches):
    """open_clip 3.x train_one_epoch's loss lines, with the recipe's changes (docs/INTEGRATIONS.md)."""
    images_all, texts_all = data
    model.train()
    loss.set_epoch(epoch)                                           # added
    out = []
    for index in index_batches:
        batch = (images_all[index], texts_all[index], index)          # the dataset yields the index too
        images, texts, index = batch                                  # was: images, texts = batch
        optimizer.zero_grad()
        model_out = model(images, texts)
        losses = loss(**model_out, index=index, output_dict=True)    # was: loss(**model_out, output_dict=True)
        total_loss = sum(losses.values())
        losses["loss"] = total_loss
        total_loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        out.append({k: v.detach().clone() for k, v in losses.items()})
    return out


def test_train_one_epoch_3x_matches_the_functional_loss(tmp_path):
    images, texts, ref_img, ref_txt = dataset()
    steps = batches(6)
    # The reference comes from a ReferenceFeatures cache built from the table (float32: exact rows).
    table = torch.utils.data.TensorDataset(torch.arange(N))
    cache = dk.ReferenceFeatures.build(tmp_path / "ref", lambda b: (ref_img[b[0]], ref_txt[b[0]]), table,
                                       fingerprint="ref-table", dtype="float32", chunk_size=16, progress=False)
    torch.manual_seed(0)
    model = TinyCLIP()
    truth_model = TinyCLIP()
    truth_model.load_state_dict(model.state_dict())
    loss = DRRhoOpenCLIPLoss(N, reference_features=cache, **HP)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    truth_opt = torch.optim.SGD(truth_model.parameters(), lr=0.5)
    truth = Truth()
    for epoch in range(2):
        got = train_one_epoch_3x(model, (images, texts), loss, epoch, opt, steps[3 * epoch:3 * epoch + 3])
        for k, index in enumerate(steps[3 * epoch:3 * epoch + 3]):
            out = truth_model(images[index], texts[index])
            want = truth(out["image_features"], out["text_features"], index, out["logit_scale"],
                         ref_img=ref_img[index].float(), ref_txt=ref_txt[index].float(), gamma=gamma_at(epoch))
            truth_opt.zero_grad()
            want.backward()
            truth_opt.step()
            with torch.no_grad():
                truth_model.logit_scale.clamp_(0, 4.6052)
            assert set(got[k]) == {"drrho_loss", "loss"}
            torch.testing.assert_close(got[k]["drrho_loss"], want.detach(), rtol=1e-12, atol=0)
            torch.testing.assert_close(got[k]["loss"], want.detach(), rtol=1e-12, atol=0)
    assert torch.equal(loss.criterion.u_img, truth.u_img) and torch.equal(loss.criterion.u_txt, truth.u_txt)
    for (name, p), q in zip(model.named_parameters(), truth_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    assert loss.epoch == 1 and loss.gamma == gamma_at(1)


def test_output_dict_false_and_the_task_api_sum():
    images, texts, ref_img, ref_txt = dataset()
    index = batches(1)[0]
    model = TinyCLIP()
    out = model(images[index], texts[index])
    a = DRRhoOpenCLIPLoss(N, **HP)
    b = DRRhoOpenCLIPLoss(N, **HP)
    refs = dict(ref_image_features=ref_img[index], ref_text_features=ref_txt[index])
    tensor = a(**out, index=index, **refs)                              # output_dict defaults to False
    losses = b(**out, index=index, output_dict=True, **refs)
    assert isinstance(tensor, torch.Tensor) and tensor.dim() == 0
    total = sum(v for k, v in losses.items() if k.endswith("_loss"))  # CLIPTask.training_forward's sum
    assert torch.equal(total, tensor) and list(losses) == ["drrho_loss"]
    assert set(DRRhoOpenCLIPLoss(N, loss_key="contrastive_loss", **HP)(**out, index=index, output_dict=True,
                                                                        **refs)) == {"contrastive_loss"}
    with pytest.raises(ValueError, match="_loss"):
        DRRhoOpenCLIPLoss(N, loss_key="drrho")


def test_logit_bias_is_rejected_with_a_clear_message_or_ignored():
    images, texts, ref_img, ref_txt = dataset()
    index = batches(1)[0]
    out = TinyCLIP(bias=True)(images[index], texts[index])
    refs = dict(ref_image_features=ref_img[index], ref_text_features=ref_txt[index])
    loss = DRRhoOpenCLIPLoss(N, **HP)
    with pytest.raises(ValueError, match=r"logit_bias.*SigLIP.*ignore_logit_bias=True"):
        loss(**out, index=index, output_dict=True, **refs)
    assert not loss.criterion.u_img.any()                             # nothing was written
    ignored = DRRhoOpenCLIPLoss(N, ignore_logit_bias=True, **HP)(**out, index=index, output_dict=True, **refs)
    out.pop("logit_bias")
    plain = DRRhoOpenCLIPLoss(N, **HP)(**out, index=index, output_dict=True, **refs)
    assert torch.equal(ignored["drrho_loss"], plain["drrho_loss"])


def test_missing_index_unknown_outputs_and_accumulation_are_errors():
    images, texts, ref_img, ref_txt = dataset()
    index = batches(1)[0]
    out = TinyCLIP()(images[index], texts[index])
    refs = dict(ref_image_features=ref_img[index], ref_text_features=ref_txt[index])
    loss = DRRhoOpenCLIPLoss(N, **HP)
    with pytest.raises(TypeError, match=r"index.*docs/INTEGRATIONS.md"):
        loss(**out, output_dict=True, **refs)                          # open_clip's unchanged loop
    with pytest.raises(TypeError, match=r"unexpected outputs \['labels', 'logits'\]"):
        loss(**out, logits=torch.zeros(1), labels=torch.zeros(1), index=index, output_dict=True, **refs)
    # --accum-freq > 1: open_clip concatenates the features of several batches.
    cat = {k: torch.cat([v, v]) if k.endswith("features") else v for k, v in out.items()}
    with pytest.raises(ValueError, match="accum-freq"):
        loss(**cat, index=index, output_dict=True,
             ref_image_features=torch.cat([refs["ref_image_features"]] * 2),
             ref_text_features=torch.cat([refs["ref_text_features"]] * 2))
    with pytest.raises(TypeError, match="index"):
        loss(**out, index={"a": 1}, output_dict=True, **refs)
    assert not loss.criterion.u_img.any()


def test_reference_sources():
    images, texts, ref_img, ref_txt = dataset()
    index = batches(1)[0]
    out = TinyCLIP()(images[index], texts[index])
    explicit = DRRhoOpenCLIPLoss(N, **HP)(**out, index=index, ref_image_features=ref_img[index],
                                           ref_text_features=ref_txt[index])
    # open_clip's --distill path: the teacher's outputs arrive as dist_*; its temperature is not used.
    dist = DRRhoOpenCLIPLoss(N, **HP)(**out, index=index, dist_image_features=ref_img[index],
                                       dist_text_features=ref_txt[index], dist_logit_scale=torch.tensor(50.0))
    assert torch.equal(explicit, dist)
    want = Truth()(out["image_features"], out["text_features"], index, out["logit_scale"], ref_img=ref_img[index],
                   ref_txt=ref_txt[index], gamma=gamma_at(0))
    assert torch.equal(explicit, want)
    with pytest.raises(ValueError, match="none given"):
        DRRhoOpenCLIPLoss(N, **HP)(**out, index=index)
    no_ref = DRRhoOpenCLIPLoss(N, require_reference=False, **HP)(**out, index=index)
    assert torch.equal(no_ref, Truth()(out["image_features"], out["text_features"], index, out["logit_scale"],
                                       gamma=gamma_at(0)))
    with pytest.raises(ValueError, match="more than one source"):
        DRRhoOpenCLIPLoss(N, **HP)(**out, index=index, ref_image_features=ref_img[index],
                                   ref_text_features=ref_txt[index], dist_image_features=ref_img[index],
                                   dist_text_features=ref_txt[index])
    with pytest.raises(ValueError, match="only one"):
        DRRhoOpenCLIPLoss(N, **HP)(**out, index=index, ref_image_features=ref_img[index])


def test_reference_cache_of_another_size_is_refused(tmp_path):
    table = torch.utils.data.TensorDataset(torch.arange(N + 1))
    cache = dk.ReferenceFeatures.build(tmp_path / "r", lambda b: (torch.ones(len(b[0]), 2), torch.ones(len(b[0]), 2)),
                                       table, fingerprint="x", progress=False)
    with pytest.raises(ValueError, match="not the same dataset"):
        DRRhoOpenCLIPLoss(N, reference_features=cache)
    with pytest.raises(TypeError, match="ReferenceFeatures"):
        DRRhoOpenCLIPLoss(N, reference_features=object())


def test_webdataset_keys_csv_rows_and_key_index(tmp_path):
    images, texts, ref_img, ref_txt = dataset()
    index = batches(1)[0]
    keys = [f"{int(i):09d}" for i in index]                            # webdataset __key__, decimal
    assert torch.equal(parse_int_keys(keys), index)
    out = TinyCLIP()(images[index], texts[index])
    refs = dict(ref_image_features=ref_img[index], ref_text_features=ref_txt[index])
    by_key = DRRhoOpenCLIPLoss(N, **HP)
    by_index = DRRhoOpenCLIPLoss(N, **HP)
    assert torch.equal(by_key(**out, index=keys, **refs), by_index(**out, index=index, **refs))
    assert torch.equal(by_key.criterion.u_img, by_index.criterion.u_img)
    with pytest.raises(ValueError, match=r"'img_0007' is not a decimal integer.*KeyIndex"):
        DRRhoOpenCLIPLoss(N, **HP)(**out, index=["img_0007"] * B, **refs)
    # Arbitrary keys through a KeyIndex (plain text on disk).
    names = [f"laion/{k:05x}.jpg" for k in range(N)]
    kidx = KeyIndex(names)
    kidx.save(tmp_path / "keys.txt")
    kidx = KeyIndex.load(tmp_path / "keys.txt")
    assert len(kidx) == N and torch.equal(kidx([names[int(i)] for i in index]), index)
    with pytest.raises(KeyError, match="not in the index"):
        kidx(["missing.jpg"])
    with pytest.raises(ValueError, match="twice"):
        KeyIndex(["a", "b", "a"])
    named = DRRhoOpenCLIPLoss(N, key_to_index=kidx, **HP)
    fresh = DRRhoOpenCLIPLoss(N, **HP)
    assert torch.equal(named(**out, index=[names[int(i)] for i in index], **refs), fresh(**out, index=index, **refs))
    assert torch.equal(named.criterion.u_img, fresh.criterion.u_img)
    # CsvDataset rows: tuples (3.x) get the index appended, dicts (main branch) get "index".
    class Csv(torch.utils.data.Dataset):
        def __init__(self, as_dict):
            self.as_dict = as_dict

        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"image": images[i], "text": texts[i]} if self.as_dict else (images[i], texts[i])

    loader = torch.utils.data.DataLoader(IndexedDataset(Csv(False)), batch_size=B, sampler=index.tolist())
    img_b, txt_b, idx_b = next(iter(loader))
    assert torch.equal(idx_b, index) and torch.equal(img_b, images[index])
    loader = torch.utils.data.DataLoader(IndexedDataset(Csv(True)), batch_size=B, sampler=index.tolist())
    batch = next(iter(loader))
    assert set(batch) == {"image", "text", "index"} and torch.equal(batch["index"], index)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    images, texts, ref_img, ref_txt = dataset()
    steps = batches(5)
    torch.manual_seed(0)
    model = TinyCLIP()
    loss = DRRhoOpenCLIPLoss(N, **HP)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def step(model, loss, opt, index):
        out = model(images[index], texts[index])
        losses = loss(**out, index=index, output_dict=True, dist_image_features=ref_img[index],
                      dist_text_features=ref_txt[index])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        return losses["drrho_loss"].detach()

    loss.set_epoch(1)
    for index in steps[:3]:
        step(model, loss, opt, index)
    checkpoint_dict = {"epoch": 2, "name": "run", "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
    save_loss_state(checkpoint_dict, loss)
    torch.save(checkpoint_dict, tmp_path / "epoch_2.pt")
    straight = [step(model, loss, opt, index) for index in steps[3:]]

    # Resume as open_clip does (pt_load = torch.load; weights_only=True is the default since torch 2.6).
    ckpt = torch.load(tmp_path / "epoch_2.pt", map_location="cpu", weights_only=True)
    model2, loss2 = TinyCLIP(), DRRhoOpenCLIPLoss(N, **HP)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    model2.load_state_dict(ckpt["state_dict"])
    opt2.load_state_dict(ckpt["optimizer"])
    load_loss_state(loss2, ckpt)
    assert loss2.epoch == 1
    assert torch.equal(loss2.criterion.u_img, ckpt["drrho_loss"]["criterion.u_img"])
    assert bool((ckpt["drrho_loss"]["criterion.u_img"] != 0).any())
    resumed = [step(model2, loss2, opt2, index) for index in steps[3:]]
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert torch.equal(loss.criterion.u_img, loss2.criterion.u_img) and torch.equal(loss.criterion.u_txt,
                                                                                    loss2.criterion.u_txt)
    # From a path (weights_only=True inside), and a checkpoint saved without the loss state.
    loss3 = DRRhoOpenCLIPLoss(N, **HP)
    load_loss_state(loss3, tmp_path / "epoch_2.pt")
    assert torch.equal(loss3.criterion.u_img, ckpt["drrho_loss"]["criterion.u_img"])
    with pytest.raises(KeyError, match="drrho_loss"):
        load_loss_state(DRRhoOpenCLIPLoss(N, **HP), {"epoch": 2, "state_dict": {}})


# ------------------------------------------------------------------------------------------------
# The task-API recipe of docs/INTEGRATIONS.md, executed as written

def recipe(name: str) -> str:
    text = (ROOT / "docs" / "INTEGRATIONS.md").read_text()
    blocks = re.findall(r"```python\n(# recipe: " + re.escape(name) + r".*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"docs/INTEGRATIONS.md: recipe {name!r} not found once"
    return blocks[0]


class StandInCLIPTask(nn.Module):
    """The parts of open_clip.task.CLIPTask the recipe relies on (main branch, task/clip_task.py)."""

    def __init__(self, model, *, loss=None, rank=0, world_size=1, **kwargs):
        super().__init__()
        self.trainable_module = model
        self.loss = loss

    @staticmethod
    def _report(source):
        return {k: source[k] for k in ("logit_scale", "logit_bias") if k in source}

    def forward(self, batch):
        return self.training_forward(batch)


def load_recipe(monkeypatch, base):
    fake = types.ModuleType("open_clip.task")
    fake.CLIPTask = base
    parent = types.ModuleType("open_clip")
    parent.task = fake
    monkeypatch.setitem(sys.modules, "open_clip", parent)
    monkeypatch.setitem(sys.modules, "open_clip.task", fake)
    namespace = {"__name__": "recipe"}
    exec(compile(recipe("open_clip task API"), "docs/INTEGRATIONS.md[task recipe]", "exec"), namespace)
    return namespace["DRRhoCLIPTask"]


def test_task_api_recipe_passes_the_index(monkeypatch):
    task_cls = load_recipe(monkeypatch, StandInCLIPTask)
    images, texts, ref_img, ref_txt = dataset()
    index = batches(1)[0]
    torch.manual_seed(0)
    model = TinyCLIP()
    loss = DRRhoOpenCLIPLoss(N, require_reference=False, **HP)
    task = task_cls(model, loss=loss, rank=0, world_size=1)
    keys = [f"{int(i):08d}" for i in index]                  # batch["index"]: the webdataset keys, collated
    losses, report = task({"image": images[index], "text": texts[index], "index": keys})
    want = Truth()(*[model(images[index], texts[index])[k] for k in ("image_features", "text_features")], index,
                   model.logit_scale.exp(), gamma=gamma_at(0))
    assert set(losses) == {"drrho_loss", "loss"} and torch.equal(losses["loss"], want)
    assert set(report) == {"logit_scale"}
    assert bool((loss.criterion.u_img[index] != 0).all()) and int((loss.criterion.u_img != 0).sum()) == B


# ------------------------------------------------------------------------------------------------
# Distributed: the loss gathers across ranks, DDP wraps the model only (gloo, 2 processes)

def _ddp_worker(rank, world, port):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    try:
        images, texts, ref_img, ref_txt = dataset()
        torch.manual_seed(0)
        model = TinyCLIP()
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = DRRhoOpenCLIPLoss(N, process_group="world", **HP)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        values = []
        for index in batches(3):
            mine = index[rank * (B // world):(rank + 1) * (B // world)]
            out = ddp(images[mine], texts[mine])
            losses = loss(**out, index=[f"{int(i):06d}" for i in mine], output_dict=True,
                          dist_image_features=ref_img[mine], dist_text_features=ref_txt[mine])
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            values.append(float(losses["drrho_loss"]))
    finally:
        torch.distributed.destroy_process_group()
    return dict(values=values, params={k: v.detach().clone() for k, v in model.state_dict().items()},
                u_img=loss.criterion.u_img.clone(), u_txt=loss.criterion.u_txt.clone())


@pytest.mark.slow
def test_ddp_model_with_the_loss_gathering_equals_one_process():
    world = 2
    ranks = spawn(_ddp_worker, world, timeout=120.0)
    # One process, the whole global batch.
    images, texts, ref_img, ref_txt = dataset()
    torch.manual_seed(0)
    model = TinyCLIP()
    loss = DRRhoOpenCLIPLoss(N, **HP)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    values = []
    for index in batches(3):
        out = model(images[index], texts[index])
        value = loss(**out, index=index, dist_image_features=ref_img[index], dist_text_features=ref_txt[index])
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    for r in ranks:
        assert torch.equal(r["u_img"], ranks[0]["u_img"])                 # every rank holds every u
        torch.testing.assert_close(r["u_img"], loss.criterion.u_img, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["u_txt"], loss.criterion.u_txt, rtol=0, atol=1e-6)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-9, atol=1e-12, msg=k)
    mean = [sum(r["values"][s] for r in ranks) / world for s in range(3)]
    assert mean == pytest.approx(values, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# With the real open_clip (skipped where it cannot be imported: it needs torchvision)

def _real_model(open_clip):
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1,
                                                        head_width=16),
                          text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
                          output_dict=True)


def test_real_open_clip_model_a_few_steps_as_train_one_epoch():
    open_clip = pytest.importorskip("open_clip")
    model = _real_model(open_clip)
    n = 24
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(n, 3, 16, 16, generator=g), torch.randint(1, 64, (n, 8), generator=g)
    loss = DRRhoOpenCLIPLoss(n, require_reference=False, gamma=0.8, gamma_decay_epochs=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    for epoch in range(2):
        loss.set_epoch(epoch)
        for k in range(3):
            index = torch.arange(8) + 8 * k
            images_b, texts_b = images[index], texts[index]
            model_out = model(images_b, texts_b)
            assert {"image_features", "text_features", "logit_scale"} <= set(model_out)
            losses = loss(**model_out, index=index, output_dict=True)
            total_loss = sum(losses.values())
            opt.zero_grad()
            total_loss.backward()
            opt.step()
            seen.append(float(total_loss.detach()))
    assert all(torch.isfinite(torch.tensor(seen))) and bool((loss.criterion.u_img != 0).all())


def test_real_open_clip_task_api_recipe_and_checkpoint(monkeypatch, tmp_path):
    pytest.importorskip("open_clip")
    task_mod = pytest.importorskip("open_clip.task")
    import open_clip
    task_cls = load_recipe(monkeypatch, task_mod.CLIPTask)
    monkeypatch.undo()                                          # the recipe now subclasses the real CLIPTask
    assert issubclass(task_cls, task_mod.CLIPTask)
    model = _real_model(open_clip)
    n = 16
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(n, 3, 16, 16, generator=g), torch.randint(1, 64, (n, 8), generator=g)
    task = task_cls(model, loss=DRRhoOpenCLIPLoss(n, require_reference=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task.train()
    for k in range(2):
        index = torch.arange(8) + 8 * k
        losses, _ = task({"image": images[index], "text": texts[index], "index": [f"{int(i):06d}" for i in index]})
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    checkpoint_dict = task_mod.save_checkpoint(task, opt, epoch=1, name="t")
    save_loss_state(checkpoint_dict, task.loss)
    torch.save(checkpoint_dict, tmp_path / "epoch_1.pt")
    task2 = task_cls(_real_model(open_clip), loss=DRRhoOpenCLIPLoss(n, require_reference=False))
    task_mod.load_checkpoint(task2, str(tmp_path / "epoch_1.pt"))
    load_loss_state(task2.loss, tmp_path / "epoch_1.pt")
    assert torch.equal(task2.loss.criterion.u_img, task.loss.criterion.u_img)
    assert bool((task2.loss.criterion.u_img != 0).all())
