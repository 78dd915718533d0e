"""Canonical JSON, sha256 of bytes and files (streaming or while writing), and the stage fingerprint.

Stdlib only (level 0): `tmd --dry-run` computes fingerprints without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterable

FINGERPRINT_PREFIX = "sha256:"


def _reject_non_finite(obj: Any) -> None:
    """Raise ValueError on NaN/inf anywhere in `obj`: they have no canonical JSON form and NaN != NaN."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"canonical JSON cannot hold a non-finite float ({obj!r})")
    elif isinstance(obj, dict):
        for value in obj.values():
            _reject_non_finite(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _reject_non_finite(value)


def canonical_json(obj: Any) -> str:
    """The one serialisation that fingerprints are computed over.

    Keys are sorted, separators are compact, output is ASCII, tuples become lists and floats use `repr` (the
    shortest string that round-trips), so equal values always give equal strings whatever their key order.

    Raises:
        ValueError: `obj` holds NaN or an infinity.
        TypeError: `obj` holds something that is not JSON (a Path, a set, a dataclass...): convert it first, so
            that what is hashed is exactly what is recorded.
    """
    _reject_non_finite(obj)
    # json.dumps writes floats with float.__repr__ and tuples as lists already; allow_nan=False is a second guard.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, int]:
    """Stream a file through sha256 without loading it whole.

    Returns:
        (hex digest, size in bytes).
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class HashingWriter:
    """Wraps a binary file opened for writing; hashes and counts every byte that goes through it.

    Writing is strictly sequential (no seek), which is what makes the hash valid without re-reading the file.
    """

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self._digest = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self.bytes_written += len(view)
        self.raw.write(view)
        return len(view)

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.write(line)

    def hexdigest(self) -> str:
        """Hex sha256 of everything written so far."""
        return self._digest.hexdigest()

    def tell(self) -> int:
        return self.bytes_written

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        # A writer that seeks back would invalidate the running hash.
        return False

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage_fingerprint(
    stage: str,
    stage_version: int,
    config_identity: dict,
    input_fingerprints: list[str],
    external_models: list[dict],
) -> str:
    """The fingerprint of a stage's output, known before the stage runs (STYLE.md 3.5).

    It covers the stage name and its integer version, the identity fields of the resolved config, the
    fingerprints of the inputs and the external model revisions. The package version and git commit are left out
    on purpose: a typo fix must not invalidate terabytes of latents; bump `stage_version` instead.

    Args:
        stage: stage name, e.g. "encode-latents".
        stage_version: bumped when the meaning of the stage's output changes.
        config_identity: the config's identity fields only (fields marked identity=False left out).
        input_fingerprints: the inputs' fingerprints ("sha256:<hex>"); their order does not matter.
        external_models: e.g. [{"name": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "revision": "..."}]; order does not
            matter either.

    Returns:
        "sha256:<64 hex>".
    """
    payload = {
        "stage": stage,
        "stage_version": int(stage_version),
        "config": config_identity,
        "inputs": sorted(input_fingerprints),
        # Sorted by their canonical form so that listing the same models in another order gives the same id.
        "external_models": sorted(external_models, key=canonical_json),
    }
    return FINGERPRINT_PREFIX + sha256_bytes(canonical_json(payload).encode("ascii"))


def fingerprint_hex(fingerprint: str) -> str:
    """The hex part of "sha256:<hex>"; raises ValueError on anything else."""
    if not fingerprint.startswith(FINGERPRINT_PREFIX):
        raise ValueError(f"not a fingerprint: {fingerprint!r}")
    return fingerprint[len(FINGERPRINT_PREFIX) :]


def file_fingerprint(path: str | Path) -> str:
    """A "sha256:<hex>" fingerprint of a file's bytes (for inputs that are plain files, not artifacts)."""
    return FINGERPRINT_PREFIX + sha256_file(path)[0]
