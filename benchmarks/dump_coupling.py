"""Dump the structured groups, attention heads and permutation groups found on real models to JSON.

Used to prove a refactor of the coupling walker finds exactly what it found before: run it on the old code and
on the new, then compare the files (groups with every slot, shape edit, consumer input and region tensor; skips
with their reasons; permutation groups with writers, biases and period).

    python benchmarks/dump_coupling.py OUT.json [MODEL.onnx ...]   (default: the demo models in the cache)
    python benchmarks/dump_coupling.py --compare BEFORE.json AFTER.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx_ir as ir

from graphprune.graph.groups import Group, find_groups
from graphprune.graph.model_io import load_model
from graphprune.graph.prepare import prepare_graph
from graphprune.passes.permute import find_channel_groups


def _name(value: ir.Value | ir.Node | None) -> str | None:
    return None if value is None else str(value.name)


def _group(g: Group) -> dict:
    return {
        "name": g.name,
        "kind": g.kind,
        "width": g.width,
        "unit_size": g.unit_size,
        "slots": [[_name(s.value), s.axis, s.role, _name(s.node)] for s in g.slots],
        "shape_edits": [[_name(e.node), e.position, e.per] for e in g.shape_edits],
        "consumer_inputs": [[_name(n), _name(v), a] for n, v, a in g.consumer_inputs],
        "region": sorted(str(v.name) for v in g.region),
        "slot_unit_size": sorted(g.slot_unit_size.items()),
        "depthwise": [_name(n) for n in g.depthwise],
    }


def dump(path: Path) -> dict:
    out: dict = {}
    model = load_model(path)
    permute, _ = find_channel_groups(model)
    out["permute"] = {
        k: [v.reader, list(v.writers), list(v.biases), v.channels, v.period] for k, v in permute.items()
    }
    for heads in (False, True):
        model = load_model(path)
        prepare_graph(model, heads=heads)
        scan = find_groups(model, ("mlp", "heads", "channels") if heads else ("mlp", "channels"))
        out[f"groups_heads={heads}"] = {
            "groups": [_group(g) for g in scan.groups],
            "skips": [[s.name, s.reason] for s in scan.skips],
        }
    return out


def default_models() -> list[Path]:
    cache = Path.home() / ".cache" / "graphprune"
    found = sorted(cache.glob("minilm_l3/**/*.onnx")) + sorted(cache.glob("rapidocr/**/*.onnx"))
    found += [
        p
        for p in (cache / "smollm2" / "model.onnx", Path("/tmp/graphprune-all-minilm-l6/model.onnx"))
        if p.exists()
    ]
    return found


def compare(before: dict, after: dict) -> bool:
    """Print, per model and finder, whether the two dumps agree; True when they agree everywhere."""
    same = True
    for model in sorted(set(before) | set(after)):
        for finder in sorted(set(before.get(model, {})) | set(after.get(model, {}))):
            agree = before.get(model, {}).get(finder) == after.get(model, {}).get(finder)
            same &= agree
            where = f"{Path(model).parent.name}/{Path(model).name}"
            print(f"{where} {finder}: {'identical' if agree else 'DIFFERENT'}")
    return same


def main() -> None:
    if sys.argv[1] == "--compare":
        sys.exit(0 if compare(*(json.loads(Path(p).read_text()) for p in sys.argv[2:4])) else 1)
    target = Path(sys.argv[1])
    models = [Path(p) for p in sys.argv[2:]] or default_models()
    result = {}
    for path in models:
        result[str(path)] = dump(path)
        print(path, {k: len(v) if k == "permute" else len(v["groups"]) for k, v in result[str(path)].items()})
    target.write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
