"""``quantize_file``: read a model, calibrate its activation ranges in the graph, smooth, quantize, write.

Outputs are planned and checked before any work (:class:`graphprune.artifacts.OutputPlan`), written in one
transaction (staged, flushed, renamed), and nothing is written when anything fails; the input is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.artifacts import OutputPlan
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.stats import ActivationStats
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model, uses_external_data
from graphprune.graph.prepare import infer_shapes
from graphprune.graph.targets import Target
from graphprune.pipeline.files import report_path
from graphprune.quantize.awq import AwqRecord, awq
from graphprune.quantize.clip import clip_fractions
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.gptq_weights import gram_statistics, solved_codes
from graphprune.quantize.opset import require_opset
from graphprune.quantize.ort_rewrites import fuse_for_ort, rewrite_for_ort
from graphprune.quantize.passes import QuantizePass, QuantizeResult
from graphprune.quantize.ranges import ChannelRange, collect_ranges
from graphprune.quantize.select import Kept, Planned, already_quantized, plan_quantization
from graphprune.quantize.smooth import SmoothRecord, smooth
from graphprune.quantize.untie import untie_head_tables


@dataclass
class QuantizeReport:
    """What a quantization run did: config, weights quantized or kept float (and why), activations."""

    config: QuantizeConfig
    result: QuantizeResult
    kept: list[Kept] = field(default_factory=list)
    smoothing: list[SmoothRecord] = field(default_factory=list)
    opset_raised_from: int | None = None
    warnings: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)  # tables a Gather reads whose head got its own copy
    rewrites: dict[str, list[str]] = field(default_factory=dict)  # target ort: exact rewrites, what they changed
    awq: list[AwqRecord] = field(default_factory=list)  # the activation-aware scales' search, per activation

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            **self.result.to_dict(),
            "kept_float": [asdict(k) for k in self.kept],
            "smoothing": [asdict(s) for s in self.smoothing],
            "awq": [asdict(a) for a in self.awq],
            "opset_raised_from": self.opset_raised_from,
            "untied_heads": self.untied,
            "ort_rewrites": self.rewrites,
            "warnings": self.warnings,
        }


@dataclass
class Measured:
    """What calibration gave: activation ranges (per channel), Gram matrices for GPTQ (or, for sequential GPTQ,
    the calibration batches and providers it measures them on, block by block), and its warnings."""

    ranges: dict[str, ChannelRange] = field(default_factory=dict)
    grams: ActivationStats | None = None
    warnings: list[str] = field(default_factory=list)
    batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)


def measure(
    model: ir.Model,
    model_path: Path,
    plan: Planned,
    config: QuantizeConfig,
    calibration: CalibrationRequest | None,
    stats: str | Path | None = None,
    stage: Callable[[str], None] = lambda _: None,
) -> Measured:
    """The calibration ``config`` needs: ranges (static scales, smoothing) and Grams (GPTQ, the activation-aware
    search: sequential GPTQ measures its own, but the search reads the model's before anything is scaled)."""
    measured = Measured()
    if config.needs_ranges:
        stage("calibrating activation ranges")
        measured.ranges, more = collect_ranges(model, plan.activations, calibration or CalibrationRequest())
        measured.warnings += more
    if config.sequential:
        from graphprune.calibration.providers import resolve_providers

        assert calibration is not None  # quantize_file refuses sequential runs without calibration data
        measured.batches, more = calibration.batches(model)
        measured.providers = resolve_providers(calibration.provider)
        measured.warnings += more
    if config.needs_grams and (not config.sequential or config.awq):
        stage("calibrating Gram matrices")
        saved = ActivationStats.load(stats, plan.targets) if stats else None
        measured.grams = gram_statistics(model_path, plan.targets, saved, calibration or CalibrationRequest())
        measured.warnings += [w for w in measured.grams.warnings if w not in measured.warnings]
    return measured


def quantize_model(
    model: ir.Model,
    config: QuantizeConfig,
    plan: Planned,
    measured: Measured,
    stage: Callable[[str], None] = lambda _: None,
    calibration: CalibrationRequest | None = None,
) -> QuantizeReport:
    """Smooth (if asked), clip (if asked: one more calibration run, on ``calibration``, of the smoothed model),
    solve GPTQ (if asked) and quantize ``model`` in place; ``measured`` is not changed."""
    warnings = list(measured.warnings)
    done = already_quantized(plan.kept)
    if done:
        warnings.append(f"{len(done)} weights are already quantized and stay as they are; only float ones change")
    ranges = {name: ChannelRange(r.lo.copy(), r.hi.copy(), r.rows) for name, r in measured.ranges.items()}
    smoothing: list[SmoothRecord] = []
    scales: dict[str, np.ndarray] = {}
    if config.smooth is not None or config.awq:
        infer_shapes(model)  # folds through a product need its operands' widths
    if config.smooth is not None:
        stage("smoothing")
        smoothing, scales = smooth(model, plan.targets, ranges, config.smooth)
    searched: list[AwqRecord] = []
    if config.awq:
        stage("searching activation-aware scales")
        assert measured.grams is not None  # measure collects them for awq
        smoothing, searched, scales = awq(model, plan.targets, measured.grams, config)
    targets, kept = _massive_inputs_float(plan, ranges, config)
    plan = Planned(targets, plan.activations, plan.kept + kept, plan.matmuls)
    clips: dict[str, float] = {}
    if config.clip != "minmax":
        stage(f"choosing activation clips ({config.clip})")
        quantized = dict.fromkeys(c.activation for t in plan.targets for c in t.consumers)
        request = calibration or CalibrationRequest()
        clips = clip_fractions(model, {a: ranges[a] for a in quantized}, config, request)
    solved: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if config.sequential:
        from graphprune.quantize.sequential import solve_sequentially

        stage("GPTQ, block by block")
        solved, more = solve_sequentially(model, plan.targets, config, measured.batches, measured.providers)
        warnings += [w for w in more if w not in warnings]
    elif config.method == "gptq" or config.weight_clip != "none" or config.refit_scales:
        stage("GPTQ" if config.method == "gptq" else "searching the weight scales")
        solved = solved_codes(model, plan.targets, config, measured.grams, scales)
    stage("quantizing")
    result = QuantizePass(
        config=config, targets=plan.targets, ranges=ranges, solved=solved, clips=clips, matmuls=plan.matmuls
    )(model)
    return QuantizeReport(config, result, plan.kept, smoothing, None, warnings, awq=searched)


def _massive_inputs_float(
    plan: Planned, ranges: dict[str, ChannelRange], config: QuantizeConfig
) -> tuple[list[Target], list[Kept]]:
    """Leave float the weights whose (smoothed) input reaches ``config.float_above``: one per-tensor scale
    cannot hold a few massive activations and the many small ones beside them (down projections of LLMs)."""
    if config.float_above is None or not config.quantizes_activations:
        return plan.targets, []
    targets, kept = [], []
    for t in plan.targets:
        r = ranges.get(t.consumers[0].activation)
        peak = float(r.absmax.max()) if r is not None else 0.0
        if peak > config.float_above:
            reason = (
                f"its input {t.consumers[0].activation} reaches |x| = {peak:.4g}, above {config.float_above:g}"
            )
            kept.append(Kept(t.name, t.op, reason))
        else:
            targets.append(t)
    return targets, kept


def default_quantized_output(model_path: Path, config: QuantizeConfig) -> Path:
    """``<stem>.<precision>.onnx`` beside the input."""
    return model_path.with_name(f"{model_path.stem}.{config.precision}.onnx")


def quantize_file(
    model_path: str | Path,
    config: QuantizeConfig,
    output: str | Path | None = None,
    calibration: CalibrationRequest | None = None,
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
    stats: str | Path | None = None,
) -> tuple[Path, QuantizeReport]:
    """Quantize ``model_path`` into ``output`` and write ``<stem>.report.json`` beside it.

    Activation ranges (static scales, smoothing) come from ``calibration``; without it, from synthetic inputs
    (with the warning calibration gives for them). GPTQ's Gram matrices come from ``stats`` (a statistics file
    saved with Grams) or from ``calibration``. Returns the model path and the report.
    """
    config.validate()
    if config.sequential and (calibration is None or calibration.data is None):
        raise GraphpruneError("`sequential` needs calibration data: pass `calib` data")
    if config.sequential and stats and not config.awq:
        raise GraphpruneError("`sequential` measures its Gram matrices on the quantized blocks: drop `stats`")
    model_path = Path(model_path)
    out = Path(output) if output is not None else default_quantized_output(model_path, config)
    outputs = OutputPlan([*(calibration.files() if calibration else ()), *([stats] if stats else [])], force)
    outputs.read(model_path, "the input model")
    out, report_file = outputs.model(out), outputs.file(report_path(out), "report")
    outputs.check()  # before any work
    stage = on_stage or (lambda _: None)
    stage("reading the model")
    model = load_model(model_path)
    external = uses_external_data(model)
    untied = untie_head_tables(model) if config.include_head else []
    # exact, before calibration, which then measures the rewritten model (they change no value it sees)
    rewrites = rewrite_for_ort(model, config.fuses_attention) if config.target == "ort" else {}
    plan = plan_quantization(model, config)
    if not plan.targets:
        reasons = sorted({k.reason for k in plan.kept})
        detail = f" ({'; '.join(reasons[:2])})" if reasons else ""
        raise GraphpruneError(f"nothing to quantize in {model_path}: no float MatMul/Gemm/Conv weight{detail}")
    raised = require_opset(model, config.opset, f"{config.precision} Q/DQ")
    measured = measure(model, model_path, plan, config, calibration, stats, stage)
    report = quantize_model(model, config, plan, measured, stage, calibration)
    if config.fuses_attention:
        stage("fusing attention")
        rewrites.update(fuse_for_ort(model))
    report.opset_raised_from, report.untied, report.rewrites = raised, untied, rewrites
    stage("writing")
    with outputs.transaction() as files:
        files.model(out, model, external_data=True if external else None)
        files.json(report_file, report.to_dict())
    return out, report
