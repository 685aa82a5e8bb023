"""The code's shape, checked: small modules, no import cycle (and no import inside a function that would
close one), a frozen config whose variants are checked again."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from iclvsft.config import derive, load_config
from iclvsft.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "iclvsft"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The iclvsft modules an import statement loads (``from .x import y`` loads x, and y if y is a module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[:len(base) - node.level + 1]
    target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
    out = {target} if target in known else set()
    return out | {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}


def _import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> modules it imports at module level, [(module, target, line)] of imports inside functions)."""
    known = _modules()
    top: dict[str, set[str]] = {}
    inner = []
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        top[module] = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top[module] |= _targets(module, node, is_package, known)
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))):
                inner += [(module, t, node.lineno) for t in _targets(module, node, is_package, known)]
    return top, inner


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(graph.get(node, ()))
    return seen


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (at most {MAX_LINES} lines each): {long}"


def test_no_import_cycle_and_no_function_level_import_that_dodges_one():
    top, inner = _import_graph()
    cycles = sorted((a, b) for a, targets in top.items() for b in targets if a != b and a in _reachable(top, b))
    assert not cycles, f"module-level import cycles: {cycles}"
    dodges = [f"{m}:{line} imports {t}" for m, t, line in inner if m in _reachable(top, t)]
    assert not dodges, f"imports inside functions that would close a cycle at module level: {dodges}"


def test_the_checks_catch_a_cycle(monkeypatch):
    """The cycle check itself: an edge back from the pure jobs module to the study is a cycle."""
    top, _ = _import_graph()
    top["iclvsft.jobs"].add("iclvsft.study")
    assert "iclvsft.jobs" in _reachable(top, "iclvsft.study")


def test_config_is_frozen_and_variants_are_checked_again():
    config = load_config(None, ["data.tasks=[expression,relation]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ft.learning_rate = 1.0  # type: ignore[misc]
    assert config.eval_tasks == ["expression", "relation"] and config.models == [config.model]
    variant = derive(config, {"eval.tasks": ["relation"], "ft.lora.r": 8, "model": "m"})
    assert (variant.eval_tasks, variant.ft.lora.r, variant.model) == (["relation"], 8, "m")
    assert (config.eval_tasks, config.ft.lora.r) == (["expression", "relation"], 16)  # the original is untouched
    with pytest.raises(ConfigError, match="learnig_rate"):
        derive(config, {"ft.learnig_rate": 1e-4})
    with pytest.raises(ConfigError, match="ft.batch_size"):
        derive(config, {"ft.batch_size": 6})  # not a multiple of per_device_batch_size 4: checked like a file
    assert derive(config, {}).to_dict() == config.to_dict()
