"""Dependencies point down (DESIGN.md): the lower layers never import the apis, engine or CLI."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vitasks"
HIGHER = ("vitasks.apis", "vitasks.cli", "vitasks.engine")
LOWER = [
    *sorted((PACKAGE / "models").rglob("*.py")),
    *sorted((PACKAGE / "data").rglob("*.py")),
    *sorted((PACKAGE / "evaluation").rglob("*.py")),
    *sorted((PACKAGE / "visualization").rglob("*.py")),
]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", LOWER, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lower_layers_do_not_import_higher_ones(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith(HIGHER))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
