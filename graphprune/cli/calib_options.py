"""Calibration options shared by ``calibrate`` and ``apply``: one definition, one help text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graphprune.calibration.request import CalibrationRequest

CalibOpt = Annotated[
    str | None,
    typer.Option(
        "--calib",
        help="Calibration data: an .npz with one array per model input (batch along axis 0), e.g. --calib "
        "calib.npz; a directory of .npz files, one feed each; or a text file with --tokenizer, e.g. --calib "
        "corpus.txt.",
    ),
]
TokenizerOpt = Annotated[
    Path | None, typer.Option("--tokenizer", help="tokenizer.json for text data, e.g. --tokenizer tokenizer.json.")
]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", help="Tokens per text window, e.g. --seqlen 512.")]
NsamplesOpt = Annotated[
    int, typer.Option("--nsamples", help="Text windows (or synthetic samples) to draw, e.g. --nsamples 128.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for text windows and synthetic inputs, e.g. --seed 0.")]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        help="Samples per ONNX Runtime run (.npz, text). Default 1: one window's activations in memory; more "
        "can be faster on many cores but holds that many windows' activations, e.g. --batch-size 8.",
    ),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        help="Shape of a model input with dynamic dimensions, for synthetic data; repeat per input, e.g. "
        "--shape input_ids=1x128 --shape attention_mask=1x128.",
    ),
]
ProviderOpt = Annotated[
    str,
    typer.Option(
        "--provider",
        help="ONNX Runtime execution provider, e.g. --provider cuda (needs the onnxruntime-gpu wheel: "
        "pip install 'graphprune\\[gpu]' instead of '\\[cpu]'); any name onnxruntime lists also works.",
    ),
]


def calibration_request(
    calib: str | None,
    tokenizer: Path | None,
    seqlen: int,
    nsamples: int,
    seed: int,
    batch_size: int,
    shape: list[str] | None,
    provider: str,
) -> CalibrationRequest:
    from graphprune.calibration.synthetic import parse_shape

    return CalibrationRequest(
        data=calib,
        tokenizer=str(tokenizer) if tokenizer else None,
        seqlen=seqlen,
        nsamples=nsamples,
        seed=seed,
        batch_size=batch_size,
        shapes=dict(parse_shape(s) for s in shape or []),
        provider=provider,
    )
