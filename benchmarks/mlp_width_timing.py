"""What one MLP neuron costs at each width: all-MiniLM-L6's MLP (384 -> N -> 384, MatMul + Add + Gelu + MatMul) on
the 64 x 128 batch of the shrink benchmarks, ONNX Runtime CPU, one thread, every width in turn in one process
(``--rounds`` interleaved rounds): median CPU seconds per batch and per 1000 neurons. Shows whether widths off a
multiple of 8 or 16 (what ``--allocate global|error`` leaves without ``--round-to``) cost more per neuron.

    nice -n 10 python benchmarks/mlp_width_timing.py 1152 1153 1158 1168 1181 1184 1187 1200 --rounds 9 \\
        --json benchmarks/results/mlp_width_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, ROWS = 384, (64, 128)


def session(width: int) -> ort.InferenceSession:
    rng = np.random.default_rng(width)
    weights = [
        numpy_helper.from_array(rng.standard_normal((HIDDEN, width)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((width, HIDDEN)).astype(np.float32) / width**0.5, "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["a"]),
        helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ]
    shape = [*ROWS, HIDDEN]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("widths", nargs="+", type=int)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "mlp_width_timing.json")
    args = parser.parse_args()
    sessions = {w: session(w) for w in args.widths}
    x = np.random.default_rng(0).standard_normal((*ROWS, HIDDEN)).astype(np.float32)
    cpu: dict[int, list[float]] = {w: [] for w in args.widths}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):  # every width in turn: they all see the same load
        for w, s in sessions.items():
            c = time.process_time()
            s.run(None, {"x": x})
            cpu[w].append(time.process_time() - c)
    load.append(os.getloadavg()[0])
    rows = {
        w: {
            "median_cpu_s": round(statistics.median(t), 4),
            "per_1000_neurons_s": round(statistics.median(t) / w * 1000, 4),
            "multiple_of_16": w % 16 == 0,
        }
        for w, t in cpu.items()
    }
    result = {"rounds": args.rounds, "threads": 1, "load": [round(v, 2) for v in load], "widths": rows}
    print(json.dumps(result, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
