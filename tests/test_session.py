"""The calibration session: a run ONNX Runtime refuses is one GraphpruneError line that says which data failed."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.session import Session, SessionModel
from graphprune.errors import GraphpruneError
from tests.onnx_builders import make_model, tensor


def test_a_failed_run_is_one_line_that_names_the_data() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", shape=[2, 3])], [tensor("y", shape=[2, 3])], []
    )
    session = Session(SessionModel(model), resolve_providers("cpu"))
    x = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(["y"], {"x": x}, "calib.npz rows 0:2")[0], np.maximum(x, 0))
    with pytest.raises(GraphpruneError) as refused:
        session.run(["y"], {"x": np.zeros((5, 7), np.float32)}, "calib.npz rows 2:7")
    message = str(refused.value)
    assert message.startswith("calib.npz rows 2:7: onnxruntime failed: ") and "\n" not in message
