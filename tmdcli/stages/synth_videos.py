"""`tmd synth-videos`: the teacher's videos for a prompts artifact (data stage 2), in tar shards.

Item i of the prompts (sorted by id, first --limit) goes to shard i // shard_size, and its seed depends only on its
id, so a shard's bytes do not depend on which worker made it. Workers (ranks of a launch x `--shard i/n` jobs) take
shard k when k % num_workers == worker, claim each shard while making it, skip shards already present (resume), and
whoever finds every shard present commits (shard_work.py). Also holds the helpers that encode-latents shares (input
resolution, teacher facts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tmdcli.artifacts.media import ffmpeg_plan_row
from tmdcli.artifacts.store import STAGING_PREFIX, Artifact, Staging, Store, is_planned
from tmdcli.data.shards import DEFAULT_SHARD_SIZE, num_shards, read_videos_index, videos_shard_name
from tmdcli.errors import ArtifactError, UsageError
from tmdcli.stages.common import NOT_IDENTITY, Plan, Runtime
from tmdcli.stages.shard_work import finish_when_complete, making

STAGE, STAGE_VERSION, OUTPUT_KIND = "synth-videos", 1, "videos"
PROMPTS_FILE = "prompts.parquet"


@dataclass(frozen=True, kw_only=True)
class SynthVideosConfig:
    """synth-videos settings. None means "the teacher's default" and is resolved by plan() before fingerprinting."""

    teacher: str
    prompts: str = field(default="latest", metadata=NOT_IDENTITY)  # the input's fingerprint is what counts
    limit: int | None = None  # first N prompts by id; None (or >= the count) = all
    num_steps: int | None = None  # teacher sampler steps (Wan: 50)
    guidance_scale: float | None = None  # CFG scale (Wan: 5)
    flow_shift: float | None = None  # sigma shift (Wan2.1 T2V: 5)
    sampler: str | None = None  # "unipc" (Wan's) or "euler"
    num_frames: int | None = None  # 4k+1
    height: int | None = None
    width: int | None = None
    seed: int | None = None  # None: the prompts' seed column; else seed_i = sha256(seed, id)
    shard_size: int = DEFAULT_SHARD_SIZE
    save_latents: bool = False  # the sampler's clean latent per item (encode-latents reuses it)
    save_noise: bool = False  # the initial noise x_1 per item (KD warm-up pairs)
    kd_pairs: bool = False  # the KD warm-up's pairs (METHOD.md 5.4): saves noise and latents, skip-layer guidance
    skip_layer: int | None = None  # block left out of the unconditional pass (skip-layer guidance); --kd-pairs: 10
    dtype: str = "auto"  # transformer / text encoder compute dtype (VAE always fp32)
    batch_size: int = field(default=4, metadata=NOT_IDENTITY)  # per-sample seeds: batching does not pick the noise
    name: str | None = field(default=None, metadata=NOT_IDENTITY)
    # speed options (runtime/speed.py): only the exact ones are accepted here (check_exact), hence not identity
    vae_dtype: str = field(default="auto", metadata=NOT_IDENTITY)
    decoder: str = field(default="auto", metadata=NOT_IDENTITY)
    compile: bool = field(default=False, metadata=NOT_IDENTITY)
    attention: str | None = field(default=None, metadata=NOT_IDENTITY)
    cuda_graphs: bool = field(default=False, metadata=NOT_IDENTITY)


# --------------------------------------------------------------------------------------------------------------
# Helpers shared with encode-latents


def resolve_input(store: Store, ref: str, kind: str, flag: str) -> Artifact:
    """Resolve an input reference to a complete artifact of `kind` that lives in this home (exit 2 otherwise)."""
    try:
        artifact = store.resolve(ref, kind=kind)
    except ArtifactError as exc:
        if store.plan_missing_inputs and ref in ("latest", f"{kind}:latest") and not store.list(kind):
            from tmdcli.artifacts.store import PlannedInput

            return PlannedInput(kind)  # a dry-run chain: the stage before makes it
        raise ArtifactError(f"{flag} {ref}: {exc.message}", hint=exc.hint) from exc
    home = store.home.resolve()
    if not artifact.path.resolve().is_relative_to(home):
        # Lineage and `tmd show` look inputs up in this home: an artifact from elsewhere would dangle.
        raise ArtifactError(f"{flag} {ref}: {artifact.id} lives in another home ({artifact.path.parent.parent})",
                            hint=f"run with --home {artifact.path.parent.parent}, or copy the folder into "
                                 f"{store.home / kind}/")
    return artifact


def teacher_entry(name: str):
    from tmdcli.registry import resolve_teacher

    return resolve_teacher(name)


def teacher_folder(entry) -> Path | None:
    """The teacher's component folder (None for teachers built in code); exit 2 when its weights are missing."""
    if entry.kind == "builtin":
        return None
    from tmdcli.registry import locate_folder

    return locate_folder(entry)


def external_model(entry, folder: Path | None) -> dict:
    """The teacher as a manifest's external model: name plus revision (hub snapshot) or folder."""
    if entry.kind == "builtin":
        return {"name": entry.name, "revision": "builtin"}
    if entry.kind == "hub-cache":
        return {"name": entry.repo_id, "revision": folder.name, "teacher": entry.name}
    if entry.name == "toy":  # the bundled folder's path differs per install; its content ships with the version
        return {"name": "toy", "revision": "bundled"}
    return {"name": entry.name, "folder": str(folder)}


def size_rules(folder: Path | None) -> dict:
    """Temporal/spatial VAE factors, patch size and latent channels, read from the configs without torch."""
    rules = {"temporal": 4, "spatial": 8, "patch": [1, 2, 2], "z_dim": 16}  # Wan2.1 (and tiny-random)
    if folder is not None:
        for part, keys in (("vae", {"scale_factor_temporal": "temporal", "scale_factor_spatial": "spatial",
                                    "z_dim": "z_dim"}), ("transformer", {"patch_size": "patch"})):
            path = folder / part / "config.json"
            if path.is_file():
                config = json.loads(path.read_text())
                rules.update({ours: config[theirs] for theirs, ours in keys.items() if theirs in config})
    return rules


def check_video_size(num_frames: int, height: int, width: int, rules: dict, what: str) -> list[int]:
    """Exit 2 unless the size fits the VAE and patching; returns the latent shape [C, T, H, W]."""
    st, ss, patch = rules["temporal"], rules["spatial"], rules["patch"]
    multiple = ss * max(patch[1], patch[2])
    if num_frames < 1 or height < 1 or width < 1:
        raise UsageError(f"{what}: frames, height and width must be positive, got {num_frames}x{height}x{width}")
    if (num_frames - 1) % st:
        near = st * ((num_frames - 1) // st) + 1
        raise UsageError(f"{what}: frames must be {st}k+1 (e.g. {near} or {near + st}), got {num_frames}")
    if height % multiple or width % multiple:
        raise UsageError(f"{what}: height and width must be multiples of {multiple} (VAE {ss} x patch "
                         f"{max(patch[1], patch[2])}), got {height}x{width}")
    return [rules["z_dim"], (num_frames - 1) // st + 1, height // ss, width // ss]


def staged_count(store: Store, kind: str, output_id: str, names: Sequence[str]) -> int:
    """How many of `names` a previous run left complete in the staging folder (for the plan's resume line)."""
    folder = store.home / kind / f"{STAGING_PREFIX}{output_id}"
    return sum((folder / name).is_file() for name in names)


def chunks(seq: Sequence, size: int) -> list:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def vae_digest(vae) -> str:
    """sha256 of the VAE's state (names, dtypes, shapes, bytes): which VAE made a latent, whatever the teacher name."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Prompts


def item_seed(base_seed: int, item_id: int) -> int:
    """A 63-bit seed from (base seed, item id): independent of order, batching and the worker split."""
    return int.from_bytes(hashlib.sha256(f"{int(base_seed)}:{int(item_id)}".encode()).digest()[:8], "little") >> 1


def read_prompt_items(artifact: Artifact, limit: int | None, base_seed: int | None) -> tuple[list[dict], str]:
    """[{"id", "prompt", "seed"}] sorted by id (first `limit`), and the rule the seeds came from."""
    from tmdcli.stages.make_prompts import read_prompts_table

    path = artifact.file(PROMPTS_FILE)
    if not path.is_file():
        raise ArtifactError(f"prompts artifact {artifact.id} has no {PROMPTS_FILE}",
                            hint=f"check it with `tmd verify {artifact.id}`, or remake it with `tmd make-prompts`")
    table = read_prompts_table(path, artifact.id)
    missing = {"id", "prompt"} - set(table.column_names)
    if missing:
        raise ArtifactError(f"{path} lacks column(s) {', '.join(sorted(missing))}",
                            hint="remake the prompts artifact with `tmd make-prompts`")
    ids = [int(v) for v in table.column("id").to_pylist()]
    prompts = table.column("prompt").to_pylist()
    stored = table.column("seed").to_pylist() if "seed" in table.column_names else [None] * len(ids)
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{path} holds duplicate ids", hint="remake the prompts artifact with `tmd make-prompts`")
    if any(not isinstance(p, str) for p in prompts):
        raise ArtifactError(f"{path} holds a missing (null) prompt", hint="remake it with `tmd make-prompts`")
    rows = sorted(zip(ids, prompts, stored))[: limit if limit is not None else None]
    use_column = base_seed is None and all(s is not None for _, _, s in rows)
    rule = "prompts.seed" if use_column else f"sha256({0 if base_seed is None else base_seed}:id)"
    base = 0 if base_seed is None else base_seed
    items = [{"id": i, "prompt": p, "seed": int(s) if use_column else item_seed(base, i)} for i, p, s in rows]
    return items, rule


# --------------------------------------------------------------------------------------------------------------
# Stage


def resolve_config(cfg: SynthVideosConfig, defaults, num_prompts: int) -> SynthVideosConfig:
    """Fill the teacher's defaults and normalise --limit, so equal work gets one fingerprint."""
    def pick(value, default):
        return default if value is None else value

    limit = cfg.limit
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if limit is not None and limit >= num_prompts:
        limit = None
    resolved = dataclasses.replace(
        cfg, limit=limit, num_steps=pick(cfg.num_steps, defaults.num_steps),
        guidance_scale=float(pick(cfg.guidance_scale, defaults.guidance_scale)),
        flow_shift=float(pick(cfg.flow_shift, defaults.flow_shift)), sampler=pick(cfg.sampler, defaults.sampler),
        num_frames=pick(cfg.num_frames, defaults.num_frames), height=pick(cfg.height, defaults.height),
        width=pick(cfg.width, defaults.width))
    if resolved.num_steps < 1:
        raise UsageError(f"--steps must be >= 1, got {resolved.num_steps}")
    if not resolved.guidance_scale > 0:
        raise UsageError(f"--cfg must be > 0, got {resolved.guidance_scale}")
    if not resolved.flow_shift > 0:
        raise UsageError(f"--shift must be > 0, got {resolved.flow_shift}")
    if resolved.sampler not in ("unipc", "euler"):
        raise UsageError(f"unknown sampler {resolved.sampler!r}", hint="use unipc or euler")
    if resolved.shard_size < 1 or cfg.batch_size < 1:
        raise UsageError("--shard-size and --batch-size must be >= 1")
    return resolved


def plan(cfg: SynthVideosConfig, store: Store) -> Plan:
    """Resolve prompts, teacher, size and sampler settings; count shards. Writes nothing, runs no model."""
    from tmdcli.registry import teacher_defaults

    from tmdcli.runtime.speed import check_exact, from_config

    check_exact(from_config(cfg), STAGE)
    entry = teacher_entry(cfg.teacher)
    folder = teacher_folder(entry)
    prompts = resolve_input(store, cfg.prompts, "prompts", "--prompts")
    if is_planned(prompts):
        total = cfg.limit or 0  # unknown until make-prompts has run
    else:
        from tmdcli.stages.make_prompts import count_prompts

        path = prompts.file(PROMPTS_FILE)
        if not path.is_file():
            raise ArtifactError(f"prompts artifact {prompts.id} has no {PROMPTS_FILE}",
                                hint=f"check it with `tmd verify {prompts.id}`")
        total = count_prompts(path, prompts.id)
        if total == 0:
            raise ArtifactError(f"prompts artifact {prompts.id} holds no prompt",
                                hint="remake it with `tmd make-prompts`")
    defaults = teacher_defaults(entry)
    r = resolve_config(cfg, defaults, total + 1 if is_planned(prompts) else total)
    from tmdcli.stages.kd_pairs import resolve_kd_options

    r, kd_notes = resolve_kd_options(r, folder)
    latent = check_video_size(r.num_frames, r.height, r.width, size_rules(folder), f"teacher {entry.name}")
    count = total if r.limit is None else r.limit
    shards = num_shards(count, r.shard_size)
    nfe = r.num_steps * (1 if r.guidance_scale == 1.0 else 2)
    p = Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=r,
                   inputs=[("prompts", prompts)], external_models=[external_model(entry, folder)], name=r.name)
    done = staged_count(store, OUTPUT_KIND, p.output_id, [videos_shard_name(k) for k in range(shards)])
    p.rows += [
        ("teacher", f"{entry.name} ({entry.kind})"),
        ("prompts", "not made yet (the make-prompts plan above)" + (f"; first {r.limit} by id" if r.limit else "")
         if is_planned(prompts) else f"{count} of {total}" + (f" (first {r.limit} by id)" if r.limit is not None
                                                               else "")),
        ("video", f"{r.num_frames}x{r.height}x{r.width} -> latent {'x'.join(map(str, latent))}"),
        ("sampler", f"{r.sampler} {r.num_steps} steps, cfg {r.guidance_scale:g}, shift {r.flow_shift:g}"
         + (f", skip-layer guidance (block {r.skip_layer} left out of the unconditional pass)"
            if r.skip_layer is not None else "")),
        *kd_notes,
        ("shards", f"{shards} of up to {r.shard_size} clips" + (f", {done} done (resume)" if done else "")),
        ("compute", f"{nfe} transformer NFE x {count} clips = {nfe * count} forward passes, {count} VAE decodes"
         if count else f"{nfe} transformer NFE and one VAE decode per clip (count known once the prompts exist)"),
        ("saves", ", ".join(["mp4"] + ["latents"] * r.save_latents + ["noise"] * r.save_noise)),
        ffmpeg_plan_row(required=not (store.plan_missing_inputs or p.complete)),  # before any sampling
    ]
    p.facts.update(num_items=count, num_shards=shards, latent_shape=latent, nfe_per_clip=nfe)
    return p


def run(cfg: SynthVideosConfig, plan: Plan, staging: Staging, rt: Runtime) -> Artifact | None:
    """Make this worker's missing shards, then commit if every shard is present."""
    from tmdcli.runtime.dist import my_shards

    cfg = SynthVideosConfig(**plan.config)
    prompts = plan.inputs[0][1]
    items, seed_rule = read_prompt_items(prompts, cfg.limit, cfg.seed)
    names = [videos_shard_name(k) for k in range(num_shards(len(items), cfg.shard_size))]
    mine = my_shards(len(names), rt.worker, rt.num_workers)

    def summarise() -> tuple[dict, dict]:
        indexes = [read_videos_index(staging.path / name) for name in names]
        num_items = sum(len(ix["items"]) for ix in indexes)
        num_failed = sum(len(ix.get("failed", [])) for ix in indexes)
        digests = {ix["vae_digest"] for ix in indexes}
        first = indexes[0]
        facts = {
            "teacher": cfg.teacher, "teacher_family": teacher_entry(cfg.teacher).family,
            "num_frames": cfg.num_frames, "height": cfg.height, "width": cfg.width, "fps": first["fps"],
            "latent_shape": first["latent_shape"], "num_items": num_items, "num_failed": num_failed,
            "failed": [f for ix in indexes for f in ix.get("failed", [])][:100],
            "sampler": {"name": cfg.sampler, "num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale,
                        "flow_shift": cfg.flow_shift, "negative_prompt": first["negative_prompt"]},
            "nfe_per_clip": plan.facts["nfe_per_clip"], "dtype": first["dtype"],
            "vae_digest": digests.pop() if len(digests) == 1 else None,  # None: mixed VAEs, never reuse latents
            "has_latents": cfg.save_latents, "has_noise": cfg.save_noise, "num_shards": len(names),
            "kd_pairs": cfg.kd_pairs, "skip_layer": cfg.skip_layer,
            "shard_size": cfg.shard_size, "seed_rule": seed_rule, "prompts": prompts.id,
        }
        return {"num_items": num_items, "num_failed": num_failed, "num_shards": len(names)}, facts

    def make(todo: list[int]) -> None:
        _make_shards(cfg, items, todo, names, mine, staging, rt)

    return finish_when_complete(staging, names, rt, summarise, make=make, mine=mine)


def _make_shards(cfg: SynthVideosConfig, items: list[dict], todo: list[int], names: list[str], mine: list[int],
                 staging: Staging, rt: Runtime) -> None:
    import tempfile

    import torch

    from tmdcli.artifacts.media import frames_to_uint8, write_mp4
    from tmdcli.data.shards import write_videos_shard
    from tmdcli.registry import load_teacher
    from tmdcli.runtime.dist import device_for
    from tmdcli.runtime.log import Progress
    from tmdcli.sampler import generators_for, randn_per_sample, sample_teacher

    def shard_items(k: int) -> list[dict]:
        return items[k * cfg.shard_size:(k + 1) * cfg.shard_size]

    from tmdcli.runtime import speed

    opts = speed.from_config(cfg)
    speed.check_runtime(opts, device_for(rt.device, rt.dist))  # before any weights are loaded
    teacher = load_teacher(cfg.teacher, device=device_for(rt.device, rt.dist), dtype=cfg.dtype)
    speed.apply_to_transformer(teacher.transformer, opts)
    decode = speed.make_decoder(teacher.vae, opts, teacher.device)
    try:
        shape = teacher.latent_shape(cfg.num_frames, cfg.height, cfg.width)
    except ValueError as exc:
        raise UsageError(f"video size {cfg.num_frames}x{cfg.height}x{cfg.width} does not fit {cfg.teacher}: {exc}") \
            from exc
    shared = {"teacher": cfg.teacher, "vae_digest": vae_digest(teacher.vae), "dtype": str(teacher.dtype)[6:],
              "fps": teacher.defaults.fps, "latent_shape": list(shape),
              "video": [cfg.num_frames, cfg.height, cfg.width], "negative_prompt": teacher.defaults.negative_prompt}
    negative = teacher.negative_embedding(1)
    total = sum(len(shard_items(k)) for k in mine)
    progress = Progress(total, f"synth-videos worker {rt.worker}/{rt.num_workers}", unit="clips", per_hour=True,
                        done=total - sum(len(shard_items(k)) for k in todo))

    def make_shard(k: int, scratch: str) -> None:
        index_items, failed, mp4s, tensors = [], [], {}, {}
        for batch in chunks(shard_items(k), cfg.batch_size):
            text = teacher.encode_prompts([it["prompt"] for it in batch])
            neg = negative.expand(len(batch), -1, -1)
            noise = randn_per_sample(shape, generators_for([it["seed"] for it in batch]), device=teacher.device)
            latents = sample_teacher(
                lambda x, t: teacher.velocity(x, t, text, text_neg=neg, guidance_scale=cfg.guidance_scale,
                                              skip_block=cfg.skip_layer),
                noise, num_steps=cfg.num_steps, flow_shift=cfg.flow_shift, sampler=cfg.sampler)
            for j, item in enumerate(batch):
                if not torch.isfinite(latents[j]).all():
                    failed.append({"id": item["id"], "reason": "non-finite latent"})
                    continue
                video = decode(latents[j:j + 1])[0]  # one clip at a time: bounded memory
                mp4 = Path(scratch) / f"{item['id']}.mp4"
                write_mp4(frames_to_uint8(video, layout="CFHW"), mp4, fps=teacher.defaults.fps)
                mp4s[item["id"]] = mp4.read_bytes()
                mp4.unlink()
                index_items.append({"id": item["id"], "prompt": item["prompt"], "seed": item["seed"],
                                    "file": f"{item['id']}.mp4"})
                if cfg.save_latents:
                    tensors[f"latent.{item['id']}"] = latents[j].float().cpu().clone()
                if cfg.save_noise:
                    tensors[f"noise.{item['id']}"] = noise[j].float().cpu().clone()
            progress.update(len(batch))
        with staging.atomic_path(names[k]) as tmp:
            write_videos_shard(tmp, index={"shard": k, **shared, "items": index_items, "failed": failed},
                               mp4s=mp4s, tensors=tensors or None)

    try:
        with tempfile.TemporaryDirectory(prefix="tmd-synth-") as scratch:
            for k in todo:
                with making(staging, names[k]) as ours:  # one process per shard, even for a twice-started command
                    if ours:
                        make_shard(k, scratch)
                    else:
                        progress.update(len(shard_items(k)))  # done meanwhile, or another process makes it
    finally:
        progress.close()
