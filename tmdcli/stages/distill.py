"""`tmd distill`: Stage 2 of TMD, DMD2-v with flow-head rollout (TMD Sec. 3.2, App. A.3; METHOD.md section 5),
and the DMD2-v baselines (`--method dmd2v`, with an optional KD warm-up for one step, METHOD.md 5.4).

Networks: the student (trained; a pretrain-head student for `tmd`, a copy of the teacher for `dmd2v`), the frozen
teacher (CFG 5 in x0 space; its block features feed the discriminator), the fake score (a trained copy of the
teacher) and the discriminator heads. Alternation (D11): iteration k trains the student when k % 5 == 0 and the
fake score + discriminator otherwise; iteration counts include critic iterations.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

from tmdcli.artifacts.store import Artifact, Staging, Store, is_planned
from tmdcli.errors import ArtifactError, UsageError
from tmdcli.objectives.u_param import U_FORMS, U_PARAMS, stored_u_param
from tmdcli.stages.common import NOT_IDENTITY, Plan, Runtime
from tmdcli.stages.synth_videos import external_model
from tmdcli.stages.training import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    SAMPLES_DIR,
    TrainingOptions,
    check_enough_items,
    check_head_blocks,
    check_run_options,
    default_lr,
    finish_student,
    make_validator,
    resolve_training_inputs,
    run_setup,
    wrap_frozen,
    wrap_trained,
)

STAGE, STAGE_VERSION, OUTPUT_KIND = "distill", 1, "student"
DATA_PARALLEL = False  # ranks train one model together; rank 0 commits
METHODS = ("tmd", "dmd2v")
KD_CHECKPOINT_DIR = "checkpoints-kd"
DEFAULT_OUTER_GAMMA = 10.0  # TMD Table 7 (t_student shift)
DIVERSITY_ALARM = 0.5  # warn when the student's seed diversity falls below this fraction of the teacher's


@dataclass(frozen=True, kw_only=True)
class DistillConfig(TrainingOptions):
    method: str = "tmd"
    num_outer_steps: int = 2  # M
    num_inner_steps: int = 2  # N (1 for dmd2v)
    num_head_blocks: int = 5  # H (unused by dmd2v)
    outer_gamma: float | None = None  # TMD: the Stage-1 student's; dmd2v: DEFAULT_OUTER_GAMMA
    u_param: str | None = None  # TMD: the Stage-1 student's (D19); dmd2v: none
    init: str | None = field(default=None, metadata=NOT_IDENTITY)  # the init's fingerprint is what counts
    iters: int | None = None  # default: TMD Table 7 by model size and M
    guidance_scale: float = 5.0
    gan_weight: float = 0.03
    t_gamma: float = 5.0
    student_every: int = 5
    rollout: bool = True
    disc_layers: tuple[int, ...] | None = None
    kd_warmup: int = 0  # KD iterations before DMD (one-step DMD2-v only)
    kd_lr: float = 7e-5
    kd_pairs: str | None = field(default=None, metadata=NOT_IDENTITY)  # the pairs' fingerprints are what counts
    diversity_seeds: int = field(default=4, metadata=NOT_IDENTITY)
    lora_rank: int = 0  # 0: full fine-tuning; R: LoRA adapters of rank R on the student and fake score blocks
    lora_targets: tuple[str, ...] | None = None  # block linears adapted (default models/lora.DEFAULT_TARGETS)


def stage1_student_config(init: Artifact) -> dict:
    """The StudentConfig fields a Stage-1 student was trained with, from its export's student.json (no torch)."""
    from tmdcli.api import STUDENT_EXPORT_DIR

    path = init.path / STUDENT_EXPORT_DIR / "student.json"
    try:
        config = json.loads(path.read_text())["config"]
        return {**config, "outer_gamma": float(config["outer_gamma"]), "u_param": stored_u_param(config)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"student {init.id} has no readable {path.name} ({exc})",
                            hint=f"check it with `tmd verify {init.id}`") from exc


def resolve_u_param(given: str | None, method: str, init) -> str | None:
    """The average-velocity parametrisation (D19). A TMD student keeps its Stage-1 student's: its head was
    pretrained to be read in that form, so a different --u-param is refused (exit 2). DMD2-v has no flow head."""
    if given is not None and given not in U_PARAMS:
        raise UsageError(f"--u-param must be one of {', '.join(U_PARAMS)}, got {given!r}")
    if method == "dmd2v":
        if given is not None:
            raise UsageError("--u-param is for TMD students (DMD2-v has no flow head)", hint="drop --u-param")
        return None
    if init is None or is_planned(init):  # a dry-run chain: the pretrain-head plan above sets it
        return given
    stored = stage1_student_config(init)["u_param"]
    if given is not None and given != stored:
        raise UsageError(f"--u-param {given} contradicts the Stage-1 student {init.id}, whose head was trained with "
                         f"{U_FORMS[stored]}",
                         hint=f"drop --u-param (the student's {stored} is used), or pretrain a student with "
                              f"`tmd pretrain-head --u-param {given}`")
    return stored


def resolve_outer_gamma(given: float | None, init) -> float:
    """The outer grid's shift gamma_t (METHOD.md 3). A TMD student keeps the grid of its Stage-1 student: its
    backbone and head were pretrained on those t_i (TMD Alg. 2; D7), and Stage 2 trains the loaded student, so a
    different --outer-gamma would be shown in the plan but not used. Refused instead (exit 2). The DMD2-v baseline
    (no init) takes --outer-gamma, default DEFAULT_OUTER_GAMMA."""
    if init is None or is_planned(init):  # dmd2v, or a dry-run chain whose Stage-1 plan above sets the grid
        return DEFAULT_OUTER_GAMMA if given is None else float(given)
    stored = stage1_student_config(init)["outer_gamma"]
    if given is not None and float(given) != stored:
        raise UsageError(f"--outer-gamma {given:g} contradicts the Stage-1 student {init.id}, trained on the outer "
                         f"grid of gamma {stored:g}",
                         hint=f"drop --outer-gamma (the student's {stored:g} is used), or pretrain a student with "
                              f"`tmd pretrain-head --outer-gamma {given:g}`")
    return stored


def default_iters(num_blocks: int, num_outer_steps: int) -> int:
    """TMD Table 7: 1.3B 4k (M >= 2) / 12k (M = 1); 14B (40 blocks) 1k / 5k."""
    if num_blocks >= 40:
        return 5000 if num_outer_steps == 1 else 1000
    return 12000 if num_outer_steps == 1 else 4000


def find_init(store: Store, ref: str | None, teacher: str, m: int, n: int, h: int) -> Artifact:
    """`--init REF`, or the newest pretrain-head student of this teacher with the same M, N, H."""
    if ref is not None:
        artifact = store.resolve(ref, kind="student")
        facts = artifact.manifest.facts or {}
        got = (facts.get("teacher"), facts.get("num_outer_steps"), facts.get("num_inner_steps"),
               facts.get("num_head_blocks"))
        if got != (teacher, m, n, h):
            raise UsageError(f"--init {artifact.id} is a student of {got[0]} with M{got[1]} N{got[2]} H{got[3]}, not "
                             f"{teacher} M{m} N{n} H{h}", hint="pick a matching student or change --m/--n/--h")
        return artifact
    for artifact in sorted(store.list("student"), key=lambda a: a.created_at, reverse=True):
        f = artifact.manifest.facts or {}
        if (artifact.manifest.stage == "pretrain-head" and f.get("teacher") == teacher
                and (f.get("num_outer_steps"), f.get("num_inner_steps"), f.get("num_head_blocks")) == (m, n, h)):
            return artifact
    if store.plan_missing_inputs:  # a dry-run chain: the pretrain-head plan above makes it
        from tmdcli.artifacts.store import PlannedInput

        return PlannedInput("student")
    raise ArtifactError(f"no pretrain-head student of {teacher} with M{m} N{n} H{h} in {store.home}",
                        hint=f"make one with `tmd pretrain-head --teacher {teacher} --m {m} --n {n} --h {h}`, "
                             f"pass --init REF, or train the baseline with --method dmd2v")


def _check(cfg: DistillConfig) -> None:
    check_run_options(cfg)
    if cfg.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.num_outer_steps < 1 or cfg.num_inner_steps < 1:
        raise UsageError(f"--m and --n must be >= 1, got {cfg.num_outer_steps} and {cfg.num_inner_steps}")
    if cfg.student_every < 2:
        raise UsageError(f"--student-every must be >= 2 (critic iterations in between), got {cfg.student_every}")
    if cfg.guidance_scale < 1 or cfg.gan_weight < 0 or cfg.t_gamma < 1:
        raise UsageError("need --guidance-scale >= 1, --gan-weight >= 0 and --t-gamma >= 1")
    if cfg.kd_warmup < 0:
        raise UsageError(f"--kd-warmup must be >= 0, got {cfg.kd_warmup}")
    if cfg.kd_pairs is not None and not cfg.kd_warmup:
        raise UsageError("--kd-pairs is read by the KD warm-up only", hint="add --kd-warmup K, or drop --kd-pairs")
    if cfg.lora_rank < 0:
        raise UsageError(f"--lora-rank must be >= 0 (0: no LoRA), got {cfg.lora_rank}")
    if cfg.lora_targets and not cfg.lora_rank:
        raise UsageError("--lora-targets needs --lora-rank R", hint="add --lora-rank 256 (public 14B practice)")
    if cfg.lora_rank:
        from tmdcli.models.lora import check_available

        check_available()  # exit 2 naming `pip install 'tmdcli[lora]'` before anything is planned
    if cfg.kd_warmup and (cfg.method != "dmd2v" or cfg.num_outer_steps != 1):
        raise UsageError("--kd-warmup is for the one-step DMD2-v baseline only (--method dmd2v --m 1)",
                         hint="TMD needs no KD warm-up (Stage 1 replaces it); multi-step DMD2-v is hurt by it "
                              "(TMD Table 4)")


def plan(cfg: DistillConfig, store: Store) -> Plan:
    from tmdcli.models.discriminator_config import count_parameters, discriminator_config_for
    from tmdcli.objectives.grids import outer_grid
    from tmdcli.runtime.dist import fsdp_enabled, planned_world_size
    from tmdcli.runtime.estimates import WanShape, dmd_estimate

    _check(cfg)
    inputs = resolve_training_inputs(store, cfg.latents, cfg.teacher)
    entry, L = inputs.entry, inputs.num_blocks
    m = cfg.num_outer_steps
    n, h = (1, 1) if cfg.method == "dmd2v" else (cfg.num_inner_steps, cfg.num_head_blocks)
    notes: list = []
    h = check_head_blocks(h, L, entry.name, notes)
    layers = tuple(cfg.disc_layers or inputs.family.disc_layers)  # from the transformer config, not the name
    if any(not 0 <= k < L for k in layers):
        raise UsageError(f"--disc-layers {layers}: {entry.name} has blocks 0..{L - 1}")
    init = find_init(store, cfg.init, entry.name, m, n, h) if cfg.method == "tmd" else None
    r = replace(cfg, teacher=entry.name, num_inner_steps=n, num_head_blocks=h, disc_layers=layers,
                iters=cfg.iters if cfg.iters is not None else default_iters(L, m),
                lr=cfg.lr if cfg.lr is not None else default_lr(inputs.family, STAGE),
                outer_gamma=resolve_outer_gamma(cfg.outer_gamma, init),
                u_param=resolve_u_param(cfg.u_param, cfg.method, init),
                lora_targets=lora_targets_for(cfg))
    if r.iters < 1:
        raise UsageError(f"--iters must be >= 1, got {r.iters}")
    world = planned_world_size()
    check_enough_items(inputs, r.micro_batch, world)
    shape = WanShape.from_config(inputs.config)
    disc_cfg = discriminator_config_for(inputs.config, layers)
    estimate = dmd_estimate(shape, inputs.latent_shape, num_head_blocks=h, num_inner_steps=n, method=r.method,
                            discriminator_params=count_parameters(disc_cfg), last_disc_layer=max(layers),
                            batch=r.batch, micro_batch=r.micro_batch, world_size=world, checkpointing=r.checkpointing,
                            sharded=fsdp_enabled(), student_every=r.student_every,
                            text_tokens=inputs.text_tokens, lora_rank=r.lora_rank, lora_targets=r.lora_targets)
    artifacts = [("latents", inputs.latents)] + ([("init", init)] if init is not None else [])
    if r.kd_warmup:  # METHOD.md 5.4: the teacher's CFG + skip-layer-guidance pairs, not the training latents
        artifacts += kd_inputs(store, r.kd_pairs, entry.name, inputs.latent_shape)
    p = Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=r, inputs=artifacts,
                   external_models=[external_model(entry, inputs.folder)], name=r.name)
    from tmdcli.objectives.grids import effective_nfe

    nfe = float(m) if r.method == "dmd2v" else effective_nfe(m, n, h, L)
    accum = r.batch // max(1, r.micro_batch * world)
    p.rows += [
        ("teacher", f"{entry.name}: L = {L} blocks, D = {shape.dim}; CFG {r.guidance_scale} in x0 space"),
        ("student", (f"TMD M{m} N{n} H{h} from {init.id}" if init is not None else f"DMD2-v M{m} from the teacher")
         + f", effective NFE {nfe:.3g}; outer grid {[round(v, 3) for v in outer_grid(m, r.outer_gamma)]}"
         + ("" if r.method == "dmd2v" else f"; rollout {'through all N steps' if r.rollout else 'off (detached)'}"
            + f"; {U_FORMS[r.u_param] if r.u_param else 'u as in the Stage-1 student'}")),
        ("critics", f"fake score (teacher copy) + discriminator on blocks {layers} "
                    f"({count_parameters(disc_cfg) / 1e6:.1f}M), GAN weight {r.gan_weight}, t_dmd shift {r.t_gamma}"),
        ("schedule", f"{r.iters} iterations (student every {r.student_every}th) x batch {r.batch} ({r.micro_batch}/GPU x"
                     f" {world} GPU(s) x {accum} accumulation), AdamW lr {r.lr:g}"
                     + (f"; KD warm-up {r.kd_warmup} iterations at lr {r.kd_lr:g} on the pairs of "
                        f"{dict(artifacts)['kd_pairs'].id}" if r.kd_warmup else "")),
        *inputs.family_rows(),
        inputs.data_row(),
        *([("lora", f"rank {r.lora_rank} adapters on {', '.join(r.lora_targets)} of every block (student and fake "
                    f"score; their other weights frozen; fusion, r-embedder, discriminator fully trained); the "
                    f"export merges them")] if r.lora_rank else []),
        *estimate.rows(r.checkpointing),
        *notes,
    ]
    p.facts.update(num_blocks=L, latent_shape=inputs.latent_shape, effective_nfe=nfe, estimate=estimate.__dict__)
    return p


def lora_targets_for(cfg: DistillConfig) -> tuple[str, ...] | None:
    """The block linears LoRA adapts (None without --lora-rank); exit 2 for a name that matches none."""
    if not cfg.lora_rank:
        return None
    from tmdcli.models.lora import parse_targets

    return parse_targets(",".join(cfg.lora_targets) if cfg.lora_targets else None)


def frozen_dtype_for(device) -> str:
    """The frozen teacher's dtype: bf16 on a GPU (frozen, so no fp32 master copy is needed), fp32 on a CPU."""
    return "bfloat16" if device.type == "cuda" else "float32"


def load_networks(teacher_name: str, method: str, device, frozen_dtype: str):
    """The teacher (VAE + frozen transformer in `frozen_dtype`) and the fp32 networks trained from its weights:
    the fake score and, for DMD2-v, the student's transformer (METHOD.md 5.1: both initialised from the teacher).

    The teacher is loaded in fp32 and copied before the frozen one is cast: copying a bf16-loaded teacher and
    calling `.float()` would start the trained networks from bf16-rounded weights. While loading, the device holds
    the teacher in fp32 once (one fp32 copy more than the frozen bf16 one needs).

    Returns (teacher, frozen transformer, fake score, DMD2-v student transformer or None)."""
    import copy

    import torch

    from tmdcli.registry import load_teacher, resolve_dtype

    teacher = load_teacher(teacher_name, device=str(device), dtype="float32", parts=("transformer", "vae"))
    net = teacher.transformer
    fake_score = copy.deepcopy(net).float()
    student_net = copy.deepcopy(net).float() if method == "dmd2v" else None
    dtype = resolve_dtype(frozen_dtype, device)
    if dtype != torch.float32:
        rope = dict(net.rope.named_buffers(recurse=False))
        net.to(dtype)
        for name, table in rope.items():  # rotary tables stay fp32, as a bf16 from_pretrained load leaves them
            setattr(net.rope, name, table)
        teacher.dtype = dtype
    return teacher, net.requires_grad_(False).eval(), fake_score, student_net


def run(cfg: DistillConfig, plan: Plan, staging: Staging, rt: Runtime) -> Artifact | None:
    import torch

    from tmdcli.data.loaders import LatentLoader
    from tmdcli.models.discriminator import discriminator_for
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.objectives.dmd import DMDParams, critic_step_loss, is_student_iteration, student_step_loss
    from tmdcli.runtime.train_loop import LoopConfig, MetricsLog, run_loop

    cfg = DistillConfig(**{**plan.config, "disc_layers": tuple(plan.config["disc_layers"]),
                           "lora_targets": tuple(plan.config.get("lora_targets") or ()) or None})
    setup = run_setup(rt)
    dev = setup.device
    inputs = dict(plan.inputs)
    latents = inputs["latents"]
    teacher, teacher_net, fake_score, student_net = load_networks(cfg.teacher, cfg.method, dev,
                                                                  frozen_dtype_for(dev))
    fake_score.requires_grad_(True).train()
    if cfg.checkpointing:  # its DSM backward holds every block's activations otherwise (~2.6 GiB each at 81x480x832)
        fake_score.enable_gradient_checkpointing()
    if cfg.method == "tmd":
        from tmdcli.api import STUDENT_EXPORT_DIR

        student = TMDStudent.load(inputs["init"].path / STUDENT_EXPORT_DIR, device=dev, dtype=torch.float32)
        student.config = replace(student.config, method="tmd")
        if student.config.outer_gamma != cfg.outer_gamma:  # plan() resolved it from this student: never expected
            raise ArtifactError(f"student {inputs['init'].id} has outer gamma {student.config.outer_gamma:g}, the "
                                f"plan says {cfg.outer_gamma:g}", hint="rerun the command (the plan is re-made)")
        if student.config.u_param != cfg.u_param:  # likewise resolved from this student by plan()
            raise ArtifactError(f"student {inputs['init'].id} reads u as {student.config.u_param}, the plan says "
                                f"{cfg.u_param}", hint="rerun the command (the plan is re-made)")
    else:
        scfg = StudentConfig(num_outer_steps=cfg.num_outer_steps, num_inner_steps=1, num_head_blocks=1,
                             outer_gamma=cfg.outer_gamma, method="dmd2v", teacher=cfg.teacher)
        student = TMDStudent.from_teacher(student_net, scfg, seed=cfg.seed).to(dev)
        student.extras.requires_grad_(False)  # DMD2-v has no flow head; its extras stay inert and untrained
    student.transformer.requires_grad_(True)
    if cfg.lora_rank:  # adapters only on both transformers (before wrapping: requires_grad is final there)
        from tmdcli.models.lora import add_lora

        add_lora(student.transformer, cfg.lora_rank, cfg.lora_targets, seed=cfg.seed)
        add_lora(fake_score, cfg.lora_rank, cfg.lora_targets, seed=cfg.seed + 1)
    student.checkpointing = cfg.checkpointing
    student.train()
    discriminator = discriminator_for(teacher_net.config, cfg.disc_layers, seed=cfg.seed).to(dev).float()
    params = DMDParams(outer_grid=tuple(student.config.outer_grid()), disc_layers=cfg.disc_layers,
                       guidance_scale=cfg.guidance_scale, gan_weight=cfg.gan_weight, t_gamma=cfg.t_gamma,
                       rollout=cfg.rollout)

    class StudentObjective(torch.nn.Module):
        """The student's loss; the other networks are held by reference (not registered: DDP/FSDP wrap only the
        trained network of each objective).

        `requires_grad` is never toggled here (it is fixed before wrapping: DDP and fully_shard read it once). The
        fake score runs under no_grad in this step; the discriminator's parameter gradients from the GAN term are
        dropped by the critic optimizer's zero_grad before its next step (and no DDP reducer expects them)."""

        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, batch, generator):
            discriminator.eval()
            return student_step_loss(self.student, teacher_net, fake_score, discriminator, batch, generator, params)

    class CriticObjective(torch.nn.Module):
        """Fake score + discriminator loss. It samples the *unwrapped* student without grad: safe under DDP (replicated
        weights, no gradient to sync) and under tmd's FSDP2, where every unit of the student all-gathers its own
        weights whoever calls it (runtime/fsdp.py)."""

        def __init__(self):
            super().__init__()
            self.fake_score = fake_score
            self.discriminator = discriminator

        def forward(self, batch, generator):
            self.discriminator.train()
            return critic_step_loss(student, teacher_net, self.fake_score, self.discriminator, batch, generator,
                                    params)

    student_obj, critic_obj = StudentObjective(), CriticObjective()
    wrap_frozen(setup, teacher_net)  # FSDP2: 1/world of the frozen teacher per GPU (each unit gathers to run)
    student_obj, opt_student = wrap_trained(setup, student_obj, cfg.lr)
    critic_obj, opt_critic = wrap_trained(setup, critic_obj, cfg.lr)  # fake score and discriminator: lr 1e-5 each
    acc = setup.accelerator
    loader = LatentLoader(latents, batch_size=cfg.micro_batch, seed=cfg.seed, rank=setup.rank,
                          world_size=setup.world_size, device=dev)
    metrics = MetricsLog(staging.path / METRICS_FILE, enabled=setup.is_main, backend=cfg.log_to,
                         run_config=plan.config)
    defaults = teacher.defaults
    sampler_validate = make_validator(student, teacher.vae, loader, staging, num_prompts=cfg.num_sample_prompts,
                                      fps=defaults.fps, latent_shape=plan.facts["latent_shape"], is_main=setup.is_main,
                                      console=rt.console)
    diversity = DiversityAlarm(student, teacher_net, loader, staging, defaults, plan.facts["latent_shape"],
                               cfg.diversity_seeds, cfg.guidance_scale, is_main=setup.is_main, console=rt.console)

    def validate(iteration: int) -> None:
        if sampler_validate is not None:
            sampler_validate(iteration)
        record = diversity.check(iteration)
        if record:
            metrics.write({"iteration": iteration, **record})

    common = dict(loader=loader, device=dev, accelerator=acc, rank=setup.rank,
                  world_size=setup.world_size, is_main=setup.is_main, console=rt.console, run_identity=plan.fingerprint)
    try:
        if cfg.kd_warmup:  # its own checkpoints and metrics file: resuming it never touches the DMD records
            kd_metrics = MetricsLog(staging.path / "metrics-kd.jsonl", enabled=setup.is_main)
            kd_loader = LatentLoader(inputs["kd_pairs"], batch_size=cfg.micro_batch, seed=cfg.seed,
                                     rank=setup.rank, world_size=setup.world_size, device=dev)
            kd_warmup(cfg, student, student_obj, inputs["kd_videos"], staging, setup,
                      dict(common, loader=kd_loader, metrics=kd_metrics))
        loop = LoopConfig(iters=cfg.iters, batch=cfg.batch, micro_batch=cfg.micro_batch, save_every=cfg.save_every,
                          log_every=cfg.log_every, sample_every=cfg.sample_every, stop_after=cfg.stop_after,
                          seed=cfg.seed)

        def step_fn(it, batch, generator):
            objective = student_obj if is_student_iteration(it, cfg.student_every) else critic_obj
            return objective(batch, generator)

        result = run_loop(loop, modules={"student": student_obj, "critic": critic_obj},
                          optimizers={"student": opt_student, "critic": opt_critic}, step_fn=step_fn,
                          schedule=lambda it: ("student",) if is_student_iteration(it, cfg.student_every)
                          else ("critic",),
                          ckpt_root=staging.path / CHECKPOINT_DIR, grad_clip={"student": cfg.grad_clip},
                          validate=validate, metrics=metrics, desc=f"distill {plan.output_id}", **common)
    finally:
        metrics.close()
    facts = {"teacher": cfg.teacher, "method": cfg.method, "stage": STAGE, "num_outer_steps": cfg.num_outer_steps,
             "num_inner_steps": cfg.num_inner_steps, "num_head_blocks": cfg.num_head_blocks,
             "num_blocks": plan.facts["num_blocks"], "effective_nfe": plan.facts["effective_nfe"],
             "rollout": cfg.rollout, "latents": latents.id, "init": inputs["init"].id if "init" in inputs else None,
             "world_size": setup.world_size, "diversity": diversity.last, "kd_warmup": cfg.kd_warmup,
             "outer_gamma": student.config.outer_gamma, "outer_grid": student.config.outer_grid(),
             "u_param": cfg.u_param, "lora_rank": cfg.lora_rank}
    return finish_student(staging, student, student_obj, result, rt, total_iters=cfg.iters, is_main=setup.is_main,
                          facts=facts, metadata={"stage": STAGE, "method": cfg.method, "latents": latents.id})


class DiversityAlarm:
    """Mode-collapse alarm (TMD Fig. 9: VBench misses it): the student's seed diversity on the first prompt,
    against the teacher's (its own 50-step CFG sampler, computed once and kept in the artifact).

    Diversity = mean pairwise RMS distance between the latents of different seeds for the same prompt."""

    def __init__(self, student, teacher_net, loader, staging, defaults, latent_shape, num_seeds: int,
                 guidance_scale: float, *, is_main: bool, console=None):
        self.student, self.teacher_net, self.loader, self.staging = student, teacher_net, loader, staging
        self.defaults, self.latent_shape, self.num_seeds = defaults, list(latent_shape), num_seeds
        self.guidance_scale, self.is_main, self.console = guidance_scale, is_main, console
        self.last: dict | None = None

    @staticmethod
    def pairwise_rms(latents) -> float:
        import torch

        flat = latents.flatten(1).double()
        d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
        k = flat.shape[0]
        return float(d.sum() / (k * (k - 1)))

    def _latents(self, sample_fn):
        import torch

        from tmdcli.sampler import generators_for, randn_per_sample

        item = self.loader.first_items(1)
        seeds = list(range(100, 100 + self.num_seeds))
        text = item["text"].expand(self.num_seeds, -1, -1)
        noise = randn_per_sample(self.latent_shape, generators_for(seeds), device=text.device)
        with torch.no_grad():
            return sample_fn(noise, text, item["negative"].expand(self.num_seeds, -1, -1), seeds)

    def teacher_diversity(self) -> float:
        name = f"{SAMPLES_DIR}/teacher_diversity.json"
        path = self.staging.path / name
        if path.is_file():
            return json.loads(path.read_text())["diversity"]
        from tmdcli.models import wan
        from tmdcli.sampler import sample_teacher

        def run(noise, text, neg, seeds):
            def v(x, t):
                return wan.guided_velocity(self.teacher_net, x.to(self.teacher_net.dtype), t,
                                           text.to(self.teacher_net.dtype), neg.to(self.teacher_net.dtype),
                                           self.defaults.guidance_scale).float()

            return sample_teacher(v, noise, num_steps=self.defaults.num_steps, flow_shift=self.defaults.flow_shift,
                                  sampler=self.defaults.sampler)

        value = self.pairwise_rms(self._latents(run))
        if self.is_main:
            self.staging.write_bytes(name, json.dumps({"diversity": value, "seeds": self.num_seeds,
                                                       "steps": self.defaults.num_steps}).encode())
        return value

    def check(self, iteration: int) -> dict | None:
        if self.num_seeds < 2:
            return None
        from tmdcli.sampler import generators_for, sample_tmd

        was = self.student.training
        self.student.eval()
        cfg = self.student.config
        student_value = self.pairwise_rms(self._latents(
            lambda noise, text, neg, seeds: sample_tmd(self.student, noise, text, outer_grid=cfg.outer_grid(),
                                                       inner_grid=cfg.inner_grid(),
                                                       generators=generators_for([s + 7 for s in seeds]))))
        self.student.train(was)
        reference = self.teacher_diversity()
        ratio = student_value / max(reference, 1e-12)
        self.last = {"seed_diversity": student_value, "teacher_seed_diversity": reference,
                     "diversity_ratio": ratio}
        if ratio < DIVERSITY_ALARM and self.is_main:
            print(f"warning: possible mode collapse at iteration {iteration}: seed diversity {student_value:.4f} is "
                  f"{ratio:.0%} of the teacher's {reference:.4f} (alarm below {DIVERSITY_ALARM:.0%}); look at the "
                  f"validation samples", file=sys.stderr)
        return self.last


def kd_inputs(store: Store, ref: str | None, teacher: str, latent_shape) -> list[tuple[str, Artifact]]:
    """The KD pairs' plan inputs: the latents with their text embeddings and the videos holding the pairs."""
    from tmdcli.stages.kd_pairs import find_kd_pairs

    pairs, videos = find_kd_pairs(store, ref, teacher)
    shape = None if is_planned(pairs) else pairs.manifest.facts.get("latent_shape")
    if shape is not None and list(shape) != list(latent_shape):
        raise UsageError(f"KD pairs {pairs.id} are {'x'.join(map(str, shape))} latents; the training latents are "
                         f"{'x'.join(map(str, latent_shape))}", hint="make the pairs at the training video size")
    return [("kd_pairs", pairs)] + ([("kd_videos", videos)] if videos is not None else [])


def kd_loss(x_hat, sample):
    """METHOD.md 5.4: `0.5 mse(x0_student(0.999 noise, t = 0.999), teacher_sample)`."""
    import torch

    return 0.5 * torch.nn.functional.mse_loss(x_hat.float(), sample.float())


def kd_warmup(cfg: DistillConfig, student, student_obj, kd_videos: Artifact, staging: Staging, setup,
              common) -> None:
    """KD warm-up of the one-step DMD2-v baseline (METHOD.md 5.4): regress the one-step output at t = 0.999 from the
    teacher's own noise onto the teacher's sample (`kd_loss`).

    The pairs are the ones `synth-videos --kd-pairs` stored (CFG + skip-layer guidance): noise and clean latent of
    each item come from the videos shards, so the target is the sampler's latent itself; `common["loader"]` reads
    the latents artifact encoded from those videos for the text embeddings."""
    import torch

    from tmdcli.objectives.dmd import generator_sample
    from tmdcli.runtime.train_loop import LoopConfig, make_adamw, run_loop
    from tmdcli.stages.kd_pairs import PairReader

    pairs = PairReader(kd_videos)
    opt = make_adamw([p for p in student_obj.parameters() if p.requires_grad], cfg.kd_lr)
    opt = opt if setup.sharded else setup.accelerator.prepare(opt)  # FSDP2: the module was sharded by tmd itself

    def step_fn(it, batch, generator):
        noise, sample = pairs.get(batch["ids"].tolist(), device=batch["latents"].device)
        t = torch.full((noise.shape[0],), 0.999, dtype=torch.float64, device=noise.device)
        x_hat = generator_sample(student, 0.999 * noise, t, batch["text"], torch.zeros_like(noise))
        loss = kd_loss(x_hat, sample)
        return loss, {"kd": loss.detach()}

    loop = LoopConfig(iters=cfg.kd_warmup, batch=cfg.batch, micro_batch=cfg.micro_batch, save_every=cfg.save_every,
                      log_every=cfg.log_every, seed=cfg.seed + 1)
    run_loop(loop, modules={"student": student_obj}, optimizers={"student": opt}, step_fn=step_fn,
             schedule=lambda it: ("student",), ckpt_root=staging.path / KD_CHECKPOINT_DIR,
             grad_clip={"student": cfg.grad_clip}, desc="kd warm-up", **common)
