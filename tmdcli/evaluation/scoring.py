"""Score the clips of an eval run: the quick suite (metrics.py) or the toy suite (toy.py) per model, or VBench per
model and dimension.

A model here is anything with `key`, `label`, `sample_dir` and `ref.teacher.name` (the stage's ModelSpec); its
clips are `<root>/samples/<sample_dir>/<file>` with the file names each prompt lists. The first model is the
reference for the Frechet distance and the diversity ratio.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from tmdcli.evaluation import metrics as m
from tmdcli.evaluation import vbench


def score_quick(models: Sequence, prompts: Sequence[dict], root: Path, *, collapse_ratio: float,
                clip_info: dict | None = None, clip_arch: str = "ViT-B-32", device: str = "cpu") -> list[dict]:
    """Per model: {"metrics", "per_prompt", "mode_collapse"}; clips are read back from their mp4 files."""
    from tmdcli.artifacts.media import read_mp4

    clip = None
    if clip_info is not None:
        from tmdcli.evaluation.clip import load_clip

        clip = load_clip(clip_info["path"], clip_arch, device)
    text = clip.encode_texts([p["prompt"] for p in prompts]) if clip is not None else None  # short prompts
    groups, start = [], 0
    for p in prompts:
        groups.append(list(range(start, start + len(p["files"]))))
        start += len(p["files"])
    captions = [p["prompt"] for p in prompts for _ in p["files"]]
    measured: dict[str, tuple] = {}
    out, reference = [], None
    for model in models:
        if model.key not in measured:
            keep_frames = model.ref.teacher.name == "toy"  # toy clips are tiny; the analyzer needs the frames
            clips, frames = [], [] if keep_frames else None
            for p_index, p in enumerate(prompts):
                for name in p["files"]:
                    video = read_mp4(root / "samples" / model.sample_dir / name)
                    clips.append(m.measure_clip(video, clip_image=clip.encode_frames if clip else None,
                                                text_feature=text[p_index] if text is not None else None))
                    if keep_frames:
                        frames.append(video)
            measured[model.key] = (clips, frames)
        clips, frames = measured[model.key]
        ref_clips, ref_diversity, ref_frames = reference or (None, None, None)
        metrics, per_prompt = m.model_metrics(clips, groups, reference=ref_clips, reference_diversity=ref_diversity)
        if frames is not None:
            metrics.update(m.toy_metrics(frames, captions, ref_frames))
        if reference is None:
            reference = (clips, metrics["seed_diversity_pixels"], frames)
        out.append({"metrics": metrics, "per_prompt": {"seed_diversity_pixels": per_prompt},
                    "mode_collapse": m.mode_collapse(metrics.get("diversity_ratio"), collapse_ratio)})
    return out


def score_toy(models: Sequence, prompts: Sequence[dict], root: Path, *, collapse_ratio: float) -> list[dict]:
    """Per model: evaluation/toy.py's {"metrics", "splits", "per_prompt", "readings"} plus "mode_collapse".

    Clips are read back from their mp4 files (what the gallery shows is what was scored); the first model is the
    reference for the Frechet distances and the diversity ratio.
    """
    from tmdcli.artifacts.media import read_mp4
    from tmdcli.evaluation import toy

    measured: dict[str, list] = {}
    out, reference = [], None
    for model in models:
        if model.key not in measured:
            measured[model.key] = [toy.measure(read_mp4(root / "samples" / model.sample_dir / name))
                                   for p in prompts for name in p["files"]]
        clips = measured[model.key]
        scores = toy.model_scores(clips, prompts, *(reference or (None, None)))
        if reference is None:
            reference = (clips, scores)
        scores["mode_collapse"] = m.mode_collapse(scores["metrics"].get("diversity_ratio"), collapse_ratio)
        out.append(scores)
    return out


def score_vbench(models: Mapping[str, object], prompts: Sequence[dict], staging, info: dict, *, python: str | None,
                 cache_dir: str | None, device: str = "cuda") -> dict[str, dict]:
    """Per distinct model key: {"vbench": {raw, normalised, quality?, semantic?, total?}, "notes"}.

    Each dimension's VBench result (and log) is kept in the staging folder as soon as it exists, so a rerun only
    runs the dimensions still missing.
    """
    from tmdcli.evaluation.vbench_runner import run_dimension, vbench_env

    env = vbench_env(python, cache_dir)
    out = {}
    for key, model in models.items():
        videos = staging.path / "samples" / model.sample_dir
        raw, notes = {}, []
        for dim in info["dimensions"]:
            rel = f"vbench/{model.sample_dir}/{dim}_eval_results.json"
            if staging.has(rel):
                data = json.loads((staging.path / rel).read_text(encoding="utf-8"))
            else:
                with tempfile.TemporaryDirectory(prefix="tmd-vbench-") as tmp:
                    data = run_dimension(env, videos=videos, full_info=Path(info["full_info"]), dimension=dim,
                                         out_dir=Path(tmp), name=dim, device=device)
                    staging.write_bytes(f"vbench/{model.sample_dir}/{dim}.log", (Path(tmp) / f"{dim}.log").read_bytes())
                staging.write_bytes(rel, json.dumps(data, indent=1).encode())
            raw[dim] = vbench.parse_eval_results({dim: data[dim]})[dim]
            expected = sum(len(p["files"]) for p in prompts if dim in p["dimensions"])
            scored = len(vbench.videos_scored(data, dim))
            if dim != "temporal_flickering" and scored != expected:  # the static filter drops clips on purpose
                notes.append(f"{dim}: VBench scored {scored} of {expected} clips")
        out[key] = {"vbench": {"raw": raw, **vbench.partial_score(raw)}, "notes": notes, "metrics": {}}
    return out
