"""Write channel permutations into a graph where they are exact, so that N:M masks keep more importance.

The channel groups themselves (which weights share a permutable K, and with what period) are found by
:func:`graphprune.graph.channel_groups.find_permutation_groups`, on the coupling walker of
:mod:`graphprune.graph.coupling`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.graph.channel_groups import ChannelGroup, find_permutation_groups
from graphprune.graph.stored import read_array, replace_tensor, stored_tensor, stored_values
from graphprune.graph.targets import Target, find_targets
from graphprune.graph.weights import read_weight


@dataclass
class PermutedGroup:
    """The report of one permutation written into the model."""

    reader: str
    writers: list[str]
    biases: list[str]
    kind: str
    period: int
    kept_before: float  # importance kept by the N:M mask in the original order (fraction of the total)
    kept_after: float
    recovered: float  # share of the importance the original order's mask loses that the permutation keeps
    written: bool  # False where no order kept more than the original one: the model keeps its order


def find_channel_groups(model: ir.Model) -> tuple[dict[str, ChannelGroup], dict[str, Target]]:
    """Every exact channel group of the model by reader name, and the model's weights by name.

    Shapes come from the model (an exporter's value_info); where the model carries none, ONNX shape inference
    fills them in (on the graph's values only). Cached for the last graph structure seen (sequential pruning
    asks once per block; the answer depends on the wiring alone, which pruning and permuting leave as it is).
    """
    key = _fingerprint(model)
    cached = _CACHE.get("groups")
    if cached is None or cached[0] != key:
        if not any(v.shape is not None for n in model.graph for v in n.outputs if not v.is_graph_output()):
            from onnx_ir.passes.common import ShapeInferencePass

            ShapeInferencePass()(model)
        targets = find_targets(model, include_head=True).targets
        by_name = {t.name: t for t in targets}
        groups = find_permutation_groups(model, targets)
        cached = (key, groups, by_name)
        _CACHE["groups"] = cached
    return cached[1], cached[2]


def full_order(order: np.ndarray, length: int) -> np.ndarray:
    """A period-p order (``len(order) == p``) repeated over ``length`` channels: block b maps to b·p + order."""
    period = len(order)
    return (np.arange(0, length, period)[:, None] + order[None, :]).reshape(-1)


def write_permutation(
    model: ir.Model, group: ChannelGroup, order: np.ndarray, targets: dict[str, Target]
) -> list[str]:
    """Reorder the group's channels in the stored weights (new channel i is old channel ``order[i]``, in every
    period); returns the names of the tensors rewritten."""
    stored = stored_values(model.graph)
    moves = [(group.reader, targets[group.reader].k_axis)]
    moves += [(name, targets[name].out_axis) for name in group.writers]
    for name, axis in moves:
        weight = read_weight(stored, targets[name])
        index = full_order(order, weight.values.shape[axis])
        weight.write(np.ascontiguousarray(np.take(weight.values, index, axis=axis)))
    for name in group.biases:
        old = stored_tensor(stored[name])
        values = read_array(old)
        permuted = np.take(values, full_order(order, values.shape[-1]), axis=-1)
        replace_tensor(stored[name], ir.Tensor(np.ascontiguousarray(permuted), dtype=old.dtype, name=old.name))
    return [name for name, _ in moves] + list(group.biases)


_CACHE: dict[str, tuple[str, dict[str, ChannelGroup], dict[str, Target]]] = {}


def _fingerprint(model: ir.Model) -> str:
    """The graph's structure (ops and wiring, not weight values): what the groups depend on."""
    digest = hashlib.sha1()
    for node in model.graph:
        inputs = ",".join(v.name if v is not None else "" for v in node.inputs)
        digest.update(f"{node.op_type}|{inputs}|{','.join(v.name for v in node.outputs)};".encode())
    for name, value in model.graph.initializers.items():
        digest.update(f"{name}:{value.shape};".encode())
    return digest.hexdigest()
