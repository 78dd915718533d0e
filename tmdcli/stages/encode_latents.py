"""`tmd encode-latents`: a videos artifact -> normalised Wan VAE latents + umT5 text embeddings (data stage 3).

Latents shard k encodes videos shard k (same split, resume and commit rules as synth-videos). The clean latents
synth-videos saved are reused when the same VAE (by weights digest) made them; otherwise the mp4s are decoded and
encoded with the fp32 VAE, `(mode - latents_mean) / latents_std` as in the Wan pipeline. Text embeddings keep only
each prompt's true-length rows (the loader re-pads with zeros to max_sequence_length); the negative prompt's
embedding is stored once. An unreadable or misshapen video is recorded, skipped and counted, never fatal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tmdcli.artifacts.store import Artifact, Staging, Store, is_planned
from tmdcli.data.shards import NEGATIVE_FILE, latents_shard_name, read_latents_meta, shard_files, storage_dtype_name
from tmdcli.errors import ArtifactError, UsageError
from tmdcli.stages.common import NOT_IDENTITY, Plan, Runtime
from tmdcli.stages.shard_work import finish_when_complete, making
from tmdcli.stages.synth_videos import (
    check_video_size,
    chunks,
    external_model,
    resolve_input,
    size_rules,
    staged_count,
    teacher_entry,
    teacher_folder,
    vae_digest,
)

STAGE, STAGE_VERSION, OUTPUT_KIND = "encode-latents", 1, "latents"
NORMALISATION = "(vae.encode(x).latent_dist.mode() - latents_mean) / latents_std"
_VIDEO_FACTS = ("num_frames", "height", "width", "num_items")


@dataclass(frozen=True, kw_only=True)
class EncodeLatentsConfig:
    teacher: str
    videos: str = field(default="latest", metadata=NOT_IDENTITY)  # the input's fingerprint is what counts
    reuse_latents: bool = True  # take synth-videos' saved latents when the same VAE made them
    storage_dtype: str = "auto"  # auto: bfloat16 when a latent has >= 2**20 elements (Wan 480p), else float32
    dtype: str = "auto"  # text encoder compute dtype (the VAE always runs in fp32)
    batch_size: int = field(default=8, metadata=NOT_IDENTITY)
    name: str | None = field(default=None, metadata=NOT_IDENTITY)


def plan(cfg: EncodeLatentsConfig, store: Store) -> Plan:
    """Resolve videos and teacher, check the video size against the teacher's VAE and patching; count the work."""
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    entry = teacher_entry(cfg.teacher)
    folder = teacher_folder(entry)
    videos = resolve_input(store, cfg.videos, "videos", "--videos")
    if is_planned(videos):  # a dry-run chain: size from the teacher's defaults
        from tmdcli.registry import teacher_defaults

        d = teacher_defaults(entry)
        facts = {"num_frames": d.num_frames, "height": d.height, "width": d.width, "num_items": 0}
    else:
        facts = videos.manifest.facts or {}
    if any(k not in facts for k in _VIDEO_FACTS):
        raise ArtifactError(f"videos artifact {videos.id} does not say its video size "
                            f"(facts {', '.join(_VIDEO_FACTS)})",
                            hint="make the videos with `tmd synth-videos`")
    frames, height, width = facts["num_frames"], facts["height"], facts["width"]
    latent = check_video_size(frames, height, width, size_rules(folder),
                              f"videos {videos.id} ({frames}x{height}x{width}) for teacher {entry.name}")
    shards = [] if is_planned(videos) else shard_files(videos.manifest.files, "videos")
    if not shards and not is_planned(videos):
        raise ArtifactError(f"videos artifact {videos.id} holds no shard", hint="remake it with `tmd synth-videos`")
    try:
        r = replace(cfg, storage_dtype=storage_dtype_name(cfg.storage_dtype, latent[0] * latent[1] * latent[2]
                                                          * latent[3]))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    p = Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=r,
                   inputs=[("videos", videos)], external_models=[external_model(entry, folder)], name=r.name)
    names = [latents_shard_name(k) for k, _ in shards]
    done = staged_count(store, OUTPUT_KIND, p.output_id, names)
    n = facts["num_items"]
    maybe_reuse = r.reuse_latents and facts.get("has_latents")
    p.rows += [
        ("teacher", f"{entry.name} ({entry.kind})"),
        ("videos", ("not made yet (the synth-videos plan above), " if is_planned(videos) else "")
                   + f"{n or '?'} clips {frames}x{height}x{width} from {facts.get('teacher', '?')} -> latent "
                   f"{'x'.join(map(str, latent))}, stored {r.storage_dtype}"),
        ("shards", "one per videos shard" if is_planned(videos) else
         f"{len(names)}" + (f", {done} done (resume)" if done else "")),
        ("compute", "per clip: its prompt through the text encoder, one mp4 decode + VAE encode (or its saved latent)"
         if is_planned(videos) else f"{n} prompts through the text encoder; "
         + (f"{n} saved latents reused if the VAE digest matches (checked when run), else {n} VAE encodes"
            if maybe_reuse else f"{n} mp4 decodes + VAE encodes")),
    ]
    p.facts.update(num_items=n, latent_shape=latent)
    return p


def run(cfg: EncodeLatentsConfig, plan: Plan, staging: Staging, rt: Runtime) -> Artifact | None:
    """Encode this worker's missing shards (and the negative prompt if absent), then commit if all are present."""
    from tmdcli.runtime.dist import my_shards

    cfg = EncodeLatentsConfig(**plan.config)
    videos = plan.inputs[0][1]
    sources = shard_files(videos.manifest.files, "videos")
    names = [latents_shard_name(k) for k, _ in sources]
    mine = my_shards(len(names), rt.worker, rt.num_workers)

    def summarise() -> tuple[dict, dict]:
        metas = [read_latents_meta(staging.path / name) for name in names]
        num_items = sum(len(m["ids"]) for m in metas)
        failed = [f for m in metas for f in m["failed"]]
        first, vf = metas[0], videos.manifest.facts
        facts = {
            "teacher": cfg.teacher, "teacher_family": teacher_entry(cfg.teacher).family,
            "num_frames": vf["num_frames"], "height": vf["height"], "width": vf["width"],
            "latent_shape": first["latent_shape"], "num_items": num_items, "num_failed": len(failed),
            "failed": failed[:100], "max_sequence_length": first["max_sequence_length"],
            "text_dim": first["text_dim"], "storage_dtype": cfg.storage_dtype, "dtype": first["dtype"],
            "normalisation": NORMALISATION, "vae_digest": first["vae_digest"],
            "latents_reused": sum(m["num_reused"] for m in metas),
            "latents_encoded": sum(m["num_encoded"] for m in metas),
            "negative_prompt": first["negative_prompt"], "num_shards": len(names), "videos": videos.id,
        }
        return {"num_items": num_items, "num_failed": len(failed), "num_shards": len(names)}, facts

    def make(todo: list[int]) -> None:
        _encode(cfg, videos, sources, names, todo, staging, rt)

    return finish_when_complete(staging, names, rt, summarise, make=make, mine=mine, extra=[NEGATIVE_FILE])


def _encode(cfg: EncodeLatentsConfig, videos: Artifact, sources, names, todo, staging: Staging, rt: Runtime) -> None:
    import tempfile

    import torch

    from tmdcli.artifacts.media import MediaError, read_mp4, uint8_to_frames
    from tmdcli.data.shards import VideosShard, write_latents_shard, write_negative
    from tmdcli.models import wan
    from tmdcli.registry import load_teacher
    from tmdcli.runtime.dist import device_for
    from tmdcli.runtime.log import Progress

    vf = videos.manifest.facts
    frames, height, width = vf["num_frames"], vf["height"], vf["width"]
    teacher = load_teacher(cfg.teacher, device=device_for(rt.device, rt.dist), dtype=cfg.dtype,
                           parts=("vae", "text_encoder"))
    try:
        shape = list(teacher.latent_shape(frames, height, width))
    except ValueError as exc:
        raise UsageError(f"videos {videos.id} ({frames}x{height}x{width}) do not fit {cfg.teacher}: {exc}") from exc
    in_channels = teacher._transformer_config.in_channels if teacher.transformer is None else \
        teacher.transformer.config.in_channels
    if in_channels != shape[0]:
        raise UsageError(f"{cfg.teacher}: the VAE makes {shape[0]} latent channels but the transformer reads "
                         f"{in_channels}", hint="the teacher folder mixes components of different models")
    digest = vae_digest(teacher.vae)
    reuse = cfg.reuse_latents and bool(vf.get("has_latents"))
    if reuse and (vf.get("vae_digest") != digest or list(vf.get("latent_shape", [])) != shape):
        reuse = False
        print(f"note: {videos.id} holds saved latents, but another VAE made them (videos teacher "
              f"{vf.get('teacher')}, VAE digest {str(vf.get('vae_digest'))[:19]}..., ours {digest[:19]}...): "
              f"decoding the mp4s and encoding them with {cfg.teacher}'s VAE instead", file=sys.stderr)
    elif reuse:
        print(f"reusing the sampler's latents saved in {videos.id} (same VAE)", file=sys.stderr)
    store_dtype = getattr(torch, cfg.storage_dtype)
    seq_len = teacher.defaults.max_sequence_length
    shared = {"latent_shape": shape, "max_sequence_length": seq_len, "dtype": str(teacher.dtype)[6:],
              "storage_dtype": cfg.storage_dtype, "vae_digest": digest,
              "negative_prompt": teacher.defaults.negative_prompt}

    def encode_text(prompts):
        return wan.encode_text(teacher.tokenizer, teacher.text_encoder, prompts, seq_len, teacher.device,
                               teacher.dtype)

    with making(staging, NEGATIVE_FILE) as ours:
        if ours:
            emb, lengths = encode_text([teacher.defaults.negative_prompt])
            with staging.atomic_path(NEGATIVE_FILE) as tmp:
                write_negative(tmp, text_1SD=emb, length=int(lengths[0]), prompt=teacher.defaults.negative_prompt,
                               dtype=store_dtype)
    counts = {i: read_index_count(videos, sources[i][1]) for i in todo}
    progress = Progress(sum(counts.values()), f"encode-latents worker {rt.worker}/{rt.num_workers}", unit="clips",
                        per_hour=True)
    try:
        with tempfile.TemporaryDirectory(prefix="tmd-encode-") as scratch:
            for i in todo:
                with making(staging, names[i]) as ours:  # one process per shard, even for a twice-started command
                    if not ours:
                        progress.update(counts[i])  # done meanwhile, or another process makes it
                        continue
                    k, rel = sources[i]
                    with VideosShard(videos.file(rel)) as shard:
                        saved = shard.tensors() if reuse else {}
                        latents, failed, pending = {}, [], []
                        for item in shard.items:
                            key = f"latent.{item['id']}"
                            if key in saved and list(saved[key].shape) == shape:
                                latents[item["id"]] = saved[key].float()
                                continue
                            mp4 = Path(scratch) / f"{item['id']}.mp4"
                            try:
                                mp4.write_bytes(shard.mp4(item["id"]))
                                clip = read_mp4(mp4)
                            except (KeyError, MediaError) as exc:
                                reason = "missing mp4" if isinstance(exc, KeyError) else exc.message
                                failed.append({"id": item["id"], "reason": reason})
                                continue
                            finally:
                                mp4.unlink(missing_ok=True)
                            if clip.shape != (frames, height, width, 3):
                                got = "x".join(map(str, clip.shape[:3]))
                                failed.append({"id": item["id"],
                                               "reason": f"frames {got}, expected {frames}x{height}x{width}"})
                                continue
                            pending.append((item["id"], clip))
                        num_reused = len(latents)
                        for batch in chunks(pending, cfg.batch_size):
                            pixels = torch.stack([torch.from_numpy(uint8_to_frames(clip)) for _, clip in batch])
                            z = teacher.encode_video(pixels).float().cpu()
                            latents.update({item_id: z[j] for j, (item_id, _) in enumerate(batch)})
                        kept = [item for item in shard.items if item["id"] in latents]
                        texts, lengths = [], []
                        for batch in chunks([item["prompt"] for item in kept], cfg.batch_size):
                            emb, n = encode_text(batch)
                            texts.append(emb.float().cpu())
                            lengths.append(n)
                        text = (torch.cat(texts) if texts
                                else torch.zeros(0, seq_len, teacher.text_encoder.config.d_model))
                        lat = torch.stack([latents[item["id"]] for item in kept]) if kept else torch.zeros(0, *shape)
                        meta = {"shard": k, "videos_shard": rel, **shared, "text_dim": int(text.shape[-1]),
                                "prompts": [item["prompt"] for item in kept], "seeds": [item["seed"] for item in kept],
                                "failed": failed, "num_reused": num_reused, "num_encoded": len(kept) - num_reused}
                        with staging.atomic_path(names[i]) as tmp:
                            write_latents_shard(tmp, ids=[item["id"] for item in kept], latents_BCTHW=lat,
                                                text_BSD=text,
                                                text_lengths_B=torch.cat(lengths) if lengths else torch.zeros(0),
                                                meta=meta, dtype=store_dtype)
                        for f in failed:
                            print(f"skipped video {f['id']} ({rel}): {f['reason']}", file=sys.stderr)
                progress.update(counts[i])
    finally:
        progress.close()


def read_index_count(videos: Artifact, rel: str) -> int:
    from tmdcli.data.shards import read_videos_index

    return len(read_videos_index(videos.file(rel))["items"])
