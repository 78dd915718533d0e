"""Warm-starting toy training from a finished bundle, so that several short runs add up (issue 16).

`python -m tmdcli.toy.train --warm-start bundle` (the committed `tmdcli/toy/weights/`) or `--warm-start DIR` (a
previous run's `OUT/bundle`) starts from that bundle's VAE, text encoder and teacher weights instead of random
ones. The phases follow the issue's order: while the source's own evaluation says the VAE misses its bar
(reconstruction adherence >= 0.95 on every attribute), the run trains the VAE from its last weights and carries the
teacher over untouched; once the bar holds, the VAE is frozen (its latent statistics kept) and the run trains the
teacher from its last weights. metrics.json's `training.totals` adds this run's steps and wall time per phase to
the source's totals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VAE_BAR = 0.95  # reconstruction adherence on every attribute (issue 16, "What to build" 1)
VAE_ATTRIBUTES = ("colour", "shape", "motion", "background")
PHASES = ("vae", "teacher")


def resolve_source(value: str) -> Path:
    """`bundle` -> the committed bundle folder; anything else is a bundle folder path (checked)."""
    from tmdcli.toy.bundle import BUNDLED_DIR

    path = BUNDLED_DIR if value == "bundle" else Path(value).expanduser()
    if not (path / "model_index.json").is_file() or not (path / "metrics.json").is_file():
        raise ValueError(f"--warm-start {value}: {path} is not a finished toy bundle (no model_index.json or "
                         "metrics.json); use --warm-start bundle or a previous run's OUT/bundle")
    return path


def vae_bar_holds(metrics: dict[str, Any]) -> bool:
    """Whether the source's evaluated VAE reconstructions reach VAE_BAR on every attribute."""
    adherence = (metrics.get("vae") or {}).get("adherence") or {}
    return all(adherence.get(name, 0.0) >= VAE_BAR for name in VAE_ATTRIBUTES)


def previous_totals(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{phase: {steps, wall_s, runs}} the source bundle was trained with: its recorded totals, or for a bundle
    made before totals existed, its single run's steps and wall time."""
    training = metrics.get("training") or {}
    if "totals" in training:
        return {p: dict(training["totals"][p]) for p in PHASES}
    out = {}
    for phase in PHASES:
        run = training.get(phase) or {}
        wall = run.get("elapsed_total_s", run.get("wall_s", 0.0))
        out[phase] = dict(steps=int(run.get("steps", 0)), wall_s=float(wall), runs=1 if run.get("steps") else 0)
    return out


def add_totals(previous: dict[str, dict[str, float]] | None,
               runs: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, float]]:
    """Totals after this run: previous + each phase's steps and wall time in this run's folder (a phase that was
    skipped or carried over adds nothing)."""
    out = {p: dict((previous or {}).get(p) or dict(steps=0, wall_s=0.0, runs=0)) for p in PHASES}
    for phase in PHASES:
        run = runs.get(phase) or {}
        if run.get("skipped") or not run.get("steps"):
            continue
        out[phase]["steps"] += int(run["steps"])
        out[phase]["wall_s"] += float(run.get("elapsed_total_s", run.get("wall_s", 0.0)))
        out[phase]["runs"] += 1
    return out


def load_components(source: Path, device) -> dict[str, Any]:
    """The source bundle's five components on `device` (float32), ready to train on."""
    from tmdcli.toy.bundle import load_bundle

    comps = load_bundle(source, device=device)
    return {k: comps[k] for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}


def latent_stats(vae) -> dict[str, Any]:
    """The frozen VAE's stored latents_mean/std, in the form build_pool keeps in ckpt/vae_stats.json."""
    return dict(latents_mean=list(vae.config.latents_mean), latents_std=list(vae.config.latents_std), clips=0,
                source="warm start")
