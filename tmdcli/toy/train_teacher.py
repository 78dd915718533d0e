"""Phases 2 and 3 of toy training (tmdcli/toy/train.py): the latent + caption pool, then the rectified-flow
teacher."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn

from tmdcli.toy import bundle, grammar
from tmdcli.toy.train_common import (
    CANONICAL_CAPTION_PROB, LOGIT_NORMAL_MEAN, LOGIT_NORMAL_STD, TrainConfig, UNIFORM_T_PROB, _check_stop,
    _combo_table, _existing_dir, _load_tensors, _optimizer, _restore, _save_training_state, _sync,
    _write_dir_atomic, log, lr_at, render_objects, sample_objects,
)


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
