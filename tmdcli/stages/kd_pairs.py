"""The KD pairs of the one-step DMD2-v baseline (METHOD.md 5.4; TMD Table 4, Table 7): the teacher's own
(noise, sample) pairs, sampled with CFG 5 plus skip-layer guidance (block 10 left out of the unconditional pass).

`tmd synth-videos --kd-pairs` makes them (it saves each clip's initial noise and clean latent next to the mp4);
`tmd encode-latents` adds the text embeddings the student is conditioned on; `tmd distill --kd-warmup` reads the
pair of every item from the videos shards, so the KD target is the sampler's latent itself, never a re-encoding.
Plans use the finders here without importing torch.
"""

from __future__ import annotations

from tmdcli.artifacts.store import Artifact, Store
from tmdcli.errors import ArtifactError, UsageError

KD_SKIP_BLOCK = 10  # METHOD.md 5.4 / Table 7: block 10 skipped in the unconditional branch (1.3B and 14B alike)
PAPER_NUM_BLOCKS = 30  # the depth the paper's block index refers to (Wan2.1 1.3B)
KD_NUM_PAIRS = 10_000  # Table 7: 10k trajectories


def skip_block_for(requested: int, num_blocks: int) -> tuple[int, str | None]:
    """The block to skip for a teacher of `num_blocks` blocks, and a note when it is not `requested`.

    An index the teacher has is used as given. One beyond a small teacher (tiny-random has 4 blocks) is scaled by
    depth, `requested * L // 30`, keeping its relative position (block 10 of 30 -> block 1 of 4)."""
    if requested < 0:
        raise UsageError(f"--skip-layer-guidance must be a block index >= 0, got {requested}")
    if requested < num_blocks:
        return requested, None
    scaled = min(num_blocks - 1, requested * num_blocks // PAPER_NUM_BLOCKS)
    return scaled, (f"skip-layer block {requested} is beyond the teacher's {num_blocks} blocks: scaled by depth to "
                    f"block {scaled} (= {requested} x {num_blocks} // {PAPER_NUM_BLOCKS})")


def teacher_num_blocks(folder) -> int:
    """L from the teacher's transformer/config.json (tiny-random, built in code: its config in models/defaults)."""
    import json

    if folder is None:
        from tmdcli.models.defaults import TINY_TRANSFORMER_CONFIG

        return int(TINY_TRANSFORMER_CONFIG["num_layers"])
    return int(json.loads((folder / "transformer" / "config.json").read_text())["num_layers"])


def resolve_kd_options(cfg, folder) -> tuple[object, list[tuple[str, str]]]:
    """synth-videos' --kd-pairs and --skip-layer-guidance, resolved before fingerprinting: --kd-pairs saves the
    noise and the clean latent of every clip and turns on skip-layer guidance at block 10 (METHOD.md 5.4); the
    block is fitted to the teacher's depth. Returns the config and the plan's notes."""
    from dataclasses import replace

    if cfg.kd_pairs:
        cfg = replace(cfg, save_latents=True, save_noise=True,
                      skip_layer=KD_SKIP_BLOCK if cfg.skip_layer is None else cfg.skip_layer)
        if cfg.guidance_scale == 1.0:
            raise UsageError("--kd-pairs needs CFG (the pairs are sampled with CFG 5 + skip-layer guidance), got "
                             "--cfg 1", hint="drop --cfg (the teacher's 5 is used)")
    if cfg.skip_layer is None:
        return cfg, []
    block, note = skip_block_for(cfg.skip_layer, teacher_num_blocks(folder))
    return replace(cfg, skip_layer=block), [("note", note)] if note else []


def is_kd_videos(artifact, teacher: str) -> bool:
    """A videos artifact made by `synth-videos --kd-pairs` with this teacher."""
    facts = artifact.manifest.facts or {}
    return bool(facts.get("kd_pairs")) and facts.get("teacher") == teacher


def make_pairs_command(teacher: str) -> str:
    return f"tmd synth-videos --teacher {teacher} --kd-pairs --limit {KD_NUM_PAIRS}"


def _videos_of(store: Store, latents: Artifact):
    videos_id = (latents.manifest.facts or {}).get("videos")
    if not videos_id:
        return None
    try:
        return store.resolve(videos_id, kind="videos")
    except ArtifactError:
        return None


def find_kd_pairs(store: Store, ref: str | None, teacher: str) -> tuple[Artifact, Artifact | None]:
    """(latents artifact with the pairs' text embeddings, the KD videos artifact holding the pairs).

    `ref`: a latents artifact encoded from KD videos, or the KD videos artifact itself (its newest latents are
    used). Default: the newest latents artifact encoded from KD videos of this teacher. Exit 2 naming the command
    that makes what is missing."""
    if ref is not None:
        artifact = store.resolve(ref)
        if artifact.kind == "videos":
            videos = artifact
            encoded = [a for a in store.list("latents") if (a.manifest.facts or {}).get("videos") == videos.id]
            if not encoded:
                raise ArtifactError(f"--kd-pairs {ref}: no latents encoded from {videos.id} yet",
                                    hint=f"run `tmd encode-latents --teacher {teacher} --videos {videos.id}`")
            latents = max(encoded, key=lambda a: a.created_at)
        elif artifact.kind == "latents":
            latents, videos = artifact, _videos_of(store, artifact)
        else:
            raise UsageError(f"--kd-pairs {ref} is a {artifact.kind} artifact",
                             hint="pass the latents (or videos) artifact made from `synth-videos --kd-pairs`")
        if videos is None or not is_kd_videos(videos, teacher):
            raise UsageError(f"--kd-pairs {ref}: its videos were not made with `synth-videos --kd-pairs` by {teacher}",
                             hint=f"make KD pairs with `{make_pairs_command(teacher)}`, then `tmd encode-latents "
                                  f"--teacher {teacher} --videos <that artifact>`")
        return latents, videos
    for latents in sorted(store.list("latents"), key=lambda a: a.created_at, reverse=True):
        videos = _videos_of(store, latents)
        if videos is not None and is_kd_videos(videos, teacher) and latents.manifest.facts.get("teacher") == teacher:
            return latents, videos
    if store.plan_missing_inputs:  # a dry-run chain: the synth-videos / encode-latents plans above make them
        from tmdcli.artifacts.store import PlannedInput

        return PlannedInput("latents"), None
    made = [v for v in store.list("videos") if is_kd_videos(v, teacher)]
    if made:
        newest = max(made, key=lambda a: a.created_at)
        raise ArtifactError(f"KD pairs {newest.id} of {teacher} have no text embeddings yet",
                            hint=f"run `tmd encode-latents --teacher {teacher} --videos {newest.id}`, or pass "
                                 f"--kd-pairs REF")
    raise ArtifactError(f"no KD pairs of {teacher} in {store.home}: the KD warm-up trains on the teacher's (noise, "
                        f"sample) pairs made with CFG + skip-layer guidance (METHOD.md 5.4)",
                        hint=f"make them with `{make_pairs_command(teacher)}` then `tmd encode-latents --teacher "
                             f"{teacher} --videos <that artifact>`, or pass --kd-pairs REF")


class PairReader:
    """The stored (noise, sample) of items by id, read from the KD videos artifact's shards (one shard's tensors
    in memory at a time: 10k pairs at 81x480x832 are ~8 GB)."""

    def __init__(self, videos: Artifact):
        from tmdcli.data.shards import read_videos_index, shard_files

        self.videos = videos
        self._shard_of: dict[int, str] = {}
        for _, rel in shard_files(videos.manifest.files, "videos"):
            for item in read_videos_index(videos.file(rel))["items"]:
                self._shard_of[int(item["id"])] = rel
        self._cached: tuple[str, dict] | None = None

    def _tensors(self, rel: str) -> dict:
        from tmdcli.data.shards import VideosShard

        if self._cached is None or self._cached[0] != rel:
            with VideosShard(self.videos.file(rel)) as shard:
                self._cached = (rel, shard.tensors())
        return self._cached[1]

    def get(self, ids, device=None):
        """(noise, sample) stacked in the order of `ids`, float32."""
        import torch

        noise, sample = [], []
        for item_id in (int(i) for i in ids):
            if item_id not in self._shard_of:
                raise ArtifactError(f"item {item_id} is not in the KD videos {self.videos.id}",
                                    hint="pass --kd-pairs with the latents encoded from those videos")
            tensors = self._tensors(self._shard_of[item_id])
            if f"noise.{item_id}" not in tensors or f"latent.{item_id}" not in tensors:
                raise ArtifactError(f"KD videos {self.videos.id} hold no saved noise/latent for item {item_id}",
                                    hint="remake them with `synth-videos --kd-pairs`")
            noise.append(tensors[f"noise.{item_id}"])
            sample.append(tensors[f"latent.{item_id}"])
        return torch.stack(noise).float().to(device), torch.stack(sample).float().to(device)
