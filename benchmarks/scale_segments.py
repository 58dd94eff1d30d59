"""Benchmark segment-wise pruning of models larger than memory: peak RSS against the model's size, in one run.

Cases (``--case``):

* ``llama7b``: a synthetic decoder with LLaMA-2-7B shapes (hidden 4096, MLP 11008, 32 heads, 32 blocks,
  vocabulary 32000), FP32, about 27 GB of external data, generated here by ``apply_large.generate`` (the
  issue-2 benchmark's model, at other dimensions). ``graphprune apply --nm 2:4 --method wanda --calib
  calib.npz --sequential --max-memory 8GB`` on 4 windows of 512 (random) tokens runs in a child process whose
  peak RSS (``VmHWM``) is the figure; target: <= 8 GB. The output then passes ``graphprune check --nm 2:4``
  (run when the machine has the memory for the checker, see ``--check``) and an ONNX Runtime run of its first
  block is compared with numpy on the pruned weights. ``--blocks 8`` runs a scaled-down version. With
  ``--magnitude`` the same generated model is then pruned by the streaming magnitude 2:4 apply (``apply --nm 2:4
  --method magnitude``: weights read, pruned and written one at a time), after the Wanda output is deleted (the
  disk holds the model and one output at a time); a plain ``onnx.load`` + ``onnx.save`` cannot run at this size.
* ``vocab262k``: a 1.1 GB decoder with a 262,144-token vocabulary (hidden 512, MLP 1536, 8 heads, 4 blocks;
  embedding and head are 1 GB of it), one-shot Wanda 2:4 on 8 windows of 512 tokens in one batch, as the issue
  measured (the logits alone would be 4.3 GB): the segment-wise one-shot (``--max-memory 2GB``), which never
  computes the logits, and with ``--compare`` in the same run today's one-shot calibration (about 8 GB at
  peak: mind a shared machine). Target: segment-wise peak <= 2x the weights.

Everything is written under ``--workdir`` (default: a temporary directory) and deleted at the end unless
``--keep``. Run it under ``nice -n 10`` on a shared machine.

    python benchmarks/scale_segments.py --case llama7b [--blocks 32] [--magnitude] [--workdir DIR] [--keep]
    python benchmarks/scale_segments.py --case vocab262k

Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apply_large import Shape, _proc_status_kib, generate, model_bytes

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
SEVEN_B = Shape(blocks=32, hidden=4096, mlp=11008, heads=32, vocab=32000)
VOCAB_262K = Shape(blocks=4, hidden=512, mlp=1536, heads=8, vocab=262144)
TINY = Shape(blocks=3, hidden=256, mlp=704, heads=4, vocab=2000)  # --tiny: a smoke test of the script


def make_model(directory: Path, shape: Shape) -> Path:
    """Generate the synthetic decoder (no whole-model check: at 27 GB it would not fit in memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    generate(path, shape)
    return path


def _log_progress(started: float) -> None:
    """Log each stage the CLI's display shows (segment i of n, every 16th weight) as a line on stderr.

    The display is transient and draws nothing when stderr is a file; an hour-long run logged to a file should
    still say how far it got.
    """
    from graphprune.cli.progress import Bar

    describe, advance = Bar.describe, Bar.advance
    weights = [0]

    def stamp(text: str) -> None:
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        print(
            f"[{time.perf_counter() - started:7.0f} s wall, {cpu.ru_utime + cpu.ru_stime:7.0f} s CPU, "
            f"RSS {_proc_status_kib('VmRSS') / 1e6:.2f} GB, load {os.getloadavg()[0]:.1f}] {text}",
            file=sys.stderr,
            flush=True,
        )

    def logged_describe(self: Bar, text: str) -> None:
        stamp(text)
        describe(self, text)

    def logged_advance(self: Bar, n: int = 1) -> None:
        weights[0] += n
        if weights[0] % 16 == 0:
            stamp(f"{weights[0]} weights pruned")
        advance(self, n)

    Bar.describe, Bar.advance = logged_describe, logged_advance  # type: ignore[method-assign]


def child(args: list[str]) -> None:
    """Run ``graphprune ARGS`` in this process; print its time, CPU time and peak RSS as JSON on the last line."""
    from graphprune.cli import app

    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # the RSS over time, to tell which phase peaked
        while not done.wait(0.5):
            samples.append(_proc_status_kib("VmRSS"))

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    _log_progress(started)
    code = 0
    try:
        app(args, standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    seconds = time.perf_counter() - started
    done.set()
    peak = _proc_status_kib("VmHWM") * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    print(
        json.dumps(
            {
                "code": code,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_bytes": peak,
                "load": os.getloadavg()[0],
                "rss_samples_kib": samples[::10],
            }
        )
    )


def graphprune(args: list[str]) -> dict:
    """``graphprune ARGS`` in a fresh child process: exit code, seconds and peak RSS."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"graphprune {' '.join(args)} failed ({done.returncode}):\n{done.stdout}")
    result = json.loads(lines[-1])
    result["stdout"] = "\n".join(lines[:-1])
    return result


def write_calibration(path: Path, windows: int, seqlen: int, vocab: int) -> None:
    rng = np.random.default_rng(1)
    np.savez(path, input_ids=rng.integers(0, vocab, size=(windows, seqlen), dtype=np.int64))


def first_block_matches_numpy(output: Path, shape: Shape) -> float:
    """Run block 0 of the pruned model in ONNX Runtime and in numpy; returns the max relative difference."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(output), load_external_data=False)
    prefix = "model.layers.0."
    nodes = [n for n in model.graph.node if n.output[0].startswith(prefix)]
    reads = {i for n in nodes for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in reads]
    first, last = "model.embed", f"{prefix}mlp_residual"
    block = helper.make_graph(
        nodes,
        "block0",
        [helper.make_tensor_value_info(first, onnx.TensorProto.FLOAT, [1, "s", shape.hidden])],
        [helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, [1, "s", shape.hidden])],
        inits,
    )
    sub = helper.make_model(block, opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    path = output.with_name("block0.onnx")  # beside the output: its tensors point into the output's data file
    path.write_bytes(sub.SerializeToString())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 64, shape.hidden)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([last], {first: x})
    del session
    path.unlink()

    data = output.with_name(output.name + ".data")
    by_name = {t.name: t for t in inits}

    def w(name: str) -> np.ndarray:
        info = {e.key: e.value for e in by_name[prefix + name].external_data}
        dims = tuple(by_name[prefix + name].dims)
        return np.fromfile(data, np.float32, int(np.prod(dims)), offset=int(info["offset"])).reshape(dims)

    def rms(h: np.ndarray, name: str) -> np.ndarray:
        h64 = h.astype(np.float64)
        return h64 / np.sqrt((h64**2).mean(-1, keepdims=True) + 1e-5) * w(f"{name}.weight")

    head_dim = shape.hidden // shape.heads
    h = rms(x, "input_layernorm")
    q, k, v = (
        (h @ w(f"self_attn.{p}_proj.weight")).reshape(1, -1, shape.heads, head_dim).transpose(0, 2, 1, 3)
        for p in "qkv"
    )
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(1, -1, shape.hidden)
    x1 = x + context @ w("self_attn.o_proj.weight")
    h = rms(x1, "post_attention_layernorm")
    gate, up = h @ w("mlp.gate_proj.weight"), h @ w("mlp.up_proj.weight")
    expected = x1 + (gate / (1 + np.exp(-gate)) * up) @ w("mlp.down_proj.weight")
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):  # the weights really are 2:4 along K
        groups = w(name).T.reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) <= 2).all(), name
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def check_pattern(output: Path, size: int, force: bool) -> str:
    """``graphprune check --nm 2:4`` on the output, when it can run here; its verdict and peak RSS."""
    available = _meminfo_bytes("MemAvailable")
    if not force and size > 0.5 * available:
        return f"graphprune check not run: the output is {size / GB:.1f} GB, {available / GB:.1f} GB available"
    result = graphprune(["check", str(output), "--nm", "2:4", "--json", "--no-eligibility"])
    verdict = json.loads(result["stdout"])
    if result["code"] != 0 or not verdict["ok"]:
        raise RuntimeError(f"graphprune check failed: {result['stdout'][:2000]}")
    return (
        f"graphprune check --nm 2:4: ok, {len(verdict['weights'])} weights, "
        f"{result['seconds']:.0f} s, peak RSS {result['peak_bytes'] / GB:.2f} GB"
    )


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _timing(result: dict) -> str:
    return f"{result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU, load average {result['load']:.1f}"


def run_llama7b(workdir: Path, shape: Shape, max_memory: str, force_check: bool, magnitude: bool) -> bool:
    started, cpu = time.perf_counter(), time.process_time()
    print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
    model = make_model(workdir / "model", shape)
    size = model_bytes(model)
    seconds = time.perf_counter() - started
    print(
        f"model: {shape.blocks} blocks of LLaMA-2-7B shapes, {size / GB:.2f} GB, generated in {seconds:.0f} s "
        f"({time.process_time() - cpu:.0f} s CPU)",
        flush=True,
    )
    calib = workdir / "calib.npz"
    write_calibration(calib, 4, 512, shape.vocab)
    output = workdir / "out" / "pruned.onnx"
    args = ["apply", str(model), "--nm", "2:4", "--method", "wanda", "--calib", str(calib), "--sequential"]
    args += ["--max-memory", max_memory, "-o", str(output), "--force"]
    result = graphprune(args)
    if result["code"] != 0:
        raise RuntimeError(f"apply failed: {result['stdout']}")
    peak = result["peak_bytes"]
    print(f"apply --sequential --max-memory {max_memory}: {_timing(result)}, peak RSS {peak / GB:.2f} GB")
    print(f"  = {peak / size:.3f}x the model's bytes; RSS samples (GB): {_samples(result)}", flush=True)
    if not magnitude:
        shutil.rmtree(model.parent)  # room on the disk for the checks (the output is as large as the input)
    print(check_pattern(output, size, force_check), flush=True)
    error = first_block_matches_numpy(output, shape)
    print(f"block 0 of the output in ONNX Runtime vs numpy on the pruned weights: max rel. difference {error:.2e}")
    ok = peak <= 8e9 and error < 1e-4
    print(f"target: peak RSS <= 8 GB and block 0 matches: {'met' if ok else 'MISSED'}", flush=True)
    if magnitude:
        shutil.rmtree(output.parent)  # the disk holds the model and one output at a time
        ok = run_magnitude(model, shape, size, workdir / "out-magnitude" / "pruned.onnx") and ok
    return ok


def run_magnitude(model: Path, shape: Shape, size: int, output: Path) -> bool:
    """The streaming magnitude 2:4 apply of the same model: one weight in memory at a time."""
    args = ["apply", str(model), "--nm", "2:4", "--method", "magnitude", "-o", str(output), "--force"]
    result = graphprune(args)
    if result["code"] != 0:
        raise RuntimeError(f"magnitude apply failed: {result['stdout']}")
    peak = result["peak_bytes"]
    print(f"streaming apply --method magnitude: {_timing(result)}, peak RSS {peak / GB:.2f} GB")
    print(f"  = {peak / size:.3f}x the model's bytes; RSS samples (GB): {_samples(result)}")
    print("  a plain onnx.load + onnx.save of this model cannot run here (its weights exceed the memory)")
    error = first_block_matches_numpy(output, shape)
    print(f"block 0 of the magnitude output in ONNX Runtime vs numpy: max rel. difference {error:.2e}")
    ok = peak <= 0.5 * size and error < 1e-4
    verdict = "met" if ok else "MISSED"
    print(f"target: peak RSS <= 0.5x the model's bytes and block 0 matches: {verdict}", flush=True)
    return ok


def run_vocab(workdir: Path, compare: bool) -> bool:
    model = make_model(workdir / "model", VOCAB_262K)
    size = model_bytes(model)
    calib = workdir / "calib.npz"
    write_calibration(calib, 8, 512, VOCAB_262K.vocab)
    base = ["apply", str(model), "--nm", "2:4", "--method", "wanda", "--calib", str(calib), "--batch-size", "8"]
    cases = {"segments": ["--max-memory", "2GB"], **({"one-shot": []} if compare else {})}
    peaks, seconds = {}, {}
    for name, extra in cases.items():
        output = workdir / "out" / f"{name}.onnx"
        result = graphprune([*base, *extra, "-o", str(output), "--force"])
        if result["code"] != 0:
            raise RuntimeError(f"{name} failed: {result['stdout']}")
        peaks[name] = result["peak_bytes"]
        print(
            f"{name:>9}: {_timing(result)}, peak RSS {result['peak_bytes'] / GB:.2f} GB "
            f"= {result['peak_bytes'] / size:.2f}x the weights ({size / GB:.2f} GB)",
            flush=True,
        )
        seconds[name] = result["seconds"]
    same = True
    if compare:
        same = _same_tensors(workdir / "out" / "one-shot.onnx", workdir / "out" / "segments.onnx")
        print(f"segment-wise one-shot writes the same weights as one-shot: {same}")
        print(
            f"segment-wise / one-shot: {peaks['segments'] / peaks['one-shot']:.2f}x the peak RSS, "
            f"{seconds['segments'] / seconds['one-shot']:.2f}x the time"
        )
    ok = peaks["segments"] <= 2 * size and same
    print(f"target: segment-wise peak <= 2x the weights: {'met' if ok else 'MISSED'}")
    return ok


def _same_tensors(a: Path, b: Path) -> bool:
    """Every initializer of the two models holds the same bytes (the data files' layouts may differ)."""
    from graphprune.graph.model_io import load_model

    first, second = load_model(a).graph.initializers, load_model(b).graph.initializers
    if first.keys() != second.keys():
        return False
    differ = [n for n in first if first[n].const_value.tobytes() != second[n].const_value.tobytes()]
    if differ:
        print(f"  {len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}")
    return not differ


def _samples(result: dict) -> str:
    return " ".join(f"{kib * 1024 / GB:.1f}" for kib in result["rss_samples_kib"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["llama7b", "vocab262k"], default="llama7b")
    parser.add_argument("--blocks", type=int, default=SEVEN_B.blocks, help="llama7b: decoder blocks (32: 27 GB)")
    parser.add_argument("--max-memory", default="8GB", help="llama7b: the budget given to apply")
    parser.add_argument("--tiny", action="store_true", help="llama7b: tiny dimensions, a smoke test")
    parser.add_argument("--magnitude", action="store_true", help="llama7b: then the streaming magnitude apply")
    parser.add_argument("--compare", action="store_true", help="vocab262k: also run today's one-shot (~8 GB)")
    parser.add_argument("--check", action="store_true", help="run graphprune check even when memory looks short")
    parser.add_argument("--workdir", type=Path, help="where models are written (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and outputs")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="graphprune-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.case == "llama7b":
            shape = TINY if args.tiny else replace(SEVEN_B, blocks=args.blocks)
            ok = run_llama7b(workdir, shape, args.max_memory, args.check, args.magnitude)
        else:
            ok = run_vocab(workdir, args.compare)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
