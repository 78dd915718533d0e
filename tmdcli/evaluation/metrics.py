"""Offline, VBench-style video metrics (EVAL.md 3): pure functions of frames and features, nothing downloaded.

Frames are uint8 `[F, H, W, 3]`. A frame encoder is any callable `frames -> [F, D]`; the default, `pooled_pixels`,
needs no weights, and a local CLIP (`evaluation/clip.py`) plugs in the same way. Each metric is named for what it
computes: none of them is a VBench score, an FVD or an FID, and results are labelled "VBench-style".

Shape legend: F frames, D feature size, K seeds of one prompt, N clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

FrameEncoder = Callable[[np.ndarray], np.ndarray]  # uint8 [F, H, W, 3] -> [F, D]

# Every metric the quick suite can report: (table header, better direction, what it computes).
METRICS: dict[str, tuple[str, str, str]] = {
    "frame_consistency_pixels": (
        "consistency (pixels)", "higher",
        "VBench subject-consistency formula, mean over t>=1 of 1/2[max(0,cos(f_t,f_t-1)) + max(0,cos(f_t,f_0))], "
        "on 8x8 area-pooled, per-frame centred RGB (no learned encoder); 1 for a static clip"),
    "flicker_abs_diff": (
        "flicker", "lower",
        "mean absolute difference of consecutive frames / 255; 0 for a static clip (VBench's temporal_flickering "
        "is 1 minus this, on static clips only)"),
    "seed_diversity_pixels": (
        "seed diversity", "higher",
        "per prompt, mean pairwise (1 - cos) between the clip embeddings (mean of L2-normalised pooled-pixel frame "
        "features) of its seeds, averaged over prompts; 0 when every seed gives the same clip (mode collapse)"),
    "diversity_ratio": (
        "diversity / ref", "higher",
        "seed_diversity_pixels of this model divided by that of the reference model (the first --model)"),
    "frechet_pixel_stats": (
        "Frechet (pixel stats)", "lower",
        "Frechet distance between Gaussians fitted to 64 pixel statistics per clip (4x4-pooled mean frame and "
        "frame-difference energy) of this model and of the reference model; biased at small N, compare at equal N"),
    "clip_score": (
        "CLIP score", "higher",
        "frame mean of max(100 cos(E_img(frame), E_txt(short prompt)), 0) with the local CLIP given by --clip-model"),
    "frame_consistency_clip": (
        "consistency (CLIP)", "higher",
        "the consistency formula on CLIP image features (VBench's background_consistency uses CLIP ViT-B/32)"),
    "toy_adherence": (
        "toy adherence", "higher",
        "share of clips whose colour, shape, motion and background (toy analyzer) match the toy caption"),
    "frechet_toy_features": (
        "Frechet (toy features)", "lower",
        "Frechet distance on the toy analyzer's 86 clip features against the reference model"),
}


# --------------------------------------------------------------------------------------------------------------
# Features


def area_pool(image: np.ndarray, cells: int) -> np.ndarray:
    """Mean of `image [H, W, ...]` over a cells x cells grid of (nearly) equal blocks."""
    rows = np.linspace(0, image.shape[0], cells + 1).astype(int)[:-1]
    cols = np.linspace(0, image.shape[1], cells + 1).astype(int)[:-1]
    sums = np.add.reduceat(np.add.reduceat(image, rows, axis=0), cols, axis=1)
    counts = np.outer(np.diff(np.append(rows, image.shape[0])), np.diff(np.append(cols, image.shape[1])))
    return sums / counts.reshape(cells, cells, *([1] * (image.ndim - 2)))


def pooled_pixels(frames: np.ndarray, cells: int = 8) -> np.ndarray:
    """Weight-free frame features `[F, cells*cells*3]`: area-pooled RGB in [0, 1], centred per frame.

    Centring makes the cosine of two frames the correlation of their pooled images, so a global brightness
    offset does not count as similarity; a uniform frame maps to the zero vector.
    """
    x = frames.astype(np.float64) / 255.0
    pooled = np.stack([area_pool(f, cells).ravel() for f in x])
    return pooled - pooled.mean(axis=1, keepdims=True)


def l2_normalise(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def pixel_stats(frames: np.ndarray) -> np.ndarray:
    """64 numbers per clip: the mean frame pooled to 4x4 per channel (48), frame-difference energy pooled 4x4 (16)."""
    x = frames.astype(np.float64) / 255.0
    diff = np.abs(np.diff(x, axis=0)).sum(-1).mean(0) if len(x) > 1 else np.zeros(x.shape[1:3])
    return np.concatenate([area_pool(x.mean(0), 4).ravel(), area_pool(diff, 4).ravel()])


# --------------------------------------------------------------------------------------------------------------
# Metrics


def frame_consistency(feats_FD: np.ndarray) -> float:
    """VBench subject/background consistency: mean over t >= 1 of 1/2 [max(0, cos(f_t, f_t-1)) + max(0, cos(f_t, f_0))].

    A single frame counts as perfectly consistent.
    """
    f = l2_normalise(np.asarray(feats_FD, dtype=np.float64))
    if len(f) < 2:
        return 1.0
    to_prev = np.maximum(0.0, (f[1:] * f[:-1]).sum(-1))
    to_first = np.maximum(0.0, f[1:] @ f[0])
    return float(np.mean(0.5 * (to_prev + to_first)))


def flicker_abs_diff(frames: np.ndarray) -> float:
    """Mean absolute difference of consecutive uint8 frames / 255 (VBench temporal_flickering = 1 - this)."""
    if len(frames) < 2:
        return 0.0
    x = frames.astype(np.float32)
    return float(np.abs(x[1:] - x[:-1]).mean() / 255.0)


def clip_embedding(feats_FD: np.ndarray) -> np.ndarray:
    """One vector per clip: the mean of its L2-normalised frame features, normalised again."""
    return l2_normalise(l2_normalise(np.asarray(feats_FD, dtype=np.float64)).mean(0))


def seed_diversity(embeddings_KD: np.ndarray) -> float:
    """Mean pairwise (1 - cos) between the clip embeddings of one prompt's K >= 2 seeds (0: all the same)."""
    e = l2_normalise(np.asarray(embeddings_KD, dtype=np.float64))
    if len(e) < 2:
        raise ValueError("seed diversity needs at least 2 clips of the prompt")
    cos = e @ e.T
    upper = np.triu_indices(len(e), k=1)
    return float(np.mean(1.0 - cos[upper]))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance of Gaussians fitted to `[N, D]` feature sets: |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2).

    tr (C_a C_b)^1/2 = tr (A C_b A)^1/2 with A = C_a^1/2, a symmetric PSD matrix: symmetric eigendecompositions
    suffice and no complex parts appear. eps * I keeps rank-deficient sets (N < D) stable.
    """
    a, b = np.asarray(feat_a, dtype=np.float64), np.asarray(feat_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two [N, D] feature sets with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Frechet distance needs at least 2 clips per set")
    identity = eps * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + identity, np.cov(b, rowvar=False) + identity
    root_a = _sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    return max(0.0, mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross))


def clip_score(image_feats_FD: np.ndarray, text_feat_D: np.ndarray) -> float:
    """CLIP score of one clip: frame mean of max(100 cos(E_img(frame), E_txt(prompt)), 0)."""
    cos = l2_normalise(np.asarray(image_feats_FD, dtype=np.float64)) @ l2_normalise(np.asarray(text_feat_D, float))
    return float(np.mean(np.maximum(100.0 * cos, 0.0)))


# --------------------------------------------------------------------------------------------------------------
# Per clip and per model


@dataclass
class ClipMeasures:
    """What one clip contributes to a model's metrics; the frames themselves are not kept."""

    consistency: float
    flicker: float
    embedding: np.ndarray  # [D] for seed diversity
    stats: np.ndarray  # [64] for the Frechet distance
    clip_score: float | None = None
    clip_consistency: float | None = None
    extra: dict = field(default_factory=dict)


def measure_clip(frames: np.ndarray, *, clip_image: FrameEncoder | None = None,
                 text_feature: np.ndarray | None = None) -> ClipMeasures:
    """Every per-clip quantity of the quick suite; CLIP ones only when an image encoder and a text feature are given."""
    feats = pooled_pixels(frames)
    measures = ClipMeasures(consistency=frame_consistency(feats), flicker=flicker_abs_diff(frames),
                            embedding=clip_embedding(feats), stats=pixel_stats(frames))
    if clip_image is not None and text_feature is not None:
        image = clip_image(frames)
        measures.clip_score = clip_score(image, text_feature)
        measures.clip_consistency = frame_consistency(image)
    return measures


def model_metrics(clips: Sequence[ClipMeasures], groups: Sequence[Sequence[int]],
                  reference: Sequence[ClipMeasures] | None = None,
                  reference_diversity: float | None = None) -> tuple[dict, list]:
    """A model's quick metrics from its clips; `groups` lists the clip indices of each prompt (its seeds).

    With a `reference` (the first model's clips) also the Frechet distance and the diversity ratio against it.
    Returns (metrics, per-prompt seed diversity, None where a prompt has a single clip).
    """
    metrics: dict = {"frame_consistency_pixels": float(np.mean([c.consistency for c in clips])),
                     "flicker_abs_diff": float(np.mean([c.flicker for c in clips]))}
    per_prompt = [seed_diversity(np.stack([clips[i].embedding for i in g])) if len(g) >= 2 else None
                  for g in groups]
    known = [d for d in per_prompt if d is not None]
    metrics["seed_diversity_pixels"] = float(np.mean(known)) if known else None
    if reference is not None:
        metrics["frechet_pixel_stats"] = (frechet_distance(np.stack([c.stats for c in clips]),
                                                           np.stack([c.stats for c in reference]))
                                          if len(clips) >= 2 and len(reference) >= 2 else None)
        ratio_ok = known and reference_diversity not in (None, 0.0)
        metrics["diversity_ratio"] = metrics["seed_diversity_pixels"] / reference_diversity if ratio_ok else None
    if all(c.clip_score is not None for c in clips):
        metrics["clip_score"] = float(np.mean([c.clip_score for c in clips]))
        metrics["frame_consistency_clip"] = float(np.mean([c.clip_consistency for c in clips]))
    return metrics, per_prompt


def mode_collapse(diversity_ratio: float | None, threshold: float) -> bool:
    """The mode-collapse flag: the diversity ratio to the reference fell below `threshold` (EVAL.md 3)."""
    return diversity_ratio is not None and diversity_ratio < threshold


def toy_metrics(frames: Sequence[np.ndarray], prompts: Sequence[str],
                reference_frames: Sequence[np.ndarray] | None) -> dict:
    """Toy-world metrics (adherence, Frechet on analyzer features) when every prompt is a toy caption, else {}."""
    from tmdcli.toy.analyzer import adherence, analyze_clips, clip_features
    from tmdcli.toy.grammar import parse_caption

    try:
        specs = [parse_caption(p) for p in prompts]
    except ValueError:
        return {}
    analyses = analyze_clips(list(frames))
    out = {"toy_adherence": adherence(analyses, specs)["all"]}
    if reference_frames is not None and len(frames) >= 2 and len(reference_frames) >= 2:
        out["frechet_toy_features"] = frechet_distance(clip_features(list(frames), analyses),
                                                       clip_features(list(reference_frames)))
    return out
