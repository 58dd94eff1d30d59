"""What graphprune's passes share with ``onnx_ir.passes``: condition errors that are also one-line errors.

A pass subclasses ``ir.passes.InPlacePass`` or ``ir.passes.FunctionalPass``; calling it (``pass_(model)``)
checks ``requires`` before and ``ensures`` after ``call`` and enforces the in-place declaration, and passes
compose with ``ir.passes.Sequential``. Conditions raise these errors, which onnx-ir lets through unwrapped and
the command line prints as one line.
"""

from __future__ import annotations

import onnx_ir as ir

from graphprune.errors import GraphpruneError


class PassPreconditionError(GraphpruneError, ir.passes.PreconditionError):
    """A pass cannot run on this model with these inputs (missing statistics, nothing to do...)."""


class PassPostconditionError(GraphpruneError, ir.passes.PostconditionError):
    """A pass ran but its result breaks its promise (an N:M group with too many non-zeros)."""
