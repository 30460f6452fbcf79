"""The import layering: only the app layer reads ``Config``, and voxphone's modules form no cycle.

Each part owns its settings type (``DeliveryPolicy``, ``EventSettings``, ``NatsSettings``,
``WebRtcSettings``, ``SphinxSettings``, ``VoxtralSettings``…); the app layer translates the
config into them. Every import counts, also those inside functions or under ``TYPE_CHECKING``:
a lazy import is still a dependency (the cycle config → events.webhook → events.delivery →
config that this test was written against went through one).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import voxphone

CONFIG = "voxphone.config"
#: Modules that may import ``voxphone.config``: the config itself, the command line that loads
#: it, and the wiring that turns it into each part's settings.
APP_LAYER = {CONFIG, "voxphone.cli", "voxphone.app"}


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Every module under ``package_dir`` (dotted, ``pkg.sub.mod``; a package is its
    ``__init__``) → the modules of the same package it imports, wherever in the file."""
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, is_package)
                for alias in node.names:  # ``from pkg import mod`` imports the module pkg.mod
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module an ``import from`` names, resolving ``from . import x`` (PEP 328)."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".")
    drop = node.level - 1 if is_package else node.level
    base = anchor[: len(anchor) - drop]
    return ".".join(base + ([node.module] if node.module else []))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``a → b → a``, its first module repeated at the end), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle: list[str] = exc.args[1]
        return cycle[::-1]  # graphlib lists it against the edges' direction
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(Path(voxphone.__file__).parent)


def test_only_the_app_layer_imports_the_config(graph: dict[str, set[str]]) -> None:
    assert CONFIG in graph["voxphone.app"]  # the walker sees imports at all
    offenders = {m for m, targets in graph.items() if CONFIG in targets} - APP_LAYER
    assert not offenders, (
        f"{', '.join(sorted(offenders))} import {CONFIG}: give the part its own settings type "
        "and let voxphone.app or voxphone.cli translate the Config into it"
    )


def test_voxphone_has_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert len(graph) > 50  # every module was found
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' → '.join(cycle or [])}"


def test_the_walker_finds_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The checks above are only as good as the graph: a planted cycle must show."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def check():\n    from pkg.sub.hook import sign\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "hook.py").write_text("from . import policy\n")
    (pkg / "sub" / "policy.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..config import check\n"
    )
    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.config": {"pkg.sub.hook"},
        "pkg.sub": set(),
        "pkg.sub.hook": {"pkg.sub.policy"},
        "pkg.sub.policy": {"pkg.config"},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.config", "pkg.sub.hook", "pkg.sub.policy"}
