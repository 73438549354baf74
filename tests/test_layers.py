"""The package's layers, read from the import statements of its modules: the pure objectives and
the sources never import each other, and the padding target comes from `fusion.data`, which loads
nothing (its `datamodule` loads Lightning)."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fusion")


def _imports(path: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in the file, nested ones included."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def _modules(folder: str = "") -> list[str]:
    root = os.path.join(PACKAGE, folder)
    return sorted(os.path.join(directory, name) for directory, _, files in os.walk(root) for name in files if name.endswith(".py"))


@pytest.mark.parametrize("layer, other", [("objectives", "fusion.sources"), ("sources", "fusion.objectives")])
def test_objectives_and_sources_do_not_import_each_other(layer, other):
    for path in _modules(layer):
        wrong = [module for module, _ in _imports(path) if module == other or module.startswith(other + ".")]
        assert not wrong, f"{os.path.relpath(path, PACKAGE)} imports {wrong}"


def test_the_padding_target_is_read_from_fusion_data():
    for path in _modules():
        for module, names in _imports(path):
            assert not (module == "fusion.data.datamodule" and "IGNORE_INDEX" in names), os.path.relpath(path, PACKAGE)
