"""Training-step time and peak memory of Stage 1 (TM-MeanFlow) and, with --stage distill, Stage 2.

    python benchmarks/train_step.py --config tiny --out train_step_cpu.json                       # 2-core CPU
    python benchmarks/train_step.py --config toy --out train_step_toy_cpu.json                    # toy shapes
    python benchmarks/train_step.py --config wan1.3b --device cuda --out train_step_gpu.json      # 81x480x832

Random weights (speed and memory do not depend on the values), micro-batch 1, text embeddings of the real shape.
For each setting (checkpointing off and on) it runs `--warmup` then `--iters` full iterations (loss forward,
backward, clip, AdamW step) with bf16 autocast on a GPU, and reports seconds per iteration, peak memory (CUDA:
max_memory_allocated; CPU: the process's peak RSS, which includes everything the process ever held), the FLOP
count of runtime/estimates.py and the achieved TFLOP/s (FLOPs / measured time), next to the --dry-run estimate
of peak memory. The r = s draw decides whether an iteration runs the finite-difference head passes, so the time
averages over iterations drawn as in training.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from _common import sync  # noqa: E402 (benchmarks/ is on sys.path when run as a script)


def build_student(config: str, device, num_head_blocks: int):
    from diffusers import WanTransformer3DModel

    from tmdcli.models.defaults import TINY_TRANSFORMER_CONFIG, WAN21_TRANSFORMER_CONFIGS
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.models.wan import float32_rope

    torch.manual_seed(0)
    if config == "tiny":
        tc, latent, text = dict(TINY_TRANSFORMER_CONFIG), (16, 3, 4, 4), (32, 32)
    elif config == "toy":
        from tmdcli.registry import TOY_BUNDLE_DIR

        tc = json.loads((TOY_BUNDLE_DIR / "transformer" / "config.json").read_text())
        tc = {k: v for k, v in tc.items() if not k.startswith("_")}
        latent, text = (tc["in_channels"], 5, 4, 4), (32, tc["text_dim"])
    else:
        tc, latent, text = dict(WAN21_TRANSFORMER_CONFIGS["wan2.1-1.3b"]), (16, 21, 60, 104), (512, 4096)
    with torch.device(device):
        transformer = WanTransformer3DModel(**tc)
    float32_rope(transformer)
    cfg = StudentConfig(num_head_blocks=min(num_head_blocks, tc["num_layers"] - 1))
    return TMDStudent.from_teacher(transformer, cfg).to(device).train(), tc, latent, text, cfg


def peak_bytes(device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class SavedActivations:
    """Bytes of the tensors autograd keeps for the backward pass (parameters excluded), counted once per storage:
    the activation memory a forward leaves behind, measurable on any device (the CPU has no allocator counter)."""

    def __init__(self, module: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def bench_pretrain(args, device) -> list[dict]:
    from tmdcli.objectives.meanflow import TMMeanFlowParams, tm_meanflow_loss
    from tmdcli.runtime.estimates import WanShape, tm_meanflow_estimate
    from tmdcli.runtime.train_loop import make_adamw, micro_batch_generator

    student, tc, latent, text_shape, cfg = build_student(args.config, device, args.h)
    shape = WanShape.from_config(tc)
    d = 1
    for n in latent:
        d *= n
    params = TMMeanFlowParams(outer_grid=tuple(cfg.outer_grid()), inner_grid=tuple(cfg.inner_grid()), norm_c=d)
    opt = make_adamw(student.parameters(), 3e-5)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, *latent, device=device, generator=g)
    text = torch.randn(1, *text_shape, device=device, generator=g)
    neg = torch.randn(1, *text_shape, device=device, generator=g)
    rows = []
    for checkpointing in args.checkpointing:
        student.checkpointing = checkpointing
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times, saved = [], []
        for it in range(args.warmup + args.iters):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), \
                    SavedActivations(student) as acts:
                loss, _ = tm_meanflow_loss(student, x, text, neg, micro_batch_generator(0, it, 0, device), params)
            saved.append(acts.bytes)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if it >= args.warmup:
                times.append(time.perf_counter() - t0)
        est = tm_meanflow_estimate(shape, latent, num_head_blocks=cfg.num_head_blocks, batch=1, micro_batch=1,
                                   world_size=1, checkpointing=checkpointing, cfg_scale=params.cfg_scale,
                                   r_equals_s_prob=params.r_equals_s_prob, text_tokens=text_shape[0])
        mean = sum(times) / len(times)
        # the estimator's activation model at this run's precision (bf16 autocast on GPU, fp32 on CPU)
        from tmdcli.runtime.estimates import activation_bytes_per_block

        tokens = shape.tokens(latent)
        width = 2 if device.type == "cuda" else 4
        block = activation_bytes_per_block(shape, tokens, width)
        # forward-held: every block's activations, or with checkpointing only each block's input (the backward pass
        # then recomputes one block at a time, which measurably does not add at the peak: docs/bench/
        # train_memory_h200.json)
        est_act = shape.num_blocks * tokens * shape.dim * width if checkpointing else shape.num_blocks * block
        rows.append({"stage": "pretrain-head", "checkpointing": checkpointing,
                     "saved_activation_mib": max(saved) / 2**20, "estimated_activation_mib": est_act / 2**20,
                     "s_per_iter_mean": mean,
                     "s_per_iter_min": min(times), "s_per_iter_max": max(times), "iters": len(times),
                     "peak_gib": peak_bytes(device) / 1024**3, "estimated_peak_gib": est.peak_gib,
                     "flops_per_iter": est.flops_per_iteration,
                     "achieved_tflops": est.flops_per_iteration / mean / 1e12})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_distill(args, device) -> list[dict]:
    """Student step (rollout with N inner steps, and with N = 1 for the rollout overhead) and critic step."""
    import copy

    from tmdcli.models.discriminator import default_disc_layers, discriminator_config_for, count_parameters, \
        discriminator_for
    from tmdcli.objectives.dmd import DMDParams, critic_step_loss, student_step_loss
    from tmdcli.runtime.estimates import WanShape, dmd_estimate
    from tmdcli.runtime.train_loop import make_adamw, micro_batch_generator

    student, tc, latent, text_shape, cfg = build_student(args.config, device, args.h)
    teacher = copy.deepcopy(student.transformer).requires_grad_(False)
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    fake = copy.deepcopy(student.transformer)
    layers = default_disc_layers(tc["num_layers"])
    disc = discriminator_for(tc, layers).to(device)
    shape = WanShape.from_config(tc)
    g = torch.Generator(device=device).manual_seed(0)
    batch = {"latents": torch.randn(1, *latent, device=device, generator=g),
             "text": torch.randn(1, *text_shape, device=device, generator=g),
             "negative": torch.randn(1, *text_shape, device=device, generator=g)}
    params = DMDParams(outer_grid=tuple(cfg.outer_grid()), disc_layers=tuple(layers))
    lora = getattr(args, "lora_rank", 0)
    if lora:  # frozen bases, trained adapters (and the student's fusion / r-embedder)
        from tmdcli.models.lora import DEFAULT_TARGETS, add_lora

        add_lora(student.transformer, lora, DEFAULT_TARGETS, seed=0)
        add_lora(fake, lora, DEFAULT_TARGETS, seed=1)
    opt_s = make_adamw(student.parameters(), 1e-5)
    opt_c = make_adamw(list(fake.parameters()) + list(disc.parameters()), 1e-5)
    rows = []
    for checkpointing in args.checkpointing:
        student.checkpointing = checkpointing
        if checkpointing:
            fake.enable_gradient_checkpointing()
        else:
            fake.disable_gradient_checkpointing()
        for step, inner in (("student", cfg.num_inner_steps), ("student", 1), ("critic", cfg.num_inner_steps)):
            from dataclasses import replace

            student.config = replace(student.config, num_inner_steps=inner)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for it in range(args.warmup + args.iters):
                sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    gen = micro_batch_generator(0, it, 0, device)
                    if step == "student":
                        fake.requires_grad_(False) if not lora else None, disc.requires_grad_(False).eval()
                        loss, _ = student_step_loss(student, teacher, fake, disc, batch, gen, params)
                    else:
                        fake.requires_grad_(True) if not lora else None, disc.requires_grad_(True).train()
                        loss, _ = critic_step_loss(student, teacher, fake, disc, batch, gen, params)
                loss.backward()
                opt = opt_s if step == "student" else opt_c
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                if it >= args.warmup:
                    times.append(time.perf_counter() - t0)
            est = dmd_estimate(shape, latent, num_head_blocks=cfg.num_head_blocks, num_inner_steps=inner,
                               method="tmd", discriminator_params=count_parameters(discriminator_config_for(tc, layers)),
                               last_disc_layer=max(layers), batch=1, micro_batch=1, world_size=1,
                               checkpointing=checkpointing, text_tokens=text_shape[0],
                               critic_state=bool(opt_c.state),  # the student steps run before the first critic step
                               lora_rank=lora)
            mean = sum(times) / len(times)
            rows.append({"stage": "distill", "step": step, "inner_steps": inner, "checkpointing": checkpointing,
                         "lora_rank": lora,
                         "s_per_iter_mean": mean, "s_per_iter_min": min(times), "iters": len(times),
                         "peak_gib": peak_bytes(device) / 1024**3, "estimated_peak_gib": est.step_peaks_gib[step]})
            print(json.dumps(rows[-1]), flush=True)
        by = {(r["step"], r["inner_steps"]): r["s_per_iter_mean"] for r in rows if r["checkpointing"] == checkpointing}
        n = cfg.num_inner_steps
        overhead = by[("student", n)] / by[("student", 1)] - 1.0
        rows.append({"stage": "distill", "rollout_overhead_vs_n1": overhead, "inner_steps": n,
                     "checkpointing": checkpointing})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("tiny", "toy", "wan1.3b"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--h", type=int, default=5, help="head blocks (capped at L - 1)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", default="off,on", help="comma list of off/on")
    p.add_argument("--stage", default="pretrain-head", choices=("pretrain-head", "distill", "both"))
    p.add_argument("--out", default=None)
    p.add_argument("--lora-rank", type=int, default=0, help="distill: LoRA adapters of this rank on student and fake "
                                                            "score blocks (as `tmd distill --lora-rank`)")
    args = p.parse_args()
    args.checkpointing = [c.strip() == "on" for c in args.checkpointing.split(",")]
    device = torch.device(args.device)
    rows = []
    if args.stage in ("pretrain-head", "both"):
        rows += bench_pretrain(args, device)
    if args.stage in ("distill", "both"):
        rows += bench_distill(args, device)
    info = {"benchmark": "train_step", "config": args.config, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
