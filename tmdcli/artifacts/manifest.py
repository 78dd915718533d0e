"""The artifact manifest (schema "tmdcli.manifest/1"): dataclass, strict parsing, atomic write.

Stdlib only (level 0). The environment is read from package metadata, so writing a manifest never imports torch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmdcli import __version__
from tmdcli.errors import ArtifactError

SCHEMA = "tmdcli.manifest/1"
MANIFEST_NAME = "manifest.json"

# Packages whose versions go into `env` when installed; the order is the order they appear in the file.
_ENV_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy")


def utc_now_iso() -> str:
    """Current time as ISO 8601 UTC with microseconds, e.g. "2025-01-31T12:00:00.123456+00:00"."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def parse_time(value: str) -> _dt.datetime:
    """Parse a `created_at` string; naive times are taken as UTC."""
    parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def _package_version(name: str) -> str | None:
    """A package's version without importing it (unless it is already imported)."""
    module = sys.modules.get(name)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_env(extra: dict | None = None) -> dict:
    """Python, platform and the versions of the heavy packages, as available.

    torch is looked up in package metadata, not imported; when a stage has already imported it, its CUDA
    version is recorded too. `extra` (e.g. {"world_size": 8} from runtime.dist) is merged in last.
    """
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _ENV_PACKAGES:
        version = _package_version(name)
        if version is not None:
            env[name] = version
    torch = sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "version", None), "cuda", None):
        env["cuda"] = torch.version.cuda
    env.update(extra or {})
    return env


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding this package, or (None, None) outside a checkout."""
    package_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def collect_code() -> dict:
    """The code that wrote an artifact: package version and git commit (recorded, never fingerprinted)."""
    commit, dirty = _git_state()
    return {"version": __version__, "git_commit": commit, "git_dirty": dirty}


@dataclass(kw_only=True)
class Manifest:
    """Everything known about one artifact (DESIGN.md section 3, STYLE.md 3.5)."""

    kind: str
    id: str
    stage: str
    stage_version: int
    fingerprint: str  # "sha256:<64 hex>", from fingerprint.stage_fingerprint
    schema: str = SCHEMA
    name: str = ""  # unique per kind; empty means "same as id"
    status: str = "complete"
    created_at: str = field(default_factory=utc_now_iso)
    duration_s: float | None = None
    config: dict = field(default_factory=dict)  # the resolved config, in full (identity or not)
    inputs: list[dict] = field(default_factory=list)  # [{"role", "kind", "id", "fingerprint"}]
    external_models: list[dict] = field(default_factory=list)  # [{"name", "revision", ...}]
    code: dict = field(default_factory=collect_code)  # {"version", "git_commit", "git_dirty"}
    env: dict = field(default_factory=collect_env)  # {"python", "torch", "diffusers", ...}
    files: list[dict] = field(default_factory=list)  # [{"path", "bytes", "sha256"}], paths relative, "/"-separated
    stats: dict = field(default_factory=dict)  # counts and timings
    facts: dict = field(default_factory=dict)  # stage-specific: teacher, M/N/H, effective NFE, metrics...

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.id

    def to_dict(self) -> dict:
        """A JSON-ready dict in field order (schema first, for people reading the file)."""
        data = dataclasses.asdict(self)
        return {"schema": data.pop("schema"), **data}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "manifest") -> Manifest:
        """Parse a manifest strictly: unknown schema, unknown keys, missing or mistyped fields are errors.

        Args:
            data: the decoded JSON object.
            source: where it came from, for error messages (usually the file path).

        Raises:
            ArtifactError: with a hint saying what to do.
        """
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: a manifest must be a JSON object", hint="the file is damaged")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise ArtifactError(
                f"{source}: unknown manifest schema {schema!r} (this tmd reads {SCHEMA!r})",
                hint="it was written by another version of tmd: upgrade tmd, or rerun the stage that made it",
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ArtifactError(
                f"{source}: unknown manifest field(s) {', '.join(unknown)}",
                hint="it was written by another version of tmd, or edited by hand",
            )
        required = [
            name for name, f in known.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ArtifactError(f"{source}: manifest lacks {', '.join(missing)}", hint="the file is damaged")
        _check_types(data, source)
        return cls(**data)


# Expected JSON types of the fields that readers rely on.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "id": (str,), "name": (str,), "stage": (str,), "stage_version": (int,),
    "fingerprint": (str,), "status": (str,), "created_at": (str,), "duration_s": (int, float, type(None)),
    "config": (dict,), "inputs": (list,), "external_models": (list,), "code": (dict,), "env": (dict,),
    "files": (list,), "stats": (dict,), "facts": (dict,),
}


def _check_types(data: dict, source: str) -> None:
    for name, types in _FIELD_TYPES.items():
        value = data.get(name)
        # bool is an int subclass: `"stage_version": true` must not pass as an int.
        if name in data and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise ArtifactError(
                f"{source}: manifest field {name!r} has the wrong type ({type(value).__name__})",
                hint="the file is damaged",
            )
    if "created_at" in data:  # readers sort by it ("latest")
        try:
            parse_time(data["created_at"])
        except ValueError:
            raise ArtifactError(
                f"{source}: created_at {data['created_at']!r} is not an ISO time", hint="the file is damaged"
            ) from None
    for entry in data.get("files", []):
        if not (isinstance(entry, dict) and {"path", "bytes", "sha256"} <= set(entry)):
            raise ArtifactError(f"{source}: malformed file entry {entry!r}", hint="the file is damaged")
    for entry in data.get("inputs", []):
        if not (isinstance(entry, dict) and {"role", "kind", "id", "fingerprint"} <= set(entry)):
            raise ArtifactError(f"{source}: malformed input entry {entry!r}", hint="the file is damaged")


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest from a `manifest.json` file or from the artifact folder that holds one.

    Raises:
        ArtifactError: missing, unreadable, not JSON, or not a valid manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(
            f"{path.parent} is not a complete artifact (no {MANIFEST_NAME})",
            hint="an interrupted stage leaves its files in a staging folder: rerun the same command to resume",
        ) from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", hint="the file is damaged"
        ) from None
    return Manifest.from_dict(data, source=str(path))


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats (a diverged metric) by the strings "NaN"/"Infinity"/"-Infinity".

    Bare NaN is not JSON; most tools (jq, browsers) reject a file holding it. The strings keep the information.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {key: _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(value) for value in obj]
    return obj


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a crash (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest_atomic(path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `manifest` to `path` so that a reader sees either no file or the whole file.

    Writes a temporary file in the same folder, fsyncs it, then `os.replace`s it into place.
    """
    path = Path(path)
    text = json.dumps(_json_safe(manifest.to_dict()), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
