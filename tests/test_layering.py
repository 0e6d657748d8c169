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


def _registry_types(path: pathlib.Path) -> set[str]:
    """The component names a file builds through a registry: string values of a `type` key in a
    dict literal or a ``dict(type=...)`` call (``{"type": "ConvFCBoxHead", ...}``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "type" and isinstance(value, ast.Constant):
                    names.add(value.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            for kw in node.keywords:
                if kw.arg == "type" and isinstance(kw.value, ast.Constant):
                    names.add(kw.value.value)
    return {n for n in names if isinstance(n, str)}


def test_lower_layers_build_no_component_of_a_higher_layer():
    """A registry lookup is an import too: a type name in a lower layer's code must resolve to a
    class defined in a lower layer (not the engine, apis or cli)."""
    from vitasks.plugins import register_all_modules
    from vitasks.registry import ALL_REGISTRIES

    register_all_modules()
    defined_in = {}
    for registry in ALL_REGISTRIES.values():
        for name, obj in registry.module_dict.items():
            defined_in.setdefault(name, set()).add(getattr(obj, "__module__", ""))
    seen = 0
    problems = []
    for path in LOWER:
        for name in _registry_types(path):
            modules = defined_in.get(name, set())
            seen += bool(modules)
            bad = sorted(m for m in modules if m.startswith(HIGHER))
            if bad and not any(m.startswith("vitasks.") and not m.startswith(HIGHER) for m in modules):
                problems.append(f"{path.relative_to(PACKAGE)} builds '{name}' defined in {bad}")
    assert seen > 5  # the scan finds the registry references (ConvFCBoxHead, MaskConvUpsampleHead...)
    assert not problems, problems


def test_command_line_code_lives_in_cli_and_tools():
    """Argument parsing only in vitasks/cli.py (and the scripts in tools/)."""
    parsing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if "argparse" in imported_modules(p) and p.name != "cli.py")
    assert parsing == []


def test_tools_import_no_private_names():
    tools = PACKAGE.parent / "tools"
    private = []
    for path in sorted(tools.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vitasks"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
