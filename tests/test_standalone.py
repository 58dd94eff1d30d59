"""The test suite's own rules: a test's data never depends on which tests ran before it (no random generator
shared at module level), and no test module imports another (shared builders live in helper modules)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
GENERATORS = {"default_rng", "RandomState", "Generator"}


def _modules() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def _shared_generators(tree: ast.Module) -> list[str]:
    """Names bound at module level to a generator object (``np.random.default_rng(0)``), not to data drawn once."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call):
            func = node.value.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in GENERATORS:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [ast.unparse(t) for t in targets]
    return found


def _test_imports(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            names = [a.name for a in node.names]
            if parts[-1].startswith("test_") or (parts == ["tests"] and any(n.startswith("test_") for n in names)):
                found.append(node.module + (f" ({', '.join(names)})" if parts == ["tests"] else ""))
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[-1].startswith("test_")]
    return found


def test_the_rules_find_what_they_look_for() -> None:
    source = "import numpy as np\nRNG = np.random.default_rng(3)\nX = RNG.random(3)\nfrom tests.test_a import f\n"
    tree = ast.parse(source)
    assert _shared_generators(tree) == ["RNG"] and _test_imports(tree) == ["tests.test_a"]
    assert _shared_generators(ast.parse("X = np.random.default_rng(3).random(3)")) == []  # data, drawn once


def test_no_module_level_generator_and_no_test_module_imported() -> None:
    problems = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        where = path.relative_to(TESTS)
        problems += [f"{where}: module-level generator {name}" for name in _shared_generators(tree)]
        problems += [f"{where}: imports {module}" for module in _test_imports(tree)]
    assert problems == []
