"""The `toy` suite of `tmd eval`: toy-grammar captions, seen and held out, read back by the toy analyzer.

Prompts are canonical single-object captions (DESIGN.md 5): K distinct ones from the combinations seen in training
("train") and K from the 20% held out of it ("heldout"), each with the scene it was drawn from, so the same
scoring can be run on rendered ground truth. Every clip is read by `toy.analyzer` (colour, shape, motion,
background, track); a model's metrics are computed per split and over both, against the first model's clips of
the same captions and seeds for the Frechet distances and the diversity ratio.

Clips are uint8 `[F, H, W, 3]` as `read_mp4` returns them; numpy only, apart from the analyzer's torch templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SPLITS = ("train", "heldout")
DEFAULT_PROMPTS_PER_SPLIT = 16
DEFAULT_SAMPLES_PER_PROMPT = 2  # seed diversity needs at least two seeds per caption

# Every metric of the suite: (table header, better direction, what it computes). Keys are plain names.
TOY_METRICS: dict[str, tuple[str, str, str]] = {
    "adherence": (
        "adherence", "higher",
        "share of clips in which the toy analyzer finds one clean object with the caption's colour, shape and "
        "motion on the caption's background"),
    "adherence_colour": (
        "colour", "higher",
        "share of clips with a clean object whose colour (palette vote of its interior pixels) is the caption's"),
    "adherence_shape": (
        "shape", "higher",
        "share of clips with a clean object whose best-fitting template (circle, square, triangle, cross) is the "
        "caption's shape"),
    "adherence_motion": (
        "motion", "higher",
        "share of clips with a clean object whose track, fitted with a line, moves in the caption's direction (left, "
        "right, up, down; still below 0.225 px/frame)"),
    "adherence_background": (
        "background", "higher",
        "share of clips with a clean object whose frame border is nearest the caption's background colour"),
    "clean_object": (
        "clean", "higher",
        "share of clips with one clean object: a single compact object in at least 75% of frames that some shape "
        "template fits; a clip without one matches nothing"),
    "frechet_analyzer_features": (
        "Frechet (analyzer)", "lower",
        "Frechet distance between Gaussians fitted to the analyzer's 22 features per clip (colours, clean flag, "
        "visibility, area, fill, size, velocity, start and end position, track residual, shape fits) of this model "
        "and of the reference model on the same captions and seeds; biased at small N, compare at equal N"),
    "frechet_pixel_features": (
        "Frechet (pixels)", "lower",
        "the same distance on 64 pixel features per clip (4x4-pooled mean frame and frame-difference energy)"),
    "seed_diversity": (
        "seed diversity", "higher",
        "per caption, mean pairwise RMS pixel distance (in [-1, 1] units) between the clips of its seeds, averaged "
        "over captions; 0 when every seed gives the same clip (mode collapse)"),
    "diversity_ratio": (
        "diversity / ref", "higher", "seed_diversity of this model divided by that of the reference model"),
    "track_wobble_px": (
        "wobble px", "lower",
        "RMS distance (px) of the object's per-frame centre from its straight-line fit, mean over clips with a "
        "clean object: temporal smoothness (rendered clips: about 0)"),
    "speed_error_px": (
        "speed err px/f", "lower",
        "mean |measured speed - caption speed| in px/frame over clips with a clean object; the grammar moves "
        "objects at 0.75 px/frame, or 0 when still"),
}
TABLE_METRICS = ("adherence", "adherence_colour", "adherence_shape", "adherence_motion", "adherence_background",
                 "clean_object", "frechet_analyzer_features", "frechet_pixel_features", "seed_diversity",
                 "diversity_ratio", "track_wobble_px")
PLOT_METRICS = ("adherence", "frechet_analyzer_features", "seed_diversity")


# --------------------------------------------------------------------------------------------------------------
# Prompts


def max_prompts(split: str) -> int:
    """Distinct single-object captions of a split: its (colour, shape, motion) combinations x 4 backgrounds."""
    from tmdcli.toy.grammar import all_captions

    return len(all_captions(split))


def distinct_scenes(n: int, *, seed: int, split: str) -> list:
    """The first `n` scenes of `sample_scenes(seed, split)` with distinct captions (single objects, deterministic).

    `sample_scenes(m)` is a prefix of `sample_scenes(2m)` (one generator, drawn in order), so doubling the draw
    keeps the scenes already chosen.
    """
    from tmdcli.toy.grammar import caption, sample_scenes

    if not 1 <= n <= max_prompts(split):
        raise ValueError(f"the {split} split has {max_prompts(split)} distinct captions; asked for {n}")
    draws = n
    while True:
        chosen: dict[str, object] = {}
        for scene in sample_scenes(draws, seed=seed, split=split):
            chosen.setdefault(caption(scene), scene)
        if len(chosen) >= n:
            return list(chosen.values())[:n]
        draws *= 2


def toy_prompts(num_per_split: int, seed: int) -> list[dict]:
    """[{index, prompt, generate_from, split, scene}]: `num_per_split` train captions, then as many held-out ones."""
    from tmdcli.toy.grammar import caption

    items: list[dict] = []
    for split in SPLITS:
        for scene in distinct_scenes(num_per_split, seed=seed, split=split):
            text = caption(scene)
            items.append({"index": len(items), "prompt": text, "generate_from": text, "split": split,
                          "scene": scene.to_dict()})
    return items


# --------------------------------------------------------------------------------------------------------------
# Per clip


@dataclass
class ToyClip:
    """What one clip contributes: the analyzer's reading, its two feature vectors and its pixels for diversity."""

    analysis: object  # toy.analyzer.ClipAnalysis
    analyzer_features: np.ndarray  # [22]
    pixel_features: np.ndarray  # [64]
    pixels: np.ndarray  # [F*H*W*3] float32 in [-1, 1]


def measure(frames: np.ndarray) -> ToyClip:
    """Analyze one clip (uint8 `[F, H, W, 3]` or float `[3, F, H, W]` in [-1, 1])."""
    from tmdcli.toy.analyzer import analyze_clip, analyzer_features, pixel_features, to_frames

    unit = to_frames(frames)  # [F, H, W, 3] in [0, 1]
    analysis = analyze_clip(frames)
    return ToyClip(analysis=analysis, analyzer_features=analyzer_features(analysis, unit.shape[2]),
                   pixel_features=pixel_features(frames), pixels=(unit * 2.0 - 1.0).astype(np.float32).ravel())


def reading(clip: ToyClip) -> str:
    """What the analyzer saw, in caption words: 'red circle left on gray', or why there is no clean object."""
    a = clip.analysis
    if not a.ok:
        return f"no clean object ({a.detail}) on {a.background}"
    return f"{a.colour} {a.shape} {a.motion} on {a.background}"


# --------------------------------------------------------------------------------------------------------------
# Per model


def _expected_speed(motion: str) -> float:
    from tmdcli.toy.grammar import SPEED_PX_PER_FRAME

    return 0.0 if motion == "still" else SPEED_PX_PER_FRAME


def group_metrics(clips: Sequence[ToyClip], specs: Sequence, groups: Sequence[Sequence[int]],
                  reference: Sequence[ToyClip] | None = None, reference_diversity: float | None = None) -> dict:
    """Metrics of one set of clips (a split, or all); `groups` lists the clip indices of each caption's seeds.

    `reference` holds the reference model's clips in the same order (same captions and seeds).
    """
    from tmdcli.evaluation.metrics import frechet_distance
    from tmdcli.toy.analyzer import adherence, seed_diversity

    analyses = [c.analysis for c in clips]
    share = adherence(analyses, list(specs))
    out: dict = {"adherence": share["all"], **{f"adherence_{k}": share[k] for k in
                                              ("colour", "shape", "motion", "background")},
                 "clean_object": share["clean"]}
    clean = [(a, s) for a, s in zip(analyses, specs) if a.ok]
    out["track_wobble_px"] = float(np.mean([a.track_residual for a, _ in clean])) if clean else None
    out["speed_error_px"] = (float(np.mean([abs(np.hypot(*a.velocity) - _expected_speed(s.objects[0][2]))
                                            for a, s in clean])) if clean else None)
    multi = [g for g in groups if len(g) >= 2]
    out["seed_diversity"] = seed_diversity([np.stack([clips[i].pixels for i in g]) for g in multi]) if multi else None
    if reference is not None:
        enough = len(clips) >= 2 and len(reference) >= 2
        for key, attr in (("frechet_analyzer_features", "analyzer_features"),
                          ("frechet_pixel_features", "pixel_features")):
            out[key] = (frechet_distance(np.stack([getattr(c, attr) for c in clips]),
                                         np.stack([getattr(c, attr) for c in reference])) if enough else None)
        ok = out["seed_diversity"] is not None and reference_diversity not in (None, 0.0)
        out["diversity_ratio"] = out["seed_diversity"] / reference_diversity if ok else None
    return out | intervals(clips, specs, groups, reference, out)


SHARE_KEYS = {"adherence": "all", "adherence_colour": "colour", "adherence_shape": "shape",
              "adherence_motion": "motion", "adherence_background": "background", "clean_object": "clean"}
FRECHET_FEATURES = {"frechet_analyzer_features": "analyzer_features", "frechet_pixel_features": "pixel_features"}


def intervals(clips: Sequence[ToyClip], specs: Sequence, groups: Sequence[Sequence[int]],
              reference: Sequence[ToyClip] | None, values: dict) -> dict:
    """{"<metric>_ci95": [low, high]} for each share (adherence overall and per attribute, clean) and, against a
    reference, each Frechet distance: 95% bootstrap intervals over captions (evaluation/bootstrap.py), so that
    an ordering of two models is called only when their intervals separate (issue 16)."""
    from tmdcli.evaluation.bootstrap import CI_SUFFIX, caption_draws, frechet_interval, share_intervals
    from tmdcli.toy.analyzer import adherence

    draws = caption_draws(len(groups))
    per_clip = [adherence([c.analysis], [s]) for c, s in zip(clips, specs)]
    indicators = np.array([[row[name] for name in SHARE_KEYS.values()] for row in per_clip])
    out = {key + CI_SUFFIX: list(ci) for key, ci in zip(SHARE_KEYS, share_intervals(indicators, groups, draws))}
    for key, attr in FRECHET_FEATURES.items():
        if reference is None or values.get(key) is None:
            continue
        mine = np.stack([getattr(c, attr) for c in clips])
        theirs = np.stack([getattr(c, attr) for c in reference])
        out[key + CI_SUFFIX] = list(frechet_interval(mine, theirs, groups, draws, values[key]))
    return out


def model_scores(clips: Sequence[ToyClip], prompts: Sequence[dict], reference: Sequence[ToyClip] | None = None,
                 reference_scores: dict | None = None) -> dict:
    """{"metrics" (both splits), "splits" {split: metrics}, "per_prompt", "readings"} of one model's clips.

    `clips` lists every prompt's seeds in prompt order (len(p["seeds"]) each); `reference` and
    `reference_scores` are the first model's clips and the result of this function on them.
    """
    from tmdcli.toy.analyzer import adherence
    from tmdcli.toy.grammar import parse_caption

    spans, start = [], 0
    for p in prompts:
        spans.append(list(range(start, start + len(p["seeds"]))))
        start += len(p["seeds"])
    if start != len(clips):
        raise ValueError(f"{len(clips)} clips for {start} prompt seeds")
    specs = [parse_caption(p["prompt"]) for p in prompts for _ in p["seeds"]]

    def subset(split: str | None) -> dict:
        chosen = [j for j, p in enumerate(prompts) if split is None or p["split"] == split]
        index = [i for j in chosen for i in spans[j]]
        groups, at = [], 0
        for j in chosen:
            groups.append(list(range(at, at + len(spans[j]))))
            at += len(spans[j])
        ref_diversity = None
        if reference_scores is not None:
            ref_diversity = (reference_scores["metrics"] if split is None
                             else reference_scores["splits"][split])["seed_diversity"]
        return group_metrics([clips[i] for i in index], [specs[i] for i in index], groups,
                             reference=[reference[i] for i in index] if reference is not None else None,
                             reference_diversity=ref_diversity)

    present = [s for s in SPLITS if any(p["split"] == s for p in prompts)]
    matches = [[adherence([clips[i].analysis], [specs[i]])["all"] == 1.0 for i in span] for span in spans]
    return {"metrics": subset(None), "splits": {s: subset(s) for s in present},
            "per_prompt": {"adherence": [float(np.mean(m)) for m in matches]},
            "readings": [[{"read": reading(clips[i]), "match": m} for i, m in zip(span, row)]
                         for span, row in zip(spans, matches)]}
