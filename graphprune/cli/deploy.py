"""Deployment commands: ``convert`` (FP16/BF16), ``build`` (TensorRT engine) and ``bench`` (dense vs 2:4)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from graphprune.cli.app import app, console, out, user_errors
from graphprune.cli.flags import as_flags
from graphprune.cli.tables import Col, fitted_table
from graphprune.errors import GraphpruneError


@app.command()
@user_errors
def convert(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model to convert, e.g. model.pruned.onnx.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Convert to FP16 (the default), e.g. --fp16.")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="Convert to BF16 instead of FP16, e.g. --bf16.")] = False,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Where to write, e.g. -o model.fp16.onnx. Default: <stem>.fp16.onnx."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists, e.g. --force.")] = False,
) -> None:
    """Convert weights and computation to FP16 or BF16 for TensorRT, keeping every pruned zero.

    Graph inputs and outputs keep their FP32 types (Casts at the boundary); normalisations, softmax, reductions,
    Pow/Sqrt and Exp/Log stay in FP32. Zeros stay zeros, non-zeros too small for the type stay non-zero, and
    overflowing values saturate. The input file is never modified; the output is written atomically.

    Example: graphprune convert model.pruned.onnx --fp16 -o model.fp16.onnx
    """
    from graphprune.pipeline.convert_file import convert_file
    from graphprune.tensorrt.eligibility import summary

    if fp16 and bf16:
        raise GraphpruneError("choose one of --fp16 and --bf16")
    done = convert_file(model, output, dtype="bfloat16" if bf16 else "float16", force=force)
    result, suffix = done.conversion, "bf16" if bf16 else "fp16"
    stats = result.rounding
    console.print(
        f"wrote {done.output}: {len(result.converted)} tensors in {suffix}, "
        f"{len(result.fp32_nodes)} nodes kept in FP32, "
        f"{result.casts_inserted} casts; {stats.raised_from_zero} tiny non-zeros kept non-zero, "
        f"{stats.saturated} saturated to the largest finite value",
        highlight=False,
    )
    console.print(f"kept in FP32: {result.fp32_summary()}", highlight=False)
    eligibility = summary(done.eligibility)
    console.print(f"sparse eligibility of the result: {eligibility} (details: graphprune check)", highlight=False)


@app.command()
@user_errors
def build(
    model: Annotated[Path, typer.Argument(help="ONNX model to build, e.g. model.fp16.onnx.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Engine file to write, e.g. -o model.engine.")],
    backend: Annotated[
        str | None,
        typer.Option(
            help="tensorrt (TensorRT 10/11: builds on the GPU it targets) or tensorrt-rtx (TensorRT for RTX: "
            'builds ahead of time without a GPU; pip install "graphprune\\[trt-rtx]"), '
            "e.g. --backend tensorrt-rtx. Default: whichever is installed, TensorRT first."
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Math precision: fp16, bf16 or int8-qdq (a model with Q/DQ nodes), e.g. --precision fp16. "
            "Default: what the ONNX file holds. Only TensorRT 10 can lower an FP32 file with builder flags "
            "(fp16 by default); TensorRT 11 and TensorRT-RTX take precision from the file, so convert first "
            "(graphprune convert --fp16)."
        ),
    ] = None,
    sparse: Annotated[
        bool,
        typer.Option(
            "--sparse/--no-sparse",
            help="Set the SPARSE_WEIGHTS builder flag so 2:4 layers may use sparse kernels, e.g. --no-sparse "
            "for the dense baseline.",
        ),
    ] = True,
    shapes: Annotated[
        list[str] | None,
        typer.Option(
            help="Optimisation profile of a dynamic input as NAME:MIN,OPT,MAX with dims joined by x, or "
            "NAME:SHAPE for a static profile (MIN = OPT = MAX); repeat per input, e.g. "
            "--shapes images:1x3x640x640 or "
            "--shapes input_ids:1x16,8x128,32x512 --shapes attention_mask:1x16,8x128,32x512."
        ),
    ] = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option(
            help="Timing cache to load if present and save after the build, e.g. --timing-cache trt.cache "
            "(TensorRT only: TensorRT-RTX has none, the option is ignored with a warning)."
        ),
    ] = None,
    workspace: Annotated[
        float | None, typer.Option(help="Workspace memory-pool limit in GiB, e.g. --workspace 4.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists, e.g. --force.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the engine report (as saved in <engine>.json) on stdout.")
    ] = False,
) -> None:
    """Build a TensorRT or TensorRT-RTX engine with sparse weights and report what the builder said about sparsity.

    The report (backend and version, profiles, the builder's sparsity lines verbatim, each engine layer's tactic
    where the builder or the engine inspector names it) is saved beside the engine as <engine>.json. No layer is
    called sparse unless a log line or a tactic name says so: TensorRT-RTX chooses kernels when the engine is
    loaded on the user's GPU, so its build cannot say which layers will run sparse. Engine and report are written
    together at the end, or not at all.

    Example: graphprune build model.fp16.onnx -o model.engine --backend tensorrt-rtx
    --shapes input_ids:1x16,8x128,32x512 --shapes attention_mask:1x16,8x128,32x512
    """
    from graphprune.tensorrt.build import build_engine

    report = build_engine(
        model, output, precision, sparse, shapes or [], timing_cache, workspace, backend=backend, force=force
    )
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(as_flags(warning))}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(report.to_json())
        return
    facts = report.sparsity
    if facts.eligible_layers:
        picked = set(facts.sparse_layers)
        rows = [[layer, "yes" if layer in picked else "no (dense faster)"] for layer in facts.eligible_layers]
        title = f"{report.product} {report.version} on {report.gpu}: {report.note}"
        console.print(fitted_table(console, [Col("eligible layer"), Col("sparse kernel")], rows, title=title))
    console.print(f"sparsity: {escape(facts.verdict)}", highlight=False, soft_wrap=True)
    if report.layers:
        counts = Counter(layer["precision"] or "unknown" for layer in report.layers)
        seen = ", ".join(f"{n} {label}" for label, n in counts.most_common())
        text = f"layer precision ({len(report.layers)} layers, {report.layers_source}): {seen}; "
        console.print(escape(text + report.layer_precision_note), highlight=False, soft_wrap=True)
    console.print(
        f"wrote {output} ({report.engine_bytes / 2**20:.1f} MiB) in {report.build_seconds:.1f} s with "
        f"{report.product} {report.version}; report in {output}.json",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@user_errors
def bench(
    model: Annotated[Path, typer.Argument(help="Pruned ONNX model, e.g. model.pruned.onnx.")],
    backend: Annotated[
        str,
        typer.Option(
            help="torch: dense vs 2:4 GEMM per pruned weight with PyTorch semi-structured sparse tensors (no "
            "TensorRT needed); tensorrt or tensorrt-rtx: dense vs sparse engine latency. E.g. --backend torch."
        ),
    ] = "torch",
    tokens: Annotated[
        str,
        typer.Option(help="torch backend: token counts (batch x sequence) to time, e.g. --tokens 512,4096."),
    ] = "512,4096",
    cutlass: Annotated[
        bool, typer.Option("--cutlass", help="torch backend: use CUTLASS kernels instead of cuSPARSELt.")
    ] = False,
    shapes: Annotated[
        list[str] | None,
        typer.Option(
            help="tensorrt backend: NAME:MIN,OPT,MAX per dynamic input (timed at OPT), e.g. "
            "--shapes input_ids:1x128,8x128,8x128."
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="tensorrt backends: fp16, bf16 or int8-qdq (default: what the ONNX file holds)."),
    ] = None,
    iterations: Annotated[
        int, typer.Option(help="Timed repetitions per measurement, e.g. --iterations 100.")
    ] = 100,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON document on stdout instead of the table, e.g. --json."),
    ] = False,
) -> None:
    """Measure what 2:4 sparsity gains: dense vs sparse, same shapes, one run, with the ratio (needs a GPU).

    Example: graphprune bench model.pruned.onnx --backend torch --tokens 512,4096
    """
    if iterations <= 0:
        raise GraphpruneError(f"--iterations must be positive, got {iterations}")
    if backend == "torch":
        _bench_torch(model, tokens, cutlass, iterations, as_json)
    elif backend in ("tensorrt", "tensorrt-rtx"):
        _bench_tensorrt(model, backend, shapes or [], precision, iterations, as_json)
    else:
        raise GraphpruneError(f"unknown --backend {backend!r}: choose torch, tensorrt or tensorrt-rtx")


def _bench_torch(model: Path, tokens: str, cutlass: bool, iterations: int, as_json: bool) -> None:
    from graphprune.graph.model_io import load_model
    from graphprune.tensorrt.bench_torch import bench_cases, device_description, model_cases, parse_tokens

    counts = parse_tokens(tokens)
    cases = model_cases(load_model(model))
    if not cases:
        raise GraphpruneError(f"{model} has no weight that is 2:4 along K: prune it with --nm 2:4 first")
    results = bench_cases(cases, counts, "cutlass" if cutlass else "cusparselt", iterations)
    device = f"{device_description()}, {'CUTLASS' if cutlass else 'cuSPARSELt'}"
    if as_json:
        rows = [{**asdict(r), "dense_over_sparse": r.speedup} for r in results]
        typer.echo(json.dumps({"device": device, "gemms": rows}, indent=1))
        return
    columns = [Col("weight"), Col("out x K", "right"), Col("tokens", "right"), Col("dense ms", "right")]
    columns += [Col("2:4 ms", "right"), Col("dense/2:4", "right"), Col("note")]
    table = []
    for r in results:
        sparse = f"{r.sparse_ms:.4f}" if r.sparse_ms else "-"
        ratio = f"{r.speedup:.2f}x" if r.speedup else "-"
        note = r.note or ("" if r.converts else "not semi-structured")
        table.append([r.name, f"{r.out} x {r.k}", str(r.tokens), f"{r.dense_ms:.4f}", sparse, ratio, note])
    out.print(fitted_table(out, columns, table, title=device))


def _bench_tensorrt(
    model: Path, backend: str, shapes: list[str], precision: str | None, iterations: int, as_json: bool
) -> None:
    from graphprune.tensorrt.build import build_engine, has_cuda_gpu
    from graphprune.tensorrt.run import time_engine

    if not has_cuda_gpu():
        raise GraphpruneError(
            "timing engines needs an NVIDIA GPU and its driver (none found here); `graphprune build` does not"
        )
    with tempfile.TemporaryDirectory(prefix="graphprune-bench-") as tmp:
        timings = {}
        for sparse in (False, True):
            engine = Path(tmp) / f"{'sparse' if sparse else 'dense'}.engine"
            report = build_engine(
                model, engine, precision, sparse, shapes, Path(tmp) / "timing.cache", backend=backend
            )
            timings[sparse] = time_engine(engine, shapes, iterations, backend=backend)
    dense, sparse_t = timings[False], timings[True]
    ratio = dense.median_ms / sparse_t.median_ms
    engine_name = f"{report.product} {report.version}"
    if as_json:
        pairs = (("dense", dense), ("sparse", sparse_t))
        engines = {label: {**asdict(t), "throughput": t.throughput} for label, t in pairs}
        document = {"engine": engine_name, "precision": report.precision, **engines, "dense_over_sparse": ratio}
        typer.echo(json.dumps(document, indent=1))
        return
    columns = [Col("engine"), Col("median ms", "right"), Col("p90 ms", "right"), Col("items/s", "right")]
    rows = [
        [label, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.throughput:.1f}"]
        for label, t in (("dense", dense), ("sparse", sparse_t))
    ]
    title = f"{model.name}: dense vs sparse {engine_name} engine ({report.precision})"
    out.print(fitted_table(out, columns, rows, title=title))
    out.print(f"dense/sparse latency ratio: {ratio:.2f}x", highlight=False)
