"""Optional third-party packages: the one guard every import of a non-core package goes through.

pyproject.toml's core dependencies are always installed; anything else (matplotlib, open_clip, vllm, wandb,
tensorboard) comes from an extra. A feature that needs one calls `require` (or `check`, to test at plan time
without paying for the import) before importing it, so a missing package is a usage error (exit 2) that names the
extra to install, never an ImportError traceback in the middle of a run. tests/test_dependencies.py checks
statically that every such import is guarded this way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from tmdcli.errors import UsageError


def available(module: str) -> bool:
    """Whether `module` can be imported here (already imported, or found on sys.path), without importing it."""
    if sys.modules.get(module) is not None:  # imported already (a stand-in module may lack __spec__)
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module object without __spec__
        return False


def install_hint(extra: str) -> str:
    """The command that installs an extra of tmdcli."""
    return f"pip install 'tmdcli[{extra}]'"


def check(module: str, *, extra: str, purpose: str, alternative: str | None = None) -> None:
    """Exit 2 (UsageError) naming the extra when `module` is not installed; imports nothing. `alternative`: what
    else the user can do instead of installing (appended to the hint)."""
    if not available(module):
        raise UsageError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed",
                         hint=install_hint(extra) + (f", or {alternative}" if alternative else ""))


def require(module: str, *, extra: str, purpose: str, alternative: str | None = None) -> ModuleType:
    """Import and return `module`, or exit 2 (UsageError) naming the extra that provides it."""
    check(module, extra=extra, purpose=purpose, alternative=alternative)
    return importlib.import_module(module)
