"""The layers of the package, read from its import statements (``ast``, nothing is imported).

Math and drop-in pieces never reach up into training code: the schedulers and the metrics
import neither the LightningModule, the strategies nor the toy-asset builders, and sampling
imports neither the module nor the builders, directly or through another ``tdd`` module.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tdd"
FORBIDDEN = ("tdd.module", "tdd.strategies", "tdd.toy")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


@lru_cache(maxsize=None)
def imported(name: str, packages: bool = True) -> frozenset[str]:
    """The ``tdd`` modules ``name`` imports anywhere in its file (also inside functions), and
    with ``packages`` the packages whose ``__init__`` each of those imports runs."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    targets = {m for m in found if m in MODULES}
    if packages:
        targets |= {parent for m in targets for k in range(1, m.count(".") + 1)
                    if (parent := ".".join(m.split(".")[:k])) in MODULES}
    return frozenset(targets - {name})


def closure(name: str, packages: bool = True) -> dict[str, str]:
    """Every ``tdd`` module that importing ``name`` loads, each with the module importing it."""
    seen, todo = {name: ""}, [name]
    while todo:
        current = todo.pop()
        for child in imported(current, packages):
            if child not in seen:
                seen[child] = current
                todo.append(child)
    return seen


def chain(seen: dict[str, str], name: str) -> str:
    links = [name]
    while seen[links[-1]]:
        links.append(seen[links[-1]])
    return " <- ".join(links)


def violations(roots: list[str], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for root in roots:
        seen = closure(root)
        out += [chain(seen, m) for m in seen if m.startswith(forbidden)]
    return out


def under(prefix: str) -> list[str]:
    return sorted(m for m in MODULES if m == prefix or m.startswith(prefix + "."))


def test_the_import_reader_sees_what_python_imports():
    assert "tdd.schedule" in imported("tdd.prediction")
    assert {"tdd.strategies.base", "tdd.strategies"} <= imported("tdd.strategies.tdd")
    assert "tdd.module" in closure("tdd.bench")  # bench drives the module: allowed there
    assert violations(["tdd.bench"], ("tdd.module",))


@pytest.mark.parametrize("root", under("tdd.schedulers") + under("tdd.metrics"))
def test_schedulers_and_metrics_stay_below_training_code(root):
    assert violations([root], FORBIDDEN) == []


def test_sampling_imports_neither_the_module_nor_the_builders():
    """Nor the strategies or the guidance modes: what it shares with them is pure math."""
    forbidden = ("tdd.module", "tdd.toy", "tdd.strategies", "tdd.guidance")
    assert violations(["tdd.sampling"], forbidden) == []


def test_builders_import_the_runtime_evaluator_never_the_reverse():
    assert "tdd.metrics.toy" in closure("tdd.toy.build_evaluator")
    assert violations(under("tdd.metrics") + under("tdd.models"), ("tdd.toy",)) == []


def test_no_import_cycles():
    """No module reaches itself through the modules it imports (a package's ``__init__``
    re-exporting its own submodules is not a cycle)."""
    cycles = []
    for name in MODULES:
        seen = closure(name, packages=False)
        cycles += [f"{name} <- {chain(seen, m)}" for m in seen if name in imported(m, False)]
    assert cycles == []
