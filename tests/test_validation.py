"""Every bad input of SPEC.md raises TypeError/ValueError naming the argument, before any computation."""
import math

import pytest
import torch

import drrho_kernels as dk
from drrho_kernels.core import ops


def base(B=4, N=None, d=3, dr=2, ref=True):
    g = torch.Generator().manual_seed(0)
    kw = dict(img=torch.randn(B, d, generator=g), txt=torch.randn(B, d, generator=g), logit_scale=torch.tensor(5.0),
              u_img=torch.zeros(B), u_txt=torch.zeros(B))
    if ref:
        kw.update(ref_img=torch.randn(B, dr, generator=g), ref_txt=torch.randn(B, dr, generator=g))
    if N is not None:
        kw.update(img_all=torch.randn(N, d, generator=g), txt_all=torch.randn(N, d, generator=g), offset=N - B)
        if ref:
            kw.update(ref_img_all=torch.randn(N, dr, generator=g), ref_txt_all=torch.randn(N, dr, generator=g))
    return kw


def call(kw):
    kw = dict(kw)
    return dk.drrho_clip_loss(kw.pop("img"), kw.pop("txt"), kw.pop("logit_scale"), kw.pop("u_img"),
                              kw.pop("u_txt"), backend=kw.pop("backend", "torch"), **kw)


BAD = [
    # (id, base kwargs, changes, exception, words the message must contain)
    ("img-not-tensor", {}, dict(img=[[1.0, 2.0]]), TypeError, ["img", "torch.Tensor", "list"]),
    ("img-1d", {}, dict(img=torch.randn(4)), ValueError, ["img", "2-D", "(4,)"]),
    ("img-int", {}, dict(img=torch.ones(4, 3, dtype=torch.int64)), TypeError, ["img", "dtype", "int64"]),
    ("txt-rows", {}, dict(txt=torch.randn(5, 3)), ValueError, ["txt", "(4, 3)", "(5, 3)"]),
    ("txt-width", {}, dict(txt=torch.randn(4, 2)), ValueError, ["txt", "(4, 3)", "(4, 2)"]),
    ("txt-dtype", {}, dict(txt=torch.randn(4, 3, dtype=torch.float64)), TypeError, ["txt", "float32", "float64"]),
    ("N-lt-2", dict(B=1), {}, ValueError, ["N >= 2", "N = 1"]),
    ("img_all-alone", dict(N=6), dict(txt_all=None), ValueError, ["img_all", "txt_all", "both or neither"]),
    ("img_all-width", dict(N=6), dict(img_all=torch.randn(6, 2)), ValueError, ["img_all", "(6, 3)", "(6, 2)"]),
    ("txt_all-rows", dict(N=6), dict(txt_all=torch.randn(5, 3)), ValueError, ["txt_all", "(6, 3)", "(5, 3)"]),
    ("offset-too-big", dict(N=6), dict(offset=3), ValueError, ["offset", "N - B = 2", "got 3"]),
    ("offset-negative", dict(N=6), dict(offset=-1), ValueError, ["offset", "got -1"]),
    ("offset-float", dict(N=6), dict(offset=1.0), TypeError, ["offset", "int", "float"]),
    ("offset-without-columns", {}, dict(offset=1), ValueError, ["offset", "N - B = 0", "got 1"]),
    ("ref-alone", {}, dict(ref_txt=None), ValueError, ["ref_img", "ref_txt", "both or neither"]),
    ("ref-rows", {}, dict(ref_img=torch.randn(3, 2)), ValueError, ["ref_img", "(4, 2)", "(3, 2)"]),
    ("ref-width-mismatch", {}, dict(ref_txt=torch.randn(4, 5)), ValueError, ["ref_txt", "(4, 2)", "(4, 5)"]),
    ("ref-cols-missing", dict(N=6), dict(ref_img_all=None, ref_txt_all=None), ValueError, ["ref_img_all", "[N, dr]"]),
    ("ref-cols-width", dict(N=6), dict(ref_img_all=torch.randn(6, 3)), ValueError, ["ref_img_all", "(6, 2)", "(6, 3)"]),
    ("ref-cols-without-cols", {}, dict(ref_img_all=torch.randn(4, 2), ref_txt_all=torch.randn(4, 2)), ValueError,
     ["ref_img_all", "expected None"]),
    ("ref-cols-without-ref", dict(N=6, ref=False), dict(ref_img_all=torch.randn(6, 2), ref_txt_all=torch.randn(6, 2)),
     ValueError, ["ref_img_all", "without ref_img"]),
    ("scale-zero", {}, dict(logit_scale=torch.tensor(0.0)), ValueError, ["logit_scale", "> 0", "0.0"]),
    ("scale-negative-float", {}, dict(logit_scale=-2.0), ValueError, ["logit_scale", "-2.0"]),
    ("scale-nan", {}, dict(logit_scale=torch.tensor(math.nan)), ValueError, ["logit_scale", "nan"]),
    ("scale-shape", {}, dict(logit_scale=torch.ones(2)), ValueError, ["logit_scale", "1-element", "(2,)"]),
    ("scale-str", {}, dict(logit_scale="10"), TypeError, ["logit_scale", "str"]),
    ("eps-zero", {}, dict(eps=0.0), ValueError, ["eps", "got 0.0"]),
    ("gamma-zero", {}, dict(gamma=0.0), ValueError, ["gamma", "(0.0, 1.0]", "got 0.0"]),
    ("gamma-above-one", {}, dict(gamma=1.5), ValueError, ["gamma", "got 1.5"]),
    ("gamma-nan", {}, dict(gamma=math.nan), ValueError, ["gamma", "nan"]),
    ("gamma-bool", {}, dict(gamma=True), TypeError, ["gamma", "real number", "bool"]),
    ("rho-negative", {}, dict(rho=-1.0), ValueError, ["rho", "got -1.0"]),
    ("u-length", {}, dict(u_img=torch.zeros(5)), ValueError, ["u_img", "(4,)", "(5,)"]),
    ("u-dtype", {}, dict(u_txt=torch.zeros(4, dtype=torch.float16)), TypeError, ["u_txt", "float16"]),
    ("u-2d", {}, dict(u_txt=torch.zeros(4, 1)), ValueError, ["u_txt", "1-D", "(4, 1)"]),
    ("device-txt", {}, dict(txt=torch.randn(4, 3, device="meta")), ValueError, ["txt", "cpu", "meta"]),
    ("device-u", {}, dict(u_img=torch.zeros(4, device="meta")), ValueError, ["u_img", "cpu", "meta"]),
    ("device-scale", {}, dict(logit_scale=torch.tensor(5.0, device="meta")), ValueError, ["logit_scale", "meta"]),
    ("device-ref", {}, dict(ref_img=torch.randn(4, 2, device="meta")), ValueError, ["ref_img", "meta"]),
    ("nan-img", {}, dict(img=torch.tensor([[0.0, 1.0, math.nan]] * 4)), ValueError, ["img", "finite", "non-finite"]),
    ("inf-ref", {}, dict(ref_txt=torch.full((4, 2), math.inf)), ValueError, ["ref_txt", "finite"]),
    ("inf-cols", dict(N=6), dict(txt_all=torch.full((6, 3), -math.inf)), ValueError, ["txt_all", "finite"]),
    ("backend-unknown", {}, dict(backend="cuda"), ValueError, ["backend", "'cuda'"]),
]


@pytest.mark.parametrize("name,shape,changes,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_computing(monkeypatch, name, shape, changes, exc, words):
    calls = []
    for op_name in ("forward", "backward", "loss"):
        op = getattr(ops, op_name)
        monkeypatch.setattr(ops, op_name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    kw = base(**shape)
    kw.update(changes)
    with pytest.raises(exc) as info:
        call(kw)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not calls, "a kernel ran before the error"


@pytest.mark.parametrize("shape", [{}, dict(N=6)], ids=["single", "distributed"])
def test_valid_base_inputs_run(shape):
    loss, u_img, u_txt = call(base(**shape))
    assert torch.isfinite(loss) and u_img.shape == (4,)


def test_non_contiguous_inputs_are_accepted():
    kw = base(N=6)
    want = call(kw)
    strided = {k: (v.T.contiguous().T if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in kw.items()}
    assert not strided["img"].is_contiguous()
    strided["u_img"] = torch.zeros(8)[::2]
    got = call(strided)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_inputs_are_not_modified():
    kw = base()
    kw["u_img"] = torch.randn(4)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    call(kw)
    for k, v in before.items():
        assert torch.equal(kw[k], v), k


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='cpp' cannot run here"):
        call(dict(base(), backend="cpp", img=torch.randn(4, 3, device="meta"), txt=torch.randn(4, 3, device="meta"),
                  logit_scale=1.0, u_img=torch.zeros(4, device="meta"), u_txt=torch.zeros(4, device="meta"),
                  ref_img=None, ref_txt=None))


@pytest.mark.parametrize("n", [6, 513, 5000], ids=["python", "numpy-edge", "numpy"])
def test_index_checks_at_every_size(n):
    """The CPU index's range and repeats: checked in Python at a small batch, in NumPy at a large one
    (``validate.SMALL_INDEX``); the same answers either way, ends and middle alike."""
    from drrho_kernels.loss import validate
    assert (n <= validate.SMALL_INDEX) == (n == 6)            # both paths are exercised
    index = torch.randperm(3 * n, generator=torch.Generator().manual_seed(n))[:n]
    assert torch.equal(validate.check_index(index.int(), n, 3 * n), index)
    for at, value, exc, words in ((0, -1, IndexError, "got -1"), (n - 1, 3 * n, IndexError, f"got {3 * n}"),
                                  (n // 2, None, ValueError, "distinct")):
        bad = index.clone()
        bad[at] = bad[0 if at else 1] if value is None else value
        with pytest.raises(exc, match=words):
            validate.check_index(bad, n, 3 * n)
    repeated = torch.cat([index[:-1], index[:1]])
    with pytest.raises(ValueError, match="across the global batch"):
        validate.check_global_index(repeated, rank=0)
    validate.check_global_index(index, rank=0)
