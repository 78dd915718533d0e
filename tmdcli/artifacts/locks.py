"""One writer per piece of work (DESIGN.md 3, Artifacts): file locks on a staging folder and on each of its shards.

    <home>/<kind>/.lock-<id>                    the staging lock of `.staging-<id>/`
    <home>/<kind>/.staging-<id>/.claims/<f>.lock  the claim on one shard file `<f>` of it

The staging lock is held *shared* by every process that writes into the staging folder (the cooperating workers of a
data stage) and *exclusively* by the process that commits it, so a commit never lists, hashes or renames a folder
another process is still writing into: no temporary file of another process can reach a manifest, and nobody can
recreate the staging folder after the rename. A single-writer stage (training, eval) holds it exclusively for its
whole run; a second run of the same artifact is refused with exit 2 naming the holder. A shard claim is held
exclusively while a worker makes that shard, so two processes never make the same shard.

These are flock(2) locks: they belong to the open file and the kernel drops them when the process dies, so a
SIGKILLed run never blocks a rerun and there are no stale locks to clean up. Within one process, every user of one
staging lock shares a single open file (flock would otherwise make a process conflict with itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from tmdcli.errors import UsageError

LOCK_PREFIX = ".lock-"
CLAIMS_DIR = ".claims"
WAIT_NOTICE_S = 2.0  # say why we wait once a lock has been busy this long


# --------------------------------------------------------------------------------------------------------------
# flock on a path that a commit may unlink


def _still_linked(fd: int, path: Path) -> bool:
    """True when `path` still names the file open as `fd` (a commit unlinks the staging lock once it is done)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _lock_path(path: Path, operation: int, *, blocking: bool) -> int | None:
    """Open (creating) `path` and flock it; the fd, or None when non-blocking and another process holds it.

    A lock won on a file that was unlinked meanwhile protects nothing (a newcomer opens a new file), so the
    attempt is repeated on the current file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, operation | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _still_linked(fd, path):
            return fd
        os.close(fd)


def _describe_me(stage: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def read_holder(path: Path) -> dict:
    """Who holds an exclusive staging lock, as its holder wrote it ({} when unknown)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------------------------
# The staging lock


class _OpenLock:
    """The one open lock file of a path in this process, shared by its users."""

    def __init__(self, fd: int, exclusive: bool):
        self.fd = fd
        self.exclusive = exclusive
        self.users = 1


_OPEN: dict[Path, _OpenLock] = {}


class StagingLock:
    """The lock of one staging folder (see the module docstring). Acquire with `join()` or `take()`."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what  # the artifact id, for messages
        self._held: _OpenLock | None = None

    @classmethod
    def of(cls, home: Path, kind: str, artifact_id: str) -> "StagingLock":
        return cls(Path(home) / kind / f"{LOCK_PREFIX}{artifact_id}", artifact_id)

    @property
    def held(self) -> bool:
        return self._held is not None and _OPEN.get(self.path) is self._held

    def _reuse(self) -> bool:
        mine = _OPEN.get(self.path)
        if mine is None:
            return False
        mine.users += 1
        self._held = mine
        return True

    def join(self) -> None:
        """Become one of the writers of the staging folder (shared); waits while another process commits it."""
        if self._reuse():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_path(self.path, fcntl.LOCK_SH, blocking=False)
        if fd is None:
            print(f"waiting: another process is committing {self.what}", file=sys.stderr)
            fd = _lock_path(self.path, fcntl.LOCK_SH, blocking=True)
        self._held = _OPEN[self.path] = _OpenLock(fd, exclusive=False)

    def take(self, stage: str) -> None:
        """Become the only writer (a single-writer stage). Raises UsageError (exit 2) naming the process that
        holds it; a killed holder frees it at once."""
        if self._reuse():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_path(self.path, fcntl.LOCK_EX, blocking=False)
        if fd is None:
            raise busy_error(self.path, self.what, stage)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_describe_me(stage)).encode(), 0)
        self._held = _OPEN[self.path] = _OpenLock(fd, exclusive=True)

    def to_exclusive(self) -> None:
        """Wait until no other process writes into the staging folder (for the commit). Converting drops the shared
        lock first, so the caller must look again for an artifact another process committed meanwhile."""
        if not self.held:
            self.join()
        held = self._held
        if held.exclusive:
            return
        try:
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for the other processes writing {self.what} to finish before committing it",
                  file=sys.stderr)
            fcntl.flock(held.fd, fcntl.LOCK_EX)
        held.exclusive = True

    def release(self) -> None:
        """Stop being a writer (the file closes when this process's last user releases it)."""
        held, self._held = self._held, None
        if held is None or _OPEN.get(self.path) is not held:
            return
        held.users -= 1
        if held.users <= 0:
            del _OPEN[self.path]
            os.close(held.fd)

    def discard(self) -> None:
        """Release the lock of an artifact found committed, removing its file unless another process uses it."""
        held = self._held
        if held is not None and _OPEN.get(self.path) is held and held.users == 1 and not held.exclusive:
            try:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.exclusive = True
            except BlockingIOError:
                pass  # another process still uses it (a failed conversion dropped our shared lock: fine, we leave)
        if held is not None and held.exclusive:
            self.release_committed()
        else:
            self.release()

    def release_committed(self) -> None:
        """After the commit (exclusive): remove the lock file and close it for every user in this process."""
        held, self._held = self._held, None
        if held is None or _OPEN.get(self.path) is not held:
            return
        with contextlib.suppress(OSError):
            if _still_linked(held.fd, self.path):
                os.unlink(self.path)
        del _OPEN[self.path]
        os.close(held.fd)


def busy_error(path: Path, what: str, stage: str) -> UsageError:
    """The refusal of a second single-writer run: who holds the artifact and what to do."""
    holder = read_holder(path)
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, `tmd {holder.get('stage', stage)}` since "
           f"{holder.get('started_at')}" if holder.get("pid") else "another process")
    return UsageError(f"{what} is being written by {who}; one run at a time writes an artifact",
                      hint="wait for that run to finish (then rerun: it will be up to date) or stop it; a killed "
                           "run frees the artifact at once and a rerun resumes from its staging folder")


# --------------------------------------------------------------------------------------------------------------
# Shard claims


def _claim_path(staging_path: Path, relpath: str) -> Path:
    return staging_path / CLAIMS_DIR / (relpath.replace("/", "__") + ".lock")


@contextlib.contextmanager
def claim(staging_path: Path, relpath: str) -> Iterator[bool]:
    """Hold the claim on shard `relpath` of a staging folder while making it. Yields False when another process
    holds it (it is making that shard now): skip it. The caller holds the staging lock, so the folder exists."""
    (staging_path / CLAIMS_DIR).mkdir(exist_ok=True)  # not parents=True: never recreate a committed staging folder
    fd = _lock_path(_claim_path(staging_path, relpath), fcntl.LOCK_EX, blocking=False)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def claimed(staging_path: Path, relpath: str) -> bool:
    """True when a live process holds the claim on shard `relpath` (it is making it right now)."""
    path = _claim_path(staging_path, relpath)
    if not path.is_file():
        return False
    fd = _lock_path(path, fcntl.LOCK_EX, blocking=False)
    if fd is None:
        return True
    os.close(fd)
    return False
