"""Byte-identity of `graphprune apply` outputs across a refactor: record sha256 of every output, compare later.

Runs the command line (a subprocess per case, as a user would) on paraphrase-MiniLM-L3-v2 (inline weights, and
the same model saved with external data) and on a tiny synthetic decoder built here (two blocks of attention
with heads plus a LLaMA MLP, seeded), in the modes each pruning strategy takes: magnitude streamed, wanda,
sparsegpt and alps one-shot and sequential, --permute, segment-wise runs of external-data models
(--max-memory, --sequential), unstructured sparsity. For each case it hashes the model file, its data files and
the report.

    python benchmarks/identity_check.py --record before.json
    python benchmarks/identity_check.py --compare before.json   # exit 1 when any hash differs

Needs the MiniLM-L3 model, all-MiniLM-L6's tokenizer and the Brown text in the asset cache
(`python -m graphprune.demo minilm_l3` etc.).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, HEAD_DIM, FFN, BLOCKS = 64, 4, 16, 128, 2


def synthetic_decoder(seed: int = 7) -> onnx.ModelProto:
    """x -> [x + attn(x); h + mlp(h)] * BLOCKS, attention with HEADS heads of HEAD_DIM, MatMul [K, N] weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name: str, *shape: int) -> str:
        inits.append(
            numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
        )
        return name

    def shape(name: str, *dims: int) -> str:
        inits.append(numpy_helper.from_array(np.array(dims, np.int64), name))
        return name

    heads, merged = shape("heads_shape", 0, 0, HEADS, HEAD_DIM), shape("merged_shape", 0, 0, HEADS * HEAD_DIM)
    x = "x"
    for b in range(BLOCKS):
        p = f"b{b}_"
        for name in ("q", "k", "v"):
            nodes.append(
                helper.make_node("MatMul", [x, weight(p + "w" + name, HIDDEN, HEADS * HEAD_DIM)], [p + name])
            )
            nodes.append(helper.make_node("Reshape", [p + name, heads], [p + name + "4"]))
        nodes += [
            helper.make_node("Transpose", [p + "q4"], [p + "qh"], perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", [p + "k4"], [p + "kh"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", [p + "v4"], [p + "vh"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [p + "qh", p + "kh"], [p + "scores"]),
            helper.make_node("Softmax", [p + "scores"], [p + "probs"], axis=-1),
            helper.make_node("MatMul", [p + "probs", p + "vh"], [p + "ctx"]),
            helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ctx_t", merged], [p + "ctx_m"]),
            helper.make_node("MatMul", [p + "ctx_m", weight(p + "wo", HEADS * HEAD_DIM, HIDDEN)], [p + "attn"]),
            helper.make_node("Add", [x, p + "attn"], [p + "h"]),
            helper.make_node("MatMul", [p + "h", weight(p + "gate", HIDDEN, FFN)], [p + "g"]),
            helper.make_node("Sigmoid", [p + "g"], [p + "sg"]),
            helper.make_node("Mul", [p + "g", p + "sg"], [p + "silu"]),
            helper.make_node("MatMul", [p + "h", weight(p + "up", HIDDEN, FFN)], [p + "u"]),
            helper.make_node("Mul", [p + "silu", p + "u"], [p + "m"]),
            helper.make_node("MatMul", [p + "m", weight(p + "down", FFN, HIDDEN)], [p + "d"]),
            helper.make_node("Add", [p + "h", p + "d"], [p + "out"]),
        ]
        x = p + "out"
    nodes.append(helper.make_node("MatMul", [x, weight("head", HIDDEN, 32)], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def prepare(work: Path) -> dict[str, Path]:
    """The models and calibration files of the cases, written under ``work``."""
    from tokenizers import Tokenizer

    from graphprune import demo

    files: dict[str, Path] = {}
    for name, model in (("minilm", onnx.load(str(demo.minilm_l3()))), ("tiny", synthetic_decoder())):
        for key, external in ((name, False), (f"{name}_ext", True)):  # inline weights, and in a data file
            files[key] = work / key / "model.onnx"
            files[key].parent.mkdir()
            onnx.save(
                model,
                str(files[key]),
                save_as_external_data=external,
                location="model.onnx.data",
                size_threshold=1024,
            )

    tokenizer = Tokenizer.from_file(str(demo.all_minilm_l6() / "tokenizer.json"))
    tokenizer.enable_truncation(64)
    tokenizer.enable_padding(length=64)
    calibration, _ = demo.brown_split()
    paragraphs = [p for p in calibration.split("\n\n") if len(p) > 80][:16]
    encoded = tokenizer.encode_batch(paragraphs)
    files["minilm_calib"] = work / "minilm_calib.npz"
    np.savez(
        files["minilm_calib"],
        input_ids=np.array([e.ids for e in encoded], np.int64),
        attention_mask=np.array([e.attention_mask for e in encoded], np.int64),
    )
    files["tiny_calib"] = work / "tiny_calib.npz"
    np.savez(files["tiny_calib"], x=np.random.default_rng(3).standard_normal((16, 8, HIDDEN)).astype(np.float32))
    return files


# case name -> (model key, calibration key or None, extra options)
CASES: dict[str, tuple[str, str | None, list[str]]] = {}
for model in ("minilm", "tiny"):
    calib = f"{model}_calib"
    CASES |= {
        f"{model}-magnitude-2:4": (model, None, []),
        f"{model}-magnitude-50%-layer": (model, None, ["--sparsity", "0.5", "--scope", "layer"]),
        f"{model}-wanda-2:4": (model, calib, ["--method", "wanda", "--batch-size", "4"]),
        f"{model}-wanda-50%": (model, calib, ["--method", "wanda", "--sparsity", "0.5"]),
        f"{model}-wanda-2:4-permute": (model, calib, ["--method", "wanda", "--permute"]),
        f"{model}-wanda-2:4-sequential-permute": (
            model,
            calib,
            ["--method", "wanda", "--sequential", "--permute"],
        ),
        f"{model}-sparsegpt-2:4-sequential": (model, calib, ["--method", "sparsegpt", "--sequential"]),
        f"{model}-sparsegpt-2:4-by-level": (model, calib, ["--method", "sparsegpt", "--sequential", "--by-level"]),
        f"{model}-sparsegpt-2:4-permute": (model, calib, ["--method", "sparsegpt", "--permute"]),
        f"{model}-alps-2:4": (model, calib, ["--method", "alps"]),
        f"{model}-alps-2:4-permute": (model, calib, ["--method", "alps", "--permute"]),
        f"{model}_ext-magnitude-2:4-streamed": (f"{model}_ext", None, []),
        f"{model}_ext-wanda-2:4-max-memory": (f"{model}_ext", calib, ["--method", "wanda", "--max-memory", "1GB"]),
        f"{model}_ext-wanda-2:4-segments-sequential": (
            f"{model}_ext",
            calib,
            ["--method", "wanda", "--sequential"],
        ),
        f"{model}_ext-sparsegpt-2:4-segments-max-memory": (
            f"{model}_ext",
            calib,
            ["--method", "sparsegpt", "--sequential", "--max-memory", "1MB"],
        ),
        f"{model}_ext-wanda-2:4-segments-permute": (
            f"{model}_ext",
            calib,
            ["--method", "wanda", "--sequential", "--by-level", "--permute"],
        ),
        f"{model}_ext-alps-2:4-segments": (f"{model}_ext", calib, ["--method", "alps", "--sequential"]),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_digest(model_path: Path) -> str:
    """sha256 of every initializer (name, type, shape, bytes) in name order: the weights alone, whatever the
    rest of the file (value_info, metadata) holds."""
    digest = hashlib.sha256()
    model = onnx.load(str(model_path))
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        array = numpy_helper.to_array(tensor)
        digest.update(f"{tensor.name}|{tensor.data_type}|{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def run_case(files: dict[str, Path], work: Path, name: str) -> dict[str, str]:
    model, calib, options = CASES[name]
    out_dir = work / "out" / name.replace(":", "-").replace("%", "pc")
    command = [sys.executable, "-m", "graphprune", "apply", str(files[model]), "--nm", "2:4", "-o"]
    command += [str(out_dir / "pruned.onnx"), *(["--calib", str(files[calib])] if calib else []), *options]
    if "--sparsity" in options:
        command.remove("--nm"), command.remove("2:4")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1]}
    hashes = {p.name: sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    return {**hashes, "weights": weights_digest(out_dir / "pruned.onnx")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the hashes to this JSON file")
    group.add_argument("--compare", type=Path, help="compare with hashes recorded earlier")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = prepare(work)
        names = [n for n in CASES if args.only is None or args.only in n]
        hashes = {}
        for name in names:
            hashes[name] = run_case(files, work, name)
            print(name, "error: " + hashes[name]["error"] if "error" in hashes[name] else "ok", flush=True)
    if args.record:
        args.record.write_text(json.dumps(hashes, indent=1, sort_keys=True))
        return 0
    recorded = json.loads(args.compare.read_text())
    differ = [n for n in names if recorded.get(n) != hashes[n]]
    for n in differ:
        same_weights = recorded.get(n, {}).get("weights") == hashes[n].get("weights")
        verdict = "same weights" if same_weights else "weights differ"
        print(f"DIFFERS {n} ({verdict}): {recorded.get(n)} != {hashes[n]}")
    print(f"{len(names) - len(differ)} of {len(names)} cases byte-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
