"""What an artifact is, for readers: a complete folder with its manifest, a placeholder for an input a manifest names
but this home no longer holds, and a not-yet-made input of a dry-run chain. The store (store.py) makes them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tmdcli.artifacts.manifest import MANIFEST_NAME, Manifest, read_manifest


@dataclass(frozen=True)
class Artifact:
    """A complete artifact: its folder holds every file its manifest lists."""

    id: str
    kind: str
    path: Path
    manifest: Manifest
    missing: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def created_at(self) -> str:
        return self.manifest.created_at

    def file(self, relpath: str) -> Path:
        """The path of one of the artifact's files."""
        return self.path / relpath


@dataclass(frozen=True)
class MissingInput:
    """Lineage placeholder for an input that a manifest names but this home no longer holds (or holds changed)."""

    id: str
    kind: str
    role: str
    fingerprint: str
    reason: str
    missing: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.id


@dataclass
class PlannedInput:
    """An input that does not exist yet, in a `--dry-run` of a chain of stages (a recipe's DRY_RUN): the stage
    before makes it. Plans show it as "not made yet" and size their estimates from the teacher's defaults."""

    kind: str
    planned: ClassVar[bool] = True

    @property
    def id(self) -> str:
        return f"(new {self.kind}, made by the stage before)"

    @property
    def fingerprint(self) -> str:
        return f"planned:{self.kind}"

    name = id


def is_planned(artifact) -> bool:
    return getattr(artifact, "planned", False)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read the artifact in folder `path` (raises ArtifactError when it has no valid manifest)."""
    path = Path(path)
    manifest = read_manifest(path / MANIFEST_NAME)
    return Artifact(id=manifest.id, kind=manifest.kind, path=path, manifest=manifest)
