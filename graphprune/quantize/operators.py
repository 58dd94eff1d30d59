"""The integer values of weights held by ONNX Runtime's quantized operators, minus their zero points.

A weight is zero where its code equals its zero point; these arrays are what ``check`` tests for N:M. Layouts:
MatMulInteger ``B [K, N]`` with ``b_zero_point`` (scalar or per column N); QLinearMatMul ``b [K, N]`` with
``b_zero_point`` (input 5); MatMulNBits (com.microsoft) ``B [N, blocks, block_size * bits / 8]`` uint8, the first
value of a byte in its low bits, zero points packed the same way per (N, block) (default 2^(bits-1)).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphprune.errors import GraphpruneError
from graphprune.graph.stored import read_array, stored_tensor
from graphprune.graph.targets import Target


def operator_weight(stored: Mapping[str, ir.Value], target: Target) -> np.ndarray:
    """``codes - zero point`` of an operator target, in the target's shape, as float32."""
    value = stored[target.name]
    codes = read_array(stored_tensor(value))
    node = next(u.node for u in value.uses() if u.node.op_type == target.op)
    if target.op == "MatMulNBits":
        return _nbits(node, codes, stored)
    zero_index = 3 if target.op == "MatMulInteger" else 5
    zero = _optional(node, zero_index, stored)
    values = codes.astype(np.float32)
    return values if zero is None else values - zero.astype(np.float32).reshape(1, -1)


def _optional(node: ir.Node, index: int, stored: Mapping[str, ir.Value]) -> np.ndarray | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None
    if stored.get(value.name or "") is not value:
        raise GraphpruneError(f"{node.op_type} {node.name}: zero point {value.name} is not a constant")
    return read_array(stored_tensor(value))


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Values of ``bits`` each, low bits first, from the last axis of a uint8 array."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)


def _nbits(node: ir.Node, packed: np.ndarray, stored: Mapping[str, ir.Value]) -> np.ndarray:
    n, k = node.attributes.get_int("N", 0), node.attributes.get_int("K", 0)
    bits, block = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size", 0)
    if bits not in (2, 4, 8) or block <= 0:
        raise GraphpruneError(f"MatMulNBits {node.name}: {bits} bits in blocks of {block} cannot be read")
    codes = _unpack(packed.astype(np.uint8), bits).reshape(n, -1, block)  # (N, blocks, block)
    zero = _optional(node, 3, stored)
    if zero is None:
        zeros = np.full((n, codes.shape[1]), 1 << (bits - 1), np.float32)
    elif zero.dtype == np.uint8:
        zeros = _unpack(zero, bits).reshape(n, -1)[:, : codes.shape[1]].astype(np.float32)
    else:  # float zero points: a weight is zero where code == zero point too
        zeros = zero.astype(np.float32).reshape(n, -1)
    values = codes.astype(np.float32) - zeros[:, :, None]
    return values.reshape(n, -1)[:, :k]
