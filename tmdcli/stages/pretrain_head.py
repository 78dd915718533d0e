"""`tmd pretrain-head`: Stage 1 of TMD, Transition-Matching MeanFlow pretraining of the flow head and backbone
(TMD Sec. 3.1, Alg. 2, App. A.2; METHOD.md section 4).

One run trains one (M, N, H) student (D7) from the teacher's weights on a latents artifact and writes a `student`
artifact: `export/` (loadable by `tmd sample` without the teacher), `metrics.jsonl`, validation `samples/`, and the
newest training checkpoint. Rerunning the same command resumes from the newest checkpoint in the staging folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tmdcli.artifacts.store import Artifact, Staging, Store
from tmdcli.errors import UsageError
from tmdcli.objectives.u_param import DEFAULT_U_PARAM, U_FORMS, U_PARAMS
from tmdcli.stages.common import Plan, Runtime
from tmdcli.stages.training import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    TrainingOptions,
    check_enough_items,
    check_head_blocks,
    check_run_options,
    default_lr,
    finish_student,
    make_validator,
    resolve_training_inputs,
    run_setup,
    wrap_trained,
)
from tmdcli.stages.synth_videos import external_model

STAGE, STAGE_VERSION, OUTPUT_KIND = "pretrain-head", 1, "student"
DATA_PARALLEL = False  # ranks train one model together; rank 0 commits
OBJECTIVES = ("tmmf", "tm")  # TM-MeanFlow, or plain transition matching (r = s always; Table 6 ablation)


@dataclass(frozen=True, kw_only=True)
class PretrainHeadConfig(TrainingOptions):
    num_outer_steps: int = 2  # M
    num_inner_steps: int = 2  # N
    num_head_blocks: int = 5  # H
    outer_gamma: float = 10.0
    inner_gamma: float = 10.0
    objective: str = "tmmf"
    fusion: str = "gated"
    u_param: str = DEFAULT_U_PARAM  # "consistent" (D19) or "paper" (Eq. 14); stored in the student
    cfg_scale: float = 3.0
    cond_dropout: float = 0.1
    fd_delta: float = 5e-3
    r_equals_s_prob: float = 0.75
    s_gamma: float = 3.0
    norm_c: float | None = None  # adaptive-loss c in units of d (1 for 1.3B, 1e-5 for 14B); default per teacher
    iters: int = 3000
    extra: dict = field(default_factory=dict)


def resolve(cfg: PretrainHeadConfig, entry, family) -> PretrainHeadConfig:
    """Fill the family's defaults (`models.family`, from the transformer config) so the manifest records the
    values actually used."""
    return replace(cfg, teacher=entry.name, lr=cfg.lr if cfg.lr is not None else default_lr(family, STAGE),
                   norm_c=cfg.norm_c if cfg.norm_c is not None else family.norm_c,
                   r_equals_s_prob=1.0 if cfg.objective == "tm" else cfg.r_equals_s_prob)


def _check(cfg: PretrainHeadConfig) -> None:
    check_run_options(cfg)
    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.u_param not in U_PARAMS:
        raise UsageError(f"--u-param must be one of {', '.join(U_PARAMS)}, got {cfg.u_param!r}",
                         hint="consistent: u = (y_s - head)/s (METHOD.md D19); paper: u = y1 - head (TMD Eq. 14)")
    if cfg.fusion not in ("gated", "concat"):
        raise UsageError(f"--fusion must be gated or concat, got {cfg.fusion!r}")
    if cfg.num_outer_steps < 1 or cfg.num_inner_steps < 1:
        raise UsageError(f"--m and --n must be >= 1, got {cfg.num_outer_steps} and {cfg.num_inner_steps}")
    if not 0.0 <= cfg.cond_dropout < 1.0 or not 0.0 <= cfg.r_equals_s_prob <= 1.0:
        raise UsageError("--cond-dropout must be in [0, 1) and --r-equals-s in [0, 1]")
    if not 0.0 < cfg.fd_delta < 0.1:
        raise UsageError(f"--fd-delta must be in (0, 0.1), got {cfg.fd_delta}")
    if cfg.cfg_scale < 1.0:
        raise UsageError(f"--cfg-scale must be >= 1, got {cfg.cfg_scale}")
    if cfg.norm_c is not None and not cfg.norm_c > 0:
        raise UsageError(f"--norm-c must be > 0, got {cfg.norm_c}")


def plan(cfg: PretrainHeadConfig, store: Store) -> Plan:
    """Resolve latents and teacher, check they fit, fill defaults, estimate memory and compute (no torch)."""
    from tmdcli.objectives.grids import effective_nfe, inner_grid, outer_grid
    from tmdcli.runtime.dist import fsdp_enabled, planned_world_size
    from tmdcli.runtime.estimates import WanShape, tm_meanflow_estimate

    _check(cfg)
    inputs = resolve_training_inputs(store, cfg.latents, cfg.teacher)
    notes: list = []
    cfg = replace(cfg, num_head_blocks=check_head_blocks(cfg.num_head_blocks, inputs.num_blocks, inputs.entry.name,
                                                         notes))
    r = resolve(cfg, inputs.entry, inputs.family)
    world = planned_world_size()
    check_enough_items(inputs, r.micro_batch, world)
    shape = WanShape.from_config(inputs.config)
    estimate = tm_meanflow_estimate(shape, inputs.latent_shape, num_head_blocks=r.num_head_blocks, batch=r.batch,
                                    micro_batch=r.micro_batch, world_size=world, checkpointing=r.checkpointing,
                                    sharded=fsdp_enabled(), cfg_scale=r.cfg_scale, r_equals_s_prob=r.r_equals_s_prob, fusion=r.fusion,
                                    text_tokens=inputs.text_tokens)
    nfe = effective_nfe(r.num_outer_steps, r.num_inner_steps, r.num_head_blocks, inputs.num_blocks)
    p = Plan.build(store, stage=STAGE, stage_version=STAGE_VERSION, kind=OUTPUT_KIND, cfg=r,
                   inputs=[("latents", inputs.latents)],
                   external_models=[external_model(inputs.entry, inputs.folder)], name=r.name)
    accum = r.batch // max(1, r.micro_batch * world)
    p.rows += [
        ("teacher", f"{inputs.entry.name}: L = {inputs.num_blocks} blocks, D = {shape.dim}"),
        ("student", f"M{r.num_outer_steps} N{r.num_inner_steps} H{r.num_head_blocks} ({r.fusion} fusion), "
                    f"effective NFE {nfe:.3g}; outer grid {[round(v, 3) for v in outer_grid(r.num_outer_steps, r.outer_gamma)]},"
                    f" inner grid {[round(v, 3) for v in inner_grid(r.num_inner_steps, r.inner_gamma)]}"),
        ("objective", f"{'TM-MeanFlow' if r.objective == 'tmmf' else 'transition matching (r = s)'}, "
                      f"{U_FORMS[r.u_param]}: CFG "
                      f"{r.cfg_scale}, dropout {r.cond_dropout}, FD delta {r.fd_delta}, r = s for "
                      f"{r.r_equals_s_prob:.0%}, c = {r.norm_c:g} d"),
        *inputs.family_rows(),
        inputs.data_row(),
        ("schedule", f"{r.iters} iterations x batch {r.batch} ({r.micro_batch}/GPU x {world} GPU(s) x {accum} "
                     f"accumulation), AdamW lr {r.lr:g}, clip {r.grad_clip}; checkpoint every {r.save_every}"),
        *estimate.rows(r.checkpointing),
        *notes,
    ]
    p.facts.update(num_blocks=inputs.num_blocks, latent_shape=inputs.latent_shape, effective_nfe=nfe,
                   estimate=estimate.__dict__)
    return p


def run(cfg: PretrainHeadConfig, plan: Plan, staging: Staging, rt: Runtime) -> Artifact | None:
    import torch

    from tmdcli.data.loaders import LatentLoader
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.objectives.meanflow import TMMeanFlowParams, tm_meanflow_loss
    from tmdcli.registry import load_teacher
    from tmdcli.runtime.train_loop import LoopConfig, MetricsLog, run_loop

    cfg = PretrainHeadConfig(**plan.config)
    setup = run_setup(rt)
    latents = plan.inputs[0][1]
    teacher = load_teacher(cfg.teacher, device=str(setup.device), dtype="float32", parts=("transformer", "vae"))
    student_cfg = StudentConfig(num_outer_steps=cfg.num_outer_steps, num_inner_steps=cfg.num_inner_steps,
                                num_head_blocks=cfg.num_head_blocks, outer_gamma=cfg.outer_gamma,
                                inner_gamma=cfg.inner_gamma, fusion=cfg.fusion, u_param=cfg.u_param, method="tmd",
                                teacher=cfg.teacher)
    student = TMDStudent.from_teacher(teacher.transformer, student_cfg, seed=cfg.seed).to(setup.device)
    student.checkpointing = cfg.checkpointing
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    d = 1
    for n in plan.facts["latent_shape"]:
        d *= int(n)
    params = TMMeanFlowParams(outer_grid=tuple(student_cfg.outer_grid()), inner_grid=tuple(student_cfg.inner_grid()),
                              norm_c=cfg.norm_c * d, cfg_scale=cfg.cfg_scale, cond_dropout=cfg.cond_dropout,
                              fd_delta=cfg.fd_delta, r_equals_s_prob=cfg.r_equals_s_prob, s_gamma=cfg.s_gamma,
                              u_param=cfg.u_param)

    class Objective(torch.nn.Module):
        """The student plus its loss, so DDP/FSDP see one forward per backward."""

        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, batch: dict, generator: torch.Generator):
            return tm_meanflow_loss(self.student, batch["latents"], batch["text"], batch["negative"], generator,
                                    params)

    objective = Objective()
    objective, optimizer = wrap_trained(setup, objective, cfg.lr)  # DDP, or FSDP2 per unit (runtime/fsdp.py)
    loader = LatentLoader(latents, batch_size=cfg.micro_batch, seed=cfg.seed, rank=setup.rank,
                          world_size=setup.world_size, device=setup.device)
    metrics = MetricsLog(staging.path / METRICS_FILE, enabled=setup.is_main, backend=cfg.log_to,
                         run_config=plan.config)
    validate = make_validator(student, teacher.vae, loader, staging, num_prompts=cfg.num_sample_prompts,
                              fps=teacher.defaults.fps, latent_shape=plan.facts["latent_shape"],
                              is_main=setup.is_main,
                              console=rt.console)
    loop = LoopConfig(iters=cfg.iters, batch=cfg.batch, micro_batch=cfg.micro_batch, save_every=cfg.save_every,
                      log_every=cfg.log_every, sample_every=cfg.sample_every, stop_after=cfg.stop_after,
                      seed=cfg.seed)
    try:
        result = run_loop(loop, modules={"student": objective}, optimizers={"student": optimizer},
                          step_fn=lambda it, batch, g: objective(batch, g), schedule=lambda it: ("student",),
                          loader=loader, ckpt_root=staging.path / CHECKPOINT_DIR, metrics=metrics,
                          device=setup.device, accelerator=setup.accelerator, rank=setup.rank,
                          world_size=setup.world_size, is_main=setup.is_main, grad_clip={"student": cfg.grad_clip},
                          validate=validate, console=rt.console, desc=f"pretrain-head {plan.output_id}",
                          run_identity=plan.fingerprint)
    finally:
        metrics.close()
    facts = {"teacher": cfg.teacher, "method": "tmd", "stage": STAGE, "objective": cfg.objective,
             "u_param": cfg.u_param,
             "num_outer_steps": cfg.num_outer_steps, "num_inner_steps": cfg.num_inner_steps,
             "num_head_blocks": cfg.num_head_blocks, "num_blocks": plan.facts["num_blocks"],
             "effective_nfe": plan.facts["effective_nfe"], "latents": latents.id, "world_size": setup.world_size}
    return finish_student(staging, student, objective, result, rt, total_iters=cfg.iters, is_main=setup.is_main,
                          facts=facts, metadata={"stage": STAGE, "latents": latents.id})
