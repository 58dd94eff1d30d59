"""Raise a model's default-domain opset to what a precision's Q/DQ needs, only when that changes no operator.

FP8 QuantizeLinear/DequantizeLinear need opset 19, blocked int4 DequantizeLinear opset 21. Moving a model from
opset ``v`` to ``t`` is exact when no operator it uses was redefined in between: every op's schema at ``t`` was
introduced at or before ``v`` (``onnx.defs.get_schema(op, t).since_version <= v``). Then only the import changes;
otherwise the model is refused and the caller is pointed at a converter that rewrites the changed operators.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from graphprune.calibration.taps import default_opset
from graphprune.errors import GraphpruneError

_IR_FOR_TYPES = {19: 9, 21: 10}  # float8 types arrived with IR version 9, int4 with 10


def require_opset(model: ir.Model, needed: int, what: str) -> int | None:
    """Make the default-domain opset at least ``needed``; the old opset when it was raised, else None."""
    current = default_opset(model)
    if current >= needed:
        return None
    changed = sorted(
        {
            node.op_type
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if node.domain in ("", "ai.onnx") and _redefined(node.op_type, current, needed)
        }
    )
    if changed:
        raise GraphpruneError(
            f"{what} needs opset {needed} and the model has opset {current}; raising it is not exact because "
            f"{', '.join(changed[:4])} changed since: convert the model first (onnx.version_converter)"
        )
    domain = "" if "" in model.opset_imports else "ai.onnx"
    model.opset_imports[domain] = needed
    model.ir_version = max(model.ir_version or 0, max(v for k, v in _IR_FOR_TYPES.items() if k <= needed))
    return current


def _redefined(op: str, current: int, target: int) -> bool:
    try:
        return onnx.defs.get_schema(op, target, "").since_version > current
    except onnx.defs.SchemaError:
        return True  # unknown to onnx: cannot prove the upgrade exact
