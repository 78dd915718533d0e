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

Code: one module per phase (train_vae.py: 1; train_teacher.py: 2 and 3; toy_eval.py: 4; train_common.py: the
config and shared utilities); this module is the command line and the driver. --warm-start: toy/warm_start.py.

Resume: checkpoints live in DIR/ckpt (or --ckpt-dir); rerunning the same command continues where it stopped and
skips finished phases. A finished DIR/bundle/metrics.json makes a rerun a no-op (delete DIR/bundle to re-evaluate).
Tensor legend: B batch, C latent channels, T latent frames, F frames, S text tokens, E text width.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tmdcli.toy import bundle, warm_start
# one module per phase; the names tests and callers used from this module stay importable here
from tmdcli.toy.toy_eval import _acceptance, evaluate
from tmdcli.toy.train_common import (
    TrainConfig, _LOG_FILE, _STOP_REQUESTED, _combo_table, _request_stop, log, sample_objects,
)
from tmdcli.toy.train_teacher import apply_latent_stats, build_pool, flow_matching_batch, train_captions, train_teacher
from tmdcli.toy.train_vae import decode_unclamped, train_vae


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
