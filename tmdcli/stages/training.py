"""What the two training stages (`pretrain-head`, `distill`) share: the common options, input checks done at plan
time (latents and teacher must fit together), the torch-free transformer config, the run setup (accelerator,
device, loader), validation samples, and the export of the trained student into the artifact.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tmdcli.api import STUDENT_EXPORT_DIR
from tmdcli.artifacts.store import Artifact, Staging, Store, is_planned
from tmdcli.errors import ArtifactError, UsageError
from tmdcli.stages.common import NOT_IDENTITY, Runtime
from tmdcli.stages.synth_videos import resolve_input, teacher_entry, teacher_folder

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """Options every training stage has (METHOD.md 6; the run-control ones are not part of the identity)."""

    teacher: str = ""  # default: the teacher that made the latents
    latents: str = field(default="latest", metadata=NOT_IDENTITY)
    iters: int = 3000
    lr: float | None = None  # default per teacher (METHOD.md 6)
    batch: int = 64  # global
    micro_batch: int = 1  # per GPU
    grad_clip: float = 10.0
    seed: int = 0
    save_every: int = field(default=500, metadata=NOT_IDENTITY)
    log_every: int = field(default=10, metadata=NOT_IDENTITY)
    sample_every: int = field(default=500, metadata=NOT_IDENTITY)
    num_sample_prompts: int = field(default=2, metadata=NOT_IDENTITY)
    stop_after: int | None = field(default=None, metadata=NOT_IDENTITY)
    checkpointing: bool = field(default=False, metadata=NOT_IDENTITY)
    log_to: str = field(default="none", metadata=NOT_IDENTITY)
    name: str | None = field(default=None, metadata=NOT_IDENTITY)


def check_run_options(cfg: TrainingOptions) -> None:
    from tmdcli.runtime.log import check_log_backend

    for flag, value, low in (("--iters", cfg.iters, 1), ("--batch", cfg.batch, 1), ("--micro-batch", cfg.micro_batch, 1),
                             ("--save-every", cfg.save_every, 1), ("--log-every", cfg.log_every, 1),
                             ("--sample-every", cfg.sample_every, 0), ("--num-sample-prompts", cfg.num_sample_prompts, 0)):
        if value is not None and value < low:  # None: a stage default resolved later
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UsageError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise UsageError(f"--stop-after must be >= 1, got {cfg.stop_after}")
    check_log_backend(cfg.log_to)


def transformer_config(entry, folder: Path | None) -> dict:
    """The teacher transformer's config.json as a dict, without torch."""
    if folder is None:
        from tmdcli.models.defaults import TINY_TRANSFORMER_CONFIG

        return dict(TINY_TRANSFORMER_CONFIG)
    return json.loads((folder / "transformer" / "config.json").read_text())


@dataclass
class TrainingInputs:
    latents: Artifact
    entry: object  # registry.TeacherEntry
    folder: Path | None
    config: dict  # transformer config
    latent_shape: list[int]
    num_items: int  # 0 when the latents are only planned (dry-run chain)
    text_tokens: int = 512

    def data_row(self) -> tuple[str, str]:
        shape = "x".join(map(str, self.latent_shape))
        if is_planned(self.latents):
            return "data", f"latents not made yet (the encode-latents plan above); {shape} at the teacher's size"
        return "data", f"{self.num_items} latents {shape} from {self.latents.id}"

    @property
    def num_blocks(self) -> int:
        return int(self.config["num_layers"])

    @property
    def family(self):
        """Table-7 defaults recognised from the transformer config, never from the teacher's name."""
        from tmdcli.models.family import family_defaults

        return family_defaults(self.config)

    def family_rows(self) -> list[tuple[str, str]]:
        """The plan's "defaults" row, plus a note when the shape is not one of the paper's."""
        family = self.family
        return [("defaults", family.describe())] + ([("note", family.note)] if family.note else [])


def resolve_training_inputs(store: Store, latents_ref: str, teacher: str) -> TrainingInputs:
    """The latents artifact and the teacher, checked against each other (exit 2 with what does not fit)."""
    latents = resolve_input(store, latents_ref, "latents", "--latents")
    if is_planned(latents):  # a dry-run chain: the latents come from encode-latents above
        if not teacher:
            raise UsageError("no latents artifact yet, so the teacher cannot be taken from it",
                             hint="pass --teacher (recipes always do)")
        entry = teacher_entry(teacher)
        folder = teacher_folder(entry)
        config = transformer_config(entry, folder)
        from tmdcli.registry import teacher_defaults
        from tmdcli.stages.synth_videos import check_video_size, size_rules

        d = teacher_defaults(entry)
        shape = check_video_size(d.num_frames, d.height, d.width, size_rules(folder), f"teacher {entry.name}")
        return TrainingInputs(latents=latents, entry=entry, folder=folder, config=config, latent_shape=list(shape),
                              num_items=0, text_tokens=d.max_sequence_length)
    facts = latents.manifest.facts or {}
    if "latent_shape" not in facts or not facts.get("num_items"):
        raise ArtifactError(f"latents artifact {latents.id} holds no items (or does not say its latent shape)",
                            hint="make one with `tmd encode-latents`")
    entry = teacher_entry(teacher or facts.get("teacher", ""))
    folder = teacher_folder(entry)
    config = transformer_config(entry, folder)
    family = facts.get("teacher_family")
    if family and family != entry.family:
        raise UsageError(f"latents {latents.id} come from the {family} family ({facts.get('teacher')}); teacher "
                         f"{entry.name} is {entry.family}", hint="encode latents with this teacher's VAE first")
    shape = list(facts["latent_shape"])
    if shape[0] != config.get("in_channels", 16):
        raise UsageError(f"latents {latents.id} have {shape[0]} channels; {entry.name} reads "
                         f"{config.get('in_channels')}", hint=f"encode latents with `tmd encode-latents --teacher "
                                                              f"{entry.name}`")
    if "text_dim" in facts and facts["text_dim"] != config.get("text_dim", 4096):
        raise UsageError(f"latents {latents.id} carry {facts['text_dim']}-wide text embeddings; {entry.name} reads "
                         f"{config.get('text_dim')}", hint="encode latents with this teacher's text encoder")
    if facts.get("teacher") and teacher and facts["teacher"] != entry.name and family is None:
        print(f"note: latents {latents.id} were made with {facts['teacher']}, training with {entry.name}",
              file=sys.stderr)
    return TrainingInputs(latents=latents, entry=entry, folder=folder, config=config, latent_shape=shape,
                          num_items=int(facts["num_items"]), text_tokens=int(facts.get("max_sequence_length", 512)))


def check_enough_items(inputs: TrainingInputs, micro_batch: int, world_size: int) -> None:
    """Each rank needs at least one micro-batch of latents per epoch."""
    if inputs.num_items and inputs.num_items // world_size < micro_batch:
        raise UsageError(f"latents {inputs.latents.id} hold {inputs.num_items} items: fewer than --micro-batch "
                         f"{micro_batch} per GPU x {world_size} GPU(s)", hint="lower --micro-batch or encode more videos")


def check_head_blocks(num_head_blocks: int, num_blocks: int, teacher: str, notes: list | None = None) -> int:
    """H must leave at least one backbone block. Under TMD_TEACHER_OVERRIDE (tests and recipe dry runs that swap
    every teacher for a small one) H is clamped to L - 1 with a note, so a 1.3B recipe can be planned on
    tiny-random; everywhere else a bad H is an error."""
    import os

    if 1 <= num_head_blocks < num_blocks:
        return num_head_blocks
    if os.environ.get("TMD_TEACHER_OVERRIDE") and num_head_blocks >= num_blocks > 1:
        if notes is not None:
            notes.append(("note", f"--h {num_head_blocks} clamped to {num_blocks - 1} for the override teacher "
                                  f"{teacher} (L = {num_blocks})"))
        return num_blocks - 1
    raise UsageError(f"--h {num_head_blocks}: the flow head needs 1 <= H < L = {num_blocks} blocks of {teacher}",
                     hint=f"the paper uses H = 5 of 30 (1.3B) and 5 of 40 (14B); try --h {min(5, num_blocks - 1)}")


def default_lr(family, stage: str) -> float:
    """TMD Table 7 for the teacher's family (`models.family.FamilyDefaults`, recognised from the transformer
    config): Stage 1 3e-5 (1.3B) / 1e-5 (14B); Stage 2 1e-5 for both (other shapes: the 1.3B values)."""
    return family.stage2_lr if stage == "distill" else family.stage1_lr


# --- run time ------------------------------------------------------------------------------------------------

@dataclass
class RunSetup:
    accelerator: object
    device: object  # torch.device
    rank: int
    world_size: int
    is_main: bool
    sharded: bool = False  # FSDP2 asked for by the launch (runtime/fsdp.py shards the networks itself)


def run_setup(rt: Runtime) -> RunSetup:
    import torch

    from tmdcli.runtime.dist import make_accelerator

    accelerator = make_accelerator(rt.device)
    if rt.device == "auto":
        device = accelerator.device
    else:
        device = torch.device(rt.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {rt.device} but CUDA is not available", hint="use --device cpu")
    from tmdcli.runtime.fsdp import fsdp2_requested

    return RunSetup(accelerator=accelerator, device=device, rank=accelerator.process_index,
                    world_size=accelerator.num_processes, is_main=accelerator.is_main_process,
                    sharded=fsdp2_requested() and accelerator.num_processes > 1)


def wrap_trained(setup: RunSetup, module, lr: float):
    """A trained loss module and its AdamW, ready for the loop: sharded per unit under FSDP2 (runtime/fsdp.py; the
    optimizer is made after fully_shard, which replaces the parameters), else prepared by accelerate (DDP or one
    process). Set `requires_grad` before: it is final here."""
    from tmdcli.runtime.train_loop import make_adamw

    if setup.sharded:
        from tmdcli.runtime.fsdp import shard

        shard(module, setup.device)
        return module, make_adamw(module.parameters(), lr)
    return setup.accelerator.prepare(module, make_adamw(module.parameters(), lr))


def wrap_frozen(setup: RunSetup, module):
    """A frozen network (Stage 2's teacher): sharded per unit under FSDP2 so each GPU holds 1/world of it, else
    as is (replicated). Its forward is unchanged: each unit all-gathers its full weights before it runs."""
    if setup.sharded:
        from tmdcli.runtime.fsdp import shard

        shard(module, setup.device)
    return module


def make_validator(student, vae, loader, staging: Staging, *, num_prompts: int, fps: int, latent_shape,
                   is_main: bool, console=None):
    """A callback that samples the first `num_prompts` items of the latents artifact (their stored text
    embeddings, seeds 0..k-1) with Algorithm 1 and writes `samples/iter-XXXXXXX/<k>.mp4` (rank 0)."""
    import torch

    from tmdcli.artifacts.media import write_mp4_from_tensor
    from tmdcli.models import wan
    from tmdcli.sampler import generators_for, randn_per_sample, sample_tmd

    if num_prompts <= 0:
        return None
    fixed = loader.first_items(num_prompts)
    seeds = list(range(len(fixed["prompts"])))

    def validate(iteration: int) -> None:
        device = fixed["text"].device
        was_training = student.training
        student.eval()
        with torch.no_grad():
            noise = randn_per_sample(latent_shape, generators_for(seeds), device=device)
            latents = sample_tmd(student, noise, fixed["text"], outer_grid=student.config.outer_grid(),
                                 inner_grid=student.config.inner_grid(),
                                 generators=generators_for([1000 + s for s in seeds]))
            videos = wan.vae_decode(vae, latents.to(device)).float().cpu() if vae is not None else None
        student.train(was_training)
        if not is_main or videos is None:
            return
        folder = f"{SAMPLES_DIR}/iter-{iteration:07d}"
        for k, prompt in enumerate(fixed["prompts"]):
            with staging.atomic_path(f"{folder}/{k}.mp4") as tmp:
                write_mp4_from_tensor(videos[k], tmp, fps=fps)
        staging.write_bytes(f"{folder}/prompts.json", json.dumps(
            [{"prompt": p, "seed": s} for p, s in zip(fixed["prompts"], seeds)], indent=1).encode())
        if console is not None:
            console.print(f"validation samples at iteration {iteration}: {folder}/ in the artifact")

    return validate


def finish_student(staging: Staging, student, objective, result, rt: Runtime, *, total_iters: int, is_main: bool,
                   facts: dict, metadata: dict) -> Artifact | None:
    """After the training loop: report a --stop-after stop, or export the trained student (full state gathered on
    every rank, written by rank 0) into `export/`, keep the newest checkpoint and commit."""
    from tmdcli.runtime.checkpoint import list_checkpoints, model_state, prune_checkpoints

    if not result.finished:
        rt.console.print(f"stopped after iteration {result.iteration} of {total_iters} (checkpointed); rerun the same "
                         f"command without --stop-after to continue")
        return None
    state = {k.removeprefix("student."): v for k, v in model_state(objective).items()}  # collective under FSDP
    from tmdcli.models.lora import has_lora, merge_lora_state

    if has_lora(state):  # LoRA mode: a plain student, W + B A (alpha = r), that loads without PEFT
        state = merge_lora_state(state)
    if not is_main:
        return None
    export = staging.path / STUDENT_EXPORT_DIR
    if export.exists():
        import shutil

        shutil.rmtree(export)  # an export cut short by a kill; the checkpoint is what counts
    student.save(export, state=state, metadata={**metadata, "iterations": result.iteration})
    prune_checkpoints(staging.path / CHECKPOINT_DIR, keep=1)  # the training state for a later resume
    found = list_checkpoints(staging.path / CHECKPOINT_DIR)
    facts = {**facts, "final_terms": result.last_terms,
             "training_state": str(found[-1][1].relative_to(staging.path)) if found else None}
    return staging.commit(facts=facts, stats={"iterations": result.iteration, "seconds": round(result.seconds, 3)})
