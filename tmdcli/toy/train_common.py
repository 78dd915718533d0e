"""Shared by the toy training phases (tmdcli/toy/train.py): the config, constants, logging and stop requests,
atomic checkpoint folders, schedules, and scene sampling on the training device."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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
