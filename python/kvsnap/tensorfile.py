"""Safetensors files with a checksum per tensor: a strict reader, an atomic writer.

kvsnap's snapshot files are plain safetensors (an 8-byte little-endian header
length, a JSON header, the tensors' bytes back to back), readable by the
``safetensors`` package and ``mx.load``. On top of that format, kvsnap adds:

- a 64-bit xxh3 checksum of every tensor's bytes, in the header metadata under
  ``xxh3.<tensor name>``, and one of the header itself under ``xxh3.__header__``;
- the header checksum covers the header's raw bytes (padding included, its
  own 16 hex digits read as zeros) and is checked before the JSON is parsed,
  so every bit of a file is covered: the header by it, the data by the
  tensor checksums, the length prefix by both. kvsnap writes the header in a
  canonical form (sorted keys, no spaces, ASCII, padded with spaces so the
  data starts on a 64-byte boundary); readers do not depend on it.

The reader reads tensors straight into caller-given buffers (arena slots) with
one ``preadv`` per run of consecutive tensors and verifies them in place. The
writer writes to a temporary name, fsyncs and renames (crash-safe); the caller
fsyncs the folder once per batch. docs/FORMAT.md is the reference.

Every OS call of the writer goes through ``OS_CALLS``; ``os_calls(...)``
replaces some for a ``with`` block, which is how the tests inject faults (a
short write then ENOSPC, EIO, a failing fsync or rename). A failed write
raises ``StoreWriteError`` (``StoreFullError`` for a full disk) naming the
file, with the OS error number, and leaves no temporary file behind.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import xxhash

from kvsnap.errors import CorruptSnapshotError, StoreError, StoreFullError, StoreWriteError

DTYPES = {"U32": np.dtype("<u4"), "F16": np.dtype("<f2"), "I32": np.dtype("<i4")}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}
_CODE_OF = {v.str: k for k, v in DTYPES.items()}  # numpy dtype.str ('<u4') -> code
_TABLES: dict[tuple[int, int], tuple[dict, dict, int]] = {}  # see TensorFile._tensor_table
ALIGN = 64  # the data section starts on this boundary
MAX_HEADER_BYTES = 100_000_000  # as the safetensors package
HEADER_CHECKSUM = "xxh3.__header__"
_HEADER_CHECKSUM_KEY = b'"xxh3.__header__":"'
TMP_PREFIX = ".tmp-"
_IOV_MAX = 1024
_ZERO_SUM = "0" * 16


def checksum(buffer) -> str:
    """The xxh3-64 checksum of a buffer's bytes, as 16 lowercase hex digits."""
    return format(xxhash.xxh3_64_intdigest(buffer), "016x")


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


def _canonical(header: dict) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    pad = -(8 + len(text)) % ALIGN
    return text + b" " * pad


def encode_header(tensors: Sequence[tuple[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    """The header (with its length prefix) of a file holding ``tensors`` in that order."""
    header: dict = {}
    meta = dict(metadata)
    offset = 0
    for name, array in tensors:
        code = DTYPE_CODES.get(array.dtype.newbyteorder("<"))
        if code is None:
            raise StoreError(f"{name}: dtype {array.dtype} cannot be stored")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        meta[f"xxh3.{name}"] = checksum(_bytes_view(array))
        offset += array.nbytes
    meta[HEADER_CHECKSUM] = _ZERO_SUM
    header["__metadata__"] = meta
    meta[HEADER_CHECKSUM] = checksum(_canonical(header))
    text = _canonical(header)
    return len(text).to_bytes(8, "little") + text


def _bytes_view(array: np.ndarray) -> memoryview:
    if not array.flags.c_contiguous:
        raise StoreError("internal: tensors must be C-contiguous")
    return memoryview(array).cast("B") if array.nbytes else memoryview(b"")


# The OS calls the writer makes: the fault-injection point (see os_calls).
OS_CALLS = SimpleNamespace(open=os.open, writev=os.writev, fsync=os.fsync, replace=os.replace)


@contextmanager
def os_calls(**replacements) -> Iterator[None]:
    """Replace some of the writer's OS calls (``open``, ``writev``, ``fsync``,
    ``replace``) inside a ``with`` block: the hook tests inject faults with."""
    unknown = set(replacements) - set(vars(OS_CALLS))
    if unknown:
        raise ValueError(f"no OS call {sorted(unknown)} to replace")
    saved = {name: getattr(OS_CALLS, name) for name in replacements}
    vars(OS_CALLS).update(replacements)
    try:
        yield
    finally:
        vars(OS_CALLS).update(saved)


def write_error(path: Path, doing: str, e: OSError) -> StoreWriteError:
    """The kvsnap error for an OS error while writing ``path``."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = "; free space on that disk (the previous snapshots are intact)" if full else ""
    cls = StoreFullError if full else StoreWriteError
    return cls(f"{path}: cannot {doing}: {e.strerror or e}{hint}", path, e.errno)


def _writev_all(fd: int, buffers: list[memoryview]) -> None:
    views = [b for b in buffers if len(b)]
    while views:
        n = OS_CALLS.writev(fd, views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def write_file(path: Path, tensors: Sequence[tuple[str, np.ndarray]], metadata: dict[str, str]) -> int:
    """Write a safetensors file crash-safely; returns its size in bytes.

    The bytes go to a temporary name in the same folder (mode 0600), are
    fsynced, and the file is renamed into place: a reader sees the old file or
    the new one, never a part. Fsync the folder afterwards to make the rename
    itself durable (once per batch of files: ``fsync_dir``).
    """
    header = encode_header(tensors, metadata)
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{path.name}"
    try:
        fd = OS_CALLS.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise write_error(path, "create a temporary file beside it", e) from e
    doing = "write"
    try:
        try:
            _writev_all(fd, [memoryview(header), *(_bytes_view(a) for _, a in tensors)])
            doing = "fsync"
            OS_CALLS.fsync(fd)
        finally:
            os.close(fd)
        doing = "rename its temporary file into place"
        OS_CALLS.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, doing, e) from e
        raise
    return len(header) + sum(a.nbytes for _, a in tensors)


def fsync_dir(path: Path) -> None:
    """Make the renames in folder ``path`` durable (StoreWriteError if the OS refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            OS_CALLS.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(path, "fsync the folder", e) from e


class TensorFile:
    """A kvsnap safetensors file opened for verified reading.

    Opening reads and validates the whole header (structure, canonical form,
    header checksum, tensors covering the data section exactly, the file's
    size); a fault raises ``CorruptSnapshotError`` naming the file. Tensor
    bytes are checked against their checksums as they are read.
    """

    def __init__(self, path: str | os.PathLike, *, follow_symlinks: bool = True):
        self.path = Path(path)
        flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
        try:
            self._fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.ELOOP and not follow_symlinks:
                raise StoreError(
                    f"{self.path}: is a symbolic link; a store holds only its own files (remove the link)",
                    self.path,
                ) from None
            raise StoreError(f"{self.path}: cannot open: {e.strerror}", self.path) from e
        try:
            self.size = os.fstat(self._fd).st_size
            self.metadata, self.tensors = self._read_header()
        except OSError as e:
            os.close(self._fd)
            raise StoreError(f"{self.path}: cannot read: {e.strerror or e}", self.path) from e
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def corrupt(self, fault: str) -> CorruptSnapshotError:
        return CorruptSnapshotError(f"{self.path}: {fault}", self.path)

    def _read_header(self):
        if self.size < 8:
            raise self.corrupt(f"truncated: {self.size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if n > MAX_HEADER_BYTES or n > self.size - 8:
            raise self.corrupt(f"header length {n} does not fit a file of {self.size} bytes (truncated or corrupt)")
        raw = os.pread(self._fd, n, 8)
        if len(raw) != n:
            raise self.corrupt("truncated inside the header")
        # The header checksum covers the raw bytes (with its own value zeroed),
        # so it is checked before parsing: a damaged header is never parsed.
        at = raw.find(_HEADER_CHECKSUM_KEY)
        if at < 0 or raw.find(_HEADER_CHECKSUM_KEY, at + 1) >= 0:
            raise self.corrupt("the header checksum (xxh3.__header__) is missing or repeated")
        value = at + len(_HEADER_CHECKSUM_KEY)
        stated = raw[value : value + 16]
        if checksum(raw[:value] + _ZERO_SUM.encode() + raw[value + 16 :]) != stated.decode("latin-1"):
            raise self.corrupt("header checksum mismatch (the header was altered)")
        try:
            header = json.loads(raw.decode("ascii"))
        except (ValueError, RecursionError) as e:  # JSON and Unicode errors are ValueErrors
            raise self.corrupt(f"header is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(header, dict):
            raise self.corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if not isinstance(metadata, dict) or not all(
            type(k) is str and type(v) is str for k, v in metadata.items()
        ):
            raise self.corrupt("__metadata__ is missing or not a map of strings")
        if metadata.pop(HEADER_CHECKSUM, None) != stated.decode("latin-1"):
            raise self.corrupt("the header checksum is not in __metadata__")
        tensors, position = self._tensor_table(header, 8 + n)
        for name in tensors:
            if f"xxh3.{name}" not in metadata:
                raise self.corrupt(f"tensor {name!r} has no checksum")
        if position != self.size:
            raise self.corrupt(
                f"truncated: the header describes {position} bytes, the file has {self.size}"
                if position > self.size
                else f"{self.size - position} bytes after the last tensor"
            )
        return metadata, tensors

    def _tensor_table(self, header: dict, data_start: int) -> tuple[dict[str, TensorInfo], int]:
        """The validated tensors in file order, and where the last one ends.

        Block files of one cache share their tensor table (only checksums
        differ): a table equal to one validated before is taken from a small
        cache, which saves most of a load's parsing time.
        """
        key = (data_start, len(header))
        hit = _TABLES.get(key)
        if hit is not None and hit[0] == header:
            return hit[1], hit[2]
        tensors = {}
        for name, entry in sorted(header.items(), key=lambda kv: _offsets_key(kv[1])):
            tensors[name] = self._tensor_info(name, entry, data_start)
        position = data_start
        for name, info in tensors.items():
            if info.start != position:
                raise self.corrupt(f"tensor {name!r} does not start where the previous one ends")
            position = info.end
        if len(_TABLES) >= 16:
            _TABLES.clear()
        _TABLES[key] = (header, tensors, position)
        return tensors, position

    def _tensor_info(self, name: str, entry, data_start: int) -> TensorInfo:
        # Plain type checks (bool is not an int here): this runs for every
        # tensor of every block file a load opens.
        if type(entry) is not dict or len(entry) != 3:
            raise self.corrupt(f"tensor {name!r}: malformed entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            raise self.corrupt(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if type(shape) is not list:
            raise self.corrupt(f"tensor {name!r}: malformed shape")
        nbytes = itemsize
        for d in shape:
            if type(d) is not int or d < 0:
                raise self.corrupt(f"tensor {name!r}: malformed shape")
            nbytes *= d
        if type(offsets) is not list or len(offsets) != 2:
            raise self.corrupt(f"tensor {name!r}: malformed data_offsets")
        start, end = offsets
        if type(start) is not int or type(end) is not int or start < 0 or end - start != nbytes:
            raise self.corrupt(f"tensor {name!r}: data_offsets do not match dtype {dtype} and shape {shape}")
        return TensorInfo(dtype, tuple(shape), data_start + start, data_start + end)

    def info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise self.corrupt(f"tensor {name!r} is missing")
        return info

    def read(self, name: str, *, dtype: str | None = None, shape: Sequence[int] | None = None) -> np.ndarray:
        """A verified copy of one tensor (optionally checking its dtype and shape)."""
        info = self._expect(name, dtype, shape)
        out = np.empty(info.shape, DTYPES[info.dtype])
        self.read_into([(name, out)])
        return out

    def _expect(self, name: str, dtype: str | None, shape: Sequence[int] | None) -> TensorInfo:
        info = self.info(name)
        if dtype is not None and info.dtype != dtype:
            raise self.corrupt(f"tensor {name!r}: dtype {info.dtype}, expected {dtype}")
        if shape is not None and info.shape != tuple(shape):
            raise self.corrupt(f"tensor {name!r}: shape {list(info.shape)}, expected {list(shape)}")
        return info

    def read_into(self, pairs: Iterable[tuple[str, np.ndarray]]) -> None:
        """Read tensors into C-contiguous arrays of their dtype and shape, verified
        (preadv raises BufferError for other arrays).

        Tensors that follow each other in the file are read with one preadv.
        """
        runs: list[tuple[int, list[np.ndarray]]] = []
        checks = []
        end = -1
        tensors = self.tensors
        for name, out in pairs:
            info = tensors.get(name)
            if info is None or info.shape != out.shape or info.dtype != _CODE_OF.get(out.dtype.str):
                self._expect(name, _CODE_OF.get(out.dtype.str), out.shape)  # raises, naming the fault
            if info.start == end:
                runs[-1][1].append(out)
            else:
                runs.append((info.start, [out]))
            end = info.end
            checks.append((name, out))
        try:
            for start, buffers in runs:
                self._preadv_all(buffers, start)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot read: {e.strerror or e}", self.path) from e
        metadata = self.metadata
        for name, out in checks:
            if checksum(out) != metadata[f"xxh3.{name}"]:
                raise self.corrupt(f"tensor {name!r}: checksum mismatch (data corrupt)")

    def _preadv_all(self, buffers: list, offset: int) -> None:
        buffers = [b for b in buffers if b.nbytes]
        while buffers:
            n = os.preadv(self._fd, buffers[:_IOV_MAX], offset)
            if n == 0:
                raise self.corrupt("truncated while reading tensor data")
            offset += n
            while buffers and n >= buffers[0].nbytes:
                n -= buffers[0].nbytes
                buffers.pop(0)
            if n:  # a short read: continue inside the first buffer
                buffers[0] = memoryview(buffers[0]).cast("B")[n:]

    def verify(self) -> None:
        """Read every tensor and check its checksum."""
        for name in self.tensors:
            self.read(name)


def _offsets_key(entry) -> tuple:
    try:
        start, end = entry["data_offsets"]
        return (0, int(start), int(end))
    except (TypeError, ValueError, KeyError, OverflowError):  # malformed: rejected later
        return (1, 0, 0)
