"""Checking artifacts against their manifests: `tmd verify`, and every stage's inputs when it starts (DESIGN.md 3).

A stage never trains or samples on bytes its manifest does not vouch for: before it runs, each input file must exist
with the size its manifest lists (always) and the sha256 (unless --no-verify-inputs). Hashes are cached in
`<home>/.cache/hashes.json` by (path, size, mtime_ns), so a file is hashed once, and the files of an artifact
committed by this machine are remembered at commit time (their hashes were computed while they were written), so
the next stage does not re-read terabytes of latents. A damaged input is refused with exit 1, naming the file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from tmdcli.artifacts.fingerprint import sha256_file
from tmdcli.errors import ArtifactError, IntegrityError

CACHE_FILE = ".cache/hashes.json"  # under the home
_SHOWN = 5


def file_problems(artifact, digest: Callable[[Path], str] | None, *, extra_files: bool = True) -> list[str]:
    """What does not match the manifest, one line per file naming it; [] = OK.

    Args:
        artifact: an Artifact.
        digest: path -> "sha256:..." (None: sizes only).
        extra_files: also report files the manifest does not list (`tmd verify`; a stage ignores them).
    """
    from tmdcli.artifacts.manifest import MANIFEST_NAME
    from tmdcli.artifacts.store import _safe_relpath, _walk_files

    problems, listed = [], set()
    for entry in artifact.manifest.files:
        rel = entry["path"]
        listed.add(rel)
        try:
            path = artifact.path / _safe_relpath(rel)
        except ArtifactError:
            problems.append(f"unsafe path in manifest: {rel}")
            continue
        if not path.is_file():
            problems.append(f"missing file: {rel}")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"size mismatch: {rel} (manifest {entry['bytes']} bytes, found {size})")
            continue
        if digest is not None and digest(path) != entry["sha256"]:
            problems.append(f"sha256 mismatch: {rel}")
    if extra_files:
        for rel, _ in _walk_files(artifact.path):
            if rel != MANIFEST_NAME and rel not in listed:
                problems.append(f"unexpected file: {rel}")
    return problems


def plain_sha256(path: Path) -> str:
    return sha256_file(path)[0]


class HashCache:
    """sha256 of files by (absolute path, size, mtime_ns), kept in `<home>/.cache/hashes.json`."""

    def __init__(self, home: Path):
        self.path = Path(home) / CACHE_FILE
        self.entries = self._read()
        self.changed: dict[str, dict] = {}
        self.hashed = 0  # files read in full by this instance (the rest came from the cache)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _key(path: Path) -> str:
        return str(Path(path).absolute())

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the cache when its size and mtime are unchanged, else hashed (and cached)."""
        stat, key = path.stat(), self._key(path)
        hit = self.entries.get(key)
        if isinstance(hit, dict) and hit.get("bytes") == stat.st_size and hit.get("mtime_ns") == stat.st_mtime_ns:
            return hit["sha256"]
        digest = plain_sha256(path)
        self.hashed += 1
        self._put(key, stat, digest)
        return digest

    def _put(self, key: str, stat: os.stat_result, digest: str) -> None:
        entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.entries[key] = self.changed[key] = entry

    def remember(self, artifact) -> None:
        """Cache the manifest's hashes of a just-committed artifact (its files were hashed while written)."""
        for entry in artifact.manifest.files:
            path = artifact.path / entry["path"]
            try:
                stat = path.stat()
            except OSError:
                continue
            if stat.st_size == entry["bytes"]:
                self._put(self._key(path), stat, entry["sha256"])

    def save(self) -> None:
        """Merge our new entries into the file and replace it atomically (a lost race only costs a re-hash)."""
        if not self.changed:
            return
        merged = {**self._read(), **self.changed}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(merged, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home still runs; it only hashes again next time
            tmp.unlink(missing_ok=True)
            print(f"note: could not write the hash cache {self.path}: {exc}", file=sys.stderr)
        self.changed = {}


def rebuild_hint(artifact) -> str:
    stage = artifact.manifest.stage
    return (f"move {artifact.path} aside and rerun the `tmd {stage}` command that made it (its options: "
            f"`tmd show {artifact.id}`) to rebuild it; `tmd verify {artifact.id}` lists every damaged file; "
            f"--no-verify-inputs uses it anyway")


def verify_inputs(home: Path, inputs: Sequence[tuple[str, object]], *, hashes: bool = True) -> None:
    """Check every input artifact's files against its manifest: sizes always, sha256 unless `hashes` is False.

    Raises:
        IntegrityError (exit 1): the first damaged input, naming its file(s) and how to rebuild it.
    """
    cache = HashCache(home) if hashes else None
    try:
        for role, artifact in inputs:
            if getattr(artifact, "planned", False):
                continue  # a dry-run chain: made by the stage before
            problems = file_problems(artifact, cache.sha256 if cache else None, extra_files=False)
            if problems:
                shown = "; ".join(problems[:_SHOWN]) + (f"; and {len(problems) - _SHOWN} more"
                                                         if len(problems) > _SHOWN else "")
                raise IntegrityError(f"input {role} {artifact.id} ({artifact.path}) does not match its manifest: "
                                     f"{shown}", hint=rebuild_hint(artifact))
    finally:
        if cache is not None:
            cache.save()


def remember_committed(home: Path, artifact) -> None:
    """Seed the hash cache with a just-committed artifact, so the stage that reads it next hashes nothing."""
    cache = HashCache(home)
    cache.remember(artifact)
    cache.save()
