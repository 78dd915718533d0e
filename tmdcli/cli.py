"""The `tmd` command: thin Typer wrappers over library functions, shared options, one error handler.

Stdout carries only results (paths, ids, JSON); logs, plans and progress go to stderr. Exit codes: 0 success,
1 failure, 2 usage or bad input, 130 interrupted. `TMD_DEBUG=1` shows tracebacks.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tmdcli import __version__
from tmdcli.errors import TmdError, UsageError
from tmdcli.objectives.u_param import DEFAULT_U_PARAM

app = typer.Typer(name="tmd", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_show_locals=False,
                  add_completion=True, help="Transition Matching Distillation for Wan2.1 text-to-video models.")

# --- shared options (declared once) ---------------------------------------------------------------------------
HomeOpt = Annotated[Path, typer.Option("--home", envvar="TMD_HOME", show_envvar=True,
                                       help="Workspace that holds all artifacts.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan and exit without writing anything.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Base seed; sample i uses seed + i.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if present), cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option("--dtype", envvar="TMD_DTYPE", show_envvar=True,
                                       help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
VerifyInputsOpt = Annotated[bool, typer.Option("--verify-inputs/--no-verify-inputs",
                                               help="Check the input artifacts' sha256 against their manifests first "
                                                    "(sizes are always checked; each file is hashed once, then "
                                                    "cached).")]
DEFAULT_HOME = Path("tmd-home")


def complete_ref(incomplete: str) -> list[str]:
    """Shell completion for artifact references: ids and names in $TMD_HOME (or ./tmd-home), plus `latest`."""
    from tmdcli.artifacts.store import Store

    try:
        artifacts = Store(os.environ.get("TMD_HOME", DEFAULT_HOME)).list()
    except Exception:  # completion must never crash the shell
        return []
    refs = ["latest"] + [a.id for a in artifacts] + [a.name for a in artifacts if a.name != a.id]
    return [r for r in refs if r.startswith(incomplete)]


RefArg = Annotated[str, typer.Argument(help="Artifact id, name, latest, KIND:latest, or path.",
                                       autocompletion=complete_ref)]


def _has_students(home) -> bool:
    from tmdcli.artifacts.store import Store

    return bool(Store(home).list("student"))


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def guarded(fn):
    """Turn known errors into `error:`/`hint:` lines and exit codes; tracebacks only with TMD_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("TMD_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TmdError as exc:
            if debug:
                raise
            _report(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _report("interrupted; rerun the same command to resume", None)
            raise typer.Exit(130) from None
        except Exception as exc:
            if debug:
                raise
            _report(f"{type(exc).__name__}: {exc}", "this is a bug or an environment problem; rerun with "
                                                    "TMD_DEBUG=1 for the traceback")
            raise typer.Exit(1) from None

    return wrapper


def _report(message: str, hint: str | None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _version_callback(value: bool):
    if value:
        print(f"tmd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """Transition Matching Distillation for Wan2.1 text-to-video models.

    Stages: make-prompts, synth-videos, encode-latents, pretrain-head, distill, sample, eval.
    """


# --- make-prompts (data stage 1) --------------------------------------------------------------------------------
@app.command("make-prompts", epilog="Examples:\n\n  tmd make-prompts --source vidprom.csv --limit 500000\n\n"
                                    "  tmd make-prompts --source toy:512\n\n"
                                    "  tmd make-prompts --source prompts.txt --expander none --name my-prompts")
@guarded
def make_prompts(
    source: Annotated[str, typer.Option(help="VidProM CSV/Parquet, Parquet/JSONL with a 'prompt' column, text file "
                                             "(one prompt a line), hf:DATASET[:SPLIT] (a Hugging Face dataset in "
                                             "the local cache or a save_to_disk folder; offline), or toy[:COUNT] / "
                                             "toy-heldout[:COUNT] / toy-all[:COUNT] (toy grammar captions, default "
                                             "1024).",
                                        show_default=False)],
    expander: Annotated[str, typer.Option(help="auto (toy for toy sources, else qwen2.5-7b), none, toy, imported, "
                                               "qwen2.5-3b/7b/14b, a HF repo id in the local cache, or a model "
                                               "folder.")] = "auto",
    backend: Annotated[str, typer.Option(help="Language-model backend: transformers or vllm (optional extra).")]
    = "transformers",
    limit: Annotated[Optional[int], typer.Option(help="Keep at most N prompts after filtering (seeded subset, "
                                                      "source order).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate() call.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Expander output budget per prompt, in tokens.")] = 512,
    min_words: Annotated[int, typer.Option(help="Drop source prompts with fewer words.")] = 3,
    max_words: Annotated[int, typer.Option(help="Drop source prompts with more words (0: no limit).")] = 120,
    nsfw_threshold: Annotated[float, typer.Option(help="Drop rows whose largest NSFW score exceeds this (1: keep "
                                                       "all).")] = 0.1,
    vbench_prompts: Annotated[Optional[Path], typer.Option(help="VBench prompt list to drop (default: the "
                                                                "installed vbench package's, when present).")]
    = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any other config field, KEY=VALUE "
                                                                     "(e.g. chunk_size=64, do_sample=false).")]
    = None,
    seed: SeedOpt = 0,
    name: Annotated[Optional[str], typer.Option(help="Name of the output artifact.")] = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    dry_run: DryRunOpt = False,
):
    """Filter a prompt source and expand it with a local instruct model into a `prompts` artifact.

    Writes prompts.parquet (id, source_prompt, prompt, expander, seed, spec, ...) with the filter counts in the
    manifest; resumable chunk by chunk. Prints the artifact path on stdout.
    """
    from tmdcli.stages import make_prompts as stage
    from tmdcli.stages.common import execute

    cfg = stage.MakePromptsConfig(source=source, expander=expander, backend=backend, limit=limit,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, min_words=min_words,
                                  max_words=max_words, nsfw_threshold=nsfw_threshold, vbench_prompts=vbench_prompts,
                                  seed=seed, name=name, dtype=dtype)
    execute(stage, stage.with_overrides(cfg, set_ or ()), home=home, dry_run=dry_run, device=device)


# --- synth-videos and encode-latents (data stages 2 and 3) --------------------------------------------------------
DataShardOpt = Annotated[Optional[str], typer.Option("--shard", help="i/n: this independent job takes every n-th shard "
                                                                 "starting at i (combines with accelerate ranks).")]
# --- speed options (issue 18), shared by synth-videos, sample and eval; logic in tmdcli/runtime/speed.py ---------
_SPD = "Speed"
VaeDtypeOpt = Annotated[str, typer.Option("--vae-dtype", rich_help_panel=_SPD, help="VAE decode dtype: auto (= "
                                          "float32, exact), float32, bfloat16 (faster, not exact).")]
DecoderOpt = Annotated[str, typer.Option("--decoder", rich_help_panel=_SPD, help="auto (= wan: chunked exact Wan "
                                         "decode), wan-stock (diffusers' per-frame loop), taehv:PATH (tiny "
                                         "approximate decoder, taew2_1 weights).")]
CompileOpt = Annotated[bool, typer.Option("--compile", rich_help_panel=_SPD, help="torch.compile each DiT block and "
                                          "the decoder (compile time pays back over many clips).")]
AttentionOpt = Annotated[Optional[str], typer.Option("--attention", rich_help_panel=_SPD, help="diffusers attention "
                                                     "backend: native, cudnn, flash, fa3, sage ... (when installed).")]
CudaGraphsOpt = Annotated[bool, typer.Option("--cuda-graphs", rich_help_panel=_SPD, help="CUDA only: replay the "
                                             "compiled blocks as CUDA graphs (fixed shapes).")]


def _speed_fields(vae_dtype: str, decoder: str, compile_: bool, attention: str | None, cuda_graphs: bool) -> dict:
    """The speed options as the stage configs' flat fields (runtime/speed.py CONFIG_FIELDS)."""
    return dict(vae_dtype=vae_dtype, decoder=decoder, compile=compile_, attention=attention, cuda_graphs=cuda_graphs)


def _speed(*values):
    from tmdcli.runtime.speed import SpeedOptions

    return SpeedOptions(**_speed_fields(*values))


DataNameOpt = Annotated[Optional[str], typer.Option("--name", help="Output artifact name (default: its id).")]
_SIZE = "Video size (default: the teacher's)"


@app.command("synth-videos", epilog="Examples:\n\n  tmd synth-videos --teacher wan2.1-14b\n\n"
                                    "  tmd synth-videos --teacher tiny-random --limit 8 --frames 5 --height 32 "
                                    "--width 32\n\n"
                                    "  accelerate launch -m tmdcli synth-videos --teacher wan2.1-14b --save-latents")
@guarded
def synth_videos(
    teacher: Annotated[str, typer.Option(help="Teacher name (wan2.1-1.3b, wan2.1-14b, toy, tiny-random) or folder.")],
    prompts: Annotated[str, typer.Option(help="Prompts artifact reference.", autocompletion=complete_ref)]
    = "latest",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts (by id).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (default: the teacher's, 50).")] = None,
    cfg: Annotated[Optional[float], typer.Option(help="CFG scale (default: the teacher's, 5).")] = None,
    shift: Annotated[Optional[float], typer.Option(help="Flow shift (default: the teacher's, 5).")] = None,
    frames: Annotated[Optional[int], typer.Option(help=f"Frames, 4k+1. {_SIZE}.", rich_help_panel="Size")] = None,
    height: Annotated[Optional[int], typer.Option(help=f"Height, multiple of 16. {_SIZE}.", rich_help_panel="Size")]
    = None,
    width: Annotated[Optional[int], typer.Option(help=f"Width, multiple of 16. {_SIZE}.", rich_help_panel="Size")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per sampler batch.")] = 4,
    shard_size: Annotated[int, typer.Option(help="Clips per shard file.")] = 64,
    save_latents: Annotated[bool, typer.Option("--save-latents", help="Also store each clean latent "
                                                                      "(encode-latents reuses it).")] = False,
    save_noise: Annotated[bool, typer.Option("--save-noise", help="Also store each initial noise (KD pairs).")]
    = False,
    kd_pairs: Annotated[bool, typer.Option("--kd-pairs", help="The one-step DMD2-v KD warm-up's (noise, sample) "
                                                              "pairs (METHOD.md 5.4): saves noise and latents, CFG "
                                                              "+ skip-layer guidance at block 10.")] = False,
    skip_layer_guidance: Annotated[Optional[int], typer.Option(help="Block left out of the unconditional pass "
                                                                   "(skip-layer guidance; --kd-pairs: 10).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Base seed: seed_i = sha256(seed, id). Default: the prompts' "
                                                     "seed column.")] = None,
    shard: DataShardOpt = None,
    name: DataNameOpt = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    decoder: DecoderOpt = "auto",
    compile_: CompileOpt = False,
    attention: AttentionOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    dry_run: DryRunOpt = False,
    verify_inputs: VerifyInputsOpt = True,
):
    """Generate the teacher's videos for a prompts artifact (data stage 2) -> a videos artifact.

    Sharded tar files (mp4 + prompt + seed, optionally latents and noise), one seed per prompt id; resumes where it
    stopped; ranks of `accelerate launch` and `--shard i/n` jobs fill one artifact together.
    """
    from tmdcli.stages import synth_videos as stage
    from tmdcli.stages.common import execute

    config = stage.SynthVideosConfig(teacher=teacher, prompts=prompts, limit=limit, num_steps=steps,
                                     guidance_scale=cfg, flow_shift=shift, num_frames=frames, height=height,
                                     width=width, seed=seed, shard_size=shard_size, save_latents=save_latents,
                                     save_noise=save_noise, kd_pairs=kd_pairs, skip_layer=skip_layer_guidance,
                                     dtype=dtype, batch_size=batch_size, name=name,
                                     **_speed_fields(vae_dtype, decoder, compile_, attention, cuda_graphs))
    execute(stage, config, home=home, dry_run=dry_run, shard=shard, device=device,
            verify_inputs=verify_inputs)


@app.command("encode-latents", epilog="Examples:\n\n  tmd encode-latents --teacher wan2.1-1.3b\n\n"
                                      "  tmd encode-latents --teacher tiny-random --videos latest --batch-size 4")
@guarded
def encode_latents(
    teacher: Annotated[str, typer.Option(help="Teacher whose VAE and text encoder to use (name or folder).")],
    videos: Annotated[str, typer.Option(help="Videos artifact reference.", autocompletion=complete_ref)]
    = "latest",
    batch_size: Annotated[int, typer.Option(help="Clips (and prompts) per encoder batch.")] = 8,
    reuse_latents: Annotated[bool, typer.Option("--reuse-latents/--reencode",
                                                help="Reuse latents synth-videos saved (when the same VAE made "
                                                     "them) or always re-encode the mp4s.")] = True,
    storage_dtype: Annotated[str, typer.Option(help="auto (bfloat16 for latents of >= 2^20 elements, else "
                                                    "float32), float32 or bfloat16.")] = "auto",
    shard: DataShardOpt = None,
    name: DataNameOpt = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    dry_run: DryRunOpt = False,
    verify_inputs: VerifyInputsOpt = True,
):
    """Encode a videos artifact into normalised Wan VAE latents and umT5 text embeddings -> a latents artifact.

    One latents shard per videos shard, plus the negative prompt's embedding once; unreadable videos are skipped and
    counted; resumable and shardable like synth-videos.
    """
    from tmdcli.stages import encode_latents as stage
    from tmdcli.stages.common import execute

    config = stage.EncodeLatentsConfig(teacher=teacher, videos=videos, reuse_latents=reuse_latents,
                                       storage_dtype=storage_dtype, dtype=dtype, batch_size=batch_size, name=name)
    execute(stage, config, home=home, dry_run=dry_run, shard=shard, device=device,
            verify_inputs=verify_inputs)


# --- training stages (shared options) ---------------------------------------------------------------------------

TeacherTrainOpt = Annotated[str, typer.Option("--teacher", help="Teacher (name or folder); default: the one that "
                                                                "made the latents.")]
LatentsOpt = Annotated[str, typer.Option("--latents", help="Latents artifact reference.", autocompletion=complete_ref)]
# The long aliases are for launchers (torchrun, accelerate launch) whose own parsers take `--n` for an abbreviation.
MOpt = Annotated[int, typer.Option("--m", "--outer-steps", help="Outer (backbone) steps M.")]
NOpt = Annotated[int, typer.Option("--n", "--inner-steps", help="Inner (flow-head) steps N.")]
HOpt = Annotated[int, typer.Option("--h", "--head-blocks", help="Flow-head blocks H (the last H of L teacher "
                                                                "blocks).")]
ItersOpt = Annotated[int, typer.Option("--iters", help="Training iterations (optimizer steps).")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default per teacher, TMD Table 7).")]
BatchOpt = Annotated[int, typer.Option("--batch", help="Global batch (all GPUs, with gradient accumulation).")]
MicroBatchOpt = Annotated[int, typer.Option("--micro-batch", help="Samples per GPU per forward pass.")]
SaveEveryOpt = Annotated[int, typer.Option("--save-every", help="Checkpoint every this many iterations.")]
LogEveryOpt = Annotated[int, typer.Option("--log-every", help="metrics.jsonl record every this many iterations.")]
SampleEveryOpt = Annotated[int, typer.Option("--sample-every", help="Validation mp4s every this many iterations "
                                                                    "(0: at the end only).")]
SamplePromptsOpt = Annotated[int, typer.Option("--num-sample-prompts", help="Validation prompts (the first items "
                                                                            "of the latents artifact).")]
StopAfterOpt = Annotated[Optional[int], typer.Option("--stop-after", help="Stop (checkpointed) after this "
                                                                          "iteration; rerun to continue.")]
CheckpointingOpt = Annotated[bool, typer.Option("--checkpointing/--no-checkpointing",
                                                help="Activation checkpointing per transformer block.")]
LogToOpt = Annotated[str, typer.Option("--log-to", help="Also log to tensorboard or wandb (when installed).")]
GradClipOpt = Annotated[float, typer.Option("--grad-clip", help="Gradient norm clip of the student.")]
TrainNameOpt = Annotated[Optional[str], typer.Option("--name", help="Name of the student artifact.")]


@app.command("pretrain-head", epilog="Examples:\n\n  tmd pretrain-head --n 2 --h 5\n\n"
                                     "  tmd pretrain-head --teacher tiny-random --n 2 --h 1 --iters 5 --save-every 2\n\n"
                                     "  accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m tmdcli "
                                     "pretrain-head --n 2 --h 5 --checkpointing\n\n"
                                     "  tmd pretrain-head --n 4 --h 5 --dry-run\n\n"
                                     "  tmd pretrain-head --n 2 --h 5 --u-param paper   # Eq. 14 as printed")
@guarded
def pretrain_head(
    n: NOpt,
    h: HOpt,
    m: MOpt = 2,
    teacher: TeacherTrainOpt = "",
    latents: LatentsOpt = "latest",
    iters: ItersOpt = 3000,
    lr: LrOpt = None,
    batch: BatchOpt = 64,
    micro_batch: MicroBatchOpt = 1,
    objective: Annotated[str, typer.Option(help="tmmf (TM-MeanFlow) or tm (plain transition matching, r = s; "
                                                "Table 6 ablation).")] = "tmmf",
    fusion: Annotated[str, typer.Option(help="gated (default) or concat (App. B.3 ablation).")] = "gated",
    u_param: Annotated[str, typer.Option("--u-param", help="How the head's output becomes the average velocity: "
                                                           "consistent, u = (y_s - head)/s (default; METHOD.md "
                                                           "D19), or paper, u = y1 - head (TMD Eq. 14). Stored in "
                                                           "the student; distill and sample use it.")]
    = DEFAULT_U_PARAM,
    cfg_scale: Annotated[float, typer.Option(help="CFG scale of the target velocity.")] = 3.0,
    cond_dropout: Annotated[float, typer.Option(help="Condition dropout to the negative prompt.")] = 0.1,
    fd_delta: Annotated[float, typer.Option(help="Finite-difference step of du/ds.")] = 5e-3,
    r_equals_s: Annotated[float, typer.Option("--r-equals-s", help="Share of samples with r = s.")] = 0.75,
    norm_c: Annotated[Optional[float], typer.Option(help="Adaptive-loss constant c in units of d (default per "
                                                         "teacher: 1 for 1.3B, 1e-5 for 14B).")] = None,
    outer_gamma: Annotated[float, typer.Option(help="Shift of the outer grid.")] = 10.0,
    grad_clip: GradClipOpt = 10.0,
    save_every: SaveEveryOpt = 500,
    log_every: LogEveryOpt = 10,
    sample_every: SampleEveryOpt = 500,
    num_sample_prompts: SamplePromptsOpt = 2,
    stop_after: StopAfterOpt = None,
    checkpointing: CheckpointingOpt = False,
    log_to: LogToOpt = "none",
    seed: SeedOpt = 0,
    name: TrainNameOpt = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dry_run: DryRunOpt = False,
    verify_inputs: VerifyInputsOpt = True,
):
    """Stage 1: TM-MeanFlow pretraining of the flow head (and backbone) for one (M, N, H) -> a student artifact.

    Resumable: rerunning the same command continues from the newest checkpoint. --dry-run prints parameter counts,
    an estimate of peak memory per GPU (with and without checkpointing) and FLOPs per iteration.
    """
    from tmdcli.stages import pretrain_head as stage
    from tmdcli.stages.common import execute

    config = stage.PretrainHeadConfig(
        teacher=teacher, latents=latents, num_outer_steps=m, num_inner_steps=n, num_head_blocks=h, iters=iters, lr=lr,
        batch=batch, micro_batch=micro_batch, objective=objective, fusion=fusion, u_param=u_param,
        cfg_scale=cfg_scale, cond_dropout=cond_dropout, fd_delta=fd_delta, r_equals_s_prob=r_equals_s, norm_c=norm_c,
        outer_gamma=outer_gamma, grad_clip=grad_clip, save_every=save_every, log_every=log_every,
        sample_every=sample_every, num_sample_prompts=num_sample_prompts, stop_after=stop_after,
        checkpointing=checkpointing, log_to=log_to, seed=seed, name=name)
    execute(stage, config, home=home, dry_run=dry_run, device=device,
            verify_inputs=verify_inputs)


@app.command("distill", epilog="Examples:\n\n  tmd distill --n 2 --h 5\n\n"
                               "  tmd distill --teacher tiny-random --n 2 --h 1 --iters 10 --save-every 5\n\n"
                               "  tmd distill --method dmd2v --m 1 --kd-warmup 10000 --iters 12000\n\n"
                               "  tmd distill --n 2 --h 5 --no-rollout --name n2h5-no-rollout   # Fig. 7 ablation\n\n"
                               "  accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m tmdcli distill "
                               "--inner-steps 2 --head-blocks 5 --checkpointing")
@guarded
def distill(
    n: Annotated[int, typer.Option("--n", "--inner-steps", help="Inner (flow-head) steps N (TMD).")] = 2,
    h: Annotated[int, typer.Option("--h", "--head-blocks", help="Flow-head blocks H (TMD).")] = 5,
    m: MOpt = 2,
    method: Annotated[str, typer.Option(help="tmd (DMD2-v + flow-head rollout, from a pretrain-head student) or "
                                             "dmd2v (the baseline: a few-step student initialised from the "
                                             "teacher).")] = "tmd",
    init: Annotated[Optional[str], typer.Option(help="Stage-1 student to start from (default: the newest "
                                                     "pretrain-head student with this teacher, M, N, H).",
                                                autocompletion=complete_ref)] = None,
    teacher: TeacherTrainOpt = "",
    latents: LatentsOpt = "latest",
    iters: Annotated[Optional[int], typer.Option("--iters", help="Iterations, critic ones included (default TMD "
                                                                 "Table 7: 4k for M >= 2, 12k for M = 1; 14B 1k / "
                                                                 "5k).")] = None,
    lr: LrOpt = None,
    batch: BatchOpt = 64,
    micro_batch: MicroBatchOpt = 1,
    rollout: Annotated[bool, typer.Option("--rollout/--no-rollout", help="Backpropagate through all N inner steps "
                                                                       "(--no-rollout: only the last; Fig. 7).")]
    = True,
    guidance_scale: Annotated[float, typer.Option(help="Teacher CFG scale (x0 space).")] = 5.0,
    gan_weight: Annotated[float, typer.Option(help="Weight of the GAN generator loss (0: no discriminator).")] = 0.03,
    t_gamma: Annotated[float, typer.Option(help="Shift of t_dmd.")] = 5.0,
    student_every: Annotated[int, typer.Option(help="Student update every this many iterations.")] = 5,
    outer_gamma: Annotated[Optional[float], typer.Option(help="Shift of the outer grid. TMD: the Stage-1 student's "
                                                             "(a different value exits 2); dmd2v: default 10 (5 "
                                                             "for 4-step DMD2-v).")] = None,
    u_param: Annotated[Optional[str], typer.Option("--u-param", help="Parametrisation of the average velocity; "
                                                                     "TMD takes its Stage-1 student's (a different "
                                                                     "value exits 2).")] = None,
    disc_layers: Annotated[Optional[str], typer.Option(help="Teacher blocks feeding the discriminator heads, e.g. "
                                                           "15,22,29 (default per teacher, TMD Table 7).")] = None,
    kd_warmup: Annotated[int, typer.Option(help="KD warm-up iterations first (one-step DMD2-v only), on the "
                                                "teacher's (noise, sample) pairs of --kd-pairs.")] = 0,
    kd_pairs: Annotated[Optional[str], typer.Option(help="KD pairs: latents (or videos) made with `synth-videos "
                                                         "--kd-pairs` (default: the newest for this teacher).",
                                                    autocompletion=complete_ref)] = None,
    grad_clip: GradClipOpt = 10.0,
    save_every: SaveEveryOpt = 500,
    log_every: LogEveryOpt = 10,
    sample_every: SampleEveryOpt = 500,
    num_sample_prompts: SamplePromptsOpt = 2,
    stop_after: StopAfterOpt = None,
    checkpointing: CheckpointingOpt = False,
    lora_rank: Annotated[int, typer.Option(help="LoRA adapters of this rank on the blocks of the student and fake "
                                                "score instead of full fine-tuning (0: off; needs tmdcli[lora]).")] = 0,
    lora_targets: Annotated[Optional[str], typer.Option(help="Block linears LoRA adapts, comma-separated suffixes "
                                                            "(default: to_q,to_k,to_v,to_out.0,ffn.net.0.proj,"
                                                            "ffn.net.2).")] = None,
    log_to: LogToOpt = "none",
    seed: SeedOpt = 0,
    name: TrainNameOpt = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dry_run: DryRunOpt = False,
    verify_inputs: VerifyInputsOpt = True,
):
    """Stage 2: DMD2-v with flow-head rollout (or the DMD2-v baseline) -> a student artifact.

    Alternates a student update every 5th iteration with fake-score + discriminator updates. Resumable: rerunning
    the same command continues from the newest checkpoint. --dry-run prints the memory plan per GPU.
    """
    from tmdcli.stages import distill as stage
    from tmdcli.stages.common import execute

    try:
        layers = tuple(int(v) for v in disc_layers.split(",")) if disc_layers else None
    except ValueError:
        raise UsageError(f"--disc-layers must be comma-separated block indices, got {disc_layers!r}") from None
    config = stage.DistillConfig(disc_layers=layers,
        method=method, teacher=teacher, latents=latents, init=init, num_outer_steps=m, num_inner_steps=n,
        num_head_blocks=h, iters=iters, lr=lr, batch=batch, micro_batch=micro_batch, rollout=rollout,
        guidance_scale=guidance_scale, gan_weight=gan_weight, t_gamma=t_gamma, student_every=student_every,
        outer_gamma=outer_gamma, u_param=u_param, kd_warmup=kd_warmup, kd_pairs=kd_pairs, grad_clip=grad_clip,
        save_every=save_every,
        log_every=log_every, sample_every=sample_every, num_sample_prompts=num_sample_prompts, stop_after=stop_after,
        checkpointing=checkpointing, log_to=log_to, seed=seed, name=name, lora_rank=lora_rank,
        lora_targets=tuple(lora_targets.split(",")) if lora_targets else None)
    execute(stage, config, home=home, dry_run=dry_run, device=device,
            verify_inputs=verify_inputs)


# --- sample ---------------------------------------------------------------------------------------------------

@app.command(epilog="Examples:\n\n  tmd sample \"a cat surfing\"\n\n"
                    "  tmd sample \"a red circle moving left on a gray background\" --model toy --out clip.mp4\n\n"
                    "  tmd sample --prompts-file prompts.txt --model latest --out clips/\n\n"
                    "  tmd sample \"a cat surfing\" --model tiny-random --m 2 --n 2 --h 1   (student at init)")
@guarded
def sample(
    prompt: Annotated[Optional[str], typer.Argument(help="The text prompt.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Student reference (id, name, latest, path) or a teacher "
                                                      "name/folder; default: the newest student.",
                                                 autocompletion=complete_ref)] = None,
    out: Annotated[Optional[Path], typer.Option(help="mp4 file (one prompt) or folder (several).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="Text file, one prompt per line (batched).")] = None,
    seed: SeedOpt = 0,
    frames: Annotated[Optional[int], typer.Option(help="Frames (4k+1); default: the teacher's.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels; default: the teacher's.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels; default: the teacher's.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 4,
    m: Annotated[Optional[int], typer.Option("--m", help="With a teacher: sample a TMD student built from it at "
                                                        "init with M outer steps (speed checks).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Inner steps N (with a student: overrides training's).")]
    = None,
    h: Annotated[Optional[int], typer.Option("--h", help="With a teacher: head blocks H of the init student.")]
    = None,
    steps: Annotated[Optional[int], typer.Option(help="Teacher sampler steps; default: the teacher's (50).")] = None,
    cfg: Annotated[Optional[float], typer.Option(help="Teacher CFG scale; default: the teacher's (5).")] = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    decoder: DecoderOpt = "auto",
    compile_: CompileOpt = False,
    attention: AttentionOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    dry_run: DryRunOpt = False,
    verify_inputs: VerifyInputsOpt = True,
    json_out: JsonOpt = False,
):
    """Generate videos with a student (TMD Algorithm 1) or a teacher (its own 50-step CFG sampler).

    Prints the mp4 path(s) on stdout; the effective NFE and the time split (text encoder, transformer, VAE decode)
    on stderr.
    """
    from tmdcli.stages import sample as stage

    request = stage.SampleRequest(prompt=prompt, prompts_file=prompts_file, model=model, out=out, seed=seed,
                                  num_frames=frames, height=height, width=width, batch_size=batch_size,
                                  num_outer_steps=m, num_inner_steps=n, num_head_blocks=h, num_steps=steps,
                                  guidance_scale=cfg, home=home, device=device, dtype=dtype, dry_run=dry_run,
                                  verify_inputs=verify_inputs,
                                  speed=_speed(vae_dtype, decoder, compile_, attention, cuda_graphs))
    console = _stderr()
    if dry_run and model in (None, "latest", "student:latest") and not _has_students(home):
        # a recipe's DRY_RUN: the student is made by the distill plan printed before this one
        console.print("[bold]sample[/bold] -> would sample the newest student (not made yet: the distill plan above)")
        return
    plan = stage.plan(request)
    stage.render_plan(plan, console)
    if dry_run:
        return
    from tmdcli.runtime import interrupts

    with interrupts.guard():  # a Ctrl-C lost inside the mp4 writer still ends in exit 130
        result = stage.run(plan, console)
    if json_out:
        print(json.dumps(result.to_dict()))
    else:
        for path in result.paths:
            print(path)


# --- eval -----------------------------------------------------------------------------------------------------
_VB = "VBench suite"


@app.command("eval", epilog="Examples:\n\n"
                            "  tmd eval --model wan2.1-1.3b --model latest --prompts prompts.txt\n\n"
                            "  tmd eval --suite quick --model tiny-random --model latest --prompts prompts.txt "
                            "--teacher-steps 8\n\n"
                            "  tmd eval --suite toy --model toy --model toy@2 --model latest --toy-prompts 16\n\n"
                            "  tmd eval --suite vbench --model wan2.1-1.3b --model student:latest "
                            "--vbench-python ~/vbench-env/bin/python --augmented-prompts aug.tsv")
@guarded
def eval_(
    model: Annotated[list[str], typer.Option("--model", help="Teacher name/folder or student reference; repeat for "
                                                             "each model. NAME@S: teacher NAME with its own sampler "
                                                             "at S steps (e.g. toy@2). The first is the reference "
                                                             "(normally the teacher).", autocompletion=complete_ref,
                                             show_default=False)],
    suite: Annotated[str, typer.Option(help="quick (offline VBench-style metrics), toy (toy-world analyzer on seen "
                                            "and held-out toy captions) or vbench (VBench in its own Python).")]
    = "quick",
    prompts: Annotated[Optional[str], typer.Option(help="quick: text file (one prompt a line) or prompts "
                                                        "artifact.")] = None,
    toy_prompts: Annotated[Optional[int], typer.Option(help="toy: captions per split, train and held-out (default "
                                                            "16).")] = None,
    samples_per_prompt: Annotated[Optional[int], typer.Option(help="Seeds per prompt (default 4 quick, 2 toy, 5 "
                                                                   "vbench).")] = None,
    seed: SeedOpt = 0,
    teacher_steps: Annotated[Optional[int], typer.Option(help="Steps of a teacher's own sampler (default its 50); "
                                                              "NAME@S overrides it per model.")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames (4k+1); default the first model's.",
                                                  rich_help_panel="Size")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height; default the first model's.", rich_help_panel="Size")]
    = None,
    width: Annotated[Optional[int], typer.Option(help="Width; default the first model's.", rich_help_panel="Size")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per sampler batch.")] = 4,
    clip_model: Annotated[Optional[Path], typer.Option(help="quick: local CLIP for the CLIP score (open_clip "
                                                            "checkpoint file or transformers CLIP folder).")] = None,
    clip_arch: Annotated[str, typer.Option(help="open_clip architecture of --clip-model.")] = "ViT-B-32",
    collapse_ratio: Annotated[float, typer.Option(help="Flag mode collapse below this seed-diversity ratio to the "
                                                       "reference.")] = 0.5,
    dimensions: Annotated[Optional[str], typer.Option(help="Comma-separated VBench dimensions (default all 16).",
                                                      rich_help_panel=_VB)] = None,
    augmented_prompts: Annotated[Optional[Path], typer.Option(help="Rewritten prompts: JSON {short: long} or TSV "
                                                                   "lines short<TAB>long.", rich_help_panel=_VB)]
    = None,
    vbench_python: Annotated[Optional[str], typer.Option(envvar="TMD_VBENCH_PYTHON", show_envvar=True,
                                                         help="Python of the VBench environment.",
                                                         rich_help_panel=_VB)] = None,
    vbench_cache: Annotated[Optional[Path], typer.Option(envvar="VBENCH_CACHE_DIR", show_envvar=True,
                                                         help="VBench weights folder (default ~/.cache/vbench).",
                                                         rich_help_panel=_VB)] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the eval artifact.")] = None,
    home: HomeOpt = DEFAULT_HOME,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    decoder: DecoderOpt = "auto",
    compile_: CompileOpt = False,
    attention: AttentionOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    dry_run: DryRunOpt = False,
    verify_inputs: VerifyInputsOpt = True,
):
    """Compare models on the same prompts and seeds -> an eval artifact with a report.

    Writes results.json, report.md (model, effective NFE, metrics, time split), quality_vs_nfe.png, gallery.html
    (clips side by side) and gallery.png (its screenshot, when headless Chromium is installed), keeps the samples,
    prints the table on stderr and the artifact path on stdout. A rerun resumes without regenerating.
    """
    from tmdcli.stages import eval as stage
    from tmdcli.stages.common import execute

    config = stage.EvalConfig(
        models=tuple(model), suite=suite, prompts=prompts, toy_prompts=toy_prompts,
        samples_per_prompt=samples_per_prompt, seed=seed,
        teacher_steps=teacher_steps, num_frames=frames, height=height, width=width,
        clip_model=str(clip_model) if clip_model else None, clip_arch=clip_arch, collapse_ratio=collapse_ratio,
        dimensions=tuple(d.strip() for d in dimensions.split(",") if d.strip()) if dimensions else None,
        augmented_prompts=str(augmented_prompts) if augmented_prompts else None, vbench_python=vbench_python,
        vbench_cache=str(vbench_cache) if vbench_cache else None, dtype=dtype, batch_size=batch_size, name=name,
        **_speed_fields(vae_dtype, decoder, compile_, attention, cuda_graphs))
    execute(stage, config, home=home, dry_run=dry_run, device=device,
            verify_inputs=verify_inputs)


# --- inspection -----------------------------------------------------------------------------------------------
@app.command("ls", epilog="Examples:\n\n  tmd ls\n\n  tmd ls student --json")
@guarded
def list_artifacts(
    kind: Annotated[Optional[str], typer.Argument(help="Only this kind: prompts, videos, latents, student, eval.")]
    = None,
    home: HomeOpt = DEFAULT_HOME,
    json_out: JsonOpt = False,
):
    """List the complete artifacts in the home, newest first."""
    from tmdcli.artifacts.store import KINDS, Store

    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown artifact kind {kind!r}", hint=f"one of: {', '.join(KINDS)}")
    artifacts = Store(home).list(kind)
    if json_out:
        print(json.dumps([{"id": a.id, "kind": a.kind, "name": a.name, "created_at": a.created_at,
                           "path": str(a.path)} for a in artifacts]))
        return
    if not artifacts:
        print(f"no artifacts in {home}", file=sys.stderr)
        return
    from rich.table import Table

    table = Table("id", "name", "stage", "created", "facts", box=None)
    for a in artifacts:
        facts = a.manifest.facts or {}
        brief = ", ".join(f"{k}={facts[k]}" for k in ("teacher", "method", "effective_nfe", "num_items")
                          if k in facts)
        table.add_row(a.id, a.name if a.name != a.id else "", a.manifest.stage, a.created_at[:19], brief)
    from rich.console import Console

    Console(highlight=False).print(table)


@app.command(epilog="Examples:\n\n  tmd show latest\n\n  tmd show student:latest --json")
@guarded
def show(
    ref: RefArg,
    home: HomeOpt = DEFAULT_HOME,
    json_out: JsonOpt = False,
):
    """Show an artifact: manifest, lineage back to the prompt source, facts and metrics."""
    from tmdcli.artifacts.store import Store

    store = Store(home)
    artifact = store.resolve(ref)
    manifest = artifact.manifest.to_dict()
    lineage = [{"id": a.id, "kind": a.kind, "missing": bool(a.missing)} for a in store.lineage(artifact)]
    if json_out:
        print(json.dumps({"path": str(artifact.path), "manifest": manifest, "lineage": lineage}, indent=2))
        return
    out = [f"{artifact.id}  ({artifact.kind}, stage {manifest['stage']} v{manifest['stage_version']})",
           f"  name:     {artifact.name}", f"  path:     {artifact.path}", f"  created:  {manifest['created_at']}",
           f"  files:    {len(manifest['files'])} ({sum(f['bytes'] for f in manifest['files']) / 2**20:.2f} MiB)"]
    for key, value in sorted((manifest.get("facts") or {}).items()):
        if key != "report_table":
            out.append(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    for key, value in sorted((manifest.get("stats") or {}).items()):
        out.append(f"  stats.{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if lineage:
        out.append("  lineage:  " + " <- ".join([artifact.id] + [a["id"] + (" (missing)" if a["missing"] else "")
                                                                  for a in lineage]))
    table = (manifest.get("facts") or {}).get("report_table")
    if table:
        out += ["", table]
    print("\n".join(out))


@app.command(epilog="Example:\n\n  tmd verify latents:latest")
@guarded
def verify(
    ref: RefArg,
    home: HomeOpt = DEFAULT_HOME,
):
    """Recompute every file's sha256 and size against the manifest; exit 1 naming each bad file."""
    from tmdcli.artifacts.store import Store
    from tmdcli.errors import IntegrityError

    store = Store(home)
    artifact = store.resolve(ref)
    problems = store.verify(artifact)
    if problems:
        for problem in problems:
            print(f"bad: {problem}", file=sys.stderr)
        raise IntegrityError(f"{artifact.id}: {len(problems)} file(s) do not match the manifest",
                             hint="regenerate the artifact (delete its folder and rerun the stage)")
    print(f"ok: {artifact.id} ({len(artifact.manifest.files)} files)", file=sys.stderr)
    print(artifact.id)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # a Ctrl-C while the commands are being built, before `guarded` runs: still 130
        _report("interrupted", None)
        sys.exit(130)
