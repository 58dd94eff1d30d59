"""all-MiniLM-L6-v2 2:4: how close each method's sentence embeddings stay to the dense model's, with and without
``--permute``, so that the SmolLM2 perplexity table is not one model's accident.

The model is the sentence-transformers pipeline exported to ONNX with its mean pooling
(``benchmarks/export_all_minilm_l6.py``: inputs ``input_ids``/``attention_mask``, output ``sentence_embedding``).
Each prune runs as ``graphprune apply`` in a child process (wall and CPU seconds measured there, calibration
included), calibrated on ``--nsamples`` seeded windows of ``--seqlen`` tokens of the Brown calibration text
(the first 60% of the corpus, ``graphprune.demo.brown_calibration_file``). Quality: the mean (and the lowest)
cosine of the pruned model's sentence embedding to the dense model's over the first ``--paragraphs`` held-out
Brown paragraphs (the last 40%, never seen in calibration), each run alone (no padding), truncated to
``--seqlen`` tokens with the tokenizer's [CLS]/[SEP]. Also the share of paragraphs whose pruned embedding is
nearest to its own dense embedding among all of them (retrieval top-1).

    /work/exportenv/bin/python benchmarks/export_all_minilm_l6.py          # once: the ONNX export
    python benchmarks/minilm_quality.py                                    # every run below
    python benchmarks/minilm_quality.py --runs wanda:sequential:permute    # some of them
    python benchmarks/minilm_quality.py --table                            # the table of every result so far

A run is METHOD[:MODE][:permute]: METHOD magnitude, wanda, sparsegpt or alps; MODE one-shot or sequential
(default sequential; magnitude needs no calibration); ``permute`` adds ``apply --permute``. The pattern is 2:4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import smollm2_quality

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path("/tmp/graphprune-all-minilm-l6/model.onnx")
DEFAULT_RUNS = [
    "magnitude",
    "wanda:sequential",
    "wanda:sequential:permute",
    "sparsegpt:sequential",
    "sparsegpt:sequential:permute",
    "alps:sequential",
    "alps:sequential:permute",
]


def parse_run(text: str) -> dict:
    """METHOD[:MODE][:permute] as smollm2_quality's run at 2:4 (sequential unless one-shot is named)."""
    method, *rest = text.split(":")
    if set(rest) - {"one-shot", "sequential", "permute"}:
        raise SystemExit(f"{text}: a run is METHOD[:one-shot|sequential][:permute]")
    mode = "one-shot" if "one-shot" in rest else "sequential"
    run = smollm2_quality.parse_run(":".join([method, "2:4", mode, *(["permute"] if "permute" in rest else [])]))
    return {**run, "run": text}


def apply_args(run: dict, model: Path, out: Path, calib: Path, tokenizer: Path, args: argparse.Namespace) -> list:
    """smollm2_quality's ``apply`` arguments, with the calibration windows cut from text by the tokenizer."""
    cli = smollm2_quality.apply_args(run, model, calib, out)
    if run["method"] != "magnitude":
        cli += ["--tokenizer", str(tokenizer), "--seqlen", str(args.seqlen), "--nsamples", str(args.nsamples)]
    return cli


def heldout_feeds(heldout: Path, tokenizer: Path, count: int, seqlen: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` held-out paragraphs of more than 80 characters, one feed each (no padding)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tok.enable_truncation(seqlen)
    texts = [p for p in heldout.read_text(encoding="utf-8").split("\n\n") if len(p) > 80][:count]
    feeds = []
    for encoded in tok.encode_batch(texts):
        ids = np.array([encoded.ids], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return feeds


def embeddings(model: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Unit-length sentence embeddings, one row per feed."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows = np.concatenate([session.run(["sentence_embedding"], feed)[0] for feed in feeds]).astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def agreement(dense: np.ndarray, pruned: np.ndarray) -> dict:
    cosines = (dense * pruned).sum(axis=1)
    nearest = (pruned @ dense.T).argmax(axis=1)
    return {
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "top1_retrieval": float((nearest == np.arange(len(dense))).mean()),
        "paragraphs": len(dense),
    }


def permutation_summary(report: Path) -> dict:
    """Groups permuted and the mean share of the lost importance recovered, from apply's report."""
    groups = [g for g in json.loads(report.read_text()).get("permuted_groups", []) if g.get("written", True)]
    recovered = [g["recovered"] for g in groups]
    return {"permuted_groups": len(groups), "recovered": float(np.mean(recovered)) if recovered else None}


def table(results: list[dict]) -> str:
    lines = [
        "| method | calibration | permute | mean cosine | lowest cosine | top-1 retrieval | groups permuted "
        "(mean recovered) | apply wall s | apply CPU s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    methods = ["magnitude", "wanda", "sparsegpt", "alps"]
    for r in sorted(results, key=lambda r: (methods.index(r["method"]), r["mode"], r["permute"])):
        groups = f"{r['permuted_groups']} ({r['recovered']:.1%})" if r["permute"] else "-"
        lines.append(
            f"| {r['method']} | {r['mode']} | {'yes' if r['permute'] else '-'} | {r['mean_cosine']:.4f} | "
            f"{r['min_cosine']:.4f} | {r['top1_retrieval']:.1%} | {groups} | {r['seconds']:.0f} | "
            f"{r['cpu_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    from graphprune import demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the ONNX export (see above)")
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="METHOD[:MODE][:permute] ...")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window and paragraph")
    parser.add_argument("--paragraphs", type=int, default=512, help="held-out paragraphs compared")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "minilm_quality.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphprune-minilm-quality"))
    parser.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = parser.parse_args()

    results = json.loads(args.results.read_text()) if args.results.exists() else []
    if not args.table:
        if not args.model.exists():
            raise SystemExit(f"{args.model} is missing: run benchmarks/export_all_minilm_l6.py first")
        tokenizer = demo.all_minilm_l6() / "tokenizer.json"
        calib, heldout = demo.brown_calibration_file(), demo.brown_heldout_file()
        feeds = heldout_feeds(heldout, tokenizer, args.paragraphs, args.seqlen)
        dense = embeddings(args.model, feeds)
        args.workdir.mkdir(parents=True, exist_ok=True)
        for text in args.runs:
            run = parse_run(text)
            out = args.workdir / f"{text.replace(':', '_')}.onnx"
            seconds, cpu, peak, _ = smollm2_quality.timed(
                apply_args(run, args.model, out, calib, tokenizer, args), None
            )
            run.update(agreement(dense, embeddings(out, feeds)), seconds=seconds, cpu_seconds=cpu, peak_mb=peak)
            run.update(permutation_summary(out.with_suffix(".report.json")), load_average=os.getloadavg()[0])
            run.update(nsamples=args.nsamples, seqlen=args.seqlen)
            print(json.dumps(run), flush=True)
            results = [r for r in results if r["run"] != run["run"]]
            results.append(run)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
