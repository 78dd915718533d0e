"""pyproject.toml's dependencies match what tmdcli imports (a static scan, lazy imports included).

Rules: a third-party module imported anywhere under tmdcli/ is a core dependency, declared directly (not left to
come with another package), or it belongs to an extra and every import of it sits behind the guard of
tmdcli/optional.py: `require("mod", extra=..., ...)` / `check("mod", extra=..., ...)` called earlier in the same
function, with literal arguments, naming an extra that installs it. And every core dependency is imported somewhere,
except the runtime-only ones listed below with the reason.
"""

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tmdcli"
GUARDS = ("require", "check")  # tmdcli.optional

# Import name -> distribution, where they differ. Checked against the installed metadata below.
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open-clip-torch",
                  "huggingface_hub": "huggingface-hub", "imageio_ffmpeg": "imageio-ffmpeg",
                  "sklearn": "scikit-learn", "cv2": "opencv-python"}

# Core dependencies nothing imports by name, and why they are declared anyway.
RUNTIME_ONLY = {
    # transformers' fast tokenizers (AutoTokenizer for Wan's UMT5 and the expander models) run on it; the floor
    # matches the tokenizer.json format of the Wan and Qwen repositories.
    "tokenizers": "transformers' fast tokenizers",
}

# Files that never run in tmdcli's interpreter, and why.
OTHER_INTERPRETER = {
    # started as `--vbench-python vbench_driver.py ...` inside VBench's own environment; plan checks that
    # environment first (evaluation/vbench_runner.py), so its imports are not tmdcli's dependencies.
    "tmdcli/evaluation/vbench_driver.py",
}


def normalise(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0])


def load_pyproject() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    return core, extras


def dist_of(module: str) -> str:
    top = module.split(".")[0]
    return normalise(IMPORT_TO_DIST.get(top, top))


def is_third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top != "tmdcli" and top not in sys.stdlib_module_names


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _guard_calls(scope) -> list[tuple[int, str | None, str | None]]:
    """(line, module, extra) of each require/check call in `scope`; None where an argument is not a literal."""
    calls = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name in GUARDS:
                module = _literal(node.args[0]) if node.args else None
                extra = next((_literal(k.value) for k in node.keywords if k.arg == "extra"), None)
                calls.append((node.lineno, module, extra))
    return calls


@functools.lru_cache(maxsize=None)  # each module is parsed once per session (results are read-only)
def scan_source(source: str, filename: str = "<src>"):
    """(imports, guards): imports as (line, module, function node or None); guards as (line, module, extra)."""
    tree = ast.parse(source, filename=filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        scope = parents.get(node)
        while scope is not None and not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope = parents.get(scope)
        imports += [(node.lineno, name, scope) for name in names]
    # the guard must be ours, not some other require(): the file imports tmdcli.optional (or from it)
    uses_ours = any(isinstance(n, ast.ImportFrom) and (n.module == "tmdcli.optional" or (
        n.module == "tmdcli" and any(a.name == "optional" for a in n.names))) for n in ast.walk(tree))
    return imports, (_guard_calls(tree) if uses_ours else [])


def problems_in(source: str, filename: str, core: set[str], extras: dict[str, set[str]]) -> tuple[list[str], set[str]]:
    """Unguarded or undeclared third-party imports in one file, and the core distributions it imports."""
    imports, guards = scan_source(source, filename)
    problems, used = [], set()
    for line, module, extra in guards:
        if module is None or extra is None:
            problems.append(f"{filename}:{line}: require/check needs literal module and extra= arguments")
        elif extra not in extras or dist_of(module) not in extras[extra]:
            problems.append(f"{filename}:{line}: extra {extra!r} does not install {dist_of(module)} ({module})")
    for line, module, scope in imports:
        if not is_third_party(module):
            continue
        dist = dist_of(module)
        if dist in core:
            used.add(dist)
            continue
        top = module.split(".")[0]
        guarded = scope is not None and any(
            g_line < line and g_module and g_module.split(".")[0] == top and extra in extras
            and dist in extras[extra] for g_line, g_module, extra in _guard_calls(scope)) and bool(guards)
        if not guarded:
            problems.append(f"{filename}:{line}: `{module}` ({dist}) is neither a core dependency nor imported "
                            f"after tmdcli.optional.require/check naming an extra that installs it")
    return problems, used


@functools.lru_cache(maxsize=None)
def package_sources() -> tuple[tuple[str, str], ...]:
    """(path relative to the repository, source) of every module under tmdcli/, read once per test session."""
    return tuple((p.relative_to(ROOT).as_posix(), p.read_text()) for p in sorted(PACKAGE.rglob("*.py")))


@functools.lru_cache(maxsize=None)
def scan_package():
    core, extras = load_pyproject()
    problems, used = [], set()
    for rel, source in package_sources():
        if rel in OTHER_INTERPRETER:
            continue
        found, imported = problems_in(source, rel, core, extras)
        problems += found
        used |= imported
    return core, extras, problems, used


def test_every_third_party_import_is_declared_or_guarded():
    _, _, problems, _ = scan_package()
    assert problems == []


def test_every_core_dependency_is_imported_or_listed_as_runtime_only():
    core, _, _, used = scan_package()
    assert sorted(core - used - set(RUNTIME_ONLY)) == []
    assert sorted(set(RUNTIME_ONLY) - core) == []  # an allowlist entry for something not declared is stale
    assert sorted(set(RUNTIME_ONLY) & used) == []  # ... and so is one for something imported after all


def test_import_names_map_to_the_installed_distributions():
    """The mapping the scan uses agrees with the installed packages' metadata, for every module it sees."""
    installed = importlib.metadata.packages_distributions()
    modules = {m.split(".")[0] for rel, source in package_sources() for _, m, _ in scan_source(source, rel)[0]
               if is_third_party(m)} | set(IMPORT_TO_DIST)
    wrong = {m: (dist_of(m), installed[m]) for m in sorted(modules)
             if m in installed and dist_of(m) not in {normalise(d) for d in installed[m]}}
    assert wrong == {}


def test_the_scan_sees_lazy_and_guarded_imports():
    """Guard against a scanner that silently finds nothing."""
    seen = {(rel, m) for rel, source in package_sources() for _, m, _ in scan_source(source, rel)[0]}
    assert ("tmdcli/data/prompt_sources.py", "pyarrow.parquet") in seen  # function-level
    assert ("tmdcli/data/expanders.py", "vllm") in seen  # guarded by require("vllm", ...)
    _, _, _, used = scan_package()
    assert {"torch", "pyarrow", "datasets", "imageio-ffmpeg", "huggingface-hub"} <= used


EXTRAS = {"plot": {"matplotlib"}}


@pytest.mark.parametrize("source,ok", [
    ("def f():\n    import matplotlib\n", False),  # an unguarded optional import
    ("import matplotlib\n", False),  # at module level nothing can guard it
    ("from tmdcli.optional import require\ndef f():\n    require('matplotlib', extra='plot', purpose='x')\n"
     "    import matplotlib.pyplot\n", True),
    ("from tmdcli.optional import require\ndef f():\n    import matplotlib\n"
     "    require('matplotlib', extra='plot', purpose='x')\n", False),  # the guard comes too late
    ("from tmdcli.optional import require\ndef f():\n    require('matplotlib', extra='dev', purpose='x')\n"
     "    import matplotlib\n", False),  # an extra that does not install it
    ("from tmdcli.optional import require\ndef g():\n    require('matplotlib', extra='plot', purpose='x')\n"
     "def f():\n    import matplotlib\n", False),  # the guard is in another function
    ("def require(m, extra, purpose): pass\ndef f():\n    require('matplotlib', extra='plot', purpose='x')\n"
     "    import matplotlib\n", False),  # not tmdcli.optional's guard
    ("from tmdcli.optional import require\nm = 'matplotlib'\ndef f():\n    require(m, extra='plot', purpose='x')\n",
     False),  # not a literal
    ("def f():\n    import numpy, torch\n", True),  # core
    ("def f():\n    import requests\n", False),  # transitive, not declared
])
def test_the_rules_on_small_sources(source, ok):
    problems, _ = problems_in(source, "<src>", {"numpy", "torch"}, {**EXTRAS, "dev": {"pytest"}})
    assert (problems == []) is ok, problems


def test_the_guard_exits_2_naming_the_extra(monkeypatch):
    from tmdcli import optional
    from tmdcli.errors import UsageError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a plain install
    with pytest.raises(UsageError) as caught:
        optional.require("matplotlib", extra="plot", purpose="drawing quality_vs_nfe.png")
    assert caught.value.exit_code == 2
    assert caught.value.message == "drawing quality_vs_nfe.png needs the matplotlib package, which is not installed"
    assert caught.value.hint == "pip install 'tmdcli[plot]'"
    assert optional.require("json", extra="plot", purpose="x") is sys.modules["json"]
    with pytest.raises(UsageError) as caught:
        optional.check("no_such_module_here", extra="wandb", purpose="--log-to wandb", alternative="use none")
    assert caught.value.hint == "pip install 'tmdcli[wandb]', or use none"


def test_log_to_a_missing_backend_names_its_extra(monkeypatch):
    from tmdcli.errors import UsageError
    from tmdcli.runtime.log import check_log_backend

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UsageError) as caught:
        check_log_backend("wandb")
    assert caught.value.hint.startswith("pip install 'tmdcli[wandb]'")
