"""Running a built engine on the GPU: once on given inputs, or timed (dense vs sparse, same shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import GraphpruneError
from graphprune.tensorrt.backends import load_backend
from graphprune.tensorrt.logs import capturing_logger
from graphprune.tensorrt.profiles import parse_shapes


@dataclass(frozen=True, kw_only=True)
class EngineTiming:
    engine: str
    median_ms: float
    p90_ms: float
    iterations: int
    batch: int  # leading dimension of the first input: throughput = batch / latency

    @property
    def throughput(self) -> float:
        return self.batch * 1000.0 / self.median_ms


def time_engine(
    engine_path: str | Path,
    shapes: Sequence[str] = (),
    iterations: int = 100,
    warmup: int = 10,
    backend: str | None = None,
) -> EngineTiming:
    """Median latency of one engine at the OPT shapes of ``shapes`` (static inputs: their own shape).

    Inputs are zeros, which is fine for timing dense and sparse engines of the same model against each other.
    """
    ranges = parse_shapes(shapes)
    session = _Session(engine_path, backend)
    feeds = {}
    for name in session.inputs:
        shape = ranges[name].opt if name in ranges else tuple(session.engine.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise GraphpruneError(f"input {name!r} is dynamic: give its range in `shapes` ({name}:MIN,OPT,MAX)")
        feeds[name] = session.torch.zeros(shape, dtype=session.dtype(name), device="cuda")
    session.bind(feeds)
    torch = session.torch
    stream = torch.cuda.Stream()
    times = []
    for n in range(warmup + iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        session.context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        if n >= warmup:
            times.append(start.elapsed_time(end))
    times.sort()
    first = next(iter(feeds.values()))
    batch = first.shape[0] if first.dim() else 1
    return EngineTiming(
        engine=str(engine_path),
        median_ms=times[len(times) // 2],
        p90_ms=times[int(len(times) * 0.9)],
        iterations=iterations,
        batch=batch,
    )


def run_engine(engine_path: str | Path, feeds: dict[str, np.ndarray], backend: str | None = None) -> dict:
    """Run the engine once on ``feeds`` (numpy, one per input) and return every output as numpy."""
    session = _Session(engine_path, backend)
    missing = sorted(set(session.inputs) - set(feeds))
    if missing:
        raise GraphpruneError(f"no value for engine input {missing[0]!r}")
    torch = session.torch
    outputs = session.bind({n: torch.from_numpy(np.ascontiguousarray(feeds[n])).cuda() for n in session.inputs})
    session.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


class _Session:
    """A deserialised engine with an execution context, and PyTorch for device buffers (imported lazily)."""

    def __init__(self, engine_path: str | Path, backend: str | None) -> None:
        self.trt = trt = load_backend(backend).trt
        try:
            import torch
        except ImportError:
            raise GraphpruneError(
                "running engines needs PyTorch with CUDA for device buffers: `pip install torch`"
            ) from None
        if not torch.cuda.is_available():
            raise GraphpruneError("PyTorch sees no CUDA GPU: cannot run a TensorRT engine")
        self.torch = torch
        logger = capturing_logger(trt)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            errors = [line.text for line in logger.lines if line.severity == "E"] or ["no error logged"]
            raise GraphpruneError(f"{engine_path}: the runtime could not load the engine: {errors[-1]}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._keep: list[Any] = []

    def dtype(self, name: str) -> Any:
        return _torch_dtype(self.torch, self.trt, self.engine.get_tensor_dtype(name))

    def bind(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Set input shapes and addresses from device tensors; allocate and bind the outputs, returned by name."""
        for name in self.inputs:
            tensor = inputs[name].to(self.dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            self._keep.append(tensor)
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = self.torch.empty(shape, dtype=self.dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self._keep += outputs.values()
        return outputs


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    for name, torch_type in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_type
    if dtype not in table:
        raise GraphpruneError(f"engine I/O type {dtype} is not supported by the timing loop")
    return table[dtype]
