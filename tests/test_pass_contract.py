"""Every way of pruning runs the pass's contract: with a mask function that breaks the N:M pattern, one-shot
(in memory and streamed while written), sequential and segment-wise runs all fail with the same
postcondition error, and write nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

import graphprune.passes.prune as prune_module
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.calibration.request import CalibrationRequest
from graphprune.passes.base import PassPostconditionError
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.files import prune_file
from tests.onnx_builders import init

BROKEN = r"^weight \S+ breaks 2:4 along K after pruning"
MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[batch,16] x) => (float[batch,16] y) {
  h = MatMul(x, w1)
  r = Relu(h)
  y = MatMul(r, w2)
}
"""


def model_file(directory: Path, external: bool) -> Path:
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(MODEL)
    proto.graph.initializer.extend(
        [
            init(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
            init(rng.standard_normal((32, 16)).astype(np.float32), "w2"),
        ]
    )
    directory.mkdir()
    path = directory / "model.onnx"
    onnx.save(proto, str(path), save_as_external_data=external, location="model.onnx.data", size_threshold=0)
    return path


@pytest.fixture
def broken_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """N:M masks that keep every weight: what a bug in the mask code would leave."""
    monkeypatch.setattr(prune_module, "nm_mask", lambda scores, pattern, axis=-1: np.ones(scores.shape, bool))


def calibration() -> CalibrationRequest:
    x = np.random.default_rng(4).standard_normal((8, 16)).astype(np.float32)
    return CalibrationRequest(data={"x": x}, batch_size=4)


CONFIG = PruneConfig(NMPattern(2, 4), method=Method.WANDA, include_head=True)
MODES = {
    "one-shot": dict(external=False, calibrate=True, sequential=None, max_memory=None),
    "one-shot streamed from external data": dict(external=True, calibrate=False, sequential=None, max_memory=None),
    "sequential": dict(external=False, calibrate=True, sequential="block", max_memory=None),
    "segment-wise sequential": dict(external=True, calibrate=True, sequential="level", max_memory=None),
    "segment-wise one-shot": dict(external=True, calibrate=True, sequential=None, max_memory=1 << 30),
}


@pytest.mark.usefixtures("broken_masks")
@pytest.mark.parametrize("mode", MODES)
def test_a_broken_pattern_fails_the_same_way_in_every_mode(mode: str, tmp_path: Path) -> None:
    options = MODES[mode]
    path = model_file(tmp_path / "in", options["external"])
    config = CONFIG if options["calibrate"] else PruneConfig(NMPattern(2, 4), include_head=True)
    out = tmp_path / "out" / "pruned.onnx"
    with pytest.raises(PassPostconditionError, match=BROKEN):
        prune_file(
            path,
            config,
            out,
            calibration=calibration() if options["calibrate"] else None,
            sequential=options["sequential"],
            max_memory=options["max_memory"],
        )
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.usefixtures("broken_masks")
def test_a_broken_pattern_fails_the_pass_in_memory() -> None:
    proto = onnx.parser.parse_model(MODEL)
    proto.graph.initializer.extend(
        [init(np.ones((16, 32), np.float32), "w1"), init(np.ones((32, 16), np.float32), "w2")]
    )
    with pytest.raises(PassPostconditionError, match=BROKEN):
        PrunePass(config=PruneConfig(NMPattern(2, 4), include_head=True))(ir.from_proto(proto))
