"""The one writer of every file graphprune produces: models with their external data, reports, statistics, engines.

A command first *plans* its outputs (:class:`OutputPlan`): every file it will write is checked, before any long
work starts, against every file it reads (by real path and inode, so ``out.onnx.data`` that the input model keeps
its weights in, a symlink or a hard link to an input are all caught) and against existing files (refused without
``force``). Then it writes them in one :class:`Transaction`: each file is staged in a hidden directory beside its
target, flushed to disk and given the user's umask; only when every file is staged are they renamed into place,
with SIGINT and SIGTERM deferred for those few renames. A model's external-data file gets a name no file has yet
(``<model>.data``, else ``<model>.1.data`` ...) and lands before the model that points to it, so an old model and
its data stay a matching pair until the new model replaces the old one; the old data file is removed last. On
failure or interruption the staging directories are removed, and the error says exactly which files were written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphprune.errors import GraphpruneError

_STAGING_PREFIX = ".graphprune-"
_journal: list[Path] = []  # files this process has committed since the command started (for interruption notes)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled exactly like SIGINT (Ctrl-C)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Around one command: SIGTERM raises :class:`Terminated` like SIGINT, and the journal starts empty."""
    _journal.clear()
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def written() -> list[Path]:
    """Files committed so far by the running command."""
    return list(_journal)


def interruption_note() -> str:
    """What an interruption left behind, in one line."""
    done = written()
    if not done:
        return "nothing was written"
    return "already written: " + ", ".join(str(p) for p in done)


def user_mode() -> int:
    """Permission bits a new file gets under the user's umask (0o666 & ~umask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the portable way, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def model_files(path: str | Path) -> list[Path]:
    """The model file and every external-data file it names, without reading any tensor data.

    Unreadable or non-ONNX files give just ``[path]``: loading the model reports those properly.
    """
    import onnx

    from graphprune.model_checks import stored_tensors

    path = Path(path)
    files = [path]
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return files
    seen: set[str] = set()
    for _, tensor in stored_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and location not in seen:
            seen.add(location)
            files.append(path.parent / location)
    return files


@dataclass
class _Output:
    path: Path
    kind: str  # "model", "report", "statistics", "engine", ...
    replace: bool = False  # may replace an existing file without force (a cache the command reads and updates)
    old_data: list[Path] = field(default_factory=list)  # a replaced model's data files, removed after the commit


class OutputPlan:
    """Every file a command will write, checked against what it reads and what exists before any work."""

    def __init__(self, reads: Iterable[str | Path | None] = (), force: bool = False) -> None:
        self.force = force
        self.reads: list[tuple[Path, str]] = []
        self.models: list[Path] = []  # input models: their external-data files are reads too
        self._model_data: dict[Path, list[Path]] = {}
        self.outputs: list[_Output] = []
        for read in reads:
            if read is not None:
                self.read(read)

    def read(self, path: str | Path, what: str = "an input") -> None:
        """Record a file (or directory) the command reads; a model also reads its external-data files."""
        path = Path(path)
        if what == "the input model":
            if path.is_file():  # else loading it says what is wrong with it
                self.reads.append((path, what))
                self.models.append(path)
        else:
            self.reads.append((path, what))

    def _reads_near(self, output: Path) -> list[tuple[Path, str]]:
        """What ``output`` must not be: the inputs and, when it exists where a model keeps its external data
        (the model's directory tree), that model's data files. Only then is a model parsed for them, so an
        ordinary run never reads a large inline model twice."""
        reads = list(self.reads)
        if os.path.lexists(output):
            for model in self.models:
                if _inside(output, model.parent):
                    if model not in self._model_data:
                        self._model_data[model] = model_files(model)[1:]
                    reads += [(f, "the input model's external data") for f in self._model_data[model]]
        return reads

    def model(self, path: str | Path) -> Path:
        """Plan a model file (its external-data file, if any, gets a fresh name at commit time)."""
        return self._add(path, "model")

    def file(self, path: str | Path, kind: str, replace: bool = False) -> Path:
        """Plan a file; ``replace`` lets it replace an existing file without ``force`` (a timing cache the
        command reads and updates on purpose)."""
        return self._add(path, kind, replace)

    def _add(self, path: str | Path, kind: str, replace: bool = False) -> Path:
        if Path(path).name in ("", "..") or str(path) == "":  # "" and "." (the same Path), "..", "dir/.."
            raise GraphpruneError(f"the {kind} path {str(path)!r} names no file: give the {kind} a file name")
        output = _Output(Path(path), kind, replace)
        self.outputs.append(output)
        return output.path

    def check(self) -> None:
        """Raise a one-line GraphpruneError for any output that would clobber an input, another output, a
        directory or (without ``force``) an existing file, or that cannot be created where it is asked for."""
        for i, output in enumerate(self.outputs):
            try:
                self._check_one(i, output)
            except OSError as exc:  # a name too long, a loop of links, a path through a file
                raise GraphpruneError(
                    f"cannot write the {output.kind} {output.path}: {exc.strerror or exc}"
                ) from None

    def _check_one(self, i: int, output: _Output) -> None:
        """One output against the inputs, the outputs before it and the file system."""
        path = output.path
        for other in self.outputs[:i]:
            if _same(path, other.path):
                raise GraphpruneError(f"the {output.kind} and the {other.kind} would both be written to {path}")
        for read, what in self._reads_near(path):
            if _same(path, read):
                raise GraphpruneError(f"{path} is {what}: the {output.kind} must go elsewhere")
            if read.is_dir() and _inside(path, read):
                raise GraphpruneError(
                    f"{path} is inside {read}, which is {what}: write the {output.kind} elsewhere"
                )
        if path.is_dir():
            raise GraphpruneError(f"{path} is a directory: give a file name for the {output.kind}")
        if os.path.lexists(path) and not (path.is_symlink() or path.is_file()):  # /dev/null, a FIFO, a socket
            raise GraphpruneError(f"{path} is not a regular file: the {output.kind} must go to a file")
        if os.path.lexists(path):
            if not (self.force or output.replace):
                raise GraphpruneError(f"{path} exists; pass `force=True` to overwrite it")
            if output.kind == "model" and _data_file_candidates(path):
                output.old_data = [f for f in model_files(path)[1:] if self._removable(path, f)]
        _check_writable_dir(path.parent, output.kind)

    def _removable(self, model: Path, data: Path) -> bool:
        """Only data files named after this model, beside it, that nothing else we touch uses, are removed."""
        if data not in _data_file_candidates(model):
            return False
        if not data.is_file() or not _same(data.parent, model.parent):
            return False
        return not any(_same(data, read) for read, _ in self._reads_near(data))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Stage the planned files; on a clean exit commit them all, otherwise write nothing."""
        self.check()  # again: files may have appeared while the command worked
        tx = Transaction(self)
        try:
            yield tx
        except BaseException:
            tx.abandon()
            raise
        tx.commit()


class Transaction:
    """Files staged beside their targets, renamed into place together by :meth:`commit`."""

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self.staged: dict[Path, Path] = {}  # final path -> staged file
        self.staged_data: dict[Path, list[Path]] = {}  # final model path -> its staged external-data files
        self.staging: dict[Path, Path] = {}  # target directory -> its staging directory
        self.created_dirs: list[Path] = []

    def model(self, path: Path, model: Any, external_data: bool | None = None) -> None:
        """Stage a model (and its external data) with ``graph.model_io.save_model``."""
        from graphprune.graph.model_io import save_model

        box = Path(tempfile.mkdtemp(prefix="model-", dir=self._staging(path)))
        stem = _fresh_data_stem(path)
        with _os_errors(path, "model"), _unwrapped_user_errors():
            save_model(model, box / stem, external_data=external_data)
        self.staged[path] = box / stem
        self.staged_data[path] = [f for f in sorted(box.iterdir()) if f.name != stem]
        for extra in self.staged_data[path]:
            if not extra.is_file():
                raise GraphpruneError(f"{path}: the model writer left a directory {extra.name}, expected files")

    def streamed_model(self, path: Path, model_file: Path, data_files: list[Path]) -> None:
        """Commit a model written elsewhere with the other files: a streamed output whose data file grew while it
        was pruned (``pipeline/streaming.py``). The data files must already carry the names the model points at,
        chosen by :func:`fresh_data_name` when the run started; they are moved at commit, never copied, and a
        file of the same name that appeared meanwhile is never replaced (the commit fails instead)."""
        for data in data_files:
            if os.path.lexists(path.parent / data.name):
                raise GraphpruneError(
                    f"{path.parent / data.name} appeared while the model was written; nothing was written"
                )
        self.staged[path] = model_file
        self.staged_data[path] = list(data_files)

    def json(self, path: Path, data: object, kind: str = "report") -> None:
        self.produce(path, lambda staged: staged.write_text(json.dumps(data, indent=1) + "\n"), kind)

    def bytes(self, path: Path, data: bytes, kind: str = "file") -> None:
        self.produce(path, lambda staged: staged.write_bytes(data), kind)

    def produce(self, path: Path, write: Callable[[Path], object], kind: str = "file") -> None:
        """Stage ``path`` by calling ``write(staged_path)``; the staged name keeps the target's suffix."""
        box = Path(tempfile.mkdtemp(prefix="file-", dir=self._staging(path)))
        staged = box / path.name
        with _os_errors(path, kind):
            write(staged)
        if not staged.is_file():
            raise GraphpruneError(f"internal error: nothing was staged for {path}")
        self.staged[path] = staged

    def _staging(self, path: Path) -> Path:
        directory = path.parent
        if directory not in self.staging:
            with _os_errors(path, "output"):
                self._make_dirs(directory)
                self.staging[directory] = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory))
        return self.staging[directory]

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for d in reversed(missing):
            d.mkdir()
            self.created_dirs.append(d)

    def commit(self) -> None:
        """Flush, set permissions, then rename everything into place with SIGINT and SIGTERM deferred."""
        mode = user_mode()
        order = [o.path for o in self.plan.outputs if o.path in self.staged]
        try:
            for path in order:
                for staged in [*self.staged_data.get(path, []), self.staged[path]]:
                    with _os_errors(path, "output"):
                        os.chmod(staged, mode)
                        _fsync(staged)
        except BaseException:
            self.abandon()
            raise
        done: list[Path] = []
        with _signals_deferred():
            self._rename_all(order, done)

    def _rename_all(self, order: list[Path], done: list[Path]) -> None:
        try:
            for path in order:
                moved: list[Path] = []
                try:
                    for data in self.staged_data.get(path, []):
                        target = path.parent / data.name
                        _move_to_new_name(data, target)
                        moved.append(target)
                    os.replace(self.staged[path], path)
                except OSError as exc:
                    for target in moved:  # the old model still points to its old data: drop the orphans
                        target.unlink(missing_ok=True)
                    raise _commit_error(path, exc, done, order) from None
                done += [*moved, path]
                _journal.extend([*moved, path])
            for directory in {p.parent for p in order}:
                _fsync(directory)
            for output in self.plan.outputs:
                for old in output.old_data:
                    if not any(_same(old, new) for new in done):
                        with contextlib.suppress(OSError):
                            old.unlink()
        finally:
            self._remove_staging()

    def abandon(self) -> None:
        """Remove everything staged and any directory this transaction created."""
        self._remove_staging()
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()

    def _remove_staging(self) -> None:
        for staging in self.staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self.staging.clear()


def write_files(
    files: Mapping[str | Path, bytes], reads: Iterable[str | Path | None] = (), force: bool = True
) -> None:
    """Write files given as bytes in one transaction (an engine and its report, say): all or none of them."""
    plan = OutputPlan(reads, force)
    targets = {plan.file(Path(path), "file"): data for path, data in files.items()}
    with plan.transaction() as tx:
        for target, data in targets.items():
            tx.bytes(target, data)


def _data_file_candidates(model: Path) -> list[Path]:
    """Files beside ``model`` named as this writer names its data files: ``<name>.data``, ``<name>.N.data``."""
    pattern = re.compile(re.escape(model.name) + r"(\.\d+)?\.data")
    with contextlib.suppress(OSError):
        return [p for p in model.parent.iterdir() if pattern.fullmatch(p.name)]
    return []


def fresh_data_name(model: Path) -> str:
    """The external-data file name a model written to ``model`` gets: ``<name>.data``, else ``<name>.N.data``,
    a name no file has yet (a user's file of that name is never replaced)."""
    return f"{_fresh_data_stem(model)}.data"


def _fresh_data_stem(model: Path) -> str:
    """A staged model name whose ``<name>.data`` does not exist beside the target: out.onnx, out.onnx.1, ..."""
    name = model.name
    for n in range(10_000):
        stem = name if n == 0 else f"{name}.{n}"
        if not os.path.lexists(model.parent / f"{stem}.data"):
            return stem
    raise GraphpruneError(f"{model.parent} holds too many {name}.N.data files; remove the stale ones")


def _move_to_new_name(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, which must not exist (a hard link refuses to replace, a rename would)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise OSError(errno.EEXIST, "a file of that name appeared meanwhile", str(target)) from None
    except OSError:  # no hard links here (some network or FAT file systems): check, then rename
        if os.path.lexists(target):
            raise OSError(errno.EEXIST, "a file of that name appeared meanwhile", str(target)) from None
        os.rename(source, target)
        return
    source.unlink()


def _commit_error(path: Path, exc: OSError, done: list[Path], order: list[Path]) -> GraphpruneError:
    missing = [str(p) for p in order if p not in done]
    wrote = f"written: {', '.join(map(str, done))}; " if done else "nothing was written; "
    return GraphpruneError(
        f"cannot write {path} ({exc.strerror or exc}): {wrote}not written: {', '.join(missing)}"
    )


@contextlib.contextmanager
def _unwrapped_user_errors() -> Iterator[None]:
    """Weights pruned while they are written fail inside the serializer, which wraps the exception (onnx-ir's
    SerdeError): a GraphpruneError anywhere in the chain is what the user must see, as one line."""
    try:
        yield
    except GraphpruneError:
        raise
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, GraphpruneError | OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


@contextlib.contextmanager
def _os_errors(path: Path, kind: str) -> Iterator[None]:
    """An OS error while staging becomes one line; nothing has been written at that point."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno is None and _nearly_full(path.parent):  # a short write (onnx-ir's words) on a full disk
            reason = f"No space left on device ({reason})"
        raise GraphpruneError(f"cannot write the {kind} {path}: {reason}; nothing was written") from None


def _nearly_full(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(directory).free < (1 << 20)
    return False


def _check_writable_dir(directory: Path, kind: str) -> None:
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise GraphpruneError(f"cannot write the {kind} in {directory}: {existing} is not a directory")
    try:  # a probe catches read-only mounts and permissions before the long work, not after
        handle, probe = tempfile.mkstemp(prefix=_STAGING_PREFIX + "probe-", dir=existing)
        try:
            os.close(handle)
        finally:
            os.unlink(probe)
    except OSError as exc:
        raise GraphpruneError(f"cannot write the {kind} in {existing}: {exc.strerror or exc}") from None


def _same(a: Path, b: Path) -> bool:
    """The same file: the same inode, or (for files not there yet) the same real path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def _inside(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):
        return False


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot sync a directory
            raise
    finally:
        os.close(handle)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then act on them as before, so that a commit is never
    cut in half. (A signal mask would not do: another thread, ONNX Runtime's or BLAS's, may take the signal, and
    Python then runs the handler in the main thread anyway; a deferring handler works whichever thread got it.)"""
    caught: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for deferred in (signal.SIGINT, signal.SIGTERM):
            previous[deferred] = signal.signal(deferred, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread: handlers cannot be changed, and signals go to the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):  # each signal once, in the order they came
            handler = previous.get(sig)
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)
