"""ReferenceFeatures: build, interrupt, resume, look up; every mismatch and corruption is an error.

The independent truth is a row-wise encoder (a fixed float64 projection computed elementwise, so a
row's features do not depend on the batch it was encoded in): the cache must return exactly the
encoder's rows rounded once to the stored dtype.
"""
from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from drrho_kernels.reference import cache as rfm
from processes import spawn
from drrho_kernels.reference.cache import (CacheMismatchError, ConcurrentWriterError, CorruptChunkError,
                                              NotBuiltError, ReferenceFeatures)

N, DIN, DI, DT = 203, 7, 6, 5            # 203 samples: the last chunk is partial
FP = "enc=proj-v1;data=synthetic-203"


def make_data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIN, dtype=torch.float64, generator=g)
    wi = torch.randn(DIN, DI, dtype=torch.float64, generator=g)
    wt = torch.randn(DIN, DT, dtype=torch.float64, generator=g)
    return x, wi, wt


class Samples(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return {"x": self.x[i], "i": i}


class Encoder:
    """Row-wise (batch-independent) projection; records the indices it was asked to encode."""

    def __init__(self, wi, wt, fail_after=None):
        self.wi, self.wt, self.fail_after = wi, wt, fail_after
        self.seen: list[int] = []
        self.calls = 0

    def rows(self, x):
        img = (x.unsqueeze(2) * self.wi).sum(1)
        txt = (x.unsqueeze(2) * self.wt).sum(1)
        return img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)

    def __call__(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.seen += batch["i"].tolist()
        return self.rows(batch["x"])


def build(path, x, enc, **kw):
    kw = dict(dict(fingerprint=FP, chunk_size=16, batch_size=6, progress=False), **kw)
    return ReferenceFeatures.build(path, enc, Samples(x), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lookup_equals_direct_encoding(tmp_path, dtype):
    x, wi, wt = make_data()
    enc = Encoder(wi, wt)
    cache = build(tmp_path / "c", x, enc, dtype=dtype)
    assert sorted(enc.seen) == list(range(N))              # every sample encoded exactly once
    assert cache.is_complete and len(cache) == N and cache.dtype == dtype
    assert (cache.dim_img, cache.dim_txt, cache.num_chunks) == (DI, DT, 13)
    index = torch.tensor([202, 0, 15, 16, 17, 101, 0, 190])   # chunk edges, the partial last chunk, a repeat
    img, txt = cache.lookup(index)
    want_img, want_txt = enc.rows(x[index])
    assert img.dtype == dtype and img.shape == (8, DI) and txt.shape == (8, DT)
    assert torch.equal(img, want_img.to(dtype)) and torch.equal(txt, want_txt.to(dtype))
    # The whole table, through a fresh open, with an int32 index and a list.
    again = ReferenceFeatures(tmp_path / "c", fingerprint=FP, num_samples=N, dim_img=DI, dim_txt=DT, dtype=dtype,
                              verify="full")
    all_img, all_txt = again.lookup(torch.arange(N, dtype=torch.int32))
    assert torch.equal(all_img, enc.rows(x)[0].to(dtype)) and torch.equal(all_txt, enc.rows(x)[1].to(dtype))
    assert torch.equal(again.lookup([3, 4])[0], all_img[3:5])
    assert again.lookup(index, dtype=torch.float64)[0].dtype == torch.float64


def test_on_disk_format_is_raw_arrays_and_json(tmp_path):
    x, wi, wt = make_data()
    enc = Encoder(wi, wt)
    build(tmp_path / "c", x, enc, dtype="float16")
    root = tmp_path / "c"
    header = json.loads((root / "header.json").read_text())
    assert header["num_samples"] == N and header["dtype"] == "float16" and header["fingerprint"] == FP
    assert header["files"]["img"] == {"name": "img.bin", "bytes": N * DI * 2}
    # img.bin is exactly the row-major float16 rows, nothing else (read here without the class).
    raw = torch.frombuffer(bytearray((root / "img.bin").read_bytes()), dtype=torch.float16).view(N, DI)
    assert torch.equal(raw, enc.rows(x)[0].to(torch.float16))
    lines = (root / "chunks-rank0.log").read_text().splitlines()
    assert len(lines) == 13 and all(re.fullmatch(r"chunk \d+ crc32 [0-9a-f]{8} [0-9a-f]{8}", ln) for ln in lines)


def test_interrupt_then_resume_encodes_exactly_the_missing_chunks(tmp_path):
    x, wi, wt = make_data()
    path = tmp_path / "c"
    first = Encoder(wi, wt, fail_after=7)          # 7 batches of 6 rows: chunks 0 and 1 (32 rows) committed
    with pytest.raises(KeyboardInterrupt):
        build(path, x, first)
    partial = ReferenceFeatures(path, fingerprint=FP)
    assert not partial.is_complete and partial.missing_chunks() == list(range(2, 13))
    assert torch.equal(partial.lookup([0, 31])[0], first.rows(x[[0, 31]])[0].to(torch.float16))
    with pytest.raises(NotBuiltError, match=r"never built"):
        partial.lookup([5, 40])                   # 40 is in chunk 2, encoded but never committed
    with pytest.raises(NotBuiltError, match=r"incomplete"):
        ReferenceFeatures(path, fingerprint=FP, require_complete=True)

    second = Encoder(wi, wt)
    cache = build(path, x, second)
    assert sorted(second.seen) == list(range(32, N))       # no committed chunk re-encoded, none skipped
    assert cache.is_complete
    img, txt = cache.lookup(torch.arange(N))
    want_img, want_txt = second.rows(x)
    assert torch.equal(img, want_img.to(torch.float16)) and torch.equal(txt, want_txt.to(torch.float16))

    third = Encoder(wi, wt)                        # complete: nothing to do
    build(path, x, third)
    assert third.seen == []


def test_torn_log_line_is_not_a_committed_chunk(tmp_path):
    x, wi, wt = make_data()
    path = tmp_path / "c"
    build(path, x, Encoder(wi, wt))
    log = path / "chunks-rank0.log"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][:12])          # the last append was cut short
    assert ReferenceFeatures(path, fingerprint=FP).missing_chunks() == [12]
    log.write_text("".join(lines[:3]) + "chunk 3 crc32 zz\n")   # a complete but malformed record
    with pytest.raises(CorruptChunkError, match="malformed"):
        ReferenceFeatures(path, fingerprint=FP)


def test_corrupted_chunk_is_detected(tmp_path):
    x, wi, wt = make_data()
    path = tmp_path / "c"
    build(path, x, Encoder(wi, wt), dtype="float32")
    with open(path / "txt.bin", "r+b") as f:              # flip one byte of row 100 (chunk 6)
        f.seek(100 * DT * 4 + 2)
        byte = f.read(1)
        f.seek(100 * DT * 4 + 2)
        f.write(bytes([byte[0] ^ 0x01]))
    cache = ReferenceFeatures(path, fingerprint=FP)       # lazy: opening does not read the chunks
    assert cache.lookup([0, 95])[0].shape == (2, DI)      # other chunks still fine
    with pytest.raises(CorruptChunkError, match=r"chunk 6 .*txt.bin.* corrupted"):
        cache.lookup([96])
    with pytest.raises(CorruptChunkError, match="chunk 6"):
        ReferenceFeatures(path, fingerprint=FP, verify="full")
    with pytest.raises(CorruptChunkError):
        ReferenceFeatures(path, fingerprint=FP).verify()
    assert ReferenceFeatures(path, fingerprint=FP, verify="none").lookup([100])[1].shape == (1, DT)


def test_mismatches_are_errors(tmp_path):
    x, wi, wt = make_data()
    path = tmp_path / "c"
    build(path, x, Encoder(wi, wt))
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        ReferenceFeatures(path, fingerprint="enc=proj-v2;data=synthetic-203")
    for kw, what in [(dict(num_samples=N + 1), "num_samples"), (dict(dim_img=DI + 1), "dim_img"),
                     (dict(dim_txt=1), "dim_txt"), (dict(dtype=torch.float32), "dtype")]:
        with pytest.raises(CacheMismatchError, match=what):
            ReferenceFeatures(path, fingerprint=FP, **kw)
    with pytest.raises(TypeError, match="fingerprint"):
        ReferenceFeatures(path, fingerprint=None)
    # Resuming with another fingerprint, dtype, chunk size or dataset size is refused before encoding.
    for kw in (dict(fingerprint="other"), dict(dtype="float32"), dict(chunk_size=32)):
        enc = Encoder(wi, wt)
        with pytest.raises(CacheMismatchError, match="overwrite=True"):
            build(path, x, enc, **kw)
        assert enc.calls == 0
    with pytest.raises(CacheMismatchError, match="num_samples"):
        build(path, x[:100], Encoder(wi, wt))
    # An encoder of another width on resume.
    (path / "chunks-rank0.log").write_text("")
    with pytest.raises(CacheMismatchError, match="dim"):
        build(path, x, Encoder(torch.randn(DIN, DI + 2, dtype=torch.float64), wt))
    # overwrite=True starts over.
    other = build(path, x, Encoder(wi, wt), fingerprint="other", overwrite=True)
    assert other.fingerprint == "other" and other.is_complete
    # A truncated data file, a header edited by hand, a header that is not JSON.
    with open(path / "img.bin", "r+b") as f:
        f.truncate(N * DI * 2 - 2)
    with pytest.raises(CacheMismatchError, match=r"img.bin is \d+ bytes.*truncated"):
        ReferenceFeatures(path, fingerprint="other")
    enc = Encoder(wi, wt)
    with pytest.raises(CacheMismatchError, match=r"img.bin is \d+ bytes.*truncated"):
        build(path, x, enc, fingerprint="other")              # resuming onto a truncated file
    assert enc.calls == 0
    header = json.loads((path / "header.json").read_text())
    header["dim_img"] = DI + 1
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(CacheMismatchError, match="files.img"):
        ReferenceFeatures(path, fingerprint="other")
    (path / "header.json").write_bytes(b"\x80\x04\x95 not json")
    with pytest.raises(CacheMismatchError, match="JSON"):
        ReferenceFeatures(path, fingerprint="other")
    with pytest.raises(FileNotFoundError):
        ReferenceFeatures(tmp_path / "nothing", fingerprint=FP)


def test_bad_lookups_and_encoder_outputs(tmp_path):
    x, wi, wt = make_data()
    cache = build(tmp_path / "c", x, Encoder(wi, wt))
    with pytest.raises(IndexError, match=r"\[0, 203\)"):
        cache.lookup([0, N])
    with pytest.raises(IndexError):
        cache.lookup(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        cache.lookup(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer"):
        cache.lookup(torch.zeros(2, 2, dtype=torch.long))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="pin_memory"):
            cache.lookup([1], pin_memory=True)
    else:
        img, _ = cache.lookup([1], pin_memory=True)
        assert img.is_pinned()

    def nan_encoder(batch):
        img, txt = Encoder(wi, wt).rows(batch["x"])
        img[batch["i"] == 9] = float("nan")
        return img, txt
    with pytest.raises(ValueError, match=r"non-finite img features .*\[9\]"):
        build(tmp_path / "n", x, nan_encoder)
    with pytest.raises(ValueError, match=r"non-finite .*float16"):   # overflows the stored dtype
        build(tmp_path / "o", x, lambda b: (Encoder(wi, wt).rows(b["x"])[0] * 1e6, Encoder(wi, wt).rows(b["x"])[1]))
    with pytest.raises(TypeError, match=r"\(img_features, txt_features\)"):
        build(tmp_path / "t", x, lambda b: Encoder(wi, wt).rows(b["x"])[0])
    with pytest.raises(ValueError, match=r"\[6, dim\]"):
        build(tmp_path / "s", x, lambda b: tuple(t[:-1] for t in Encoder(wi, wt).rows(b["x"])))


def test_second_concurrent_writer_is_refused(tmp_path):
    x, wi, wt = make_data()
    path = tmp_path / "c"
    outcome = {}

    class Reentrant(Encoder):
        def __call__(self, batch):
            if self.calls == 2:                      # while the first build holds the lock
                with pytest.raises(ConcurrentWriterError, match=rf"written by another process .*pid {os.getpid()}"):
                    build(path, x, Encoder(wi, wt))
                outcome["refused"] = True
            return super().__call__(batch)

    cache = build(path, x, Reentrant(wi, wt))
    assert outcome == {"refused": True} and cache.is_complete
    build(path, x, Encoder(wi, wt))                  # the lock was released at the end of the build


def test_pickles_for_dataloader_workers(tmp_path):
    import pickle
    x, wi, wt = make_data()
    cache = build(tmp_path / "c", x, Encoder(wi, wt))
    clone = pickle.loads(pickle.dumps(cache))        # reopens from the path: the mappings are not pickled
    assert torch.equal(clone.lookup([7, 8])[0], cache.lookup([7, 8])[0])
    assert len(pickle.dumps(cache)) < 2000


def test_fingerprint_helper():
    a = torch.nn.Linear(3, 2)
    fa = rfm.fingerprint(a, "data-v1", 5)
    assert fa.startswith("sha256:") and fa == ReferenceFeatures.make_fingerprint(a, "data-v1", 5)
    assert rfm.fingerprint(a, "data-v2", 5) != fa
    with torch.no_grad():
        a.weight[0, 0] += 1e-3
    assert rfm.fingerprint(a, "data-v1", 5) != fa
    assert rfm.fingerprint("ab", "c") != rfm.fingerprint("a", "bc")
    with pytest.raises(TypeError):
        rfm.fingerprint(object())


def test_no_pickle_anywhere_in_the_new_readers():
    """Nothing read from disk is unpickled: no pickle/torch.load without weights_only in these files."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "drrho_kernels" / "reference_features.py", root / "examples" / "train_hf_clip.py",
             *sorted((root / "drrho_kernels" / "integrations").glob("*.py"))]
    for path in files:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib)\b", text, flags=re.M), path
        assert "np.load(" not in text and "numpy.load(" not in text, path
        for call in re.findall(r"torch\.load\((.*?)\)\n", text, flags=re.S):
            assert "weights_only=True" in call, (path, call)


# ------------------------------------------------------------------------------------------------
# Split across torch.distributed ranks (gloo, 2 processes)

def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    try:
        x, wi, wt = make_data()
        enc = Encoder(wi, wt)
        cache = build(path, x, enc, process_group="world")
        ok = torch.equal(cache.lookup(torch.arange(N))[0], enc.rows(x)[0].to(torch.float16))
    finally:
        torch.distributed.destroy_process_group()
    return dict(seen=list(enc.seen), ok=ok)


@pytest.mark.slow
def test_distributed_build_splits_the_chunks(tmp_path):
    path = str(tmp_path / "c")
    seen = spawn(_worker, 2, path, timeout=120.0, what="distributed build")
    assert all(s["ok"] is True for s in seen)
    a, b = set(seen[0]["seen"]), set(seen[1]["seen"])
    assert not (a & b) and a | b == set(range(N))               # disjoint shares, all samples
    assert {len(a) // 16, len(b) // 16} <= {5, 6}              # 13 chunks split about evenly
    logs = sorted(p.name for p in Path(path).glob("chunks-rank*.log"))
    assert logs == ["chunks-rank0.log", "chunks-rank1.log"]
    # A single process resumes nothing: complete.
    enc = Encoder(*make_data()[1:])
    assert build(path, make_data()[0], enc).is_complete and enc.seen == []
