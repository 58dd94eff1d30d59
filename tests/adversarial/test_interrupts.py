"""Class 1, interruption: SIGINT and SIGTERM of a real ``graphprune apply`` while it computes and while it writes
a few-hundred-MB external-data model: one line, nothing half-written, no leftovers, the input unchanged."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.adversarial.builders import save_external
from tests.onnx_builders import init, make_model, tensor

WIDTH = 4096
LAYERS = 4  # 4 x 64 MiB of float32 weights


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        inits.append(init(rng.standard_normal((WIDTH, WIDTH), dtype=np.float32), f"w{i}"))
        x = f"h{i}"
    model = make_model(nodes, [tensor("x", shape=[None, WIDTH])], [tensor(x, shape=[None, WIDTH])], inits)
    save_external(model, directory / "big.onnx", "big.onnx.data")
    return directory / "big.onnx"


def start(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "graphprune",
        "apply",
        str(model),
        "--nm",
        "2:4",
        "--include-head",
        "-o",
        str(out),
    ]
    return subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reading_from(pid: int, directory: Path) -> bool:
    """Whether the process has a file of ``directory`` open."""
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return any(link.startswith(str(directory)) for link in links)


def staged_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob(".graphprune-*/**/*") if p.is_file())


def stopped(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc/PID/stat): the readiness signal of :func:`freeze_at`."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def freeze_at(condition, child: subprocess.Popen, timeout: float = 120.0) -> None:
    """Stop the child (SIGSTOP) at a moment ``condition`` holds, wait until the kernel reports it stopped, and
    check the condition again while it is frozen: the interruption then lands at that moment however loaded the
    machine is. A child that moved past a brief moment (a feed file closed) before the stop landed is let go
    (SIGCONT) and caught again at the next such moment."""
    deadline = time.monotonic() + timeout
    while True:
        while not condition():
            if child.poll() is not None:
                pytest.fail(f"the command ended before the moment to interrupt it: {child.communicate()}")
            if time.monotonic() > deadline:
                child.kill()
                pytest.fail("the moment to interrupt never came")
            time.sleep(0.002)  # polling the child's state, not a delay the test relies on
        child.send_signal(signal.SIGSTOP)
        while not stopped(child.pid):
            if child.poll() is not None:
                pytest.fail(f"the command ended before it could be frozen: {child.communicate()}")
            time.sleep(0.001)
        if condition():  # its state cannot change while stopped
            return
        child.send_signal(signal.SIGCONT)


def finish(child: subprocess.Popen, sig: int) -> tuple[int, str]:
    """Deliver ``sig`` to the frozen child, then let it run: the signal is the first thing it handles."""
    child.send_signal(sig)
    child.send_signal(signal.SIGCONT)
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see the child's memory")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["computing", "writing"])
def test_interrupted_apply_writes_nothing(big_model: Path, tmp_path: Path, sig: int, moment: str) -> None:
    before = {p.name: digest(p) for p in big_model.parent.iterdir()}
    out = tmp_path / "out.onnx"
    calib = big_model.parent / "calib.npz"
    if not calib.exists():
        np.savez(calib, x=np.random.default_rng(1).standard_normal((64, WIDTH), dtype=np.float32))
    before[calib.name] = digest(calib)
    # computing: Wanda calibrates in ONNX Runtime before anything is pruned or written, whether the model is
    # loaded eagerly or read lazily while it is written
    child = start(big_model, out, *(["--method", "wanda", "--calib", str(calib)] if moment == "computing" else []))
    model_mb = (big_model.parent / "big.onnx.data").stat().st_size / 2**20
    if moment == "computing":  # the weights are in memory, nothing is staged yet
        freeze_at(lambda: rss_mb(child.pid) > 1.1 * model_mb and staged_bytes(tmp_path) == 0, child)
    else:  # part of the new external-data file is on disk
        freeze_at(lambda: staged_bytes(tmp_path) > 16 * 2**20 and not out.exists(), child)
    code, stderr = finish(child, sig)
    assert code == (130 if sig == signal.SIGINT else 143), stderr
    assert stderr.strip().splitlines() == [
        f"{'interrupted' if sig == signal.SIGINT else 'terminated'}: nothing was written"
    ], stderr
    assert list(tmp_path.iterdir()) == []  # no model, no data, no report, no hidden staging directory
    assert {p.name: digest(p) for p in big_model.parent.iterdir()} == before


def test_interrupted_force_run_keeps_the_previous_pair(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    first = start(big_model, out)
    assert first.wait(timeout=120) == 0, first.communicate()
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    child = start(big_model, out, "--force", "--nm", "1:4")
    freeze_at(lambda: staged_bytes(tmp_path) > 16 * 2**20, child)  # the old pair is still in place
    code, stderr = finish(child, signal.SIGTERM)
    assert code == 143 and "nothing was written" in stderr, stderr
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before
    onnx.checker.check_model(str(out))  # the old model and its data still go together
    kept = onnx.load_model(str(out))
    w = onnx.numpy_helper.to_array(kept.graph.initializer[0])
    assert np.count_nonzero(w) == w.size // 2  # 2:4 from the first run, not 1:4


def test_sigterm_is_handled_like_sigint_in_calibrate(tmp_path: Path) -> None:
    # calibrate: a long synthetic calibration interrupted before any output exists
    rng = np.random.default_rng(1)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[None, 512])],
        [tensor("y", shape=[None, 512])],
        [init(rng.standard_normal((512, 512), dtype=np.float32), "w")],
    )
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "unused.npy", np.zeros(1))
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i in range(200):
        np.savez(feeds / f"{i:05d}.npz", x=rng.standard_normal((256, 512), dtype=np.float32))
    args = [sys.executable, "-m", "graphprune", "calibrate", str(tmp_path / "m.onnx"), "--calib", str(feeds)]
    child = subprocess.Popen([*args, "-o", str(tmp_path / "s.npz"), "-q"], stderr=subprocess.PIPE, text=True)
    freeze_at(lambda: reading_from(child.pid, feeds), child)  # calibrating: a feed file is open
    code, stderr = finish(child, signal.SIGTERM)
    assert (code, stderr.strip()) == (143, "terminated: nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feeds", "m.onnx", "unused.npy"]
