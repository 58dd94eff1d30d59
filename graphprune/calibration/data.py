"""Calibration data sources, streamed one feed (a batch of samples) at a time.

Every source yields ``(label, feed)`` pairs: ``label`` says where the feed came from for error messages, ``feed``
maps model input names to arrays. :func:`open_source` picks the source for what the user passed.
"""

from __future__ import annotations

import contextlib
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx

from graphprune.calibration.signature import InputSpec
from graphprune.errors import GraphpruneError

Labelled = tuple[str, Mapping[str, Any]]


class Source(ABC):
    """A stream of feeds; ``total`` is the number of samples when known in advance (for the progress bar)."""

    total: int | None = None
    warnings: list[str]

    def __init__(self) -> None:
        self.warnings = []

    @abstractmethod
    def __iter__(self) -> Iterator[Labelled]: ...


class ArraySource(Source):
    """In-memory arrays, one per input with the batch along axis 0, split into batches."""

    def __init__(self, arrays: Mapping[str, Any], batch_size: int, origin: str = "arrays") -> None:
        super().__init__()
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_size = _check_batch_size(batch_size)
        self.origin = origin
        self.total = _common_length({k: a.shape for k, a in self.arrays.items()}, origin)

    def __iter__(self) -> Iterator[Labelled]:
        assert self.total is not None
        for start in range(0, self.total, self.batch_size):
            stop = min(start + self.batch_size, self.total)
            yield f"{self.origin} rows {start}:{stop}", {k: a[start:stop] for k, a in self.arrays.items()}


class NpzSource(Source):
    """An ``.npz`` file with one array per input (batch along axis 0), read batch by batch from the archive."""

    def __init__(self, path: Path, batch_size: int) -> None:
        super().__init__()
        self.path = path
        self.batch_size = _check_batch_size(batch_size)
        headers = {}
        with _archive(path) as zf:
            for member in _npy_members(zf, path):
                with zf.open(member) as fp:
                    shape, _, dtype = _read_header(fp, path, member)
                    need = fp.tell() + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
                size = zf.getinfo(member).file_size
                if size != need:  # a cut-off (or padded) member, found before any work rather than mid-run
                    state = "truncated" if size < need else "longer than its header says"
                    detail = f"{size} bytes, shape {list(shape)} needs {need}"
                    raise GraphpruneError(f"{path}: array {member[:-4]!r} is {state} ({detail})")
                headers[member[:-4]] = shape
        self.total = _common_length(headers, str(path))

    def __iter__(self) -> Iterator[Labelled]:
        assert self.total is not None
        with _archive(self.path) as zf:
            readers = {m[:-4]: _RowReader(zf.open(m), self.path, m) for m in _npy_members(zf, self.path)}
            try:
                for start in range(0, self.total, self.batch_size):
                    n = min(self.batch_size, self.total - start)
                    yield f"{self.path.name} rows {start}:{start + n}", {k: r.read(n) for k, r in readers.items()}
            finally:
                for r in readers.values():
                    r.close()


class NpzDirSource(Source):
    """A directory of ``.npz`` files, each one feed (one array per input)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.files = sorted(path.glob("*.npz"))
        if not self.files:
            raise GraphpruneError(f"calibration directory {path} holds no .npz files")

    def __iter__(self) -> Iterator[Labelled]:
        for f in self.files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    feed = {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise GraphpruneError(f"cannot read calibration file {f}: {_reason(exc)}") from None
            yield f.name, feed


class IterableSource(Source):
    """Any iterable of ``{input name: array}`` dicts, or an object with ``get_next()`` returning None at the end
    (onnxruntime's ``CalibrationDataReader``)."""

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.data = data  # its length, if any, counts feeds, not samples: the progress bar stays open-ended

    def __iter__(self) -> Iterator[Labelled]:
        get_next = getattr(self.data, "get_next", None)
        if callable(get_next):
            i = 0
            while (feed := get_next()) is not None:
                yield f"item {i} of the data reader", feed
                i += 1
            return
        for i, feed in enumerate(self.data):
            yield f"item {i} of the calibration data", feed


def open_source(
    data: Any,
    model: onnx.ModelProto,
    specs: Sequence[InputSpec],
    *,
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    seqlen: int = 512,
    nsamples: int = 128,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Source:
    """The source for ``data``: None, a path (.npz, directory, text with a tokenizer), arrays, an iterable."""
    if isinstance(data, Source):
        return data
    if data is None:
        from graphprune.calibration.synthetic import SyntheticSource

        return SyntheticSource(model, specs, shapes or {}, nsamples=nsamples, seed=seed)
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.exists():
            raise GraphpruneError(f"calibration data not found: {path}")
        if path.is_dir():
            return NpzDirSource(path)
        if path.suffix == ".npz":
            return NpzSource(path, batch_size)
        if tokenizer is not None:
            from graphprune.calibration.text import TextSource

            return TextSource(
                path, Path(tokenizer), specs, seqlen=seqlen, nsamples=nsamples, seed=seed, batch_size=batch_size
            )
        raise GraphpruneError(
            f"calibration data {path}: expected an .npz file, a directory of .npz files, "
            "or a text file together with a `tokenizer` (a tokenizer.json)"
        )
    if isinstance(data, Mapping):
        return ArraySource(data, batch_size)
    if hasattr(data, "get_next") or isinstance(data, Iterable):
        return IterableSource(data)
    raise GraphpruneError(f"unsupported calibration data of type {type(data).__name__}")


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise GraphpruneError(f"batch size must be at least 1, got {batch_size}")
    return batch_size


def _common_length(shapes: Mapping[str, tuple[int, ...]], origin: str) -> int:
    if not shapes:
        raise GraphpruneError(f"{origin} holds no arrays")
    scalars = [k for k, s in shapes.items() if not s]
    if scalars:
        raise GraphpruneError(f"{origin}: array {scalars[0]!r} is a scalar; arrays need the batch along axis 0")
    lengths = {k: s[0] for k, s in shapes.items()}
    if len(set(lengths.values())) > 1:
        raise GraphpruneError(f"{origin}: arrays differ in length along axis 0: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise GraphpruneError(f"{origin} holds no samples")
    return n


@contextlib.contextmanager
def _archive(path: Path) -> Iterator[zipfile.ZipFile]:
    """The .npz as a zip archive; anything unreadable in it (not a zip, a bad CRC) is one line."""
    try:
        with zipfile.ZipFile(path) as zf:
            yield zf
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise GraphpruneError(f"cannot read {path}: {_reason(exc)}") from None


def open_npz(path: Path, what: str) -> np.lib.npyio.NpzFile:
    """``np.load`` of an ``.npz`` archive (never pickles), or a one-line error: a plain ``.npy``, not a zip."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except IsADirectoryError:
        raise GraphpruneError(f"{path} is a directory, not an .npz archive of {what}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise GraphpruneError(f"cannot read {what} from {path}: {_reason(exc)}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise GraphpruneError(f"{path} is a single .npy array, not an .npz archive of {what}")
    return loaded


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, zipfile.BadZipFile) or "pickle" in text:  # numpy's words for "not an .npz"
        return f"not a valid .npz archive ({text})" if "pickle" not in text else "not a valid .npz archive"
    return text


def _npy_members(zf: zipfile.ZipFile, path: Path) -> list[str]:
    members = [m for m in zf.namelist() if m.endswith(".npy")]
    if not members:
        raise GraphpruneError(f"{path} holds no arrays")
    return members


def _read_header(fp: IO[bytes], path: Path, member: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        header = fmt.read_array_header_1_0(fp) if version == (1, 0) else fmt.read_array_header_2_0(fp)
    except ValueError as exc:
        raise GraphpruneError(f"cannot read array {member[:-4]!r} of {path}: {exc}") from None
    shape, fortran, dtype = header
    if dtype.hasobject:
        raise GraphpruneError(f"{path}: array {member[:-4]!r} holds Python objects; use numeric arrays")
    return tuple(shape), fortran, dtype


class _RowReader:
    """Reads consecutive rows (along axis 0) of one ``.npy`` member without loading the rest."""

    def __init__(self, fp: IO[bytes], path: Path, member: str) -> None:
        self.fp, self.path, self.member = fp, path, member
        self.shape, fortran, self.dtype = _read_header(fp, path, member)
        self.whole: np.ndarray | None = None
        if fortran:  # rows are not contiguous: load this (unusual) array once
            with zipfile.ZipFile(path) as zf, zf.open(member) as whole:
                self.whole = np.lib.format.read_array(whole, allow_pickle=False)
        self.pos = 0
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def read(self, n: int) -> np.ndarray:
        if self.whole is not None:
            rows = self.whole[self.pos : self.pos + n]
        else:
            buf = self.fp.read(n * self.row_bytes)
            if len(buf) != n * self.row_bytes:
                raise GraphpruneError(f"{self.path}: array {self.member[:-4]!r} is truncated")
            rows = np.frombuffer(buf, dtype=self.dtype).reshape((n, *self.shape[1:]))
        self.pos += n
        return rows

    def close(self) -> None:
        self.fp.close()
