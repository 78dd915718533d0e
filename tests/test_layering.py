"""STYLE.md 3.2: imports only point downward; math and model code never import the CLI, rich, typer or stages."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tmdcli"
LOW_LEVEL = ("tmdcli.objectives", "tmdcli.models", "tmdcli.sampler")
FORBIDDEN_FOR_LOW_LEVEL = ("typer", "rich", "click", "accelerate", "tmdcli.runtime", "tmdcli.cli", "tmdcli.stages",
                           "tmdcli.api", "tmdcli.evaluation", "tmdcli.data")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_imports():
    """Every import statement in the package, lazy (function-level) ones included."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield module_name(path), alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield module_name(path), node.module


def test_math_and_model_code_import_no_cli_runtime_or_stages():
    offenders = [(m, i) for m, i in all_imports() if m.startswith(LOW_LEVEL)
                 and any(i == f or i.startswith(f + ".") for f in FORBIDDEN_FOR_LOW_LEVEL)]
    assert offenders == []


def test_nothing_imports_click_directly():
    assert [(m, i) for m, i in all_imports() if i == "click" or i.startswith("click.")] == []


def test_the_scan_sees_lazy_imports():
    """Guard against a scanner that silently finds nothing."""
    found = set(all_imports())
    assert ("tmdcli.cli", "typer") in found
    assert ("tmdcli.registry", "tmdcli.models.tiny") in found  # a function-level import
