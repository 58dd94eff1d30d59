"""Class 1: every file a command writes is checked against what it reads and what exists; one writer commits."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphprune import artifacts
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from tests.adversarial.builders import mlp, names, refused, save_external, snapshot, umask
from tests.onnx_builders import run

runner = CliRunner()
X = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)


def hook_rename(monkeypatch: pytest.MonkeyPatch, target: Path, action: Callable[[], None]) -> None:
    """Run ``action`` just before the writer renames a staged file into ``target`` (to fail or interrupt it)."""
    real_replace = os.replace

    def hooked(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == target:
            action()
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", hooked)


def fail_with(code: int, text: str) -> Callable[[], None]:
    def action() -> None:
        raise OSError(code, text)

    return action


def outputs_of(path: Path) -> np.ndarray:
    return run(onnx.load_model(str(path)), {"x": X})[0]


def test_output_data_file_named_like_the_inputs_data_keeps_the_input(tmp_path: Path) -> None:
    # m.onnx keeps its weights in out.onnx.data (an export renamed later): writing out.onnx must not touch it.
    model = tmp_path / "m.onnx"
    save_external(mlp(), model, "out.onnx.data")
    before = snapshot(tmp_path)
    expected = outputs_of(model)
    result = runner.invoke(app, ["apply", str(model), "--nm", "2:4", "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    np.testing.assert_array_equal(outputs_of(model), expected)
    written = onnx.load_model(str(tmp_path / "out.onnx"), load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.1.data"}
    assert not np.allclose(outputs_of(tmp_path / "out.onnx"), expected)  # pruned, and loadable
    assert names(tmp_path) == {"m.onnx", "out.onnx.data", "out.onnx", "out.onnx.1.data", "out.report.json"}


def test_an_unrelated_existing_data_file_is_never_replaced(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    save_external(mlp(), model, "m.onnx.data")
    (tmp_path / "out.onnx.data").write_bytes(b"the user's own file")
    result = runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx.data").read_bytes() == b"the user's own file"
    outputs_of(tmp_path / "out.onnx")


@pytest.mark.parametrize(
    ("layout", "output", "words"),
    [
        ("x.report.json", "x.onnx", ["x.report.json", "input model", "report"]),  # the report is the input
        ("m.onnx", "m.onnx", ["input model"]),
        ("m.onnx", "m.onnx.data", ["external data"]),  # -o names the input's own data file
        ("m.onnx", "sub/../m.onnx", ["input model"]),
    ],
)
def test_an_output_that_is_an_input_is_refused(tmp_path: Path, layout: str, output: str, words: list[str]) -> None:
    (tmp_path / "sub").mkdir()
    save_external(mlp(), tmp_path / layout, f"{layout}.data")
    before = snapshot(tmp_path)
    refused(runner.invoke(app, ["apply", str(tmp_path / layout), "-o", str(tmp_path / output), "--force"]), *words)
    assert snapshot(tmp_path) == before


def test_symlinks_and_hard_links_to_an_input_are_the_input(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    (tmp_path / "link.onnx").symlink_to(model)
    os.link(model, tmp_path / "hard.onnx")
    before = snapshot(tmp_path)
    for name in ("link.onnx", "hard.onnx"):
        refused(runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / name), "--force"]), "input model")
    hard = str(tmp_path / "hard.onnx")
    refused(runner.invoke(app, ["apply", hard, "-o", str(model), "--force"]), "input model")  # same inode
    assert snapshot(tmp_path) == before


def test_an_existing_report_is_refused_without_force(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    (tmp_path / "out.report.json").write_text("mine")
    refused(
        runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / "out.onnx")]), "out.report.json", "--force"
    )
    assert not (tmp_path / "out.onnx").exists()
    assert (tmp_path / "out.report.json").read_text() == "mine"


def test_the_statistics_file_is_an_input_of_apply(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    np.savez(tmp_path / "calib.npz", x=X)
    assert runner.invoke(app, ["calibrate", str(model), "--calib", str(tmp_path / "calib.npz"), "-o",
                               str(tmp_path / "s.npz")]).exit_code == 0  # fmt: skip
    before = snapshot(tmp_path)
    args = ["apply", str(model), "--stats", str(tmp_path / "s.npz"), "--force", "-o"]
    refused(runner.invoke(app, [*args, str(tmp_path / "s.npz")]), "s.npz")
    (tmp_path / "s.npz").rename(tmp_path / "t.report.json")
    before = snapshot(tmp_path)
    refused(
        runner.invoke(app, [*args[:3], str(tmp_path / "t.report.json"), "--force", "-o", str(tmp_path / "t.onnx")])
    )
    assert snapshot(tmp_path) == before


def test_calibrate_never_replaces_its_calibration_data_and_needs_force(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    np.savez(tmp_path / "calib.npz", x=X)
    before = snapshot(tmp_path)
    args = ["calibrate", str(model), "--calib", str(tmp_path / "calib.npz"), "-o"]
    refused(runner.invoke(app, [*args, str(tmp_path / "calib.npz"), "--force"]), "calib.npz")
    refused(runner.invoke(app, [*args, str(tmp_path / "calib"), "--force"]), "calib.npz")  # .npz is appended
    assert snapshot(tmp_path) == before
    assert runner.invoke(app, [*args, str(tmp_path / "s.npz")]).exit_code == 0
    refused(runner.invoke(app, [*args, str(tmp_path / "s.npz")]), "exists", "--force")
    assert runner.invoke(app, [*args, str(tmp_path / "s.npz"), "--force"]).exit_code == 0
    assert names(tmp_path) == {"m.onnx", "calib.npz", "s.npz"}


def test_outputs_inside_a_calibration_directory_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    (tmp_path / "feeds").mkdir()
    np.savez(tmp_path / "feeds" / "a.npz", x=X)
    result = runner.invoke(app, ["calibrate", str(model), "--calib", str(tmp_path / "feeds"), "-o",
                                 str(tmp_path / "feeds" / "stats.npz")])  # fmt: skip
    refused(result, "inside")  # the next run would read the statistics as a feed


def test_a_directory_as_output_is_one_line(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    (tmp_path / "d").mkdir()
    refused(runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / "d"), "--force"]), "directory")
    refused(runner.invoke(app, ["convert", str(model), "-o", str(tmp_path / "d"), "--force"]), "directory")
    np.savez(tmp_path / "c.npz", x=X)
    result = runner.invoke(
        app, ["calibrate", str(model), "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "d.npz")]
    )
    assert result.exit_code == 0
    (tmp_path / "e.npz").mkdir()
    refused(runner.invoke(app, ["calibrate", str(model), "--calib", str(tmp_path / "c.npz"), "-o",
                                str(tmp_path / "e.npz"), "--force"]), "directory")  # fmt: skip
    (tmp_path / "file").write_text("x")
    refused(
        runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / "file" / "out.onnx")]), "not a directory"
    )


def test_names_the_file_system_refuses_are_one_line(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    refused(runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / ("x" * 300 + ".onnx"))]), "too long")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    refused(runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / "loop" / "o.onnx")]))
    np.savez(tmp_path / "c.npz", x=X)
    args = ["calibrate", str(model), "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path)]
    refused(runner.invoke(app, args), "is a directory")  # not <dir>.npz beside it
    assert not tmp_path.with_name(tmp_path.name + ".npz").exists()


def test_special_files_are_never_replaced(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    os.mkfifo(tmp_path / "fifo")
    for target in (Path("/dev/null"), tmp_path / "fifo"):
        refused(runner.invoke(app, ["apply", str(model), "-o", str(target), "--force"]), "not a regular file")
        refused(runner.invoke(app, ["convert", str(model), "-o", str(target), "--force"]), "not a regular file")
    assert Path("/dev/null").is_char_device() and (tmp_path / "fifo").is_fifo()


def test_convert_and_build_check_their_outputs_too(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    save_external(mlp(), model, "m.onnx.data")
    before = snapshot(tmp_path)
    refused(
        runner.invoke(app, ["convert", str(model), "-o", str(tmp_path / "m.onnx.data"), "--force"]),
        "external data",
    )
    refused(runner.invoke(app, ["build", str(model), "-o", str(model), "--force"]), "input model")
    refused(runner.invoke(app, ["build", str(model), "-o", str(tmp_path / "m.onnx.data"), "--force"]), "external")
    (tmp_path / "e.engine.json").write_text("{}")
    before = snapshot(tmp_path)
    refused(
        runner.invoke(app, ["build", str(model), "-o", str(tmp_path / "e.engine")]), "e.engine.json", "--force"
    )
    refused(runner.invoke(app, ["build", str(model), "-o", str(tmp_path / "t.cache"), "--timing-cache",
                                str(tmp_path / "t.cache")]), "timing cache")  # fmt: skip
    assert snapshot(tmp_path) == before


def test_force_replaces_an_external_pair_and_removes_the_old_data(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    save_external(mlp(), model, "m.onnx.data")
    out = tmp_path / "out.onnx"
    for round_ in range(3):
        result = runner.invoke(app, ["apply", str(model), "--nm", "2:4", "-o", str(out), "--force"])
        assert result.exit_code == 0, result.output
        data = [n for n in names(tmp_path) if n.startswith("out.onnx") and n.endswith(".data")]
        assert len(data) == 1, (round_, data)  # the old data file went once the new model was in place
        assert names(tmp_path) == {"m.onnx", "m.onnx.data", "out.onnx", "out.report.json", data[0]}
        outputs_of(out)


def test_a_failed_model_rename_leaves_the_old_pair_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.onnx"
    save_external(mlp(), model, "m.onnx.data")
    out = tmp_path / "out.onnx"
    assert runner.invoke(app, ["apply", str(model), "--nm", "2:4", "-o", str(out)]).exit_code == 0
    before, expected = snapshot(tmp_path), outputs_of(out)
    hook_rename(monkeypatch, out, fail_with(5, "Input/output error"))
    result = runner.invoke(app, ["apply", str(model), "--nm", "1:4", "-o", str(out), "--force"])
    monkeypatch.undo()
    refused(result, "nothing was written", "not written", "out.onnx")
    assert snapshot(tmp_path) == before
    np.testing.assert_array_equal(outputs_of(out), expected)


def test_files_get_the_users_umask(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    save_external(mlp(), model, "m.onnx.data")
    previous = os.umask(0o027)
    try:
        assert runner.invoke(app, ["apply", str(model), "-o", str(tmp_path / "o.onnx")]).exit_code == 0
        np.savez(tmp_path / "c.npz", x=X)
        assert runner.invoke(app, ["calibrate", str(model), "--calib", str(tmp_path / "c.npz"), "-o",
                                   str(tmp_path / "s.npz")]).exit_code == 0  # fmt: skip
        assert runner.invoke(app, ["convert", str(model), "-o", str(tmp_path / "h.onnx")]).exit_code == 0
    finally:
        os.umask(previous)
    assert umask() == previous
    for name in ("o.onnx", "o.onnx.data", "o.report.json", "s.npz", "h.onnx"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report  # a whole JSON document


def test_write_files_commits_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "deep" / "er" / "model.engine"
    report = target.with_name("model.engine.json")
    artifacts.write_files({target: b"abc", report: b"{}"})
    artifacts.write_files({target: b"defg", report: b"[]"})
    assert (target.read_bytes(), report.read_bytes()) == (b"defg", b"[]")
    assert names(target.parent) == {"model.engine", "model.engine.json"}
    real_write = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.name == "model.engine.json":
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(GraphpruneError, match="No space left on device"):
        artifacts.write_files({target: b"new engine", report: b"new report"})
    monkeypatch.undo()
    assert (target.read_bytes(), report.read_bytes()) == (b"defg", b"[]")  # the pair is untouched
    assert names(target.parent) == {"model.engine", "model.engine.json"}
    with pytest.raises(GraphpruneError, match="exists"):
        artifacts.write_files({target: b"x"}, force=False)
    with pytest.raises(GraphpruneError, match="input"):
        artifacts.write_files({target: b"x"}, reads=[target])


@pytest.fixture
def external_input(tmp_path: Path) -> Path:
    """m.onnx with its weights in m.onnx.data."""
    save_external(mlp(), tmp_path / "m.onnx", "m.onnx.data")
    return tmp_path / "m.onnx"


def test_a_failure_after_the_model_says_exactly_what_was_written(
    tmp_path: Path, external_input: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, out = external_input, tmp_path / "out.onnx"
    hook_rename(monkeypatch, tmp_path / "out.report.json", fail_with(28, "No space left on device"))
    line = refused(runner.invoke(app, ["apply", str(model), "-o", str(out)]))
    monkeypatch.undo()
    assert f"written: {tmp_path / 'out.onnx.data'}, {out}; not written: {tmp_path / 'out.report.json'}" in line
    assert names(tmp_path) == {"m.onnx", "m.onnx.data", "out.onnx", "out.onnx.data"}  # no staging left
    outputs_of(out)  # what was written is whole


def test_an_interruption_during_the_renames_waits_for_them(
    tmp_path: Path, external_input: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    model, out = external_input, tmp_path / "out.onnx"
    hook_rename(monkeypatch, out, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C after the data file
    result = runner.invoke(app, ["apply", str(model), "-o", str(out)])
    monkeypatch.undo()
    assert result.exit_code == 130
    expected = f"interrupted: already written: {tmp_path / 'out.onnx.data'}, {out}, {tmp_path / 'out.report.json'}"
    assert result.output.strip().splitlines()[-1] == expected
    assert names(tmp_path) == {"m.onnx", "m.onnx.data", "out.onnx", "out.onnx.data", "out.report.json"}
    outputs_of(out)
