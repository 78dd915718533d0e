"""Retrain the `toy` teacher bundle from scratch (VAE, latent pool, rectified-flow teacher, eval), resumably.

    python -m tmdcli.toy.train --out DIR [--device auto|cpu|cuda] [--time-budget-s S] ...

Phases (DESIGN.md section 5; WAN.md sections 3-4):
1. VAE: the tiny `AutoencoderKLWan` on freshly rendered data (all combinations, one or two objects), first on
   single frames (shapes are learnt there several times faster), then on 17-frame clips; foreground-weighted
   MSE, a small KL term, and a nearly deterministic posterior at init.
2. Pool: rendered train-split single-object clips, encoded once (latent mode, normalised with the per-channel
   latents_mean/std measured here and stored in the VAE config), plus the frozen text encoder's embeddings of each
   canonical caption and of `--caption-variants` expander rewrites (computed exactly as `WanPipeline` does).
3. Teacher: rectified flow matching, x_t = (1 - t) x + t eps (t = 1 is noise), target v = eps - x, timestep
   1000 t, t ~ logit-normal(0, 1) mixed with 10% uniform, 10% caption dropout to the "" embedding (the CFG null
   condition); AdamW, warm-up then cosine, EMA weights become the bundle transformer.
4. Eval through the real `WanPipeline` (UniPC): VAE reconstructions, teacher at 50 and at 2 steps with CFG.
5. The bundle (diffusers Wan layout + tmd_teacher.json + metrics.json) is written to DIR/bundle.

Resume: checkpoints live in DIR/ckpt (or --ckpt-dir); rerunning the same command continues where it stopped and
skips finished phases. A finished DIR/bundle/metrics.json makes a rerun a no-op (delete DIR/bundle to re-evaluate).
Tensor legend: B batch, C latent channels, T latent frames, F frames, S text tokens, E text width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn

from tmdcli.toy import bundle, grammar, render, warm_start

VAE_BUDGET_SHARE = 0.45  # the VAE bounds everything downstream (teacher samples decode through it)
TWO_OBJECT_PROB_VAE = 0.25
LOGIT_NORMAL_MEAN, LOGIT_NORMAL_STD, UNIFORM_T_PROB = 0.0, 1.0, 0.1
CANONICAL_CAPTION_PROB = 0.5  # else one of the expander rewrites
GUIDANCE_CANDIDATES = (3.0, 5.0, 7.0)
SHIFT_CANDIDATES = (1.0, 2.0, 3.0)
DIVERSITY_PROMPTS, DIVERSITY_SEEDS = 8, 4
CALIBRATION_PROMPTS = 32
EVAL_SEED = 1_000_003


@dataclass
class TrainConfig:
    out: str
    ckpt_dir: str
    device: str
    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_fg_weight: float = 20.0
    vae_image_frac: float = 0.4  # first part of the VAE phase (steps or time) on single frames
    vae_image_batch: int = 32
    vae_init_logvar: float = -8.0
    teacher_steps: int = 30000
    batch: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    pool_size: int = 4000
    caption_variants: int = 16
    stats_clips: int = 2048
    time_budget_s: float | None = None
    eval_prompts: int = 64
    eval_steps: int = 50
    few_steps: int = 2
    calibrate: bool = False
    guidance_scale: float = bundle.TOY_GUIDANCE_SCALE
    flow_shift: float = bundle.TOY_FLOW_SHIFT
    ckpt_every_s: float = 60.0
    ckpt_every_steps: int = 1000
    log_every: int = 200
    cache_pool: bool = True
    vae_share: float = VAE_BUDGET_SHARE
    warm_start: str | None = None  # "bundle" or a bundle folder: start from its weights (toy/warm_start.py)


# ---------------------------------------------------------------------------------------------------------------
# Small utilities: logging, atomic checkpoint folders, schedules
# ---------------------------------------------------------------------------------------------------------------


_LOG_FILE: list[Path] = []  # set by main(): OUT/train.log


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    for path in _LOG_FILE:
        with path.open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")


_STOP_REQUESTED: list[int] = []  # set by SIGINT/SIGTERM: the training loops checkpoint and stop at a step boundary


def _request_stop(signum, frame) -> None:
    if _STOP_REQUESTED:
        raise KeyboardInterrupt
    _STOP_REQUESTED.append(signum)
    log("[train] stop requested: checkpointing at the end of this step (signal again to abort at once)")


def _check_stop(save) -> None:
    if _STOP_REQUESTED:
        save()
        raise KeyboardInterrupt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_dir_atomic(final: Path, write) -> None:
    """Write a checkpoint folder via a sibling tmp folder and renames; a crash leaves the old or the new one."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _existing_dir(final: Path) -> Path | None:
    """The checkpoint folder, or its previous version when a crash hit between the two renames."""
    for d in (final, final.with_name(final.name + ".old")):
        if (d / "state.json").is_file():
            return d
    return None


def lr_at(step: int, progress: float, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from base_lr to base_lr / 10 over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return base_lr * warm * cos


def _save_training_state(d: Path, model_sd: dict[str, torch.Tensor], optimizer, generator: torch.Generator,
                         state: dict[str, Any], extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, str(d / "model.safetensors"))
    for name, tensors in (extra_tensors or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(d / f"{name}.safetensors"))
    save_file({"generator": generator.get_state()}, str(d / "rng.safetensors"))
    torch.save(optimizer.state_dict(), d / "optim.pt")  # optimizer state only; loaded with weights_only=True
    (d / "state.json").write_text(json.dumps(state, indent=2))


def _load_training_state(d: Path, optimizer, generator: torch.Generator, device: torch.device):
    from safetensors.torch import load_file

    model_sd = load_file(str(d / "model.safetensors"), device=str(device))
    optimizer.load_state_dict(torch.load(d / "optim.pt", map_location=device, weights_only=True))
    generator.set_state(load_file(str(d / "rng.safetensors"))["generator"])
    return model_sd, json.loads((d / "state.json").read_text())


def _load_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def _restore(ckpt: Path, model, optimizer, generator: torch.Generator, device: torch.device) -> tuple[int, float]:
    """Load the newest checkpoint in `ckpt` into model/optimizer/generator; returns (step, elapsed_s)."""
    d = _existing_dir(ckpt)
    if d is None:
        raise RuntimeError(f"no checkpoint in {ckpt} to restore")
    model_sd, state = _load_training_state(d, optimizer, generator, device)
    model.load_state_dict(model_sd)
    return state["step"], state["elapsed_s"]


def _optimizer(params, lr: float, weight_decay: float, device: torch.device):
    kwargs = dict(lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling on the device (no host round trips), rendered with the toy renderer
# ---------------------------------------------------------------------------------------------------------------


_TABLES: dict[str, dict[str, torch.Tensor]] = {}


def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Motion directions and palettes on `device`, built once (a per-step host-to-device copy would sync CUDA)."""
    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = dict(
            directions=torch.tensor([grammar.MOTION_DIRECTIONS[m] for m in grammar.MOTIONS], device=device),
            palette=render.palette(device), background=render.background_palette(device))
    return _TABLES[key]


def _combo_table(combos, device) -> torch.Tensor:
    """[K, 3] long (colour index, shape index, motion index) of a list of grammar combos."""
    rows = [(grammar.COLOUR_NAMES.index(c), grammar.SHAPES.index(s), grammar.MOTIONS.index(m)) for c, s, m in combos]
    return torch.tensor(rows, dtype=torch.long, device=device)


def sample_objects(combos: torch.Tensor, n: int, g: torch.Generator, *, num_frames: int = grammar.NUM_FRAMES,
                   size: int = grammar.FRAME_SIZE) -> dict[str, torch.Tensor]:
    """n objects with combos drawn uniformly from `combos` [K, 3], placed like grammar.start_range (inside all frames)."""
    dev = combos.device
    pick = torch.randint(combos.shape[0], (n,), device=dev, generator=g)
    colour, shape, motion = combos[pick].unbind(1)
    dirs = _tables(dev)["directions"][motion]  # [n, 2]
    velocity = dirs * grammar.SPEED_PX_PER_FRAME
    half = grammar.MIN_HALF_SIZE + (grammar.MAX_HALF_SIZE - grammar.MIN_HALF_SIZE) * torch.rand(
        n, device=dev, generator=g)
    travel = velocity * (num_frames - 1)
    low = grammar.EDGE_MARGIN_PX + half[:, None] - travel.clamp(max=0.0)
    high = size - grammar.EDGE_MARGIN_PX - half[:, None] - travel.clamp(min=0.0)
    start = low + (high - low) * torch.rand(n, 2, device=dev, generator=g)
    return dict(pick=pick, colour=colour, shape=shape, motion=motion, x0=start[:, 0], y0=start[:, 1],
                vx=velocity[:, 0], vy=velocity[:, 1], half=half)


def render_objects(objects: list[dict[str, torch.Tensor]], bg: torch.Tensor, present: list[torch.Tensor] | None = None,
                   *, num_frames: int = grammar.NUM_FRAMES, size: int = grammar.FRAME_SIZE):
    """Clips [B, 3, F, H, W] in [-1, 1] and the foreground coverage [B, 1, F, H, W] in [0, 1]."""
    dev = bg.device
    pal, bg_pal = _tables(dev)["palette"], _tables(dev)["background"]
    layers, cover = [], None
    for k, o in enumerate(objects):
        alpha = render.object_alpha(o["shape"], o["x0"], o["y0"], o["vx"], o["vy"], o["half"],
                                    num_frames=num_frames, size=size)
        if present is not None:
            alpha = alpha * present[k].view(-1, 1, 1, 1)
        layers.append((alpha, pal[o["colour"]]))
        cover = alpha if cover is None else torch.maximum(cover, alpha)
    return render.composite(bg_pal[bg], layers), cover.unsqueeze(1)


def vae_batch(n: int, g: torch.Generator, combos: torch.Tensor, num_frames: int = grammar.NUM_FRAMES):
    """Training clips for the VAE: any combination, 1 or 2 objects (overlap allowed), any background.

    num_frames=1 gives single images (the first, image-only chunk of the causal VAE).
    """
    dev = combos.device
    objs = [sample_objects(combos, n, g, num_frames=num_frames), sample_objects(combos, n, g, num_frames=num_frames)]
    present = [torch.ones(n, device=dev), (torch.rand(n, device=dev, generator=g) < TWO_OBJECT_PROB_VAE).float()]
    bg = torch.randint(len(grammar.BACKGROUND_NAMES), (n,), device=dev, generator=g)
    return render_objects(objs, bg, present, num_frames=num_frames)


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: VAE
# ---------------------------------------------------------------------------------------------------------------


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` without its final clamp (diffusers 0.42.1), so saturated pixels keep a gradient."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                               first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(out, 2)


def init_posterior(vae, logvar: float) -> None:
    """Start the posterior nearly deterministic (std = exp(logvar / 2)).

    With the default init the posterior std is about 1, comparable to the spread of the latent means, and with a
    small KL weight it shrinks only slowly: the decoder then learns from noisy latents and renders blurred blobs,
    which the analyzer cannot tell apart (measured: every shape read as a circle after 800 steps).
    """
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.z_dim:] = logvar


def vae_loss(vae, x: torch.Tensor, cover: torch.Tensor, g: torch.Generator, cfg: TrainConfig):
    """Foreground-weighted MSE (weight 1 + w_fg * coverage) + kl_weight * mean per-element KL; returns (loss, mse)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, device=x.device, generator=g)
    x_rec = decode_unclamped(vae, z)
    weight = 1.0 + cfg.vae_fg_weight * cover
    se = (x_rec - x).pow(2)
    rec = (weight * se).mean() / weight.mean()
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
    return rec + cfg.vae_kl_weight * kl, se.mean()


def train_vae(cfg: TrainConfig, vae, device: torch.device, budget_s: float | None, *,
              warm: bool = False) -> dict[str, Any]:
    """Phase 1. bf16 autocast on CUDA; a non-finite loss restores the last checkpoint and continues in float32.

    `warm`: the VAE holds trained weights (--warm-start), so its posterior is not re-initialised.
    """
    ckpt = Path(cfg.ckpt_dir) / "vae"
    g = torch.Generator(device).manual_seed(cfg.seed * 7919 + 11)
    vae.train().requires_grad_(True)
    opt = _optimizer(vae.parameters(), cfg.vae_lr, 0.0, device)
    step, elapsed_before, use_bf16 = 0, 0.0, device.type == "cuda"
    if _existing_dir(ckpt) is not None:
        step, elapsed_before = _restore(ckpt, vae, opt, g, device)
        log(f"[vae] resuming at step {step}")
    elif not warm:
        init_posterior(vae, cfg.vae_init_logvar)
    combos = _combo_table(grammar.ALL_COMBOS, device)
    t0 = last_ckpt = time.time()
    start_step, loss_acc, n_acc, last = step, torch.zeros((), device=device), 0, {}

    def save():
        _sync(device)
        state = dict(step=step, elapsed_s=elapsed_before + time.time() - t0, **last)
        _write_dir_atomic(ckpt, lambda d: _save_training_state(d, vae.state_dict(), opt, g, state))

    if _existing_dir(ckpt) is None:
        save()  # something to fall back to if the loss diverges
    while step < cfg.vae_steps:
        _check_stop(save)
        elapsed = time.time() - t0
        if budget_s is not None and elapsed >= budget_s:
            log(f"[vae] time budget reached at step {step}")
            break
        progress = max(step / cfg.vae_steps, (elapsed / budget_s) if budget_s else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, cfg.vae_lr, min(100, cfg.warmup_steps))
        image_mode = progress < cfg.vae_image_frac
        if image_mode:
            x, cover = vae_batch(cfg.vae_image_batch, g, combos, num_frames=1)
        else:
            x, cover = vae_batch(cfg.vae_batch, g, combos)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, mse = vae_loss(vae, x, cover, g, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        loss_acc += mse.detach().float()
        n_acc += 1
        due_log = step % cfg.log_every == 0 or step == cfg.vae_steps
        due_ckpt = time.time() - last_ckpt > cfg.ckpt_every_s or step % cfg.ckpt_every_steps == 0
        if (due_log or due_ckpt) and not bool(torch.isfinite(loss_acc)):
            log(f"[vae] non-finite loss near step {step}: restoring the last checkpoint, continuing in float32")
            step, _ = _restore(ckpt, vae, opt, g, device)
            use_bf16, n_acc = False, 0
            loss_acc.zero_()
            continue
        if due_log:
            mse_mean = float(loss_acc) / n_acc
            loss_acc.zero_()
            n_acc = 0
            rate = (step - start_step) / max(1e-9, time.time() - t0)
            last = dict(mse=mse_mean, psnr_train=10 * math.log10(4.0 / max(mse_mean, 1e-12)), steps_per_s=rate)
            log(f"[vae] step {step} ({'images' if image_mode else 'clips'}) mse {mse_mean:.5f} "
                f"psnr {last['psnr_train']:.2f} dB {rate:.2f} steps/s")
        if due_ckpt:
            save()
            last_ckpt = time.time()
    save()
    vae.eval().requires_grad_(False)
    return dict(steps=step, steps_this_run=step - start_step, wall_s=time.time() - t0, bf16=use_bf16,
                elapsed_total_s=elapsed_before + time.time() - t0, **last)


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: the latent + caption pool
# ---------------------------------------------------------------------------------------------------------------


def train_captions() -> list[str]:
    """Canonical captions of every train-split (combo, background); index = combo index * 4 + background index."""
    return [grammar.caption_of_spec(grammar.CaptionSpec(objects=(c,), background=bg))
            for c in grammar.TRAIN_COMBOS for bg in grammar.BACKGROUND_NAMES]


@torch.no_grad()
def encode_text(pipe, prompts: list[str], device: torch.device, chunk: int = 512) -> torch.Tensor:
    """[N, S, E] float32, exactly `WanPipeline._get_t5_prompt_embeds` (cut to true length, zero-padded)."""
    out = [pipe._get_t5_prompt_embeds(prompt=prompts[i:i + chunk], max_sequence_length=bundle.TOY_MAX_SEQUENCE_LENGTH,
                                      device=device, dtype=torch.float32) for i in range(0, len(prompts), chunk)]
    return torch.cat(out)


@torch.no_grad()
def encode_latent_mode(vae, clips: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([vae.encode(clips[i:i + chunk]).latent_dist.mode() for i in range(0, clips.shape[0], chunk)])


def apply_latent_stats(vae, stats: dict[str, Any]) -> None:
    """Store the measured per-channel latent mean/std in the VAE config, where WanPipeline reads them."""
    vae.register_to_config(latents_mean=list(stats["latents_mean"]), latents_std=list(stats["latents_std"]))


@torch.no_grad()
def build_pool(cfg: TrainConfig, comps: dict[str, Any], pipe, device: torch.device) -> dict[str, Any]:
    """Render + encode `pool_size` train-split single-object clips; measure latent stats; embed the captions."""
    vae = comps["vae"]
    ckpt = Path(cfg.ckpt_dir)
    stats_path, pool_path = ckpt / "vae_stats.json", ckpt / "pool.safetensors"
    chunk = 1024 if device.type == "cuda" else 32
    t0 = time.time()
    if cfg.cache_pool and pool_path.is_file():
        from safetensors.torch import load_file

        cached = load_file(str(pool_path), device=str(device))
        lat_raw, cap = cached["latents"], cached["caption_id"]
        log(f"[pool] loaded {lat_raw.shape[0]} cached latents")
    else:
        g = torch.Generator(device).manual_seed(cfg.seed * 7919 + 23)
        combos = _combo_table(grammar.TRAIN_COMBOS, device)
        lats, caps = [], []
        for i in range(0, cfg.pool_size, chunk):
            n = min(chunk, cfg.pool_size - i)
            obj = sample_objects(combos, n, g)
            bg = torch.randint(len(grammar.BACKGROUND_NAMES), (n,), device=device, generator=g)
            clips, _ = render_objects([obj], bg)
            lats.append(vae.encode(clips).latent_dist.mode())
            caps.append(obj["pick"] * len(grammar.BACKGROUND_NAMES) + bg)
        lat_raw, cap = torch.cat(lats), torch.cat(caps)
        if cfg.cache_pool:
            from safetensors.torch import save_file

            save_file({"latents": lat_raw.cpu(), "caption_id": cap.cpu()}, str(pool_path) + ".tmp")
            os.replace(str(pool_path) + ".tmp", pool_path)
    # latents_mean/std: per channel over the first `stats_clips` clips, fixed once and stored with the VAE
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
    else:
        sample = lat_raw[: cfg.stats_clips].transpose(0, 1).reshape(lat_raw.shape[1], -1).double()
        stats = dict(latents_mean=sample.mean(1).tolist(), latents_std=sample.std(1).clamp(min=1e-6).tolist(),
                     clips=int(min(cfg.stats_clips, lat_raw.shape[0])))
        stats_path.write_text(json.dumps(stats, indent=2))
    apply_latent_stats(vae, stats)
    mean = torch.tensor(stats["latents_mean"], device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(stats["latents_std"], device=device).view(1, -1, 1, 1, 1)
    latents = ((lat_raw - mean) / std).float().contiguous()
    # Caption embeddings: [num canonical captions, 1 + variants, S, E]; variant 0 is the canonical caption
    canon = train_captions()
    texts = []
    for j, c in enumerate(canon):
        texts += [c] + [grammar.expand_caption(c, seed=k) for k in range(cfg.caption_variants)]
    emb = encode_text(pipe, texts, device).view(len(canon), 1 + cfg.caption_variants, bundle.TOY_MAX_SEQUENCE_LENGTH, -1)
    null = encode_text(pipe, [bundle.TOY_NEGATIVE_PROMPT], device)[0]
    log(f"[pool] {latents.shape[0]} clips, latent {tuple(latents.shape[1:])}, {len(texts)} captions, "
        f"{time.time() - t0:.1f} s")
    return dict(latents=latents, caption_id=cap, emb=emb, null=null, stats=stats, wall_s=time.time() - t0)


# ---------------------------------------------------------------------------------------------------------------
# Phase 3: the teacher (rectified flow matching)
# ---------------------------------------------------------------------------------------------------------------


def sample_t(n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """t in (0, 1): logit-normal(LOGIT_NORMAL_MEAN, LOGIT_NORMAL_STD), with probability UNIFORM_T_PROB uniform."""
    logit_normal = torch.sigmoid(LOGIT_NORMAL_MEAN + LOGIT_NORMAL_STD * torch.randn(n, device=device, generator=g))
    uniform = torch.rand(n, device=device, generator=g)
    use_uniform = torch.rand(n, device=device, generator=g) < UNIFORM_T_PROB
    return torch.where(use_uniform, uniform, logit_normal)


def flow_matching_batch(pool: dict[str, Any], n: int, g: torch.Generator, cfg: TrainConfig):
    """(x_t, 1000 t, text, v) for one batch: x_t = (1 - t) x + t eps and v = eps - x."""
    lat, dev = pool["latents"], pool["latents"].device
    idx = torch.randint(lat.shape[0], (n,), device=dev, generator=g)
    x = lat[idx]
    num_variants = pool["emb"].shape[1]
    variant = torch.randint(1, max(2, num_variants), (n,), device=dev, generator=g).clamp(max=num_variants - 1)
    variant = torch.where(torch.rand(n, device=dev, generator=g) < CANONICAL_CAPTION_PROB, 0, variant)
    text = pool["emb"][pool["caption_id"][idx], variant]
    drop = torch.rand(n, device=dev, generator=g) < cfg.caption_dropout
    text = torch.where(drop[:, None, None], pool["null"].expand_as(text), text)
    t = sample_t(n, g, dev)
    eps = torch.randn(x.shape, device=dev, generator=g)
    t_ = t.view(-1, 1, 1, 1, 1)
    return (1.0 - t_) * x + t_ * eps, 1000.0 * t, text, eps - x


def train_teacher(cfg: TrainConfig, transformer, pool: dict[str, Any], device: torch.device,
                  budget_s: float | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Phase 3; returns the EMA weights (a state dict) and the phase summary."""
    ckpt = Path(cfg.ckpt_dir) / "teacher"
    g = torch.Generator(device).manual_seed(cfg.seed * 7919 + 37)
    transformer.train().requires_grad_(True)
    names, params = zip(*transformer.named_parameters())
    opt = _optimizer(list(params), cfg.lr, cfg.weight_decay, device)
    ema = [p.detach().clone().float() for p in params]
    step, elapsed_before, history, use_bf16, budget_stop = 0, 0.0, [], device.type == "cuda", False

    def restore() -> int:
        nonlocal history
        restored_step, _ = _restore(ckpt, transformer, opt, g, device)
        ema_sd = _load_tensors(_existing_dir(ckpt) / "ema.safetensors", device)
        for e, n in zip(ema, names):
            e.copy_(ema_sd[n])
        history = list(json.loads((_existing_dir(ckpt) / "state.json").read_text()).get("history", []))
        return restored_step

    if _existing_dir(ckpt) is not None:
        step = restore()
        elapsed_before = json.loads((_existing_dir(ckpt) / "state.json").read_text())["elapsed_s"]
        log(f"[teacher] resuming at step {step}")
    t0 = last_ckpt = time.time()
    start_step, loss_acc, n_acc, last = step, torch.zeros((), device=device), 0, {}

    def save():
        _sync(device)
        state = dict(step=step, elapsed_s=elapsed_before + time.time() - t0, history=history[-50:], **last)
        ema_sd = {n: e for n, e in zip(names, ema)}
        _write_dir_atomic(ckpt, lambda d: _save_training_state(d, transformer.state_dict(), opt, g, state,
                                                                {"ema": ema_sd}))

    if _existing_dir(ckpt) is None:
        save()  # something to fall back to if the loss diverges
    while step < cfg.teacher_steps:
        _check_stop(save)
        elapsed = time.time() - t0
        if budget_s is not None and elapsed >= budget_s:
            log(f"[teacher] time budget reached at step {step}")
            budget_stop = True
            break
        progress = max(step / cfg.teacher_steps, (elapsed / budget_s) if budget_s else 0.0)
        lr = lr_at(step, progress, cfg.lr, cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x_t, timestep, text, v = flow_matching_batch(pool, cfg.batch, g, cfg)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        loss = Fn.mse_loss(pred.float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        loss_acc += loss.detach()
        n_acc += 1
        due_log = step % cfg.log_every == 0 or step == cfg.teacher_steps
        due_ckpt = time.time() - last_ckpt > cfg.ckpt_every_s or step % cfg.ckpt_every_steps == 0
        if (due_log or due_ckpt) and not bool(torch.isfinite(loss_acc)):
            log(f"[teacher] non-finite loss near step {step}: restoring the last checkpoint, continuing in float32")
            step = restore()
            use_bf16, n_acc = False, 0
            loss_acc.zero_()
            continue
        if due_log:
            mean_loss = float(loss_acc) / n_acc
            loss_acc.zero_()
            n_acc = 0
            rate = (step - start_step) / max(1e-9, time.time() - t0)
            last = dict(loss=mean_loss, steps_per_s=rate)
            history.append([step, round(mean_loss, 5)])
            log(f"[teacher] step {step} loss {mean_loss:.4f} lr {lr:.2e} {rate:.2f} steps/s")
        if due_ckpt:
            save()
            last_ckpt = time.time()
    save()
    transformer.eval().requires_grad_(False)
    summary = dict(steps=step, steps_this_run=step - start_step, wall_s=time.time() - t0, budget_stop=budget_stop,
                   bf16=use_bf16, elapsed_total_s=elapsed_before + time.time() - t0, loss_history=history, **last)
    return {n: e for n, e in zip(names, ema)}, summary


# ---------------------------------------------------------------------------------------------------------------
# Phase 4: evaluation through WanPipeline
# ---------------------------------------------------------------------------------------------------------------


def scene_for_caption(text: str, rng) -> grammar.Scene:
    """A ground-truth scene for a single-object canonical caption, placed like grammar.sample_scenes."""
    spec = grammar.parse_caption(text)
    objs = []
    for colour, shape, motion in spec.objects:
        half = rng.uniform(grammar.MIN_HALF_SIZE, grammar.MAX_HALF_SIZE)
        (xl, xh), (yl, yh) = grammar.start_range(motion, half, num_frames=grammar.NUM_FRAMES,
                                                 size=grammar.FRAME_SIZE)
        objs.append(grammar.ToyObject(shape=shape, colour=colour, motion=motion, x0=rng.uniform(xl, xh),
                                      y0=rng.uniform(yl, yh), size=half))
    return grammar.Scene(objects=tuple(objs), background=spec.background)


def pick_captions(split: str, k: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    import random

    pool = [c for c in grammar.all_captions(split) if c not in exclude]
    rng = random.Random(seed)
    return rng.sample(pool, min(k, len(pool))) if k <= len(pool) else [rng.choice(pool) for _ in range(k)]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, shift: float,
             chunk: int = 128) -> torch.Tensor:
    """Clips [B, 3, F, H, W] in [-1, 1] (CPU float32) from the real WanPipeline, UniPC, CFG with the "" prompt."""
    pipe.scheduler = bundle.make_scheduler(shift)
    out = []
    for i in range(0, len(prompts), chunk):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + chunk]]
        frames = pipe(prompt=prompts[i:i + chunk], negative_prompt=bundle.TOY_NEGATIVE_PROMPT,
                      height=bundle.TOY_HEIGHT, width=bundle.TOY_WIDTH, num_frames=bundle.TOY_NUM_FRAMES,
                      num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt",
                      max_sequence_length=bundle.TOY_MAX_SEQUENCE_LENGTH).frames  # [B, F, 3, H, W] in [0, 1]
        out.append(frames.permute(0, 2, 1, 3, 4).float().cpu() * 2.0 - 1.0)
    return torch.cat(out)


def _adherence(analyzer, clips: torch.Tensor, specs, analyses=None) -> dict[str, float]:
    analyses = analyzer.analyze_clips(clips) if analyses is None else analyses
    return {k: float(v) for k, v in analyzer.adherence(analyses, specs).items()}


@torch.no_grad()
def eval_vae(vae, k: int, device: torch.device, analyzer) -> dict[str, Any]:
    scenes = grammar.sample_scenes(k, seed=EVAL_SEED, split="heldout")
    x = render.render_scenes(scenes, device=device)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mode()).sample for i in range(0, k, 256)])
    mse = (rec - x).pow(2).flatten(1).mean(1)
    specs = [grammar.spec_of(s) for s in scenes]
    return dict(num_clips=k, psnr=float((10 * torch.log10(4.0 / mse.clamp(min=1e-12))).mean()),
                mse=float(mse.mean()), adherence=_adherence(analyzer, rec.float().cpu(), specs),
                adherence_ground_truth=_adherence(analyzer, x.float().cpu(), specs))


def eval_teacher(pipe, prompts: dict[str, list[str]], gt: dict[str, torch.Tensor], *, steps: int, guidance: float,
                 shift: float, analyzer) -> dict[str, Any]:
    t0 = time.time()
    out: dict[str, Any] = dict(steps=steps, guidance_scale=guidance, flow_shift=shift)
    for split, caps in prompts.items():
        seeds = [EVAL_SEED + i for i in range(len(caps))]
        clips = generate(pipe, caps, seeds, steps=steps, guidance=guidance, shift=shift)
        analyses = analyzer.analyze_clips(clips)
        out[split] = dict(num_prompts=len(caps),
                          adherence=_adherence(analyzer, clips, [grammar.parse_caption(c) for c in caps], analyses),
                          frechet=float(analyzer.frechet_distance(analyzer.clip_features(clips, analyses),
                                                                  gt[split + "_features"])))
    # seed diversity: DIVERSITY_PROMPTS seen captions x DIVERSITY_SEEDS seeds
    caps = prompts["seen"][:DIVERSITY_PROMPTS]
    rep = [c for c in caps for _ in range(DIVERSITY_SEEDS)]
    seeds = [EVAL_SEED + 7 * i + j for i in range(len(caps)) for j in range(DIVERSITY_SEEDS)]
    clips = generate(pipe, rep, seeds, steps=steps, guidance=guidance, shift=shift)
    groups = [clips[i * DIVERSITY_SEEDS:(i + 1) * DIVERSITY_SEEDS] for i in range(len(caps))]
    out["seed_diversity"] = float(analyzer.seed_diversity(groups))
    out["wall_s"] = time.time() - t0
    return out


def calibrate(pipe, analyzer, k: int, exclude: set[str], steps: int) -> tuple[float, float, dict[str, float]]:
    """Pick (guidance, shift) by adherence on seen captions that the reported eval does not use (ties: lowest)."""
    caps = pick_captions("train", k, EVAL_SEED + 1, exclude)
    seeds = [EVAL_SEED + 100 + i for i in range(len(caps))]
    specs = [grammar.parse_caption(c) for c in caps]
    scores = {}
    for shift in SHIFT_CANDIDATES:
        for guidance in GUIDANCE_CANDIDATES:
            clips = generate(pipe, caps, seeds, steps=steps, guidance=guidance, shift=shift)
            scores[f"g{guidance}_s{shift}"] = _adherence(analyzer, clips, specs)["all"]
    best = max(scores, key=lambda key: scores[key])
    guidance, shift = (float(v) for v in best[1:].split("_s"))
    return guidance, shift, scores


def evaluate(cfg: TrainConfig, comps: dict[str, Any], device: torch.device) -> tuple[dict[str, Any], float, float]:
    """All eval numbers; returns (metrics, guidance, shift) with the calibrated or configured sampling defaults."""
    import random

    from diffusers import WanPipeline

    from tmdcli.toy import analyzer

    t0 = time.time()
    k = cfg.eval_prompts
    metrics: dict[str, Any] = {}

    def section(name: str, fn):
        """Run one eval section; an error is recorded in the metrics instead of losing the other sections."""
        try:
            metrics[name] = fn()
            log(f"[eval] {name} {json.dumps(metrics[name])}")
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            metrics[name] = dict(error=f"{type(exc).__name__}: {exc}")

    section("vae", lambda: eval_vae(comps["vae"], k, device, analyzer))
    pipe = WanPipeline(tokenizer=comps["tokenizer"], text_encoder=comps["text_encoder"], vae=comps["vae"],
                       scheduler=comps["scheduler"], transformer=comps["transformer"])
    pipe.set_progress_bar_config(disable=True)
    prompts = dict(seen=pick_captions("train", k, EVAL_SEED), heldout=pick_captions("heldout", k, EVAL_SEED))
    rng = random.Random(EVAL_SEED)
    gt = {s: render.render_scenes([scene_for_caption(c, rng) for c in caps]).float() for s, caps in prompts.items()}
    gt.update({f"{s}_features": analyzer.clip_features(gt[s]) for s in prompts})
    sampling = dict(guidance_scale=cfg.guidance_scale, flow_shift=cfg.flow_shift)
    if cfg.calibrate:
        def run_calibration():
            guidance, shift, scores = calibrate(pipe, analyzer, CALIBRATION_PROMPTS, set(prompts["seen"]),
                                                cfg.eval_steps)
            sampling.update(guidance_scale=guidance, flow_shift=shift)
            return dict(scores=scores, guidance_scale=guidance, flow_shift=shift, num_prompts=CALIBRATION_PROMPTS)

        section("calibration", run_calibration)
    guidance, shift = sampling["guidance_scale"], sampling["flow_shift"]
    for name, steps in (("teacher", cfg.eval_steps), ("teacher_few_step", cfg.few_steps)):
        section(name, lambda steps=steps: eval_teacher(pipe, prompts, gt, steps=steps, guidance=guidance,
                                                       shift=shift, analyzer=analyzer))

    def reference():
        # what a perfect generator scores: ground-truth renders, and their position-only diversity per caption
        caps = prompts["seen"][:DIVERSITY_PROMPTS]
        groups = [render.render_scenes([scene_for_caption(c, rng) for _ in range(DIVERSITY_SEEDS)]) for c in caps]
        return dict(seen_adherence=_adherence(analyzer, gt["seen"], prompts["seen"]),
                    heldout_adherence=_adherence(analyzer, gt["heldout"], prompts["heldout"]),
                    seed_diversity=float(analyzer.seed_diversity(groups)))

    section("ground_truth", reference)
    metrics["eval_wall_s"] = time.time() - t0
    return metrics, guidance, shift


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _acceptance(m: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance thresholds, evaluated (None where a number is missing)."""
    def get(*keys):
        cur = m
        for key in keys:
            if not isinstance(cur, dict) or key not in cur:
                return None
            cur = cur[key]
        return cur

    vae = get("vae", "adherence", "all")
    seen, held = get("teacher", "seen", "adherence", "all"), get("teacher", "heldout", "adherence", "all")
    div = get("teacher", "seed_diversity")
    few_seen, few_fd = get("teacher_few_step", "seen", "adherence", "all"), get("teacher_few_step", "seen", "frechet")
    fd = get("teacher", "seen", "frechet")
    few_worse = None
    if None not in (seen, few_seen, fd, few_fd):
        few_worse = bool(few_seen <= seen - 0.2 or few_fd >= 2.0 * fd)
    return dict(vae_adherence_ge_0_95=None if vae is None else vae >= 0.95,
                teacher_seen_ge_0_90=None if seen is None else seen >= 0.90,
                teacher_heldout_ge_0_80=None if held is None else held >= 0.80,
                seed_diversity_gt_0=None if div is None else div > 0.0,
                few_step_clearly_worse=few_worse)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, torch.device]:
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu")
    gpu = dev == "cuda"
    # On a GPU the time budget is meant to bind (step counts are upper bounds); on CPU the step counts do.
    defaults = dict(vae_steps=20000 if gpu else 3000, vae_batch=64 if gpu else 8, vae_image_batch=256 if gpu else 32,
                    teacher_steps=200000 if gpu else 30000, batch=1024 if gpu else 32, lr=1e-3 if gpu else 5e-4,
                    pool_size=50000 if gpu else 4000, calibrate=gpu, cache_pool=not gpu)
    out = Path(args.out)
    values = dict(out=str(out), ckpt_dir=str(Path(args.ckpt_dir) if args.ckpt_dir else out / "ckpt"), device=dev)
    for key, default in defaults.items():
        given = getattr(args, key, None)
        values[key] = default if given is None else given
    for key in ("seed", "time_budget_s", "eval_prompts", "vae_lr", "eval_steps", "caption_variants",
                "stats_clips", "log_every", "ckpt_every_s", "guidance_scale", "flow_shift", "vae_share",
                "vae_image_frac", "warm_start"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return TrainConfig(**values), torch.device(dev)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tmdcli.toy.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m tmdcli.toy.train --out toy-run --device cuda --time-budget-s 400\n"
               "  python -m tmdcli.toy.train --out toy-run --device cpu      # hours; rerun to resume")
    p.add_argument("--out", required=True, help="run folder: ckpt/, bundle/, summary.json")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default OUT/ckpt)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--vae-batch", type=int, default=None)
    p.add_argument("--vae-lr", type=float, default=None)
    p.add_argument("--vae-image-batch", type=int, default=None, help="batch of the single-frame VAE steps")
    p.add_argument("--vae-image-frac", type=float, default=None,
                   help="share of the VAE phase trained on single frames first (default 0.4)")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="teacher batch size")
    p.add_argument("--lr", type=float, default=None, help="teacher learning rate")
    p.add_argument("--pool-size", type=int, default=None, help="train clips encoded for the teacher")
    p.add_argument("--caption-variants", type=int, default=None, help="expander rewrites per caption")
    p.add_argument("--stats-clips", type=int, default=None, help="clips for latents_mean/std")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="training wall time, eval excluded (VAE gets --vae-share of it, the teacher the rest)")
    p.add_argument("--vae-share", type=float, default=None, help="VAE share of --time-budget-s (default 0.45)")
    p.add_argument("--eval-prompts", type=int, default=None, help="prompts per split (>= 64 for acceptance)")
    p.add_argument("--eval-steps", type=int, default=None, help="teacher sampling steps for eval (default 50)")
    p.add_argument("--calibrate", dest="calibrate", action="store_true", default=None,
                   help="pick guidance/shift on separate seen prompts (default on CUDA)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--flow-shift", type=float, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 can be much faster on a busy 2-core box)")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--ckpt-every-s", type=float, default=None)
    p.add_argument("--warm-start", default=None, metavar="bundle|DIR",
                   help="start from a finished bundle's weights (`bundle`: the committed tmdcli/toy/weights; or a "
                        "previous run's OUT/bundle): the VAE trains until its bar holds, then the teacher; "
                        "metrics.json's training.totals adds up the runs")
    args = p.parse_args(argv)
    if args.warm_start is not None:
        from tmdcli.toy.warm_start import resolve_source

        try:
            resolve_source(args.warm_start)
        except ValueError as exc:
            p.error(str(exc))  # exit 2 with the usage line
    return args


def main(argv: list[str] | None = None) -> int:
    import signal

    _STOP_REQUESTED.clear()
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        return _run(parse_args(argv))
    except KeyboardInterrupt:
        log("[train] interrupted; the last checkpoint is kept, rerun the same command to continue")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, device = resolve_config(args)
    out, ckpt = Path(cfg.out), Path(cfg.ckpt_dir)
    bundle_dir = out / "bundle"
    if (bundle_dir / "metrics.json").is_file():
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        log(f"[train] {bundle_dir} is complete; delete it to re-evaluate")
        print(json.dumps(dict(summary, skipped=True)))
        return 0
    ckpt.mkdir(parents=True, exist_ok=True)
    _LOG_FILE[:] = [out / "train.log"]
    log(f"[train] config {json.dumps(asdict(cfg))}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    (ckpt / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t_start = time.time()
    source = warm_start.resolve_source(cfg.warm_start) if cfg.warm_start else None
    source_metrics = json.loads((source / "metrics.json").read_text()) if source else None
    if source is not None:  # the source's text encoder too: its teacher was trained on those embeddings
        comps = warm_start.load_components(source, device)
        log(f"[train] warm start from {source}")
    else:
        comps = bundle.build_components(seed=cfg.seed)
        comps["vae"].to(device)
        comps["text_encoder"].to(device)
        bundle.to_device_dtype(comps["transformer"], device)
    # issue 16's order: a warm VAE below its bar trains (whole budget) and the teacher waits; above it, it is frozen
    freeze_vae = source is not None and warm_start.vae_bar_holds(source_metrics)
    train_teacher_now = source is None or freeze_vae
    timings: dict[str, float] = {}
    train_budget = cfg.time_budget_s

    # 1. VAE
    done_marker = ckpt / "vae" / "done.json"
    if freeze_vae:
        comps["vae"].eval().requires_grad_(False)
        stats_path = ckpt / "vae_stats.json"  # keep the frozen VAE's latent statistics, which its teacher learnt
        if not stats_path.is_file():
            stats_path.write_text(json.dumps(warm_start.latent_stats(comps["vae"]), indent=2))
        vae_summary = dict(steps=0, steps_this_run=0, wall_s=0.0, frozen=True,
                           reason=f"warm start: the source's VAE meets its bar ({warm_start.VAE_BAR} per attribute)")
        log("[vae] frozen (warm start, bar holds)")
    elif done_marker.is_file():
        from safetensors.torch import load_file

        comps["vae"].load_state_dict(load_file(str(ckpt / "vae" / "model.safetensors"), device=str(device)))
        comps["vae"].eval().requires_grad_(False)
        vae_summary = dict(json.loads(done_marker.read_text()), skipped=True)
        log("[vae] done earlier; loaded")
    else:
        share = cfg.vae_share if train_teacher_now else 1.0
        vae_budget = None if train_budget is None else share * train_budget
        vae_summary = train_vae(cfg, comps["vae"], device, vae_budget, warm=source is not None)
        done_marker.write_text(json.dumps(vae_summary, indent=2))
    timings["vae_s"] = time.time() - t_start

    # 2. pool and 3. teacher; a teacher that finished (its steps, or its time budget) is only loaded
    teacher_done = ckpt / "teacher" / "done.json"
    finished = json.loads(teacher_done.read_text()) if teacher_done.is_file() else None
    if not train_teacher_now:  # carried over; the latent statistics are re-measured for the retrained VAE
        from diffusers import WanPipeline

        text_pipe = WanPipeline(tokenizer=comps["tokenizer"], text_encoder=comps["text_encoder"], vae=comps["vae"],
                                scheduler=comps["scheduler"], transformer=None)
        timings["pool_s"] = build_pool(cfg, comps, text_pipe, device)["wall_s"]
        ema_sd = {k: v.detach().clone() for k, v in comps["transformer"].state_dict().items()}
        teacher_summary = dict(steps=0, steps_this_run=0, wall_s=0.0, carried_over=True,
                               reason=f"warm start: the VAE is below its bar ({warm_start.VAE_BAR}); it trains first")
        log("[teacher] carried over from the warm start (the VAE trains first)")
    elif finished is not None and (finished.get("budget_stop") or finished["steps"] >= cfg.teacher_steps):
        from safetensors.torch import load_file

        apply_latent_stats(comps["vae"], json.loads((ckpt / "vae_stats.json").read_text()))
        ema_sd = load_file(str(ckpt / "teacher" / "ema.safetensors"), device=str(device))
        teacher_summary = dict(finished, skipped=True)
        log("[teacher] done earlier; loaded (delete ckpt/teacher/done.json to train on)")
    else:
        from diffusers import WanPipeline

        text_pipe = WanPipeline(tokenizer=comps["tokenizer"], text_encoder=comps["text_encoder"], vae=comps["vae"],
                                scheduler=comps["scheduler"], transformer=None)
        pool = build_pool(cfg, comps, text_pipe, device)
        timings["pool_s"] = pool["wall_s"]
        teacher_budget = None if train_budget is None else max(0.0, train_budget - (time.time() - t_start))
        ema_sd, teacher_summary = train_teacher(cfg, comps["transformer"], pool, device, teacher_budget)
        teacher_done.write_text(json.dumps(teacher_summary, indent=2))
        timings["teacher_s"] = teacher_summary["wall_s"]
        del pool
    timings["train_total_s"] = time.time() - t_start

    comps["transformer"].load_state_dict(ema_sd)
    comps["scheduler"] = bundle.make_scheduler(cfg.flow_shift)
    # Save the weights first so a failing eval never loses them, then again with the metrics.
    bundle.save_bundle(comps, bundle_dir, teacher_defaults=bundle.teacher_defaults(
        guidance_scale=cfg.guidance_scale, flow_shift=cfg.flow_shift))
    t_eval = time.time()
    try:
        eval_metrics, guidance, shift = evaluate(cfg, comps, device)
    except Exception as exc:  # noqa: BLE001 - report and keep the trained weights
        import traceback

        traceback.print_exc()
        eval_metrics, guidance, shift = dict(eval_error=f"{type(exc).__name__}: {exc}"), cfg.guidance_scale, cfg.flow_shift
    timings["eval_s"] = time.time() - t_eval
    timings["total_s"] = time.time() - t_start
    n_params = {k: sum(p.numel() for p in comps[k].parameters()) for k in ("transformer", "vae", "text_encoder")}
    metrics = dict(eval_metrics, device=_device_name(device), torch=torch.__version__, timings=timings,
                   params=n_params, training=dict(vae=vae_summary, teacher=teacher_summary,
                                                  totals=warm_start.add_totals(
                                                      warm_start.previous_totals(source_metrics)
                                                      if source_metrics else None,
                                                      dict(vae=vae_summary, teacher=teacher_summary)),
                                                  warm_start=None if source is None else dict(
                                                      source=str(source), vae_bar_held=freeze_vae),
                                                  latents_mean=list(comps["vae"].config.latents_mean),
                                                  latents_std=list(comps["vae"].config.latents_std)),
                   config=asdict(cfg))
    metrics["acceptance"] = _acceptance(metrics)
    comps["scheduler"] = bundle.make_scheduler(shift)
    bundle.save_bundle(comps, bundle_dir, teacher_defaults=bundle.teacher_defaults(guidance_scale=guidance,
                                                                                   flow_shift=shift),
                       metrics=metrics)
    def pick(name: str) -> dict[str, Any]:
        m = metrics.get(name, {})
        return dict(seen=m.get("seen", {}).get("adherence", {}).get("all"),
                    heldout=m.get("heldout", {}).get("adherence", {}).get("all"),
                    frechet_seen=m.get("seen", {}).get("frechet"), frechet_heldout=m.get("heldout", {}).get("frechet"),
                    seed_diversity=m.get("seed_diversity"))

    summary = dict(bundle=str(bundle_dir), device=metrics["device"], vae_steps=vae_summary.get("steps"),
                   teacher_steps=teacher_summary.get("steps"), guidance_scale=guidance, flow_shift=shift,
                   vae_psnr=metrics.get("vae", {}).get("psnr"),
                   vae_adherence=metrics.get("vae", {}).get("adherence", {}).get("all"),
                   teacher=pick("teacher"), teacher_few_step=pick("teacher_few_step"),
                   acceptance=metrics["acceptance"], timings={k: round(v, 1) for k, v in timings.items()})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
