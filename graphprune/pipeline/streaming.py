"""Tensors streamed one at a time between external data files, and an output staged so a failure leaves nothing.

:class:`StagedOutput` appends tensors to the output's data file as they are produced, copies others over a chunk
at a time and, on :meth:`StagedOutput.commit`, moves the data file and then the model file into place (a model
never points at data that is not there yet). Until then everything lives in a hidden staging directory beside the
output, removed however the run ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import onnx

from graphprune.artifacts import OutputPlan, fresh_data_name

_ALIGN = 4096  # tensor offsets in the data file: page-aligned, so each tensor can be memory-mapped
_COPY_CHUNK = 64 << 20


class StagedOutput:
    """The output model and its data file (``<name>.data``, else ``<name>.N.data``: a name no file has yet),
    written in a staging directory until a writer transaction commits them."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self._created = [d for d in (output.parent, *output.parent.parents) if not d.exists()]  # removed if empty
        output.parent.mkdir(parents=True, exist_ok=True)
        self.data_name = fresh_data_name(output)  # tensors point at it: chosen before the first is written
        self.staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        self.data_path = self.staging / self.data_name
        self._stream = self.data_path.open("wb")
        self._offset = 0
        self.model: onnx.ModelProto | None = None  # the graph to commit, once everything is written

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def append_bytes(self, data: bytes) -> tuple[int, int]:
        """Append one tensor's bytes; returns their offset and length, readable at once through the file."""
        offset = self._start()
        self._stream.write(data)
        self._offset += len(data)
        self._stream.flush()
        return offset, len(data)

    def rewrite_bytes(self, offset: int, data: bytes) -> None:
        """Write ``data`` over bytes appended earlier (same place, same length: a tensor reordered in place)."""
        if offset < 0 or offset + len(data) > self._offset:
            raise ValueError(f"rewrite of {len(data)} bytes at {offset} is outside the {self._offset} written")
        self._stream.flush()
        os.pwrite(self._stream.fileno(), data, offset)

    def copy_range(self, source: Path, source_offset: int, length: int) -> tuple[int, int]:
        """Copy ``length`` bytes of ``source`` from ``source_offset`` in chunks; returns where they went."""
        offset = self._start()
        with source.open("rb") as stream:
            stream.seek(source_offset)
            left = length
            while left:
                chunk = stream.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise OSError(f"{source}: external data is truncated")
                self._stream.write(chunk)
                left -= len(chunk)
        self._offset += length
        self._stream.flush()
        return offset, length

    def stage(self, model: onnx.ModelProto) -> tuple[Path, list[Path]]:
        """Close the data file and write the model proto (its large tensors point into the data file) beside it;
        returns both, for :meth:`graphprune.artifacts.Transaction.streamed_model`."""
        self._stream.close()
        staged = self.staging / self.output.name
        staged.write_bytes(model.SerializeToString())
        return staged, [self.data_path]

    def commit(self, model: onnx.ModelProto) -> None:
        """Stage the model and commit it alone through the one writer (a library call: an existing output at
        the same path is replaced, its old data file removed)."""
        plan = OutputPlan(force=True)
        output = plan.model(self.output)
        with plan.transaction() as files:
            files.streamed_model(output, *self.stage(model))

    def close(self) -> None:
        """Remove the staging directory (after a commit it holds nothing) and the folders made for an output
        that was never committed."""
        self._stream.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        for directory in self._created:  # innermost first; a committed output's folder is not empty
            with contextlib.suppress(OSError):
                directory.rmdir()

    def _start(self) -> int:
        pad = -self._offset % _ALIGN
        if pad:
            self._stream.write(b"\0" * pad)
            self._offset += pad
        return self._offset
