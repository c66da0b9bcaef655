"""The house's layering, as docs/design.md's layer table states it: no module imports a module of
a layer above its own, the contract (fusion.api) imports nothing else of fusion, and the built-in
plugins speak to the host only through the contract (``fusion`` / ``fusion.api``), exactly as a
third-party plugin would. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
# the folders the distribution installs, by import name
PACKAGES = {"fusion": ROOT / "fusion", "fusion.plugins": ROOT / "plugins", "fusion.registry": ROOT / "registry"}


def layer_table() -> dict[str, int]:
    """module prefix → layer number, from the table under '## Layers' in docs/design.md."""
    text = DESIGN.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for module in re.findall(r"`([\w.]+)`", cells[1]):
                layers[module] = int(cells[0])
    return layers


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a fusion module in ``path``, relative ones resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from fusion import api` names a module too: count the most specific one
            for alias in node.names:
                found.append((node.lineno, f"{target}.{alias.name}" if f"{target}.{alias.name}" in ALL else target))
    return [(line, m) for line, m in found if m == "fusion" or m.startswith("fusion.")]


ALL = modules()


def layer_of(module: str, table: dict[str, int]) -> int | None:
    best = None
    for prefix, layer in table.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def test_every_module_has_a_layer():
    table = layer_table()
    assert table, "docs/design.md has no layer table under '## Layers'"
    missing = sorted(m for m in ALL if not m.startswith(("fusion.plugins", "fusion.registry"))
                     and layer_of(m, table) is None)
    assert not missing, f"modules with no layer in docs/design.md: {missing}"


@pytest.mark.parametrize("module", sorted(m for m in ALL if not m.startswith(("fusion.plugins", "fusion.registry"))))
def test_no_module_imports_a_layer_above_its_own(module):
    table = layer_table()
    own = layer_of(module, table)
    wrong = [f"line {line}: {target} (layer {layer_of(target, table)})"
             for line, target in imports(module, ALL[module])
             if target in ALL and (layer_of(target, table) or 0) > own]
    assert not wrong, f"{module} (layer {own}) imports upwards: {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in ALL if m.startswith("fusion.api")))
def test_the_contract_imports_nothing_else_of_fusion(module):
    wrong = [f"line {line}: {t}" for line, t in imports(module, ALL[module]) if not t.startswith("fusion.api")]
    assert not wrong, f"{module} is part of the contract but imports {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in ALL if m.startswith("fusion.plugins")))
def test_builtin_plugins_import_only_the_contract(module):
    wrong = beyond_the_contract(module, imports(module, ALL[module]))
    assert not wrong, f"the built-in plugin {module} reaches beyond the contract: {wrong}"


def beyond_the_contract(module: str, found: list[tuple[int, str]]) -> list[str]:
    """The imports of plugin ``module`` that are neither the contract nor its own package (a
    plugin package such as plugins/hub/ may import its own modules, never another plugin's)."""
    own = ".".join(module.split(".")[:3])
    return [f"line {line}: {t}" for line, t in found
            if t != "fusion" and not t.startswith("fusion.api") and not (t == own or t.startswith(own + "."))]


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checks above could fail: a lower module importing a higher one is caught."""
    table = layer_table()
    path = tmp_path / "config.py"
    path.write_text("def f():\n    from .pipeline import merge\n")
    found = imports("fusion.config", path)
    assert found == [(2, "fusion.pipeline")] and layer_of("fusion.pipeline", table) > layer_of("fusion.config", table)


def test_the_checker_sees_a_plugin_importing_another(tmp_path):
    path = tmp_path / "dare.py"
    path.write_text("import fusion\nfrom fusion.api import kernels\nfrom fusion.plugins.ties import Ties\n")
    assert beyond_the_contract("fusion.plugins.dare", imports("fusion.plugins.dare", path)) == [
        "line 3: fusion.plugins.ties"]
    hub = imports("fusion.plugins.hub.resolver", ALL["fusion.plugins.hub.resolver"])
    assert any(t.startswith("fusion.plugins.hub.") for _, t in hub), "the hub package imports its own modules"
    assert beyond_the_contract("fusion.plugins.hub.resolver", hub) == []
