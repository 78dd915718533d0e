"""Phase 4 of toy training (tmdcli/toy/train.py): evaluation through the real WanPipeline, and the issue's bars."""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from tmdcli.toy import bundle, grammar, render
from tmdcli.toy.train_common import (
    CALIBRATION_PROMPTS, DIVERSITY_PROMPTS, DIVERSITY_SEEDS, EVAL_SEED, GUIDANCE_CANDIDATES, SHIFT_CANDIDATES,
    TrainConfig, log,
)


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
