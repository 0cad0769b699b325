"""examples/train_hf_clip.py: a transformers CLIPModel trained with DRRhoCLIPLoss and a cached reference.

A few steps of the example's own training code: the loss falls, each step changes the loss module's
state at the batch's dataset indices only, a checkpoint of model + optimizer + loss resumes bit-exactly
(read with weights_only=True), the reference cache holds the reference model's embeddings, and the
whole example (``--quick``) builds the cache once and reuses it on a second run.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import drrho_kernels as dk

pytest.importorskip("transformers")
pytest.importorskip("sklearn")           # the digits pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("train_hf_clip", ROOT / "examples" / "train_hf_clip.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_hf_clip"] = module            # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_hf_clip", None)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)                  # as the example runs (tiny matrices: threads only cost)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def setup(ex, tmp_path_factory):
    args = ex.parse_args(["--no-progress", "--epochs", "4"])
    data = ex.make_data(args.seed, args.n_test, args.n_ref, args.noise)
    reference = ex.make_clip(data, 16, 1, 16, seed=1).eval().requires_grad_(False)
    cache, status = ex.build_reference_cache(str(tmp_path_factory.mktemp("hf") / "cache"), reference, data, args,
                                             progress=False)
    return args, data, reference, cache, status


def test_cache_holds_the_reference_embeddings(ex, setup):
    args, data, reference, cache, status = setup
    assert status == "built" and cache.is_complete and len(cache) == data.train_px.shape[0]
    assert (cache.dim_img, cache.dim_txt, cache.dtype) == (16, 16, torch.float16)
    index = torch.tensor([0, 5, 300, 1046, 17])
    img, txt = cache.lookup(index)
    with torch.no_grad():
        want_img = ex.encode_image(reference, data.train_px[index])
        want_txt = ex.encode_text(reference, data.train_ids[index])
    # float16 storage of unit vectors (and a batch-size dependent GEMM): a few float16 ulps.
    torch.testing.assert_close(img.float(), want_img, atol=2e-3, rtol=0)
    torch.testing.assert_close(txt.float(), want_txt, atol=2e-3, rtol=0)
    # The index is the row: the neighbours' embeddings are different vectors.
    neighbours = ex.encode_image(reference, data.train_px[(index + 1) % len(cache)]).detach()
    assert (img.float() - neighbours).abs().max() > 0.05


def test_loss_falls_and_state_changes_only_at_the_batch(ex, setup):
    args, data, _, cache, _ = setup
    run = ex.Run(ex.make_clip(data, 32, 1, 32, seed=0), ex.Pairs(data.train_px, data.train_ids), data, args,
                 epochs=4, cache=cache)
    before = {k: v.clone() for k, v in run.crit.state_dict().items() if isinstance(v, torch.Tensor)}
    index = run.batch_index(0)
    # The first step's loss is the functional loss with the cached reference rows of the batch.
    with torch.no_grad():
        img = ex.encode_image(run.model, data.train_px[index])
        txt = ex.encode_text(run.model, data.train_ids[index])
        ref_img, ref_txt = cache.lookup(index)
        want, _, _ = dk.drrho_clip_loss(img, txt, run.model.logit_scale.exp(), torch.zeros(len(index)),
                                        torch.zeros(len(index)), ref_img=ref_img, ref_txt=ref_txt,
                                        gamma=run.crit.gamma, rho=args.rho)
    assert run.train_step() == pytest.approx(float(want), rel=1e-6)
    after = run.crit.state_dict()
    others = torch.ones(len(run.pairs), dtype=torch.bool)
    others[index] = False
    for key in ("u_img", "u_txt"):
        assert torch.equal(after[key][others], before[key][others]), key         # untouched elsewhere
        assert bool((after[key][index] != before[key][index]).all()), key       # every batch entry set
    losses = [run.train_step() for _ in range(19)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, losses


def _snapshot(run) -> dict:
    out = {f"model.{k}": v.clone() for k, v in run.model.state_dict().items()}
    out.update({f"loss.{k}": v.clone() for k, v in run.crit.state_dict().items() if isinstance(v, torch.Tensor)})
    for i, state in run.opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in state.items()})
    return out


def test_checkpoint_of_model_and_loss_resumes_bit_exact(ex, setup, tmp_path):
    args, data, _, cache, _ = setup
    args = ex.parse_args(["--no-progress", "--quick", "--epochs", "4"])     # 3 steps per epoch, 4 epochs
    pairs = ex.Pairs(data.train_px, data.train_ids)
    ckpt = str(tmp_path / "ckpt.pt")
    torch.use_deterministic_algorithms(True)

    straight = ex.Run(ex.make_clip(data, 32, 1, 32, seed=0), pairs, data, args, epochs=4, cache=cache)
    straight.run(until=4)                       # mid-epoch 1
    straight.save(ckpt)
    straight.run(until=11)                      # through epochs 2 and 3 (gamma changes with the epoch)

    resumed = ex.Run(ex.make_clip(data, 32, 1, 32, seed=123), pairs, data, args, epochs=4, cache=cache)
    resumed.load(ckpt)                          # torch.load(..., weights_only=True) inside
    assert resumed.step == 4 and resumed.crit.epoch == straight_epoch_at(4, resumed)
    resumed.run(until=11)
    a, b = _snapshot(straight), _snapshot(resumed)
    assert a.keys() == b.keys() and any(k.startswith("loss.u_") for k in a)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff
    assert straight.crit.epoch == resumed.crit.epoch == 3
    assert straight.history == resumed.history
    # The file holds only tensors and plain containers: it loads with weights_only=True.
    assert set(torch.load(ckpt, weights_only=True)) >= {"model", "optimizer", "loss", "step"}


def straight_epoch_at(step: int, run) -> int:
    """The loss's epoch after ``step`` steps: the epoch of the last step taken."""
    return (step - 1) // run.steps_per_epoch


def test_quick_example_builds_the_cache_then_reuses_it(ex, tmp_path, capsys):
    argv = ["--quick", "--no-progress", "--out", str(tmp_path)]
    first = ex.main(argv)
    out = capsys.readouterr().out
    assert "zero-shot test accuracy" in out and "reference cache built" in out
    assert first["reference_cache"]["status"] == "built"
    header = json.loads((tmp_path / "ref_cache" / "header.json").read_text())
    assert header["num_samples"] == first["config"]["n_train"] and header["dtype"] == "float16"
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("reference_accuracy", "target_plain_accuracy", "target_drrho_accuracy"):
        assert 0.0 <= saved[key] <= 1.0
    second = ex.main(argv)
    assert second["reference_cache"]["status"] == "reused"
    assert second["history"] == first["history"]           # deterministic, and the cache gave the same rows
