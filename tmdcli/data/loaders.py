"""Training loader over a `latents` artifact: seeded shuffle per epoch, disjoint equal shares per rank, exact resume.

    loader = LatentLoader(artifact, batch_size=4, seed=0)          # rank / world size from the launcher
    for batch in loader:                                            # the rest of the current epoch
        batch["latents"]   # [B, C, T, H, W] float32 (normalised Wan latents)
        batch["text"]      # [B, S, D] float32, zero past text_lengths[b] (S = max_sequence_length)
        batch["negative"]  # [1, S, D] float32 (or [B, S, D] with expand_negative=True)
    state = loader.state_dict()    # {"epoch", "position", ...}: the next batch after load_state_dict(state)

Epoch e visits the items (sorted by id first, so the shard layout does not matter) in the order of randperm(N)
drawn from epoch_seed(seed, e). Rank r takes every world_size-th item of the first world_size * (N // world_size),
so the shares are disjoint and equal (collective steps line up); the few left over wait for the next epoch's order.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tmdcli.artifacts.store import Artifact, Store, load_artifact
from tmdcli.data.shards import NEGATIVE_FILE, read_latents_meta, read_negative, shard_files
from tmdcli.errors import ArtifactError

_OPEN_SHARDS = 16  # safetensors handles kept open (memory-mapped), least recently used closed first


def epoch_seed(seed: int, epoch: int) -> int:
    """The permutation seed of one epoch (a hash: neighbouring seeds and epochs give unrelated orders)."""
    return int.from_bytes(hashlib.sha256(f"loader:{int(seed)}:{int(epoch)}".encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class _Item:
    id: int
    shard: int  # index into the loader's shard paths
    row: int  # row in the shard's latents
    text_offset: int  # first row in the shard's concatenated text
    text_length: int
    prompt: str
    seed: int | None  # the seed synth-videos drew the clip's noise from


def resume_position(position: int, old_world: int, new_world: int, num_items: int) -> int:
    """This rank's epoch position after a resume under `new_world` ranks from one saved under `old_world`.

    Rank r of W visits items r, r + W, ... of the epoch order (cut to a multiple of W), so the ranks together have
    consumed the first `position x W` items of it. Another world size continues from the same item when that count
    splits evenly over its ranks and both cut the epoch order at the same length; anything else would skip or
    repeat items, so it is refused."""
    if old_world == new_world:
        return position
    consumed = position * old_world
    if consumed % new_world or num_items // old_world * old_world != num_items // new_world * new_world:
        raise ValueError(f"the checkpoint was written by {old_world} process(es) after {consumed} items of the epoch;"
                         f" {new_world} process(es) cannot continue from exactly there ({num_items} items)")
    return consumed // new_world


class LatentLoader:
    """Batches of latents, text embeddings and the negative embedding from a `latents` artifact.

    Args:
        source: an Artifact, the path of a latents artifact folder, or a reference resolved in `home`.
        batch_size: items per batch on this rank.
        seed: shuffle seed; epoch e uses `epoch_seed(seed, e)`.
        shuffle: False visits items in id order every epoch.
        drop_last: drop the epoch's last incomplete batch (default, for training).
        rank, world_size: this rank's share; default from the launcher's variables (runtime.dist).
        expand_negative: give `negative` as [B, S, D] instead of [1, S, D].
        device: where the batch tensors go.
        home: the store home for a reference `source`.
    """

    def __init__(self, source: Artifact | str | os.PathLike, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, rank: int | None = None,
                 world_size: int | None = None, expand_negative: bool = False, device: str | torch.device = "cpu",
                 home: str | os.PathLike | None = None):
        self.artifact = _resolve(source, home)
        if rank is None or world_size is None:
            from tmdcli.runtime.dist import dist_info

            info = dist_info()
            rank = info.rank if rank is None else rank
            world_size = info.world_size if world_size is None else world_size
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, int(seed), shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.expand_negative, self.device = expand_negative, torch.device(device)
        self._paths: list[Path] = []
        items: list[_Item] = []
        for _, rel in shard_files(self.artifact.manifest.files, "latents"):
            meta = read_latents_meta(self.artifact.file(rel))
            offset = 0
            seeds = meta.get("seeds") or [None] * len(meta["ids"])
            for row, (item_id, length, prompt, seed) in enumerate(zip(meta["ids"], meta["text_lengths"],
                                                                      meta["prompts"], seeds)):
                items.append(_Item(int(item_id), len(self._paths), row, offset, int(length), prompt,
                                   None if seed is None else int(seed)))
                offset += int(length)
            self._paths.append(self.artifact.file(rel))
            self.max_sequence_length = int(meta["max_sequence_length"])
            self.latent_shape = tuple(meta["latent_shape"])
        if not items:
            raise ArtifactError(f"latents artifact {self.artifact.id} holds no item",
                                hint="encode videos first: `tmd encode-latents`")
        self._items = sorted(items, key=lambda it: it.id)
        self.per_rank = len(self._items) // world_size
        if self.per_rank == 0:
            raise ValueError(f"{len(self._items)} items cannot be shared by {world_size} ranks")
        negative = read_negative(self.artifact.file(NEGATIVE_FILE))
        self.negative_prompt = negative.text
        self._negative = negative.padded().float()  # [1, S, D]
        self.text_dim = self._negative.shape[-1]
        self._handles: OrderedDict[int, object] = OrderedDict()
        self.epoch, self.position = 0, 0  # position: items of this rank's epoch order already yielded
        self._order_cache: tuple[int, list[int]] | None = None

    # -- sizes and order ---------------------------------------------------------------------------------------

    @property
    def num_items(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices (into the id-sorted items) this rank visits in `epoch`, in order."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self._items)
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch))).tolist()
        else:
            perm = list(range(n))
        order = perm[: self.per_rank * self.world_size][self.rank::self.world_size]
        self._order_cache = (epoch, order)
        return order

    # -- iteration ---------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the loader stands at the start of the next one."""
        order = self.epoch_order(self.epoch)
        while self.position < len(order):
            chosen = order[self.position:self.position + self.batch_size]
            if len(chosen) < self.batch_size and self.drop_last:
                break
            self.position += len(chosen)
            yield self.load([self._items[i] for i in chosen])
        self.epoch, self.position = self.epoch + 1, 0

    def batches(self) -> Iterator[dict]:
        """Endless batches, epoch after epoch (training loops count steps, not epochs)."""
        if len(self) == 0:  # would loop forever without yielding
            raise ArtifactError(f"latents artifact {self.artifact.id} gives each of {self.world_size} rank(s) "
                                f"{self.per_rank} items, fewer than one batch of {self.batch_size}",
                                hint="lower --micro-batch, or encode more videos")
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "num_items": self.num_items, "artifact": self.artifact.id}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. The data, seed and shuffle must be the same; the world size may
        change (a run started on 2 GPUs resumes on 1 or 4) when `resume_position` can map the position."""
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}: "
                                 f"the position would mean other items")
        position = resume_position(int(state["position"]), int(state["world_size"]), self.world_size,
                                   self.num_items)
        if not 0 <= position <= self.per_rank:
            raise ValueError(f"loader state position {state['position']} is outside the epoch ({self.per_rank})")
        self.epoch, self.position = int(state["epoch"]), position

    def first_items(self, count: int) -> dict:
        """A fixed batch of the `count` lowest-id items (validation prompts whose embeddings are stored here)."""
        return self.load(self._items[:max(0, min(count, len(self._items)))])

    # -- reading -----------------------------------------------------------------------------------------------

    def _handle(self, shard: int):
        from safetensors import safe_open

        handle = self._handles.pop(shard, None)
        if handle is None:
            handle = safe_open(str(self._paths[shard]), framework="pt")
            while len(self._handles) >= _OPEN_SHARDS:
                self._handles.popitem(last=False)
        self._handles[shard] = handle
        return handle

    def load(self, items: list[_Item]) -> dict:
        """One batch of the given items (float32, text zero-padded to max_sequence_length)."""
        latents = torch.empty((len(items), *self.latent_shape), dtype=torch.float32)
        text = torch.zeros((len(items), self.max_sequence_length, self.text_dim), dtype=torch.float32)
        for b, item in enumerate(items):
            handle = self._handle(item.shard)
            latents[b] = handle.get_slice("latents")[item.row:item.row + 1][0].float()
            rows = handle.get_slice("text")[item.text_offset:item.text_offset + item.text_length]
            text[b, :item.text_length] = rows.float()
        negative = self._negative.expand(len(items), -1, -1) if self.expand_negative else self._negative
        return {
            "latents": latents.to(self.device),
            "text": text.to(self.device),
            "text_lengths": torch.tensor([it.text_length for it in items], dtype=torch.int64, device=self.device),
            "negative": negative.to(self.device),
            "ids": torch.tensor([it.id for it in items], dtype=torch.int64, device=self.device),
            "prompts": [it.prompt for it in items],
            "seeds": [it.seed for it in items],
        }


def _resolve(source, home) -> Artifact:
    if isinstance(source, Artifact):
        artifact = source
    elif home is not None:
        artifact = Store(home).resolve(source, kind="latents")
    else:
        artifact = load_artifact(Path(source))
    if artifact.kind != "latents":
        raise ArtifactError(f"{artifact.id} is a {artifact.kind} artifact; the loader reads latents artifacts",
                            hint="make one with `tmd encode-latents`")
    return artifact
