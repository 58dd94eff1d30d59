"""Benchmark ``graphprune apply`` on a large model against plain ``onnx.load`` + ``onnx.save`` of the same model.

Generates (once, seeded, reused when present) a synthetic LLaMA-like decoder in ONNX with realistic layer shapes
(hidden 2048, MLP 5632, 32 heads, vocabulary 32000, like TinyLlama-1.1B but with full multi-head K/V), every
MatMul weight a ``[K, N]`` initializer, RMSNorm written out as elementwise ops, an embedding Gather and an LM head.
All weights are float32 in one external data file, IR version 8, opset 18. Default: 3 blocks, about 1.1 GB.

Then, in one run and each in its own subprocess (so peak RSS, the child's ``VmHWM``, is that process's alone):

* ``baseline``: ``onnx.load`` with external data, ``onnx.save`` with external data to a new path;
* ``apply-2:4``: ``prune_file`` with magnitude 2:4 (what ``graphprune apply --nm 2:4`` runs);
* ``apply-50%``: ``prune_file`` with magnitude, 50 % unstructured per output neuron (``--no-unstructured`` skips).

The cases alternate in order over ``--repeats`` rounds; medians are printed. Time is the operation inside the
process (imports excluded, the same for every case); peak memory is the process's maximum resident set size,
imports included. Targets (issue 14, streaming magnitude 2:4 apply of a model with external data): apply time
<= 0.7x the baseline, apply peak RSS <= 0.5x the model's bytes (the 50 % case keeps issue 2's 2x / 2.5x).
Finally ``graphprune check --nm 2:4`` verifies the 2:4 output
and ONNX Runtime runs it on a tiny input.

    python benchmarks/apply_large.py [--workdir DIR] [--blocks 3] [--repeats 3] [--profile]

Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IR_VERSION = 8
OPSET = 18
# (apply time / baseline time, apply peak RSS / model size on disk) per case: streaming magnitude 2:4 has issue
# 14's targets; the unstructured case keeps issue 2's (its per-output sort is not what issue 14 measures).
TARGETS = {"apply-2:4": (0.7, 0.5), "apply-50%": (2.0, 2.5)}
MODEL_NAME = "model.onnx"
_ALIGN = 4096  # offsets of tensors in the data file


@dataclass(frozen=True)
class Shape:
    """The synthetic model's dimensions."""

    blocks: int = 3
    hidden: int = 2048
    mlp: int = 5632
    heads: int = 32
    vocab: int = 32000
    seed: int = 0


# --------------------------------------------------------------------------------------------- model generation


class _DataWriter:
    """Writes tensors one at a time into one external data file and returns initializers that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stream = path.open("wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray):  # -> onnx.TensorProto
        import onnx

        array = np.ascontiguousarray(array)
        pad = -self.offset % _ALIGN
        self.stream.write(b"\0" * pad)
        self.offset += pad
        self.stream.write(array.tobytes())
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += array.nbytes
        return tensor

    def close(self) -> None:
        self.stream.close()


def generate(model_path: Path, shape: Shape) -> None:
    """Write the synthetic decoder to ``model_path`` with its weights in ``<name>.data`` beside it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(shape.seed)
    d, head_dim = shape.hidden, shape.hidden // shape.heads
    writer = _DataWriter(model_path.with_name(model_path.name + ".data"))
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, k: int, n: int) -> str:
        """A MatMul weight stored [K, N], scaled like a trained layer (std 1/sqrt(K))."""
        values = rng.standard_normal((k, n), dtype=np.float32)
        values *= np.float32(1.0 / np.sqrt(k))
        initializers.append(writer.add(name, values))
        return name

    def norm_weight(name: str) -> str:
        values = (1.0 + 0.05 * rng.standard_normal(d, dtype=np.float32)).astype(np.float32)
        initializers.append(writer.add(name, values))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_{op}", **attrs))
        return output

    def rms_norm(x: str, prefix: str) -> str:
        square = node("Mul", [x, x], f"{prefix}.sq")
        mean = node("ReduceMean", [square, "axes_last"], f"{prefix}.mean", keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}.var")], f"{prefix}.rms")
        return node("Mul", [node("Div", [x, rms], f"{prefix}.normed"), norm_weight(f"{prefix}.weight")], prefix)

    # Small constants stay inline (under the 1 KiB external-data threshold).
    initializers += [
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(head_dim), np.float32), "attn_scale"),
        numpy_helper.from_array(np.array([0, 0, shape.heads, head_dim], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, d], np.int64), "hidden_shape"),
    ]
    embedding = rng.standard_normal((shape.vocab, d), dtype=np.float32) * np.float32(0.02)
    initializers.append(writer.add("model.embed_tokens.weight", embedding))
    del embedding
    x = node("Gather", ["model.embed_tokens.weight", "input_ids"], "model.embed", axis=0)
    for i in range(shape.blocks):
        p = f"model.layers.{i}"
        h = rms_norm(x, f"{p}.input_layernorm")
        qkv = []
        for proj, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            y = node("MatMul", [h, weight(f"{p}.self_attn.{proj}_proj.weight", d, d)], f"{p}.self_attn.{proj}")
            y = node("Reshape", [y, "heads_shape"], f"{p}.self_attn.{proj}_heads")
            qkv.append(node("Transpose", [y], f"{p}.self_attn.{proj}_t", perm=perm))
        scores = node("MatMul", qkv[:2], f"{p}.self_attn.scores")
        scores = node("Mul", [scores, "attn_scale"], f"{p}.self_attn.scaled")
        probs = node("Softmax", [scores], f"{p}.self_attn.probs", axis=-1)
        context = node("MatMul", [probs, qkv[2]], f"{p}.self_attn.context")
        context = node("Transpose", [context], f"{p}.self_attn.context_t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, "hidden_shape"], f"{p}.self_attn.context_flat")
        attn = node("MatMul", [context, weight(f"{p}.self_attn.o_proj.weight", d, d)], f"{p}.self_attn.out")
        x = node("Add", [x, attn], f"{p}.attn_residual")
        h = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = node("MatMul", [h, weight(f"{p}.mlp.gate_proj.weight", d, shape.mlp)], f"{p}.mlp.gate")
        up = node("MatMul", [h, weight(f"{p}.mlp.up_proj.weight", d, shape.mlp)], f"{p}.mlp.up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        hidden = node("Mul", [silu, up], f"{p}.mlp.hidden")
        down = node("MatMul", [hidden, weight(f"{p}.mlp.down_proj.weight", shape.mlp, d)], f"{p}.mlp.down")
        x = node("Add", [x, down], f"{p}.mlp_residual")
    h = rms_norm(x, "model.norm")
    node("MatMul", [h, weight("lm_head.weight", d, shape.vocab)], "logits")
    writer.close()

    graph = helper.make_graph(
        nodes,
        "synthetic_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", shape.vocab])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphprune")
    model.ir_version = IR_VERSION
    model_path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(model_path))  # by path: it resolves the external data beside the model


def run_tiny(model_path: Path, vocab: int) -> np.ndarray:
    """Logits of the model in ONNX Runtime (CPU) on a [1, 8] input; raises if they are not finite."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    ids = np.arange(8, dtype=np.int64).reshape(1, 8) * 997 % vocab
    (logits,) = session.run(None, {"input_ids": ids})
    if logits.shape != (1, 8, vocab) or not np.isfinite(logits).all():
        raise RuntimeError(f"{model_path}: unexpected logits, shape {logits.shape}")
    return logits


def ensure_model(workdir: Path, shape: Shape) -> Path:
    """The model in ``workdir``, generated and sanity-checked when absent or made with other dimensions."""
    model_path = workdir / MODEL_NAME
    meta = workdir / "model.json"
    data = model_path.with_name(model_path.name + ".data")
    wanted = json.dumps(asdict(shape), sort_keys=True)
    if model_path.exists() and data.exists() and meta.exists() and meta.read_text() == wanted:
        print(f"reusing {model_path}")
        return model_path
    workdir.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)
    started = time.perf_counter()
    generate(model_path, shape)
    print(f"generated {model_path} in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    run_tiny(model_path, shape.vocab)
    print(f"ONNX Runtime runs it on a [1, 8] input ({time.perf_counter() - started:.1f} s)")
    meta.write_text(wanted)
    return model_path


# ------------------------------------------------------------------------------------------------ measurements


def _proc_status_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak resident set size since exec) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def child(case: str, model_path: Path, output: Path, profile: Path | None) -> None:
    """Run one case in this (fresh) process and print its timing as JSON on the last line of stdout."""
    import onnx

    if case.startswith("apply"):
        if str(ROOT) not in sys.path:  # run from a checkout without installing graphprune
            sys.path.insert(0, str(ROOT))
        from graphprune.algorithms.pattern import NMPattern, Scope, Unstructured
        from graphprune.algorithms.scores import Method
        from graphprune.passes.prune import PruneConfig
        from graphprune.pipeline.files import prune_file

        pattern = NMPattern(2, 4) if case == "apply-2:4" else Unstructured(0.5, Scope.OUTPUT)
        config = PruneConfig(pattern, method=Method.MAGNITUDE)

        def operation() -> None:
            prune_file(model_path, config, output)

    else:

        def operation() -> None:
            model = onnx.load_model(str(model_path), load_external_data=True)
            onnx.save_model(
                model,
                str(output),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=output.name + ".data",
                size_threshold=1024,
            )

    rss_before = _proc_status_kib("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    if profile is not None:
        import cProfile

        cProfile.runctx("operation()", globals(), {"operation": operation}, str(profile))
    else:
        operation()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_before_kib": rss_before, "peak_kib": peak}))


@dataclass
class Measurement:
    case: str
    seconds: float  # the operation only
    cpu_seconds: float  # the operation's user+sys time, all threads
    wall_seconds: float  # the whole process, interpreter start and imports included
    peak_bytes: int  # maximum resident set size of the process
    rss_before_bytes: int  # resident set size after imports, before the operation


def measure(case: str, model_path: Path, output: Path, profile: Path | None = None) -> Measurement:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, str(model_path), str(output)]
    if profile is not None:
        command += ["--profile-to", str(profile)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed with exit status {done.returncode}:\n{done.stdout}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The child's own VmHWM, not the rusage of os.wait4: Linux carries the parent's RSS at fork into a child's
    # ru_maxrss, and this process may be large after generating the model and running it in ONNX Runtime.
    return Measurement(
        case,
        result["seconds"],
        result["cpu_seconds"],
        wall,
        result["peak_kib"] * 1024,
        result["rss_before_kib"] * 1024,
    )


def remove_model(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data"), path.with_name(f"{path.stem}.report.json")):
        p.unlink(missing_ok=True)


def model_bytes(path: Path) -> int:
    return path.stat().st_size + path.with_name(path.name + ".data").stat().st_size


def check_output(output: Path, vocab: int) -> None:
    """``graphprune check --nm 2:4`` on the pruned model, then one ONNX Runtime run of it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "graphprune", "check", str(output), "--nm", "2:4", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"graphprune check failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    verdict = json.loads(done.stdout)
    print(f"graphprune check --nm 2:4: ok={verdict['ok']}, {len(verdict['weights'])} weights checked")
    run_tiny(output, vocab)
    print("ONNX Runtime runs the 2:4 output on a [1, 8] input")


# ---------------------------------------------------------------------------------------------------------- main


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the model is generated and kept (default: a temp dir)")
    parser.add_argument("--blocks", type=int, default=Shape.blocks, help="decoder blocks (default 3: ~1.1 GB)")
    parser.add_argument("--vocab", type=int, default=Shape.vocab)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every case; medians are reported")
    parser.add_argument("--no-unstructured", action="store_true", help="skip the 50%% unstructured case")
    parser.add_argument("--profile", action="store_true", help="also write a cProfile of one 2:4 apply")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "MODEL", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, model, output = args.child
        child(case, Path(model), Path(output), args.profile_to)
        return 0

    shape = Shape(blocks=args.blocks, vocab=args.vocab)
    with tempfile.TemporaryDirectory(prefix="graphprune-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        model_path = ensure_model(workdir, shape)
        size = model_bytes(model_path)
        if size < 500e6:
            print(f"warning: the model is {_mb(size)}, under the 500 MB the benchmark is meant for")
        # Bring the input into the page cache, so that the first case doesn't pay for the disk read alone.
        with model_path.with_name(model_path.name + ".data").open("rb") as stream:
            while stream.read(1 << 24):
                pass
        cases = ["baseline", "apply-2:4"] + ([] if args.no_unstructured else ["apply-50%"])
        results: dict[str, list[Measurement]] = {c: [] for c in cases}
        for round_ in range(args.repeats):
            for case in cases if round_ % 2 == 0 else cases[::-1]:
                output = workdir / f"out-{case.replace(':', '-').replace('%', 'pct')}.onnx"
                remove_model(output)
                m = measure(case, model_path, output)
                results[case].append(m)
                print(
                    f"round {round_ + 1} {case:>10}: {m.seconds:6.2f} s, CPU {m.cpu_seconds:6.2f} s "
                    f"(process {m.wall_seconds:6.2f} s, load {os.getloadavg()[0]:.1f}), "
                    f"peak RSS {_mb(m.peak_bytes)}",
                    flush=True,
                )
                if not (case == "apply-2:4" and round_ == args.repeats - 1):
                    remove_model(output)
        nm_output = workdir / "out-apply-2-4.onnx"
        check_output(nm_output, shape.vocab)
        remove_model(nm_output)
        if args.profile:
            stats = workdir / "apply-2-4.prof"
            measure("apply-2:4", model_path, nm_output, profile=stats)
            remove_model(nm_output)
            print(f"cProfile of one 2:4 apply: {stats}")
        return report(results, size, shape, args.repeats)


def report(results: dict[str, list[Measurement]], size: int, shape: Shape, repeats: int) -> int:
    def median(case: str, field: str) -> float:
        return statistics.median(getattr(m, field) for m in results[case])

    base_time = median("baseline", "seconds")
    print()
    print(
        f"model: {shape.blocks} LLaMA-like blocks (hidden {shape.hidden}, MLP {shape.mlp}, vocab {shape.vocab}), "
        f"{_mb(size)} on disk (float32, external data); medians of {repeats} rounds"
    )
    print(
        f"{'case':>10} {'time':>8} {'x base':>7} {'CPU':>8} {'process':>8} {'peak RSS':>10} {'x size':>7} "
        f"{'RSS pre':>8}"
    )
    ok = True
    for case in results:
        seconds, peak = median(case, "seconds"), median(case, "peak_bytes")
        time_ratio, memory_ratio = seconds / base_time, peak / size
        print(
            f"{case:>10} {seconds:7.2f}s {time_ratio:6.2f}x {median(case, 'cpu_seconds'):7.2f}s "
            f"{median(case, 'wall_seconds'):7.2f}s "
            f"{_mb(peak):>10} {memory_ratio:6.2f}x {_mb(median(case, 'rss_before_bytes')):>8}"
        )
        if case in TARGETS:
            time_target, memory_target = TARGETS[case]
            met = time_ratio <= time_target and memory_ratio <= memory_target
            ok &= met
            print(
                f"{'':>10} target: time <= {time_target}x baseline, peak RSS <= {memory_target}x model size: "
                f"{'met' if met else 'MISSED'}"
            )
    print(f"targets: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
