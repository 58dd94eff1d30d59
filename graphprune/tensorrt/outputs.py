"""Writing an engine and its report: checked before the build, committed together after it, never half-written.

Seam: this is a stand-in for the shared writer ``graphprune/artifacts.py`` (engineer "rel"), which was not on main
when this was written. :func:`check_writable` and :func:`commit` are the two calls to replace with it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from graphprune.errors import GraphpruneError


def check_writable(path: Path, force: bool) -> None:
    """Fail before a long build if ``path`` cannot be written: exists without ``force``, or its folder refuses."""
    if path.is_dir():
        raise GraphpruneError(f"{path} is a directory; give the engine file to write, e.g. -o model.engine")
    if path.exists() and not force:
        raise GraphpruneError(f"{path} exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise GraphpruneError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def commit(files: Mapping[Path, bytes]) -> None:
    """Write every file to a temporary name beside it, then rename them all into place.

    Nothing is renamed until every temporary is complete, so a full disk or a refused folder leaves the old files
    (or none) and no partial one; temporaries are removed on failure.
    """
    staged: list[tuple[Path, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            staged.append((Path(tmp), path))
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the engine private to its builder
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        raise GraphpruneError(
            f"cannot write {staged[-1][1] if staged else 'output'}: {exc.strerror or exc}"
        ) from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
