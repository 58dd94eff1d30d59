"""Class 3, bad files: corrupt tensors, external data outside the model, broken .npz and statistics files are one
line (exit 2, no traceback), write nothing and change no input."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from graphprune.cli import app
from tests.adversarial.builders import mlp, refused, save_external, snapshot

runner = CliRunner()
X = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)


def set_external(key: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        for entry in model.graph.initializer[0].external_data:
            if entry.key == key:
                entry.value = value
                return
        model.graph.initializer[0].external_data.add(key=key, value=value)

    return edit


def raw_bytes(change: Callable[[bytes], bytes]) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].raw_data = change(model.graph.initializer[0].raw_data)

    return edit


def first_dim(value: int) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].dims[0] = value

    return edit


def short_float_data(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[0]
    values = numpy_helper.to_array(tensor).ravel()
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values[:-3].tolist())


CORRUPT_MODELS = {
    "short raw_data": (False, raw_bytes(lambda b: b[:-4]), ["2044 bytes", "needs 2048", "short"]),
    "long raw_data": (False, raw_bytes(lambda b: b + b"1234"), ["2052 bytes", "long"]),
    "float_data short": (False, short_float_data, ["509 values", "needs 512"]),
    "negative dim": (False, first_dim(-16), ["negative dimension"]),
    "huge dim": (False, first_dim(2**40), ["needs 140737488355328"]),
    "external length short": (True, set_external("length", "12"), ["length of 12 bytes", "needs 2048"]),
    "external length long": (True, set_external("length", "4096"), ["length of 4096 bytes"]),
    "external offset past the end": (True, set_external("offset", "999999"), ["truncated"]),
    "external offset negative": (True, set_external("offset", "-8"), ["negative"]),
    "external offset not a number": (True, set_external("offset", "x"), ["non-numeric"]),
    "external data file missing": (True, set_external("location", "gone.bin"), ["missing"]),
    "external huge dim": (True, first_dim(2**40), ["needs 140737488355328"]),
}


@pytest.mark.parametrize("case", list(CORRUPT_MODELS))
@pytest.mark.parametrize("command", ["apply", "check", "convert", "calibrate"])
def test_tensor_bytes_that_do_not_match_the_shape(tmp_path: Path, case: str, command: str) -> None:
    external, edit, words = CORRUPT_MODELS[case]
    path = tmp_path / "m.onnx"
    if external:
        save_external(mlp(), path, "m.onnx.data")
        model = onnx.load_model(str(path), load_external_data=False)
    else:
        model = mlp()
    edit(model)
    onnx.save_model(model, str(path))
    np.savez(tmp_path / "c.npz", x=X)
    before = snapshot(tmp_path)
    args = {
        "apply": ["-o", str(tmp_path / "o.onnx")],
        "check": [],
        "convert": ["-o", str(tmp_path / "o.onnx")],
        "calibrate": ["--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "s.npz")],
    }[command]
    refused(runner.invoke(app, [command, str(path), *args]), "m.onnx", *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("outside", ["../secret.bin", "/SECRET_ABS", "link.bin", "sub/../../secret.bin"])
def test_external_data_outside_the_model_directory_reveals_nothing(tmp_path: Path, outside: str) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 123457)  # a size the message must not give away
    inner = tmp_path / "model"
    inner.mkdir()
    (inner / "link.bin").symlink_to(secret)
    path = inner / "m.onnx"
    save_external(mlp(), path, "m.onnx.data")
    model = onnx.load_model(str(path), load_external_data=False)
    set_external("location", outside.replace("/SECRET_ABS", str(secret)))(model)
    onnx.save_model(model, str(path))
    messages = []
    for target in (secret, tmp_path / "absent.bin"):  # the message is the same whether the file exists or not
        if outside.startswith("/"):
            set_external("location", str(target))(model)
            onnx.save_model(model, str(path))
        line = refused(runner.invoke(app, ["check", str(path)]), "outside the model's directory")
        assert "123457" not in line and "123" not in line.replace(str(tmp_path), "")
        messages.append(line.replace(str(target), "X"))
    if outside.startswith("/"):
        assert messages[0] == messages[1]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _truncated_member(path: Path, keep: float) -> None:
    with zipfile.ZipFile(path) as z:
        data = z.read("x.npy")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", data[: int(len(data) * keep)])


BAD_NPZ: dict[str, Callable[[Path], None]] = {
    "not a zip": lambda p: p.write_bytes(b"not a zip at all"),
    "a plain .npy": lambda p: np.save(open(p, "wb"), X),  # noqa: SIM115
    "empty file": lambda p: p.write_bytes(b""),
    "cut in half": lambda p: p.write_bytes(_npz_bytes({"x": X})[:300]),
    "truncated member": lambda p: _truncated_member(p, 0.5),
    "member cut in its header": lambda p: _truncated_member(p, 0.05),
    "padded member": lambda p: (p.write_bytes(_npz_bytes({"x": X})), _pad(p)),
    "huge shape in a header": lambda p: _huge_header(p),
    "bad CRC": lambda p: _flip_data_byte(p),
}


def _huge_header(path: Path) -> None:
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 16)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 64)


def _flip_data_byte(path: Path) -> None:
    np.savez(path, x=np.ones((8, 16), np.float32))
    data = bytearray(path.read_bytes())
    at = data.find(b"\x00\x00\x80?")  # the first 1.0f of the array
    data[at + 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _pad(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        data = z.read("x.npy")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", data + b"\0" * 64)


@pytest.mark.parametrize("case", list(BAD_NPZ))
@pytest.mark.parametrize("use", ["apply --calib", "calibrate --calib", "eval --calib", "apply --stats"])
def test_broken_npz_files(tmp_path: Path, case: str, use: str) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=X)
    BAD_NPZ[case](bad)
    before = snapshot(tmp_path)
    command, option = use.split()
    args = {
        "apply": ["apply", str(model), option, str(bad), "-o", str(tmp_path / "o.onnx")],
        "calibrate": ["calibrate", str(model), option, str(bad), "-o", str(tmp_path / "s.npz")],
        "eval": ["eval", str(model), str(model), option, str(bad)],
    }[command]
    refused(runner.invoke(app, args), "bad.npz")
    assert snapshot(tmp_path) == before


@pytest.fixture
def saved_stats(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict]:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    np.savez(tmp_path / "c.npz", x=X)
    args = ["calibrate", str(model), "--calib", str(tmp_path / "c.npz"), "--gram", "-q", "-o"]
    assert runner.invoke(app, [*args, str(tmp_path / "s.npz")]).exit_code == 0
    with np.load(tmp_path / "s.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return model, arrays, json.loads(str(arrays["meta"][()]))


def _meta(change: Callable[[dict], object]) -> Callable[[dict, dict], None]:
    return lambda arrays, meta: change(meta)


def _array(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict, dict], None]:
    return lambda arrays, meta: arrays.__setitem__(name, value(arrays[name]))


EDITS: dict[str, tuple[Callable[[dict, dict], None], str]] = {
    "a name dropped": (_meta(lambda m: m["names"].pop()), "one entry per name"),
    "names duplicated": (_meta(lambda m: m.__setitem__("names", [m["names"][0]] * len(m["names"]))), "distinct"),
    "rows as text": (_meta(lambda m: m.__setitem__("rows", ["a"] * len(m["rows"]))), "rows"),
    "rows negative": (_meta(lambda m: m.__setitem__("rows", [-1] * len(m["rows"]))), "rows"),
    "shape edited": (_meta(lambda m: m["shapes"].__setitem__(1, [32, 16])), "edited"),
    "shape zero": (_meta(lambda m: m["shapes"].__setitem__(1, [0, 32])), "positive"),
    "K axis out of range": (_meta(lambda m: m.__setitem__("k_axes", [7] * len(m["k_axes"]))), "K axis 7"),
    "K axis swapped": (_meta(lambda m: m.__setitem__("k_axes", [1] * len(m["k_axes"]))), "edited"),
    "gram_of unknown name": (_meta(lambda m: m["gram_of"].__setitem__("nope", 0)), "gram_of"),
    "gram_of missing gram": (_meta(lambda m: m["gram_of"].update({k: 9 for k in m["gram_of"]})), "gram_9"),
    "fingerprint removed": (_meta(lambda m: m.pop("model_fingerprint")), "fingerprint"),
    "meta a list": (lambda a, m: a.__setitem__("meta", np.array("[1, 2]")), "not a graphprune statistics"),
    "meta not JSON": (lambda a, m: a.__setitem__("meta", np.array("{{")), "cannot read"),
    "meta missing": (lambda a, m: a.pop("meta"), "meta"),
    "Gram wrong shape": (_array("gram_1", lambda g: g[:4, :4]), "Gram matrix"),
    "Gram NaN": (_array("gram_1", lambda g: np.full_like(g, np.nan)), "NaN"),
    "Gram infinite": (_array("gram_1", lambda g: np.full_like(g, np.inf)), "infinite"),
    "sumsq NaN": (_array("sumsq_1", lambda s: np.full_like(s, np.nan)), "NaN"),
    "sumsq negative": (_array("sumsq_1", lambda s: -np.ones_like(s)), "negative"),
    "sumsq wrong length": (_array("sumsq_1", lambda s: s[:3]), "expected float[16]"),
    "sumsq integer": (_array("sumsq_1", lambda s: s.astype(np.int64)), "expected float"),
    "sumsq 2-D": (_array("sumsq_1", lambda s: s[None]), "expected float[16]"),
}


@pytest.mark.parametrize("case", list(EDITS))
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_edited_or_corrupt_statistics(
    tmp_path: Path, saved_stats: tuple[Path, dict, dict], case: str, method: str
) -> None:
    model, arrays, meta = saved_stats
    arrays, meta = dict(arrays), json.loads(json.dumps(meta))
    edit, words = EDITS[case]
    edit(arrays, meta)
    if "meta" in arrays and not case.startswith("meta"):
        arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "edited.npz", **arrays)
    before = snapshot(tmp_path)
    args = ["apply", str(model), "--stats", str(tmp_path / "edited.npz"), "--method", method]
    refused(runner.invoke(app, [*args, "-o", str(tmp_path / "o.onnx")]), words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_non_finite_activations_are_one_line(tmp_path: Path, value: float, method: str) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    feeds = X.copy()
    feeds[3, 5] = value
    np.savez(tmp_path / "c.npz", x=feeds)
    result = runner.invoke(app, ["apply", str(model), "--calib", str(tmp_path / "c.npz"), "--method", method])
    refused(result, "not finite", "w1")
    assert not (tmp_path / "m.pruned.onnx").exists()


def test_non_finite_weights_stop_sparsegpt(tmp_path: Path) -> None:
    model = mlp()
    w2 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w2[4, 2] = np.inf
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2, "w2"))
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=X)
    args = ["apply", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--method", "sparsegpt"]
    refused(runner.invoke(app, args), "w2")


def test_text_calibration_names_a_few_inputs_not_sixty(tmp_path: Path) -> None:
    from onnx import TensorProto

    from tests.onnx_builders import tensor

    extra = [f"extra_{i}" for i in range(60)]
    model = mlp()
    ids = tensor("input_ids", TensorProto.INT64, [None, None])
    model.graph.input.extend([ids, *(tensor(name, shape=[1]) for name in extra)])
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    (tmp_path / "t.txt").write_text("text " * 100)
    args = ["calibrate", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "t.txt"), "--tokenizer"]
    line = refused(runner.invoke(app, [*args, str(tmp_path / "tok.json"), "-o", str(tmp_path / "s.npz")]))
    assert "and 58 more" in line and len(line) < 400, line
