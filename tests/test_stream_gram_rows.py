"""``shrink --sequential`` streamed through the sequential engine takes its Gram matrices from the same rows as the
one-shot moments: every ``gram_stride``-th real token plus every n-th padded row weighted n (``pad_stride``), with
the sample's own Σx and row count; the dense targets' cross terms pair the same rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphprune.pipeline.shrink_stream as stream_module
from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.moments import Moments
from graphprune.calibration.request import CalibrationRequest
from graphprune.pipeline.shrink import ShrinkConfig, calibrated, shrink_model
from tests.onnx_builders import draw, residual_stack, run

D, HIDDEN, BATCH = 6, 800, 4  # wider than 2 x 384: the Gram matrices are blocks of their upper triangle


def _encoder() -> tuple[onnx.ModelProto, list[tuple[np.ndarray, np.ndarray]]]:
    """Three residual MLP blocks x + relu(x W1) W2 on x [b, s, D], beside an ``attention_mask`` [b, s]."""
    model, weights, _ = residual_stack(d=D, hidden=HIDDEN, tokens=True)
    return onnx.shape_inference.infer_shapes(model), weights  # type: ignore[return-value]


def _calibration(batch: int = 12, seq: int = 9) -> dict[str, np.ndarray]:
    """Random inputs, each sample padded after a random number (1 to ``seq``) of real tokens."""
    rng = np.random.default_rng(72)
    lengths = rng.integers(1, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": draw(rng, batch, seq, D, scale=1.0), "attention_mask": mask}


def _sampled(g: np.ndarray, mask: np.ndarray, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray, int]:
    """numpy's Gram matrix, Σx and rows over the rows the taps take, batch by batch as they slice them."""
    gram, sums, rows = np.zeros((HIDDEN, HIDDEN)), np.zeros(HIDDEN), 0
    for i in range(0, len(g), BATCH):
        flat, real = g[i : i + BATCH].reshape(-1, HIDDEN), mask[i : i + BATCH].ravel() == 1
        kept, padded = flat[real][::stride], flat[~real][:: stride * max(pad, 1)]
        weight = pad if pad > 1 else 0
        gram += kept.T @ kept + weight * padded.T @ padded
        sums += kept.sum(0) + weight * padded.sum(0)
        rows += len(kept) + weight * len(padded)
    return gram, sums, rows


def _measured(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[str, object]]:
    """What the stream hands the shrink: the moments (``moments_of``) or dense moments of each group, in order."""
    seen: list[tuple[str, object]] = []
    wrapped = getattr(stream_module, name)

    def recording(stats, group):  # type: ignore[no-untyped-def]
        found = wrapped(stats, group)
        seen.append((group.name, found))
        return found

    monkeypatch.setattr(stream_module, name, recording)
    return seen


@pytest.mark.parametrize(("stride", "pad"), [(1, 3), (2, 0), (2, 2)])
def test_streamed_gram_rows_equal_numpy_and_the_one_shot_moments(
    monkeypatch: pytest.MonkeyPatch, stride: int, pad: int
) -> None:
    model, weights = _encoder()
    data = _calibration()
    request = CalibrationRequest(data=data, batch_size=BATCH)
    config = ShrinkConfig(
        ratio=0.25, units=("mlp",), method=StructuredMethod.FLAP, refit=True, damp=0.01, allocate="uniform",
        sequential=True, gram_stride=stride, pad_stride=pad,
    )  # fmt: skip
    seen = _measured(monkeypatch, "moments_of")
    streamed = ir.from_proto(model)
    shrink_model(streamed, config, request)
    assert len(seen) == 3  # every block streamed

    # block 0 reads the dense input: its Gram terms are numpy's over the sampled rows of relu(x W1)
    first = seen[0][1]
    assert isinstance(first, Moments)
    g = np.maximum(data["x"] @ weights[0][0], 0).astype(np.float64)
    assert (data["attention_mask"] == 0).sum() > 4 * max(pad, 1) * stride  # padding to sample
    gram, sums, rows = _sampled(g, data["attention_mask"], stride, pad)
    got_gram, got_sums, got_rows = first.gram_terms("r0")
    assert got_rows == rows != g.shape[0] * g.shape[1]  # a sample of the rows
    np.testing.assert_allclose(got_gram, gram, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got_sums, sums, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(first.sums["r0"], g.reshape(-1, HIDDEN).sum(0), rtol=1e-4, atol=1e-3)  # all rows

    # one tapped run per group on the shrunk prefix (moments.collect_moments) gives the same model
    per_group = ir.from_proto(model)
    shrink_model(per_group, config, measure=calibrated(request))
    a, b = ir.to_proto(streamed), ir.to_proto(per_group)
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_allclose(
            onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y), rtol=1e-4, atol=1e-4, err_msg=x.name
        )
    every = ir.from_proto(model)  # the option is honoured: every row refits another model
    shrink_model(every, replace(config, gram_stride=1, pad_stride=1), request)
    feed = {k: v[:2] for k, v in data.items()}
    assert np.abs(run(ir.to_proto(every), feed)[0] - run(a, feed)[0]).max() > 1e-4


def test_dense_cross_terms_pair_the_gram_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing shrunk upstream the dense input is the shrunk one: block 0's cross moments are its Gram terms,
    on the same sampled rows."""
    model, _ = _encoder()
    request = CalibrationRequest(data=_calibration(), batch_size=BATCH)
    config = ShrinkConfig(
        ratio=0.25, units=("mlp",), method=StructuredMethod.FLAP, refit=True, allocate="uniform", sequential=True,
        gram_stride=2, pad_stride=2, target="dense",
    )  # fmt: skip
    own = _measured(monkeypatch, "moments_of")
    dense = _measured(monkeypatch, "_dense_moments")
    shrink_model(ir.from_proto(model), config, request)
    first, cross = own[0][1], dense[0][1]
    assert isinstance(first, Moments) and isinstance(cross, dict)
    gram, sums, _ = first.gram_terms("r0")
    np.testing.assert_allclose(cross["r0"][0], gram, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cross["r0"][1], sums, rtol=1e-5, atol=1e-4)
    assert not np.allclose(sums, first.sums["r0"], rtol=1e-2)  # a sample, not every row
