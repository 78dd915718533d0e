"""On-disk shard formats of the data stages: videos shards (tar) and latents shards (safetensors), written and read.

A shard is one file, written once through the store's atomic writers, so it is either complete or absent.
    videos  `shards/videos-00000.tar`: `index.json` (first), `<id>.mp4` per item, optional `tensors.safetensors`
            holding `latent.<id>` (the sampler's clean latent, normalised, float32) and `noise.<id>` (its x_1).
    latents `shards/latents-00000.safetensors`: `ids` [B] int64, `latents` [B, C, T, H, W], `text` [sum L_b, D]
            (each prompt's true-length umT5 rows, concatenated), `text_lengths` [B] int64; the JSON metadata
            under the single key "tmdcli" (one key keeps the file bytes deterministic).
    `negative.safetensors` once per latents artifact: `negative` [L, D] and `length` [1].
Bytes are deterministic (fixed tar headers, sorted members, one metadata key): a resumed run hashes like an
uninterrupted one. Nothing is pickled. torch and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tmdcli.artifacts.fingerprint import canonical_json
from tmdcli.errors import IntegrityError

VIDEOS_SHARD_FORMAT = "tmdcli.videos-shard/1"
LATENTS_SHARD_FORMAT = "tmdcli.latents-shard/1"
NEGATIVE_FORMAT = "tmdcli.negative/1"
DEFAULT_SHARD_SIZE = 64
NEGATIVE_FILE = "negative.safetensors"
INDEX_MEMBER = "index.json"
TENSORS_MEMBER = "tensors.safetensors"
METADATA_KEY = "tmdcli"
# Storage dtype rule ("auto"): bfloat16 once one latent has at least this many elements (Wan 81x480x832:
# 16x21x60x104 = 2.1M), float32 below (tiny and toy shapes stay exact).
BF16_MIN_LATENT_ELEMENTS = 1 << 20

_VIDEOS_RE = re.compile(r"^shards/videos-(\d{5,})\.tar$")
_LATENTS_RE = re.compile(r"^shards/latents-(\d{5,})\.safetensors$")


def videos_shard_name(k: int) -> str:
    return f"shards/videos-{k:05d}.tar"


def latents_shard_name(k: int) -> str:
    return f"shards/latents-{k:05d}.safetensors"


def shard_files(files: Sequence[Mapping[str, Any]], kind: str) -> list[tuple[int, str]]:
    """(shard index, relative path) of a manifest's shard files of `kind` ("videos" or "latents"), by index."""
    pattern = _VIDEOS_RE if kind == "videos" else _LATENTS_RE
    found = []
    for entry in files:
        match = pattern.match(entry["path"])
        if match:
            found.append((int(match.group(1)), entry["path"]))
    return sorted(found)


def num_shards(num_items: int, shard_size: int) -> int:
    return (num_items + shard_size - 1) // shard_size


def storage_dtype_name(choice: str, latent_elements: int) -> str:
    """Resolve --storage-dtype: "auto" -> bfloat16 for large latents, float32 for small ones."""
    if choice == "auto":
        return "bfloat16" if latent_elements >= BF16_MIN_LATENT_ELEMENTS else "float32"
    if choice not in ("float32", "bfloat16"):
        raise ValueError(f"storage dtype must be auto, float32 or bfloat16, got {choice!r}")
    return choice


# --------------------------------------------------------------------------------------------------------------
# Videos shards (tar)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def mp4_member(item_id: int) -> str:
    return f"{int(item_id)}.mp4"


def write_videos_shard(path: str | os.PathLike, *, index: dict, mp4s: Mapping[int, bytes],
                       tensors: Mapping[str, Any] | None = None) -> None:
    """Write one videos shard tar at `path` (a temporary path from the store's `atomic_path`).

    Args:
        index: {"shard": k, "items": [{"id", "prompt", "seed", "file"}, ...], ...}; `format` is added.
        mp4s: item id -> mp4 bytes; every item of the index needs one.
        tensors: optional name -> CPU tensor (`latent.<id>`, `noise.<id>`), stored as one safetensors member.
    """
    index = {"format": VIDEOS_SHARD_FORMAT, **index}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        _tar_add(tar, INDEX_MEMBER, (canonical_json(index) + "\n").encode("ascii"))
        for item in index["items"]:
            _tar_add(tar, item["file"], mp4s[item["id"]])
        if tensors:
            from safetensors.torch import save

            meta = {METADATA_KEY: canonical_json({"format": VIDEOS_SHARD_FORMAT})}
            _tar_add(tar, TENSORS_MEMBER, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


class VideosShard:
    """A videos shard opened for reading: `index`, `items`, `mp4(id)` bytes, `tensors()` (empty dict if none)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, "r:")
            self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
            self.index = json.loads(self._read(INDEX_MEMBER))
        except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
            raise IntegrityError(f"videos shard {self.path} is unreadable: {exc}",
                                 hint="check the artifact with `tmd verify`, then regenerate it") from exc
        if self.index.get("format") != VIDEOS_SHARD_FORMAT:
            raise IntegrityError(f"{self.path} is not a {VIDEOS_SHARD_FORMAT} shard "
                                 f"(format {self.index.get('format')})")

    @property
    def items(self) -> list[dict]:
        return self.index["items"]

    def _read(self, name: str) -> bytes:
        member = self._members[name]
        handle = self._tar.extractfile(member)  # read into memory only: member names never become paths
        return handle.read()

    def mp4(self, item_id: int) -> bytes:
        """The mp4 bytes of one item (KeyError when the member is missing)."""
        return self._read(mp4_member(item_id))

    def has_tensors(self) -> bool:
        return TENSORS_MEMBER in self._members

    def tensors(self) -> dict:
        if not self.has_tensors():
            return {}
        from safetensors.torch import load

        return load(self._read(TENSORS_MEMBER))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "VideosShard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_videos_index(path: str | os.PathLike) -> dict:
    """Only the index of a videos shard (the first member: cheap)."""
    with VideosShard(path) as shard:
        return shard.index


# --------------------------------------------------------------------------------------------------------------
# Latents shards (safetensors)


def pack_text(text_BSD, lengths_B):
    """Zero-padded (B, S, D) embeddings -> (sum_b L_b, D) true-length rows, concatenated in batch order."""
    import torch

    rows = [text_BSD[b, : int(lengths_B[b])] for b in range(text_BSD.shape[0])]
    if not rows:
        return text_BSD.new_zeros((0, text_BSD.shape[-1]))
    return torch.cat(rows, dim=0)


def pad_text(rows_LD, max_sequence_length: int):
    """(L, D) true-length rows -> (max_sequence_length, D), zeros past L (the Wan pipeline's layout)."""
    out = rows_LD.new_zeros((max_sequence_length, rows_LD.shape[-1]))
    out[: rows_LD.shape[0]] = rows_LD
    return out


def write_latents_shard(path: str | os.PathLike, *, ids, latents_BCTHW, text_BSD, text_lengths_B,
                        meta: dict, dtype) -> None:
    """Write one latents shard at `path` (a temporary path from `atomic_path`).

    Args:
        ids: (B,) int64 item ids. latents_BCTHW: normalised VAE latents. text_BSD: zero-padded umT5 embeddings.
        text_lengths_B: (B,) true token counts. meta: JSON-able shard facts (prompts, seeds, failed items...).
        dtype: the storage dtype of latents and text (torch dtype).
    """
    import torch
    from safetensors.torch import save_file

    lengths = torch.as_tensor(text_lengths_B, dtype=torch.int64).cpu()
    tensors = {
        "ids": torch.as_tensor(ids, dtype=torch.int64).cpu(),
        "latents": latents_BCTHW.detach().to("cpu", dtype).contiguous(),
        "text": pack_text(text_BSD.detach().cpu(), lengths).to(dtype).contiguous(),
        "text_lengths": lengths,
    }
    meta = {"format": LATENTS_SHARD_FORMAT, **meta, "ids": [int(i) for i in tensors["ids"]],
            "text_lengths": [int(n) for n in lengths]}
    save_file(tensors, str(path), metadata={METADATA_KEY: canonical_json(meta)})


def _metadata(handle, path) -> dict:
    raw = (handle.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise IntegrityError(f"{path} has no tmdcli metadata; it was not written by tmdcli")
    return json.loads(raw)


def read_latents_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a latents shard (header only: no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = _metadata(handle, path)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"latents shard {path} is unreadable: {exc}", hint="check it with `tmd verify`") from exc
    if meta.get("format") != LATENTS_SHARD_FORMAT:
        raise IntegrityError(f"{path} is not a {LATENTS_SHARD_FORMAT} shard")
    return meta


@dataclass
class NegativeEmbedding:
    rows_LD: Any  # (L, D) true-length rows
    text: str
    max_sequence_length: int

    def padded(self):
        """(1, max_sequence_length, D), zeros past the true length."""
        return pad_text(self.rows_LD, self.max_sequence_length)[None]


def write_negative(path: str | os.PathLike, *, text_1SD, length: int, prompt: str, dtype) -> None:
    """The negative prompt's embedding, once per latents artifact: true-length rows + length + the text."""
    import torch
    from safetensors.torch import save_file

    rows = text_1SD[0, :length].detach().to("cpu", dtype).contiguous()
    meta = {"format": NEGATIVE_FORMAT, "prompt": prompt, "max_sequence_length": int(text_1SD.shape[1])}
    save_file({"negative": rows, "length": torch.tensor([length], dtype=torch.int64)}, str(path),
              metadata={METADATA_KEY: canonical_json(meta)})


def read_negative(path: str | os.PathLike) -> NegativeEmbedding:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = _metadata(handle, path)
        rows = handle.get_tensor("negative")
    return NegativeEmbedding(rows_LD=rows, text=meta["prompt"], max_sequence_length=meta["max_sequence_length"])
