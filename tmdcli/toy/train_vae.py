"""Phase 1 of toy training (tmdcli/toy/train.py): the tiny AutoencoderKLWan on freshly rendered data."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from tmdcli.toy import grammar
from tmdcli.toy.train_common import (
    TrainConfig, _check_stop, _combo_table, _existing_dir, _optimizer, _restore, _save_training_state, _sync,
    _write_dir_atomic, log, lr_at, vae_batch,
)


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
