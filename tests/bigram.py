"""A bigram language model built in code, its perplexity by hand, and a word tokenizer with held-out text:
shared by the perplexity, eval and output tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors

VOCAB = 11


def bigram_model(table: np.ndarray, with_mask: bool, extra_input: bool = False) -> onnx.ModelProto:
    """logits[b, t] = table[input_ids[b, t]] (times attention_mask[b, t] when the model takes a mask); with
    ``extra_input`` the model also takes `speaker_ids`, an input nothing can fill."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])
    inits = [numpy_helper.from_array(table.astype(np.float32), "table")]
    inputs = [ids]
    out = "logits"
    if with_mask:
        out = "raw"
    nodes = [helper.make_node("Gather", ["table", "input_ids"], [out], axis=0)]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask_3d"]),
            helper.make_node("Mul", ["raw", "mask_3d"], ["logits"]),
        ]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("speaker_ids", TensorProto.INT64, ["batch", "seq"]))
    graph = helper.make_graph(nodes, "bigram", inputs, [logits], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def expected_perplexity(table: np.ndarray, windows: np.ndarray) -> float:
    """By hand: log-softmax of every table row at once, then look up each (previous, next) pair."""
    table = table.astype(np.float32).astype(np.float64)
    log_probs = table - np.log(np.sum(np.exp(table), axis=1, keepdims=True))
    nll = [-log_probs[prev, nxt] for w in windows for prev, nxt in itertools.pairwise(w)]
    return float(np.exp(np.mean(nll)))


WORDS = [f"w{i}" for i in range(VOCAB - 1)]  # id 0 is the BOS token "<s>"


def word_tokenizer(path: Path) -> Path:
    vocab = {"<s>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(path))
    return path


def bigram_pair_and_text(
    tmp_path: Path, rng: np.random.Generator, scale: float, words: int, with_mask: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
    """dense.onnx and pruned.onnx (half of the dense table zeroed), heldout.txt of ``words`` random words and
    tokenizer.json in ``tmp_path``: (dense table, pruned table, the words' ids, the tokenizer)."""
    dense_table = rng.standard_normal((VOCAB, VOCAB)) * scale
    pruned_table = np.where(rng.random((VOCAB, VOCAB)) < 0.5, dense_table, 0.0)
    for name, table in (("dense", dense_table), ("pruned", pruned_table)):
        onnx.save(bigram_model(table, with_mask=with_mask), str(tmp_path / f"{name}.onnx"))
    ids = rng.integers(1, VOCAB, size=words)
    (tmp_path / "heldout.txt").write_text(" ".join(WORDS[i - 1] for i in ids))
    return dense_table, pruned_table, ids, word_tokenizer(tmp_path / "tokenizer.json")
