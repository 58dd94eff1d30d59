"""Class 3, OS errors: a read-only directory, a full disk, an immutable target are one line, and leave nothing."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphprune.cli import app
from tests.adversarial.builders import mlp, refused, save_external, snapshot

runner = CliRunner()


def _try(*command: str) -> bool:
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run(command, capture_output=True).returncode == 0


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if not _try("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    model = tmp_path / "in" / "m.onnx"
    model.parent.mkdir()
    big = mlp(width=16384)  # ~2 MiB of weights, in an external data file
    save_external(big, model, "m.onnx.data")
    return model


def test_full_disk_is_one_line_and_leaves_nothing(external_model: Path, tmp_path: Path) -> None:
    before = snapshot(external_model.parent)
    with tmpfs(tmp_path / "small", "512k") as small:
        result = runner.invoke(app, ["apply", str(external_model), "-o", str(small / "out.onnx")])
        refused(result, "No space left on device", "nothing was written")
        assert list(small.iterdir()) == []  # no partial data file, no hidden staging directory
        np.savez(tmp_path / "c.npz", x=np.ones((2, 16), np.float32))
        (small / "keep.txt").write_bytes(b"k" * 500_000)  # leave too little room for the statistics
        result = runner.invoke(app, ["calibrate", str(external_model), "--calib", str(tmp_path / "c.npz"), "-o",
                                     str(small / "s.npz")])  # fmt: skip
        refused(result, "No space left on device")
        assert sorted(p.name for p in small.iterdir()) == ["keep.txt"]
    assert snapshot(external_model.parent) == before


def test_read_only_directory_fails_before_any_work(external_model: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        result = runner.invoke(app, ["apply", str(external_model), "-o", str(ro / "out.onnx"), "--calib",
                                     str(tmp_path / "missing.npz")])  # fmt: skip
        refused(result, "Read-only file system")  # the output is checked before the calibration data is opened
        refused(runner.invoke(app, ["convert", str(external_model), "-o", str(ro / "h.onnx")]), "Read-only")
        refused(runner.invoke(app, ["apply", str(external_model), "-o", str(ro / "new" / "o.onnx")]), "Read-only")


def test_an_immutable_target_is_one_line_and_keeps_the_old_pair(external_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert runner.invoke(app, ["apply", str(external_model), "-o", str(out)]).exit_code == 0
    if not _try("chattr", "+i", str(out)):
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and a file system with it)")
    try:
        before = snapshot(tmp_path)
        result = runner.invoke(app, ["apply", str(external_model), "--nm", "1:4", "-o", str(out), "--force"])
        refused(result, "out.onnx", "Operation not permitted", "not written")
        assert snapshot(tmp_path) == before  # the new data file was removed again, the old pair is intact
        onnx.checker.check_model(str(out))
    finally:
        _try("chattr", "-i", str(out))


def test_an_immutable_directory_fails_before_any_work(external_model: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _try("chattr", "+i", str(locked)):
        pytest.skip("chattr +i is not available here")
    try:
        refused(runner.invoke(app, ["apply", str(external_model), "-o", str(locked / "o.onnx")]), "not permitted")
    finally:
        _try("chattr", "-i", str(locked))
