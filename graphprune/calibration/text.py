"""Calibration windows cut from a text file, as the Wanda and SparseGPT loaders cut them from C4.

The whole text is tokenised once (``tokenizer.json`` read by the ``tokenizers`` package, no special tokens), then
``nsamples`` windows of ``seqlen`` tokens start at seeded random positions (``random.Random(seed).randint``, as
the reference loaders draw them). ``attention_mask`` (ones) is filled in when the model takes it, and every input
:func:`~graphprune.calibration.cache_inputs.complete_feed` knows how to fill (``position_ids`` 0..seqlen-1,
``token_type_ids`` zeros, empty caches) by it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from graphprune.calibration.cache_inputs import complete_feed, fillable
from graphprune.calibration.data import Labelled, Source
from graphprune.calibration.signature import InputSpec
from graphprune.calibration.synthetic import check_feed_bytes
from graphprune.errors import GraphpruneError, a_few

FILLED = ("attention_mask", "position_ids", "token_type_ids")  # never the token-id input


def token_input(specs: Sequence[InputSpec]) -> InputSpec:
    """The input that takes token ids: ``input_ids``, else the only integer input."""
    for s in specs:
        if s.name == "input_ids":
            return s
    ints = [s for s in specs if np.issubdtype(s.dtype, np.integer) and s.name not in FILLED]
    if len(ints) != 1:
        raise GraphpruneError(
            "text calibration needs a model with one token-id input (input_ids); this one takes "
            + a_few([s.describe() for s in specs])
        )
    return ints[0]


class TextSource(Source):
    """Seeded random windows of ``seqlen`` tokens from one text file, ``batch_size`` windows per feed."""

    def __init__(
        self,
        text: Path,
        tokenizer: Path,
        specs: Sequence[InputSpec],
        *,
        seqlen: int,
        nsamples: int,
        seed: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        if seqlen < 1 or nsamples < 1 or batch_size < 1:
            raise GraphpruneError("`seqlen`, `nsamples` and `batch_size` must be at least 1")
        self.ids_spec = token_input(specs)
        others = [s for s in specs if s.name != self.ids_spec.name and s.name not in FILLED and not fillable(s)]
        if others:
            raise GraphpruneError(
                f"text calibration fills {self.ids_spec.name}, attention_mask, position_ids, token_type_ids and "
                f"caches; the model also takes {a_few([s.describe() for s in others])}: pass an .npz with every "
                "input instead"
            )
        self.specs = list(specs)
        self.mask = next((s for s in specs if s.name == "attention_mask"), None)
        self.seqlen, self.batch_size, self.total = seqlen, batch_size, nsamples
        self.tokens = _tokenise(text, tokenizer)
        if len(self.tokens) <= seqlen:
            raise GraphpruneError(
                f"{text} has {len(self.tokens)} tokens: not enough for one window of `seqlen={seqlen}`"
            )
        rows = min(batch_size, nsamples)
        asks = "`batch_size` windows of `seqlen` tokens ask for"
        windows = 1 + sum(s.name in FILLED for s in specs)  # the ids and each filled input are rows x seqlen
        check_feed_bytes([(rows, seqlen)] * windows, asks, "give a smaller `batch_size`")
        self.seed = seed

    def __iter__(self) -> Iterator[Labelled]:
        rng = random.Random(self.seed)  # drawn batch by batch: nsamples starts are never held at once
        last = len(self.tokens) - self.seqlen - 1
        assert self.total is not None  # nsamples, set in __init__
        for b in range(0, self.total, self.batch_size):
            starts = [rng.randint(0, last) for _ in range(min(self.batch_size, self.total - b))]
            ids = np.stack([self.tokens[s : s + self.seqlen] for s in starts]).astype(self.ids_spec.dtype)
            feed = {self.ids_spec.name: ids}
            if self.mask is not None:
                feed[self.mask.name] = np.ones(ids.shape, dtype=self.mask.dtype)
            yield f"text windows {b}:{b + len(starts)}", complete_feed(feed, self.specs)


def _tokenise(text: Path, tokenizer: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    if not tokenizer.is_file():
        raise GraphpruneError(f"tokenizer not found: {tokenizer} (pass a tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as exc:
        raise GraphpruneError(f"cannot read tokenizer {tokenizer}: {str(exc).splitlines()[0]}") from None
    tok.no_truncation()  # a tokenizer.json made for sentences (BERT's: 128 tokens) would cut the text short
    content = text.read_text(encoding="utf-8", errors="replace")
    return np.asarray(tok.encode(content, add_special_tokens=False).ids, dtype=np.int64)
