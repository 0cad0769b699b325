"""Example selection (SPEC 2.3): dk.jest_select against the tests' dense statement of the authors'
``jointly_sample_batch_softmax`` (family_oracle.jest_oracle) on every fused backend, dk.rho_select
against the per-sample oracle, the chunk sizes, bad input. (Parity with the authors' own function, with
their snapshot: tests/test_authors_parity.py.)"""
import numpy as np
import pytest
import torch

import drrho_kernels as dk
import family_oracle as fo
from drrho_kernels.reference.selection import selection_sizes
from test_conformance import BACKENDS, DEVICES

FUSED = [p for p in BACKENDS if p.values[0] != "reference"] + [pytest.param("reference", id="reference")]


def inputs(N=24, d=6, dr=5, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def emb(w):
        return torch.nn.functional.normalize(torch.randn(N, w, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return dict(img=emb(d), txt=emb(d), ref_img=emb(dr), ref_txt=emb(dr))


@pytest.mark.parametrize("topk", [True, False], ids=["topk", "sample"])
@pytest.mark.parametrize("n_chunks,f", [(2, 0.5), (3, 0.5), (4, 0.5), (2, 0.75)])
@pytest.mark.parametrize("backend", FUSED)
def test_jest_matches_the_dense_statement(backend, n_chunks, f, topk):
    x = inputs()
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = {k: v.to(dtype=dtype, device=DEVICES.get(backend, "cpu")) for k, v in x.items()}
    want = fo.jest_oracle(x["ref_img"], x["ref_txt"], x["img"], x["txt"], learner_scale=14.0, ref_scale=100.0,
                          n_chunks=n_chunks, filter_ratio=f, topk=topk,
                          generators=[torch.Generator().manual_seed(7)])[0]
    got = dk.jest_select(dev["img"], dev["txt"], dev["ref_img"], dev["ref_txt"], 14.0, filter_ratio=f,
                         n_chunks=n_chunks, topk=topk, generator=torch.Generator().manual_seed(7), backend=backend,
                         return_scores=True)
    assert got.indices.tolist() == np.asarray(want["inds"]).tolist()
    np.testing.assert_allclose(got.scores.double().numpy(), want["diag"], rtol=1e-5 if dtype == torch.float32 else 1e-12)
    for mine, theirs in zip(got.conditional, want["cond"]):
        keep = np.isfinite(theirs)
        assert np.array_equal(np.isfinite(mine.numpy()), keep)
        tol = 1e-4 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(mine.double().numpy()[keep], theirs[keep], rtol=tol, atol=tol)


def test_chunk_sizes_split_exactly():
    assert selection_sizes(20, 0.5, 2) == [5, 5]
    assert selection_sizes(12, 0.5, 4) == [2, 2, 1, 1]              # the authors': 1 per chunk (4, not 6)
    assert selection_sizes(100, 0.8, 2) == [10, 10]                  # the authors' floating point: 9 + 9
    with pytest.raises(ValueError, match="n_chunks"):
        selection_sizes(10, 0.8, 3)                                   # 2 pairs cannot fill 3 chunks


@pytest.mark.parametrize("backend", FUSED)
def test_rho_select_takes_the_largest_rho_losses(backend):
    from spec_oracle import Case
    x = inputs(N=16)
    got = dk.rho_select(x["img"], x["txt"], x["ref_img"], x["ref_txt"], 12.0, filter_ratio=0.75,
                        backend=backend if backend != "triton" else "torch")
    case = Case(img=x["img"], txt=x["txt"], logit_scale=12.0, u_img=torch.zeros(16), u_txt=torch.zeros(16),
                ref_img=x["ref_img"], ref_txt=x["ref_txt"])
    want = fo.per_sample_oracle(case)
    rho = 0.5 * ((want["target_img"] - want["ref_img"]) + (want["target_txt"] - want["ref_txt"]))
    assert got.tolist() == np.argsort(-rho)[:4].tolist()


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(filter_ratio=1.0), ValueError, "filter_ratio"), (dict(filter_ratio=0.0), ValueError, "filter_ratio"),
    (dict(n_chunks=0), ValueError, "n_chunks"), (dict(n_chunks=2.0), TypeError, "n_chunks"),
    (dict(n_chunks=20), ValueError, "n_chunks"), (dict(ref_scale=0.0), ValueError, "ref_scale"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale"), (dict(topk=1), TypeError, "topk"),
    (dict(ref_img=torch.randn(23, 5)), ValueError, "ref_img"),
])
def test_bad_input(kwargs, exc, words):
    x = inputs()
    args = dict(logit_scale=14.0, **x)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        dk.jest_select(args.pop("img"), args.pop("txt"), args.pop("ref_img"), args.pop("ref_txt"),
                       args.pop("logit_scale"), **args)


def test_non_finite_embeddings_are_named_by_both_selections():
    """Every public entry point checks through the same helpers: a NaN embedding is named, never a failure
    deep inside ``torch.multinomial``."""
    g = torch.Generator().manual_seed(0)
    x = [torch.nn.functional.normalize(torch.randn(12, 4, generator=g), dim=1) for _ in range(4)]
    x[2][3, 1] = float("nan")
    for select in (lambda: dk.jest_select(*x, 10.0, filter_ratio=0.5, n_chunks=2, backend="torch"),
                   lambda: dk.rho_select(*x, 10.0, filter_ratio=0.5, backend="torch")):
        with pytest.raises(ValueError, match="ref_img: expected finite values"):
            select()
