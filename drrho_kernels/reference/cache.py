"""Cached reference-model embeddings: encode a dataset once, then look rows up by dataset index.

DRRho-CLIP needs the reference model's embeddings of every pair of every batch. Running the reference
model at each step costs a second forward pass; :class:`ReferenceFeatures` computes them once, stores
them on disk and hands back ``[B, dr]`` tensors for ``ref_img=`` / ``ref_txt=``::

    cache = ReferenceFeatures.build("ref_cache", encoder, dataset, fingerprint="ref=ViT-B-32@ep32;data=v1")
    ...
    ref_img, ref_txt = cache.lookup(index, device=img.device)
    loss = crit(img, txt, index, logit_scale, ref_img=ref_img, ref_txt=ref_txt)

On-disk format (a directory; nothing in it is ever unpickled, so a cache from elsewhere cannot run code):

``header.json``
    Plain JSON: format name and version, ``num_samples``, ``dim_img``, ``dim_txt``, ``dtype``
    (``"float16"``, ``"bfloat16"`` or ``"float32"``), byte order (little-endian), ``chunk_size``,
    ``num_chunks``, the user's ``fingerprint`` of encoder and data, and the name and byte size of each
    data file.
``img.bin``, ``txt.bin``
    Raw row-major ``[num_samples, dim]`` arrays of that dtype (bfloat16 as its 16 raw bits), read
    memory-mapped. Row ``i`` is the dataset index ``i``.
``chunks-rank<r>.log``
    Plain text, one line per committed chunk (``chunk <k> crc32 <img> <txt>``: the CRC-32 of the chunk's
    bytes in each file), appended by rank ``r`` of the writing job only after the chunk's rows are on
    disk (``fsync``). A chunk is built when some log lists it; an interrupted build loses at most the
    chunks it had not committed, and a resumed build encodes exactly the chunks no log lists.
``writer.lock``
    Held (``flock``) by the one writing job; a second writer raises :class:`ConcurrentWriterError`.

Errors, never silence: a looked-up index whose chunk was never built (:class:`NotBuiltError`), an
index out of range (``IndexError``), a header or file whose size, dimensions, dtype or fingerprint do
not match (:class:`CacheMismatchError`), a chunk whose bytes no longer match their checksum
(:class:`CorruptChunkError`, checked the first time a chunk is read, or all at once by :meth:`verify`),
a second concurrent writer (:class:`ConcurrentWriterError`).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import json
import math
import os
import re
import socket
import sys
import zlib
from pathlib import Path

import torch

from .._version import __version__

__all__ = ["ReferenceFeatures", "ReferenceFeaturesError", "CacheMismatchError", "CorruptChunkError",
           "NotBuiltError", "ConcurrentWriterError", "fingerprint"]

FORMAT = "drrho_kernels.reference_features"
FORMAT_VERSION = 1
HEADER = "header.json"
DATA_FILES = {"img": "img.bin", "txt": "txt.bin"}
LOCK_FILE = "writer.lock"
_LOG_RE = re.compile(r"chunks-rank(\d+)\.log")
_LINE_RE = re.compile(r"chunk (\d+) crc32 ([0-9a-f]{8}) ([0-9a-f]{8})")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ReferenceFeaturesError(RuntimeError):
    """Base class of the errors of :class:`ReferenceFeatures`."""


class CacheMismatchError(ReferenceFeaturesError, ValueError):
    """The cache on disk is not the one asked for: header, file size, dims, dtype or fingerprint differ."""


class CorruptChunkError(ReferenceFeaturesError):
    """A committed chunk's bytes no longer match the checksum recorded when it was written."""


class NotBuiltError(ReferenceFeaturesError, LookupError):
    """A looked-up dataset index lies in a chunk that was never built (an interrupted build)."""


class ConcurrentWriterError(ReferenceFeaturesError):
    """Another process is writing this cache."""


# ------------------------------------------------------------------------------------------------
# Small helpers

def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype: expected one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}")


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a CPU tensor, row-major (no NumPy needed)."""
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def _crc(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def fingerprint(*parts) -> str:
    """A stable ``"sha256:<hex>"`` of encoder weights and data descriptions, for ``fingerprint=``.

    Each part may be an ``nn.Module`` (its ``state_dict``: names, dtypes, shapes and bytes), a tensor,
    ``str``, ``bytes``, ``int``, ``float``, ``bool`` or ``None``, or a list/tuple/dict of these. Example:
    ``fingerprint(ref_model, "laion-subset-v2", len(dataset))``.
    """
    h = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.nn.Module):
            h.update(b"module")
            feed(dict(obj.state_dict()))
        elif isinstance(obj, torch.Tensor):
            h.update(f"tensor {obj.dtype} {tuple(obj.shape)}".encode())
            h.update(_raw_bytes(obj))
        elif isinstance(obj, dict):
            h.update(f"dict {len(obj)}".encode())
            for key in sorted(obj, key=str):
                feed(str(key))
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"seq {len(obj)}".encode())
            for item in obj:
                feed(item)
        elif isinstance(obj, bytes):
            h.update(b"bytes %d " % len(obj) + obj)
        elif obj is None or isinstance(obj, (str, int, float, bool)):
            text = repr(obj).encode()
            h.update(f"{type(obj).__name__} {len(text)} ".encode() + text)
        else:
            raise TypeError(f"fingerprint: cannot fingerprint a {type(obj).__name__}; pass a module, tensor, "
                            "str, bytes, number, or a list/dict of those")

    for part in parts:
        feed(part)
    return "sha256:" + h.hexdigest()


def _read_header(root: Path) -> dict:
    path = root / HEADER
    if not path.is_file():
        raise FileNotFoundError(f"ReferenceFeatures: no cache at {root} ({HEADER} not found); build it with "
                                "ReferenceFeatures.build(...)")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheMismatchError(f"ReferenceFeatures: {path} is not a valid JSON header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CacheMismatchError(f"ReferenceFeatures: {path} is not a {FORMAT} header")
    if header.get("version") != FORMAT_VERSION:
        raise CacheMismatchError(f"ReferenceFeatures: {path} has format version {header.get('version')!r}, this "
                                 f"drrho_kernels reads version {FORMAT_VERSION}")
    ints = ("num_samples", "dim_img", "dim_txt", "chunk_size", "num_chunks")
    for key in ints:
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CacheMismatchError(f"ReferenceFeatures: {path}: {key} must be a positive int, got {value!r}")
    if header.get("dtype") not in DTYPES:
        raise CacheMismatchError(f"ReferenceFeatures: {path}: dtype {header.get('dtype')!r} is not one of "
                                 f"{sorted(DTYPES)}")
    if header.get("byte_order") != "little":
        raise CacheMismatchError(f"ReferenceFeatures: {path}: byte_order {header.get('byte_order')!r}; only "
                                 "little-endian caches exist")
    if header["num_chunks"] != math.ceil(header["num_samples"] / header["chunk_size"]):
        raise CacheMismatchError(f"ReferenceFeatures: {path}: num_chunks {header['num_chunks']} does not match "
                                 f"num_samples {header['num_samples']} / chunk_size {header['chunk_size']}")
    if not isinstance(header.get("fingerprint"), str):
        raise CacheMismatchError(f"ReferenceFeatures: {path}: fingerprint missing")
    esize = DTYPES[header["dtype"]].itemsize
    for kind, name in DATA_FILES.items():
        entry = header.get("files", {}).get(kind, {})
        want = header["num_samples"] * header[f"dim_{kind}"] * esize
        if entry.get("name") != name or entry.get("bytes") != want:
            raise CacheMismatchError(f"ReferenceFeatures: {path}: files.{kind} is {entry!r}, expected name "
                                     f"{name!r} and {want} bytes")
    return header


def _read_logs(root: Path, num_chunks: int) -> dict[int, tuple[str, str]]:
    """Committed chunks ``{k: (img_crc, txt_crc)}`` from every rank's log (a later line wins)."""
    done: dict[int, tuple[str, str]] = {}
    for path in sorted(root.iterdir()):
        if not _LOG_RE.fullmatch(path.name):
            continue
        text = path.read_bytes().decode("ascii", errors="replace")
        lines = text.split("\n")
        # The last element is "" when the file ends with a newline; otherwise it is a line whose append was
        # interrupted (the chunk was not committed): ignored.
        for number, line in enumerate(lines[:-1], start=1):
            match = _LINE_RE.fullmatch(line)
            if match is None or int(match.group(1)) >= num_chunks:
                raise CorruptChunkError(f"ReferenceFeatures: {path}, line {number}: malformed chunk record "
                                        f"{line[:80]!r}")
            done[int(match.group(1))] = (match.group(2), match.group(3))
    return done


# ------------------------------------------------------------------------------------------------
# Writer side

class _WriterLock:
    """An exclusive, non-blocking lock on ``writer.lock`` (``flock``; an ``O_EXCL`` file where absent)."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self.fd = None
        self._excl = False

    def acquire(self) -> None:
        owner = (f"host {socket.gethostname()} pid {os.getpid()} since "
                 f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
        try:
            import fcntl
        except ImportError:            # not POSIX: a lock file that exists while a writer runs
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise ConcurrentWriterError(self._busy("(remove the file if no writer is running)")) from None
            self._excl = True
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ConcurrentWriterError(self._busy("")) from None
            os.ftruncate(fd, 0)
        os.write(fd, owner.encode())
        self.fd = fd

    def _busy(self, hint: str) -> str:
        try:
            holder = self.path.read_text(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        return (f"ReferenceFeatures: {self.path.parent} is being written by another process ({holder}); only "
                f"one writer at a time {hint}").strip()

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)          # releases the flock
        self.fd = None
        if self._excl:
            with contextlib.suppress(OSError):
                self.path.unlink()


def _create(root: Path, num_samples: int, dim_img: int, dim_txt: int, dtype: str, chunk_size: int,
            fp: str) -> dict:
    """Write a fresh header and preallocated (sparse) data files; remove old logs."""
    for path in root.iterdir():
        if _LOG_RE.fullmatch(path.name):
            path.unlink()
    esize = DTYPES[dtype].itemsize
    files = {}
    for kind, name in DATA_FILES.items():
        nbytes = num_samples * (dim_img if kind == "img" else dim_txt) * esize
        with open(root / name, "wb") as f:
            f.truncate(nbytes)
            f.flush()
            os.fsync(f.fileno())
        files[kind] = {"name": name, "bytes": nbytes}
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "num_samples": num_samples, "dim_img": dim_img,
        "dim_txt": dim_txt, "dtype": dtype, "byte_order": "little", "chunk_size": chunk_size,
        "num_chunks": math.ceil(num_samples / chunk_size), "fingerprint": fp, "files": files,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "writer": f"drrho_kernels {__version__}",
    }
    tmp = root / (HEADER + ".tmp")
    tmp.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / HEADER)
    _fsync_dir(root)
    return header


class _ChunkWriter:
    """Writes the rows of whole chunks into the data files and commits them to this rank's log."""

    def __init__(self, root: Path, header: dict, rank: int):
        self.header = header
        self.dtype = DTYPES[header["dtype"]]
        self.files = {kind: open(root / name, "r+b") for kind, name in DATA_FILES.items()}
        self.log = open(root / f"chunks-rank{rank}.log", "ab")

    def commit(self, chunk: int, img: torch.Tensor, txt: torch.Tensor) -> None:
        start = chunk * self.header["chunk_size"]
        crcs = []
        for kind, rows in (("img", img), ("txt", txt)):
            data = _raw_bytes(rows.to(self.dtype))
            f = self.files[kind]
            f.seek(start * self.header[f"dim_{kind}"] * self.dtype.itemsize)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())           # the rows are on disk before the chunk is recorded as built
            crcs.append(_crc(data))
        self.log.write(f"chunk {chunk} crc32 {crcs[0]} {crcs[1]}\n".encode())
        self.log.flush()
        os.fsync(self.log.fileno())

    def close(self) -> None:
        for f in list(self.files.values()) + [self.log]:
            f.close()


class _Group:
    """This process's rank and world size, and the two collectives the build needs (or none)."""

    def __init__(self, process_group):
        self.group = None
        self.rank, self.world = 0, 1
        if process_group is None:
            return
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ReferenceFeatures.build: process_group was given but torch.distributed is not "
                               "initialised; call torch.distributed.init_process_group first, or pass "
                               "process_group=None")
        if isinstance(process_group, str):
            if process_group != "world":
                raise ValueError(f"process_group: expected None, 'world' or a ProcessGroup, got {process_group!r}")
            process_group = dist.group.WORLD
        self.group = process_group
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)

    def _device(self):
        import torch.distributed as dist
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (its own error where it failed)."""
        if self.group is None:
            if error is not None:
                raise error
            return
        import torch.distributed as dist
        flags = torch.tensor([0 if error is None else 1], device=self._device())
        dist.all_reduce(flags, group=self.group)
        if error is not None:
            raise error
        if int(flags.item()):
            raise ReferenceFeaturesError(f"ReferenceFeatures.build: {int(flags.item())} other rank(s) failed "
                                         "(see their error); nothing was written by this rank")

    def barrier(self) -> None:
        if self.group is not None:
            self.agree(None)


def _progress(total: int, enabled, desc: str):
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        class _Plain:                      # a few lines on stderr when tqdm is not installed
            def __init__(self):
                self.n, self.shown = 0, -1

            def update(self, k):
                self.n += k
                tenth = 10 * self.n // total
                if tenth != self.shown:
                    self.shown = tenth
                    print(f"{desc}: {self.n}/{total} samples", file=sys.stderr, flush=True)

            def close(self):
                pass
        return _Plain()
    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, file=sys.stderr)


def _check_output(out, batch_index: torch.Tensor, dtype: torch.dtype, header: dict | None):
    """The encoder's two outputs, checked, on the CPU in the storage dtype (one rounding from theirs)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"ReferenceFeatures.build: the encoder must return (img_features, txt_features), got "
                        f"{type(out).__name__}")
    b = batch_index.numel()
    rows = []
    for kind, t in zip(("img", "txt"), out, strict=True):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 or t.shape[0] != b:
            what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"ReferenceFeatures.build: the encoder's {kind} features must be a floating [{b}, dim] "
                             f"tensor for a batch of {b} samples, got {what}")
        if header is not None and t.shape[1] != header[f"dim_{kind}"]:
            raise CacheMismatchError(f"ReferenceFeatures.build: the encoder gives {kind} features of dim "
                                     f"{t.shape[1]}, the cache on disk has dim_{kind} = {header[f'dim_{kind}']}")
        t = t.detach().to("cpu").to(dtype)
        bad = ~torch.isfinite(t).all(dim=1)             # after the cast: an overflow to inf is caught too
        if bool(bad.any()):
            raise ValueError(f"ReferenceFeatures.build: non-finite {kind} features (in {dtype}) for dataset "
                             f"indices {batch_index[bad][:5].tolist()}")
        rows.append(t)
    return rows


# ------------------------------------------------------------------------------------------------
# The cache

class ReferenceFeatures:
    """Reference-model embeddings of a whole dataset, on disk, looked up by dataset index.

    Open an existing cache with ``ReferenceFeatures(path, fingerprint=...)``; build one with
    :meth:`build`. See the module documentation for the on-disk format and the errors.

    Args:
        path: the cache directory.
        fingerprint: the fingerprint it must have been built with (a mismatch raises). Pass the same
            string as to :meth:`build` (e.g. from :func:`fingerprint` of the reference model and the data).
        num_samples, dim_img, dim_txt, dtype: optional expectations, checked against the header.
        verify: ``"lazy"`` (default: each chunk's checksum is checked the first time one of its rows is
            looked up, by reading the chunk once), ``"full"`` (every built chunk now) or ``"none"``.
        require_complete: raise :class:`NotBuiltError` at open if some chunk was never built (default:
            only a lookup of such an index raises).

    Example::

        >>> import tempfile, torch, drrho_kernels as dk
        >>> data = [torch.randn(4) for _ in range(10)]                  # a dataset of 10 samples
        >>> encode = lambda batch: (batch[:, :3], batch[:, 1:])          # the reference model: (img, txt)
        >>> with tempfile.TemporaryDirectory() as path:
        ...     cache = dk.ReferenceFeatures.build(path, encode, data, fingerprint="demo", chunk_size=4,
        ...                                        progress=False)
        ...     ref_img, ref_txt = cache.lookup(torch.tensor([7, 2]))
        ...     again = dk.ReferenceFeatures(path, fingerprint="demo").lookup([7])[0]
        >>> ref_img.shape, ref_txt.dtype, torch.equal(again, ref_img[:1])
        (torch.Size([2, 3]), torch.float16, True)
    """

    def __init__(self, path, *, fingerprint: str, num_samples: int | None = None, dim_img: int | None = None,
                 dim_txt: int | None = None, dtype=None, verify: str = "lazy", require_complete: bool = False):
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint: expected the str given to ReferenceFeatures.build, got {fingerprint!r}")
        if verify not in ("lazy", "full", "none"):
            raise ValueError(f"verify: expected 'lazy', 'full' or 'none', got {verify!r}")
        self.path = Path(path)
        self._args = dict(fingerprint=fingerprint, num_samples=num_samples, dim_img=dim_img, dim_txt=dim_txt,
                          dtype=dtype, verify=verify, require_complete=require_complete)
        self._open()

    # -- opening ---------------------------------------------------------------------------------

    def _open(self) -> None:
        a = self._args
        header = _read_header(self.path)
        if header["fingerprint"] != a["fingerprint"]:
            raise CacheMismatchError(f"ReferenceFeatures: {self.path} was built with fingerprint "
                                     f"{header['fingerprint']!r}, expected {a['fingerprint']!r} (another encoder "
                                     "or dataset: rebuild it, or pass the right fingerprint)")
        expect = dict(num_samples=a["num_samples"], dim_img=a["dim_img"], dim_txt=a["dim_txt"],
                      dtype=None if a["dtype"] is None else _dtype_name(a["dtype"]))
        for key, want in expect.items():
            if want is not None and header[key] != want:
                raise CacheMismatchError(f"ReferenceFeatures: {self.path} has {key} = {header[key]!r}, expected "
                                         f"{want!r}")
        for kind, name in DATA_FILES.items():
            file = self.path / name
            size = file.stat().st_size if file.is_file() else None
            if size != header["files"][kind]["bytes"]:
                raise CacheMismatchError(f"ReferenceFeatures: {file} is {size} bytes, the header says "
                                         f"{header['files'][kind]['bytes']} ({header['num_samples']} x "
                                         f"{header[f'dim_{kind}']} {header['dtype']}): truncated or replaced")
        if sys.byteorder != "little":
            raise ReferenceFeaturesError("ReferenceFeatures: caches are little-endian; this machine is big-endian")
        self.header = header
        self._crcs = _read_logs(self.path, header["num_chunks"])
        self._built = torch.zeros(header["num_chunks"], dtype=torch.bool)
        if self._crcs:
            self._built[torch.tensor(sorted(self._crcs))] = True
        self._verified: set[int] = set()
        dtype = DTYPES[header["dtype"]]
        self._maps = {}
        for kind, name in DATA_FILES.items():
            n, d = header["num_samples"], header[f"dim_{kind}"]
            # shared=False: a private, read-only-on-disk mapping; pages are read on demand.
            self._maps[kind] = torch.from_file(str(self.path / name), shared=False, size=n * d,
                                               dtype=dtype).view(n, d)
        if a["require_complete"] and not self.is_complete:
            missing = self.missing_chunks()
            raise NotBuiltError(f"ReferenceFeatures: {self.path} is incomplete: {len(missing)} of "
                                f"{self.num_chunks} chunks never built (first: {missing[:5]}); resume the build")
        if a["verify"] == "full":
            self.verify()

    def __getstate__(self):             # DataLoader workers: reopen instead of pickling the mappings
        return {"path": str(self.path), "args": self._args}

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self._args = state["args"]
        self._open()

    def refresh(self) -> None:
        """Re-read the header and the logs (chunks committed since this object was opened)."""
        self._open()

    # -- properties ------------------------------------------------------------------------------

    num_samples = property(lambda self: self.header["num_samples"])
    dim_img = property(lambda self: self.header["dim_img"])
    dim_txt = property(lambda self: self.header["dim_txt"])
    chunk_size = property(lambda self: self.header["chunk_size"])
    num_chunks = property(lambda self: self.header["num_chunks"])
    make_fingerprint = staticmethod(fingerprint)          # the module function (before the name is reused)
    fingerprint = property(lambda self: self.header["fingerprint"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.header["dtype"]]

    @property
    def is_complete(self) -> bool:
        return bool(self._built.all())

    def missing_chunks(self) -> list[int]:
        return (~self._built).nonzero().flatten().tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"ReferenceFeatures({str(self.path)!r}, num_samples={self.num_samples}, dim_img={self.dim_img}, "
                f"dim_txt={self.dim_txt}, dtype={self.header['dtype']}, chunks built "
                f"{int(self._built.sum())}/{self.num_chunks})")

    # -- checks ----------------------------------------------------------------------------------

    def _chunk_bytes(self, kind: str, chunk: int) -> bytes:
        c, d = self.chunk_size, self.header[f"dim_{kind}"]
        start, stop = chunk * c, min((chunk + 1) * c, self.num_samples)
        esize = self.dtype.itemsize
        with open(self.path / DATA_FILES[kind], "rb") as f:
            f.seek(start * d * esize)
            return f.read((stop - start) * d * esize)

    def _verify_chunk(self, chunk: int) -> None:
        want = self._crcs[chunk]
        for kind, crc in zip(("img", "txt"), want, strict=True):
            got = _crc(self._chunk_bytes(kind, chunk))
            if got != crc:
                c = self.chunk_size
                last = min((chunk + 1) * c, self.num_samples) - 1
                raise CorruptChunkError(f"ReferenceFeatures: chunk {chunk} (dataset indices {chunk * c}..{last}) of "
                                        f"{self.path / DATA_FILES[kind]} is corrupted: CRC-32 {got}, recorded {crc} "
                                        "when written; rebuild the cache (or restore the file)")
        self._verified.add(chunk)

    def verify(self) -> None:
        """Check the checksum of every built chunk now; raise :class:`CorruptChunkError` on the first bad one."""
        for chunk in sorted(self._crcs):
            if chunk not in self._verified:
                self._verify_chunk(chunk)

    # -- lookup ----------------------------------------------------------------------------------

    def lookup(self, index, *, device=None, pin_memory: bool = False, dtype: torch.dtype | None = None):
        """``(ref_img, ref_txt)``: ``[B, dim_img]`` and ``[B, dim_txt]`` rows of the dataset indices ``index``.

        Args:
            index: ``[B]`` integer tensor (any device) or sequence of ints; repeats are allowed.
            device: move the result there (``non_blocking`` when pinned); default: CPU.
            pin_memory: gather into page-locked host memory (needs an accelerator) so that the copy to
                the GPU overlaps with compute.
            dtype: cast the result (default: the stored dtype; the loss casts to the embeddings' dtype).
        """
        idx = index if isinstance(index, torch.Tensor) else torch.as_tensor(index)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex() or idx.dim() != 1:
            raise TypeError(f"index: expected a 1-D integer tensor or sequence of dataset indices, got "
                            f"{tuple(idx.shape)} {idx.dtype}")
        idx = idx.to("cpu", torch.int64)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_samples:
                raise IndexError(f"index: expected dataset indices in [0, {self.num_samples}) (the cache's "
                                 f"num_samples), got {lo if lo < 0 else hi}")
        chunks = torch.unique(idx // self.chunk_size)
        unbuilt = chunks[~self._built[chunks]]
        if unbuilt.numel():
            bad = idx[torch.isin(idx // self.chunk_size, unbuilt)]
            raise NotBuiltError(f"ReferenceFeatures: dataset indices {bad[:5].tolist()} lie in chunks "
                                f"{unbuilt[:5].tolist()} of {self.path}, which were never built (interrupted "
                                "build?): resume ReferenceFeatures.build")
        if self._args["verify"] != "none":
            for chunk in chunks.tolist():
                if chunk not in self._verified:
                    self._verify_chunk(chunk)
        out = []
        for kind in ("img", "txt"):
            mm = self._maps[kind]
            if pin_memory:
                try:
                    buf = torch.empty((idx.numel(), mm.shape[1]), dtype=mm.dtype, pin_memory=True)
                except RuntimeError as exc:
                    raise RuntimeError(f"lookup(pin_memory=True): pinned memory needs an accelerator here "
                                       f"({exc}); use pin_memory=False") from None
                torch.index_select(mm, 0, idx, out=buf)
            else:
                buf = torch.index_select(mm, 0, idx)
            if dtype is not None and dtype != buf.dtype:        # cast into pinned memory too, when pinned
                buf = torch.empty_like(buf, dtype=dtype, pin_memory=pin_memory).copy_(buf)
            if device is not None:
                buf = buf.to(device, non_blocking=pin_memory)
            out.append(buf)
        return out[0], out[1]

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def build(cls, path, encoder, dataset, *, fingerprint: str, dtype="float16", chunk_size: int = 2048,
              batch_size: int = 256, collate_fn=None, num_workers: int = 0, progress=True,
              process_group=None, overwrite: bool = False, verify: str = "lazy") -> "ReferenceFeatures":
        """Encode every sample of ``dataset`` once and store the embeddings; resume an interrupted build.

        Args:
            path: the cache directory (created).
            encoder: ``encoder(batch) -> (img_features [b, dim_img], txt_features [b, dim_txt])``, called
                under ``torch.no_grad()`` on the batches of ``dataset`` (any device, any float dtype; the
                reference model's normalized embeddings, as the loss would receive them).
            dataset: a map-style dataset (``len`` and ``dataset[i]``); sample ``i`` is dataset index ``i``.
                Batches are collated with ``collate_fn`` (default: PyTorch's default collate) by a
                ``DataLoader`` with ``num_workers``.
            fingerprint: a string identifying encoder and data (see :func:`fingerprint`); stored, and
                required to match when the cache is opened or the build resumed.
            dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"`` (or the torch dtype).
            chunk_size: rows per chunk, the unit of checksums and of resuming.
            progress: a progress bar (tqdm if installed) on rank 0.
            process_group: ``None`` (one process), ``"world"`` or a ``ProcessGroup``: the missing chunks are
                split across the ranks, which all write into the same directory (a shared file system).
                Every rank must call ``build``.
            overwrite: discard an existing cache at ``path`` instead of resuming it.

        Resuming: if ``path`` holds a cache with the same fingerprint, ``num_samples``, dtype and
        ``chunk_size``, only the chunks that no log records are encoded; a different one raises
        :class:`CacheMismatchError` (use ``overwrite=True``). Returns the opened cache (every rank).
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(f"fingerprint: expected a non-empty str identifying encoder and data, got {fingerprint!r}")
        dtype = _dtype_name(dtype)
        for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not callable(encoder):
            raise TypeError(f"encoder: expected a callable batch -> (img, txt), got {type(encoder).__name__}")
        num_samples = len(dataset)
        if num_samples < 1:
            raise ValueError("dataset: expected at least one sample")
        root = Path(path)
        group = _Group(process_group)
        lock = _WriterLock(root)
        first = None                                  # rank 0's first batch when it fixes the dims
        error = None
        try:
            if group.rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                if (root / HEADER).exists() and not overwrite:
                    header = _read_header(root)
                    want = dict(fingerprint=fingerprint, num_samples=num_samples, dtype=dtype, chunk_size=chunk_size)
                    for key, value in want.items():
                        if header[key] != value:
                            raise CacheMismatchError(
                                f"ReferenceFeatures.build: {root} holds a cache with {key} = {header[key]!r}, this "
                                f"build has {value!r}; pass overwrite=True to discard it, or another path")
                    for kind, name in DATA_FILES.items():
                        file = root / name
                        size = file.stat().st_size if file.is_file() else None
                        if size != header["files"][kind]["bytes"]:
                            raise CacheMismatchError(
                                f"ReferenceFeatures.build: {file} is {size} bytes, its header says "
                                f"{header['files'][kind]['bytes']}: truncated or replaced; pass overwrite=True")
                else:
                    rows = torch.arange(min(batch_size, chunk_size, num_samples))
                    batch = _collate(collate_fn)([dataset[i] for i in rows.tolist()])
                    with torch.no_grad():
                        first = (rows, _check_output(encoder(batch), rows, DTYPES[dtype], None))
                    dims = first[1][0].shape[1], first[1][1].shape[1]
                    _create(root, num_samples, dims[0], dims[1], dtype, chunk_size, fingerprint)
        except BaseException as exc:      # noqa: BLE001 (re-raised on every rank by agree)
            error = exc
        try:
            group.agree(error)
            header = _read_header(root)
            done = _read_logs(root, header["num_chunks"])
            missing = [k for k in range(header["num_chunks"]) if k not in done]
            mine = missing[group.rank::group.world]
            _encode_chunks(root, header, mine, encoder, dataset, first, batch_size, collate_fn, num_workers,
                           progress and group.rank == 0, group.rank)
            group.barrier()
        finally:
            lock.release()
        return cls(root, fingerprint=fingerprint, verify=verify)


def _collate(collate_fn):
    if collate_fn is not None:
        return collate_fn
    from torch.utils.data import default_collate
    return default_collate


def _encode_chunks(root: Path, header: dict, chunks: list[int], encoder, dataset, first, batch_size: int,
                   collate_fn, num_workers: int, progress, rank: int) -> None:
    if not chunks:
        return
    from torch.utils.data import DataLoader
    c, n = header["chunk_size"], header["num_samples"]
    batches = []
    for k in chunks:
        start, stop = k * c, min((k + 1) * c, n)
        for lo in range(start, stop, batch_size):
            rows = list(range(lo, min(lo + batch_size, stop)))
            if first is not None and rows[0] == 0:
                continue                                   # already encoded to learn the dims
            batches.append(rows)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_collate(collate_fn), num_workers=num_workers)
    bar = _progress(sum(min((k + 1) * c, n) - k * c for k in chunks), progress, "reference features")
    writer = _ChunkWriter(root, header, rank)
    pending: dict[int, list] = {}                          # chunk -> [img rows, txt rows, rows filled]

    def add(rows: torch.Tensor, img: torch.Tensor, txt: torch.Tensor) -> None:
        k = int(rows[0]) // c
        start, stop = k * c, min((k + 1) * c, n)
        if k not in pending:
            dt = DTYPES[header["dtype"]]
            pending[k] = [torch.empty(stop - start, header["dim_img"], dtype=dt),
                          torch.empty(stop - start, header["dim_txt"], dtype=dt), 0]
        entry = pending[k]
        entry[0][rows - start] = img
        entry[1][rows - start] = txt
        entry[2] += rows.numel()
        if entry[2] == stop - start:                   # every row of the chunk is there: commit it
            writer.commit(k, entry[0], entry[1])
            del pending[k]
        if bar is not None:
            bar.update(rows.numel())

    try:
        if first is not None:
            add(first[0], *first[1])
        batch_iter = iter(loader)
        for rows in batches:
            batch = next(batch_iter)
            rows = torch.tensor(rows)
            with torch.no_grad():
                img, txt = _check_output(encoder(batch), rows, DTYPES[header["dtype"]], header)
            add(rows, img, txt)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
