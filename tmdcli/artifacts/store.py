"""The artifact store: `<home>/<kind>/<id>/` folders, staging and atomic commit, references, verify, lineage.

A stage writes into `<home>/<kind>/.staging-<id>/`; `commit()` writes `manifest.json` last and renames the folder
into place, so a reader never sees half an artifact. The id derives from the fingerprint, which is known before
the stage runs: rerunning the same configuration finds the finished artifact, or resumes the staging folder.
Several processes may write one staging folder; locks.py makes the commit wait for them and happen once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from tmdcli.artifacts.artifact import (  # noqa: F401 (re-exported: readers import them from the store)
    Artifact,
    MissingInput,
    PlannedInput,
    is_planned,
    load_artifact,
)
from tmdcli.artifacts.fingerprint import HashingWriter, canonical_json, fingerprint_hex, sha256_file, stage_fingerprint
from tmdcli.artifacts.locks import CLAIMS_DIR, StagingLock
from tmdcli.artifacts.manifest import (
    MANIFEST_NAME,
    Manifest,
    fsync_dir,
    parse_time,
    utc_now_iso,
    write_manifest_atomic,
)
from tmdcli.errors import ArtifactError, IntegrityError, UsageError
from tmdcli.runtime import interrupts

KINDS = ("prompts", "videos", "latents", "student", "eval", "samples")

# The stage(s) that produce each kind, for "none yet: run `tmd ...` first" hints.
PRODUCERS: dict[str, tuple[str, ...]] = {
    "prompts": ("make-prompts",),
    "videos": ("synth-videos",),
    "latents": ("encode-latents",),
    "student": ("pretrain-head", "distill"),
    "eval": ("eval",),
    "samples": ("sample",),
}

STAGING_PREFIX = ".staging-"
STAGING_META = ".staging.json"  # fingerprint and config of a staging folder, checked when a rerun resumes it
HASHES_DIR = ".hashes"  # per-file sidecars with the sha256 computed while writing
_BOOKKEEPING = (HASHES_DIR, CLAIMS_DIR)  # store folders inside a staging folder, removed by the commit
_TMP_RE = re.compile(r"\.tmp-\d+")  # `<name>.tmp-<pid>[.ext]`: a write that never finished
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def _is_tmp(filename: str) -> bool:
    return _TMP_RE.search(filename) is not None


def _tmp_name(filename: str) -> str:
    """`name.ext` -> `name.tmp-<pid>.ext`: the extension survives, for writers that pick a format from it."""
    stem, dot, ext = filename.rpartition(".")
    if not stem:  # no extension (or a dotfile)
        return f"{filename}.tmp-{os.getpid()}"
    return f"{stem}.tmp-{os.getpid()}{dot}{ext}"


def _safe_relpath(relpath: str | os.PathLike) -> str:
    """Normalise a path inside an artifact to "a/b.ext"; reject absolute paths and `..`."""
    text = os.fspath(relpath).replace("\\", "/")
    pure = PurePosixPath(text)
    parts = [p for p in pure.parts if p not in ("", ".")]
    if pure.is_absolute() or not parts or ".." in parts:
        raise ArtifactError(f"invalid path inside an artifact: {text!r}", hint="use a relative path without '..'")
    return "/".join(parts)


def _walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every file under `root`, sorted, sidecar folder excluded."""
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in _BOOKKEEPING]
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for filename in sorted(filenames):
            yield (rel_dir / filename).as_posix(), Path(dirpath) / filename


def _check_name_syntax(name: str) -> None:
    """Names appear in refs (`KIND:NAME`) and on the command line; keep them unambiguous."""
    if (
        not name
        or name == "latest"
        or name.startswith((".", "~"))
        or any(c in name for c in "/\\:")
        or any(c.isspace() for c in name)
    ):
        raise ArtifactError(
            f"invalid artifact name {name!r}",
            hint="use letters, digits, '-', '_' or '.', not starting with '.', and not 'latest'",
        )


def _write_json_atomic(path: Path, data: dict, *, fsync: bool) -> None:
    tmp = path.with_name(_tmp_name(path.name))
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _none_yet_hint(kind: str | None) -> str:
    if kind is None:
        return "none yet: run `tmd make-prompts` first"
    return "none yet: run " + " or ".join(f"`tmd {stage}`" for stage in PRODUCERS[kind]) + " first"


# --------------------------------------------------------------------------------------------------------------
# Staging


class Staging:
    """The folder a stage writes its output into before `commit()` renames it into place.

    Several processes (ranks) may write different files into the same staging folder; exactly one commits.
    When the output already exists, `complete` is True, `artifact` is that artifact and nothing may be written.
    """

    def __init__(
        self,
        store: Store,
        *,
        kind: str,
        id: str,
        name: str,
        fingerprint: str,
        stage: str,
        stage_version: int,
        config: dict,
        inputs: list[dict],
        external_models: list[dict],
        path: Path,
        artifact: Artifact | None = None,
        lock: StagingLock | None = None,
    ):
        self.store = store
        self.kind = kind
        self.id = id
        self.name = name
        self.fingerprint = fingerprint
        self.stage = stage
        self.stage_version = stage_version
        self.config = config
        self.inputs = inputs
        self.external_models = external_models
        self.path = path
        self.artifact = artifact
        self.lock = lock  # held while this process writes here (locks.py); None for ranks that never write
        self._started = time.monotonic()

    @property
    def complete(self) -> bool:
        """True when the output artifact exists already (the caller reports "up to date")."""
        return self.artifact is not None

    @property
    def final_path(self) -> Path:
        return self.store.home / self.kind / self.id

    # -- writing ------------------------------------------------------------------------------------------------

    def _target(self, relpath: str | os.PathLike) -> tuple[str, Path]:
        if self.complete:
            raise ArtifactError(f"{self.id} is complete; its files cannot change", hint="nothing is ever overwritten")
        rel = _safe_relpath(relpath)
        top = rel.split("/")[0]
        if rel in (MANIFEST_NAME, STAGING_META) or top in _BOOKKEEPING or _is_tmp(rel.rsplit("/", 1)[-1]):
            raise ArtifactError(f"{rel!r} is a name the store reserves for itself")
        if not self.path.is_dir():  # committed by another process: writing would recreate a stale staging folder
            raise ArtifactError(f"staging folder {self.path} is gone (committed or removed)",
                                hint="rerun the same command: it finds the artifact or starts over")
        return rel, self.path / rel

    def write_bytes(self, relpath: str | os.PathLike, data: bytes) -> Path:
        """Write one file atomically (see `open_atomic`) and return its path in the staging folder."""
        with self.open_atomic(relpath) as f:
            f.write(data)
        return self.path / _safe_relpath(relpath)

    @contextlib.contextmanager
    def open_atomic(self, relpath: str | os.PathLike) -> Iterator[HashingWriter]:
        """Open `relpath` for binary writing; it appears under its name only once it is complete.

        The data goes to `<relpath>.tmp-<pid>`, is hashed while written, fsynced and renamed into place; the hash
        is kept in a sidecar so `commit()` never re-reads large files. On an exception the partial file is deleted.
        """
        rel, final = self._target(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as raw:
                writer = HashingWriter(raw)
                yield writer
                raw.flush()
                os.fsync(raw.fileno())
            interrupts.check()  # written while a SIGINT was pending (perhaps dropped): do not keep it
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._record_hash(rel, final, writer.hexdigest(), writer.bytes_written)

    @contextlib.contextmanager
    def atomic_path(self, relpath: str | os.PathLike) -> Iterator[Path]:
        """For writers that need a file name (safetensors, ffmpeg): yields a temporary path to write to.

        The temporary name keeps the extension (`shard.tmp-<pid>.safetensors`). After the block, the file is
        hashed once (it is fresh in the page cache), fsynced and renamed into place.
        """
        rel, final = self._target(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(_tmp_name(final.name))
        try:
            yield tmp
            if not tmp.is_file():
                raise ArtifactError(f"nothing was written to {tmp}")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest, size = sha256_file(tmp)
            interrupts.check()  # written while a SIGINT was pending (perhaps dropped): do not keep it
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._record_hash(rel, final, digest, size)

    def has(self, relpath: str | os.PathLike) -> bool:
        """True when `relpath` was written completely (files only ever appear under their name whole)."""
        root = self.artifact.path if self.artifact is not None else self.path
        return (root / _safe_relpath(relpath)).is_file()

    # -- hash sidecars ------------------------------------------------------------------------------------------

    def _sidecar(self, rel: str) -> Path:
        return self.path / HASHES_DIR / f"{rel}.json"

    def _record_hash(self, rel: str, path: Path, digest: str, size: int) -> None:
        # One sidecar per file, so ranks writing different shards never race on a shared index. The mtime lets
        # commit() notice a file changed after it was recorded.
        sidecar = self._sidecar(rel)
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        record = {"sha256": digest, "bytes": size, "mtime_ns": path.stat().st_mtime_ns}
        _write_json_atomic(sidecar, record, fsync=False)  # a lost sidecar only costs a re-hash

    def _recorded_hash(self, rel: str, path: Path) -> tuple[str, int] | None:
        try:
            record = json.loads(self._sidecar(rel).read_text(encoding="utf-8"))
            stat = path.stat()
            if record["bytes"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
                return record["sha256"], record["bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    # -- commit -------------------------------------------------------------------------------------------------

    def _collect_files(self) -> list[dict]:
        """Every file of the staging folder with its size and sha256; deletes leftovers of interrupted writes."""
        entries = []
        for rel, path in _walk_files(self.path):
            if rel in (STAGING_META, MANIFEST_NAME):
                continue
            if _is_tmp(path.name):
                path.unlink(missing_ok=True)
                continue
            if path.is_symlink() or not path.is_file():
                raise ArtifactError(f"{path} is not a regular file", hint="artifacts hold regular files only")
            digest, size = self._recorded_hash(rel, path) or sha256_file(path)
            entries.append({"path": rel, "bytes": size, "sha256": digest})
        return sorted(entries, key=lambda e: e["path"])

    def _adopt(self, existing: Artifact) -> Artifact:
        """Accept an artifact committed by another process for the same fingerprint; refuse anything else."""
        if existing.fingerprint != self.fingerprint:
            raise ArtifactError(
                f"{existing.path} already exists with another fingerprint; it is never overwritten",
                hint="move that folder away if it is stale",
            )
        if self.lock is not None:
            self.lock.discard()
        self.artifact = existing
        return existing

    def commit(
        self,
        *,
        stats: dict | None = None,
        facts: dict | None = None,
        duration_s: float | None = None,
        env: dict | None = None,
    ) -> Artifact:
        """List and hash the files, write `manifest.json` last, and rename the staging folder into place.

        Args:
            stats: counts and timings for the manifest.
            facts: stage-specific facts (teacher, M/N/H, effective NFE, metrics).
            duration_s: the stage's run time; default the time since `begin()`.
            env: extra environment facts, e.g. {"world_size": 8}.

        Returns:
            The committed artifact, or the identical one another process committed first.

        Raises:
            ArtifactError: the final folder exists with another fingerprint or without a manifest, or the name
                was taken meanwhile by another artifact.
        """
        if self.artifact is not None:
            return self.artifact
        interrupts.check()  # a SIGINT, even one whose KeyboardInterrupt was dropped, never ends in a commit
        if self.lock is None:
            self.lock = StagingLock.of(self.store.home, self.kind, self.id)
        self.lock.to_exclusive()  # from here on no other process writes into the staging folder
        existing = self.store._existing(self.kind, self.id)
        if existing is not None:
            return self._adopt(existing)
        final = self.final_path
        if final.exists():
            raise ArtifactError(
                f"{final} exists but holds no manifest; it is never overwritten",
                hint="move it away, then rerun the same command to commit again",
            )
        if not self.path.is_dir():
            raise ArtifactError(f"staging folder {self.path} has vanished", hint="rerun the same command")
        self.store._check_name_free(self.kind, self.name, self.id)
        try:
            manifest = Manifest(
                kind=self.kind,
                id=self.id,
                name=self.name,
                stage=self.stage,
                stage_version=self.stage_version,
                fingerprint=self.fingerprint,
                created_at=utc_now_iso(),
                duration_s=round(time.monotonic() - self._started, 3) if duration_s is None else duration_s,
                config=self.config,
                inputs=self.inputs,
                external_models=self.external_models,
                files=self._collect_files(),
                stats=dict(stats or {}),
                facts=dict(facts or {}),
            )
            if env:
                manifest.env.update(env)
            # Store bookkeeping goes before the manifest: the manifest is the last file written.
            for folder in _BOOKKEEPING:
                shutil.rmtree(self.path / folder, ignore_errors=True)
            (self.path / STAGING_META).unlink(missing_ok=True)
            write_manifest_atomic(self.path / MANIFEST_NAME, manifest)
            interrupts.check()  # still resumable: a rerun rewrites the manifest
            # A directory rename fails when the target exists and is not empty: it cannot overwrite an artifact.
            os.replace(self.path, final)
        except OSError:
            # Another rank may have committed (and renamed this very folder) while we were listing it.
            existing = self.store._existing(self.kind, self.id)
            if existing is not None:
                return self._adopt(existing)
            raise
        fsync_dir(final.parent)
        self.lock.release_committed()
        self.path = final
        self.artifact = Artifact(id=self.id, kind=self.kind, path=final, manifest=manifest)
        return self.artifact

    def release(self) -> None:
        """This process stops writing here (its staging lock is released; see locks.py)."""
        if self.lock is not None:
            self.lock.release()


# --------------------------------------------------------------------------------------------------------------
# Store


def check_home(home: Path) -> None:
    """A home is a folder or does not exist yet (it is created on the first write); a regular file, or a path
    under one, is a usage error (exit 2), not an empty home."""
    existing = next((p for p in (home, *home.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == home else f"lies under {existing}, which is"
        raise UsageError(f"--home {home} {where} a file, not a folder",
                         hint="pass a folder for the artifacts (created when missing), or set TMD_HOME to one")


class Store:
    """All artifacts under one home folder (`--home`, env TMD_HOME)."""

    plan_missing_inputs = False  # set for --dry-run: a `latest` input that does not exist yet is planned, not an error

    def __init__(self, home: str | os.PathLike):
        # Absolute, so that paths recorded or printed stay valid after a chdir (no resolve: keep symlinked homes).
        self.home = Path(home).expanduser().absolute()
        check_home(self.home)

    def __repr__(self) -> str:
        return f"Store({str(self.home)!r})"

    # -- creating -----------------------------------------------------------------------------------------------

    def begin(
        self,
        *,
        kind: str,
        stage: str,
        stage_version: int,
        config: dict,
        identity_config: dict,
        inputs: Sequence[tuple[str, Artifact]] = (),
        external_models: Sequence[dict] = (),
        name: str | None = None,
        writer: str = "shared",
    ) -> Staging:
        """Start (or resume, or find complete) the output of a stage.

        Args:
            kind: the output kind, one of KINDS.
            stage, stage_version: the stage; the version is bumped when the output's meaning changes.
            config: the resolved config, recorded in full in the manifest.
            identity_config: the fields of `config` that change the result; only these are fingerprinted.
            inputs: (role, artifact) pairs; their fingerprints enter the fingerprint.
            external_models: e.g. [{"name": ..., "revision": ...}]; fingerprinted.
            name: the artifact's name, unique per kind; default the id (or the name a resumed run was given).
            writer: "shared" (cooperating workers write shards side by side), "only" (a single-writer stage: exit
                2 while another process writes this artifact) or "none" (a rank that never writes). See locks.py.

        Returns:
            A Staging; `complete` is True when the artifact exists already. Call `release()` when done with it.
        """
        self._check_kind(kind)
        external_models = [dict(m) for m in external_models]
        fingerprint = stage_fingerprint(
            stage, stage_version, identity_config, [a.fingerprint for _, a in inputs], external_models
        )
        artifact_id = f"{kind}-{fingerprint_hex(fingerprint)[:12]}"
        # Round-trip through canonical JSON: the config recorded is exactly what a reader will load.
        config = json.loads(canonical_json(config))
        input_entries = [{"role": role, "kind": a.kind, "id": a.id, "fingerprint": a.fingerprint} for role, a in inputs]
        staging_path = self.home / kind / f"{STAGING_PREFIX}{artifact_id}"
        meta = self._read_staging_meta(staging_path)
        name = name or (meta or {}).get("name") or artifact_id
        _check_name_syntax(name)
        fields = dict(
            kind=kind, id=artifact_id, name=name, fingerprint=fingerprint, stage=stage, stage_version=stage_version,
            config=config, inputs=input_entries, external_models=external_models,
        )

        existing = self._existing(kind, artifact_id)
        if existing is not None:
            return Staging(self, **fields, path=existing.path, artifact=existing)
        self._check_name_free(kind, name, artifact_id)
        lock = None if writer == "none" else StagingLock.of(self.home, kind, artifact_id)
        if lock is not None:
            if writer == "only":
                lock.take(stage)  # exit 2 while another run writes this artifact
            else:
                lock.join()  # waits only while another process commits it
            existing = self._existing(kind, artifact_id)  # committed while we waited
            if existing is not None:
                lock.discard()
                return Staging(self, **fields, path=existing.path, artifact=existing)
            meta = self._read_staging_meta(staging_path)
        try:
            self._prepare_staging(staging_path, meta, fields, identity_config)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return Staging(self, **fields, path=staging_path, lock=lock)

    @staticmethod
    def _prepare_staging(staging_path: Path, meta: dict | None, fields: dict, identity_config: dict) -> None:
        staging_path.mkdir(parents=True, exist_ok=True)
        if meta is None:
            identity = json.loads(canonical_json(identity_config))
            meta = {**fields, "identity_config": identity, "started_at": utc_now_iso()}
            _write_json_atomic(staging_path / STAGING_META, meta, fsync=True)
        elif meta.get("fingerprint") != fields["fingerprint"]:
            # Cannot happen unless the folder was edited or copied: the id is derived from the fingerprint.
            raise ArtifactError(
                f"staging folder {staging_path} belongs to another configuration ({meta.get('fingerprint')})",
                hint="delete that folder to start over",
            )

    @staticmethod
    def _read_staging_meta(staging_path: Path) -> dict | None:
        try:
            meta = json.loads((staging_path / STAGING_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _existing(self, kind: str, artifact_id: str) -> Artifact | None:
        path = self.home / kind / artifact_id
        return load_artifact(path) if (path / MANIFEST_NAME).is_file() else None

    def _check_name_free(self, kind: str, name: str, artifact_id: str) -> None:
        """Names are unique per kind, and a name may not be another artifact's id."""
        for other in self.list(kind):
            if other.id != artifact_id and name in (other.name, other.id):
                raise ArtifactError(
                    f"the name {name!r} is already used by {kind} artifact {other.id} (another configuration)",
                    hint="choose another --name; names are unique per kind",
                )

    # -- listing and references ---------------------------------------------------------------------------------

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ArtifactError(f"unknown artifact kind {kind!r}", hint=f"kinds are: {', '.join(KINDS)}")

    def list(self, kind: str | None = None) -> list[Artifact]:
        """Complete artifacts, newest first. Staging folders and folders without a valid manifest are skipped."""
        if kind is not None:
            self._check_kind(kind)
        found = []
        for k in (kind,) if kind else KINDS:
            folder = self.home / k
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(".") or not (entry / MANIFEST_NAME).is_file():
                    continue
                try:
                    artifact = load_artifact(entry)
                except ArtifactError:
                    continue  # damaged; resolving it by path or `tmd verify` reports why
                # A manifest that disagrees with its folder was moved by hand: do not let it shadow the real one.
                if artifact.kind == k and artifact.id == entry.name:
                    found.append(artifact)
        found.sort(key=lambda a: (parse_time(a.created_at), a.id), reverse=True)
        return found

    def resolve(self, ref: str | os.PathLike, kind: str | None = None) -> Artifact:
        """Find a complete artifact from a reference.

        Args:
            ref: an id, a name, `latest`, `KIND:latest`, `KIND:NAME` (or `KIND:ID`), or the path of an artifact
                folder (or of its manifest.json).
            kind: the kind the caller needs; None accepts any kind.

        Raises:
            ArtifactError: unknown, ambiguous or of the wrong kind; the hint lists what is available.
        """
        if kind is not None:
            self._check_kind(kind)
        if isinstance(ref, os.PathLike):
            return self._by_path(Path(ref), kind)
        ref = str(ref).strip()
        if ref == "latest":
            return self._latest(kind)
        prefix, sep, rest = ref.partition(":")
        if sep and prefix in KINDS:
            if kind is not None and prefix != kind:
                raise ArtifactError(f"{ref!r} names a {prefix} artifact, but a {kind} artifact is needed")
            if rest == "latest":
                return self._latest(prefix)
            found = self._by_id_or_name(rest, prefix)
            if found is None:
                raise self._unknown(ref, prefix)
            return found
        if "/" in ref or os.sep in ref or ref.startswith((".", "~")):
            return self._by_path(Path(ref), kind)  # names cannot hold these characters
        found = self._by_id_or_name(ref, kind)
        if found is not None:
            return found
        if (Path(ref) / MANIFEST_NAME).is_file():  # a bare folder name relative to the working directory
            return self._by_path(Path(ref), kind)
        raise self._unknown(ref, kind)

    def _latest(self, kind: str | None) -> Artifact:
        artifacts = self.list(kind)
        if not artifacts:
            what = f"{kind} artifact" if kind else "artifact"
            raise ArtifactError(f"no complete {what} in {self.home}", hint=_none_yet_hint(kind))
        return artifacts[0]

    def _by_id_or_name(self, ref: str, kind: str | None) -> Artifact | None:
        kinds = (kind,) if kind else KINDS
        for k in kinds:
            if ref.startswith(f"{k}-"):
                existing = self._existing(k, ref)
                if existing is not None:
                    return existing
        matches = [a for k in kinds for a in self.list(k) if a.name == ref]
        if len(matches) > 1:
            choices = ", ".join(f"{a.kind}:{a.name}" for a in matches)
            raise ArtifactError(f"the name {ref!r} is used by several kinds", hint=f"say which: {choices}")
        return matches[0] if matches else None

    def _by_path(self, path: Path, kind: str | None) -> Artifact:
        path = path.expanduser()
        if path.name == MANIFEST_NAME:
            path = path.parent
        if not path.is_dir():
            raise ArtifactError(f"no artifact folder at {path}", hint="give an id, a name, `latest` or a folder path")
        artifact = load_artifact(path.absolute())
        if kind is not None and artifact.kind != kind:
            raise ArtifactError(
                f"{path} is a {artifact.kind} artifact, but a {kind} artifact is needed",
                hint=f"list {kind} artifacts with `tmd ls {kind}`",
            )
        return artifact

    def _unknown(self, ref: str, kind: str | None) -> ArtifactError:
        what = f"{kind} artifact" if kind else "artifact"
        if kind is not None:
            elsewhere = self._by_id_or_name(ref, None)
            if elsewhere is not None:
                return ArtifactError(
                    f"{ref!r} is a {elsewhere.kind} artifact, but a {kind} artifact is needed",
                    hint=f"list {kind} artifacts with `tmd ls {kind}`",
                )
        available = self.list(kind)
        if not available:
            return ArtifactError(f"no {what} {ref!r} in {self.home}", hint=_none_yet_hint(kind))
        shown = [a.id if a.name == a.id else f"{a.name} ({a.id})" for a in available[:_MAX_LISTED]]
        more = f" and {len(available) - _MAX_LISTED} more" if len(available) > _MAX_LISTED else ""
        listing = f"`tmd ls {kind}`" if kind else "`tmd ls`"
        return ArtifactError(
            f"no {what} {ref!r} in {self.home}",
            hint=f"available: {', '.join(shown)}{more} (see {listing}); or use `latest`",
        )

    # -- inspection ---------------------------------------------------------------------------------------------

    def verify(self, artifact: Artifact) -> list[str]:
        """Re-hash every file against the manifest. Returns the problems found, each naming its file; [] = OK."""
        from tmdcli.artifacts.verify_inputs import file_problems, plain_sha256

        return file_problems(artifact, plain_sha256)

    def check(self, artifact: Artifact) -> None:
        """`verify`, raising IntegrityError (exit 1) when anything is wrong."""
        problems = self.verify(artifact)
        if problems:
            shown = "; ".join(problems[:_MAX_LISTED])
            if len(problems) > _MAX_LISTED:
                shown += f"; and {len(problems) - _MAX_LISTED} more"
            raise IntegrityError(
                f"{artifact.id} does not match its manifest: {shown}",
                hint=f"restore the files, or rerun `tmd {artifact.manifest.stage}` into a fresh home",
            )

    def lineage(self, artifact: Artifact) -> list[Artifact | MissingInput]:
        """The artifact's inputs, their inputs and so on: depth first, each once, the artifact itself excluded.

        An input that cannot be found (deleted, or changed since) appears as a MissingInput placeholder.
        """
        seen = {artifact.id}
        out: list[Artifact | MissingInput] = []

        def visit(node: Artifact) -> None:
            for entry in node.manifest.inputs:
                if entry["id"] in seen:
                    continue
                seen.add(entry["id"])
                found = self._find_input(entry, near=node.path)
                out.append(found)
                if isinstance(found, Artifact):
                    visit(found)

        visit(artifact)
        return out

    def _find_input(self, entry: dict, *, near: Path) -> Artifact | MissingInput:
        """Look for an input in this home, then next to the artifact that names it (a home given by path)."""
        kind, artifact_id = entry["kind"], entry["id"]
        reason = f"not found in {self.home}"
        for folder in dict.fromkeys([self.home / kind / artifact_id, near.parent.parent / kind / artifact_id]):
            if not (folder / MANIFEST_NAME).is_file():
                continue
            try:
                found = load_artifact(folder)
            except ArtifactError as exc:
                reason = exc.message
                continue
            if found.fingerprint == entry["fingerprint"]:
                return found
            reason = f"{folder} has another fingerprint"
        return MissingInput(
            id=artifact_id, kind=kind, role=entry["role"], fingerprint=entry["fingerprint"], reason=reason
        )
