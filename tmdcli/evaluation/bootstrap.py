"""95% intervals for the toy suite's figures by bootstrap over captions, and the rule that calls an ordering.

The unit that is sampled is the caption: the clips of a caption's seeds share its prompt and are not independent,
so a resample draws captions with replacement and takes all seeds of each drawn caption together (a cluster
bootstrap). A Frechet distance compares two models on the same captions and seeds, so both models' clips are
resampled with the same caption draw. The bootstrap generator has a fixed seed: the same clips give the same
intervals, run after run. numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NUM_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
CI_SUFFIX = "_ci95"  # results.json: metric "adherence" has its interval under "adherence_ci95" = [low, high]


def caption_draws(num_captions: int, *, resamples: int = NUM_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """`[resamples, num_captions]` caption indices drawn with replacement (Efron's nonparametric bootstrap)."""
    if num_captions < 1 or resamples < 1:
        raise ValueError(f"a bootstrap needs captions and resamples, got {num_captions} and {resamples}")
    return np.random.default_rng(seed).integers(0, num_captions, size=(resamples, num_captions))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval: the (1-level)/2 and (1+level)/2 quantiles of the bootstrap replicates."""
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(np.asarray(replicates, dtype=np.float64), [tail, 1.0 - tail])
    return float(low), float(high)


def bias_corrected_interval(replicates: np.ndarray, estimate: float, level: float = LEVEL,
                            floor: float | None = 0.0) -> tuple[float, float]:
    """Percentile interval of the replicates less their bootstrap bias (mean(T*) - T), cut at `floor`.

    Used for Frechet distances: resampling duplicates clips, which moves a distance's replicates upward (the
    mean term gains the resampling noise; at tens of clips often above the estimate in every replicate), so the
    plain percentile interval can sit wholly above the estimate. A distance is never negative: hence the floor.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        raise ValueError("no finite bootstrap replicate")
    low, high = percentile_interval(reps - (reps.mean() - estimate), level)
    return (low if floor is None else max(low, floor)), high


def clip_weights(groups: Sequence[Sequence[int]], draws: np.ndarray) -> np.ndarray:
    """`[resamples, clips]`: how often each clip appears in each resample (its caption's draw count)."""
    caption_of = np.empty(sum(len(g) for g in groups), dtype=np.int64)
    for c, g in enumerate(groups):
        caption_of[list(g)] = c
    counts = np.stack([np.bincount(row, minlength=len(groups)) for row in draws])  # [resamples, captions]
    return counts[:, caption_of].astype(np.float64)


def weighted_frechet(feat_a: np.ndarray, feat_b: np.ndarray, weights: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """metrics.frechet_distance of the clip sets in which clip i appears weights[r, i] times, for every row r.

    Batched: the covariances are those np.cov gives for the repeated rows (divided by count - 1, plus eps I), and
    tr (C_a^1/2 C_b C_a^1/2)^1/2 = sum sqrt eig(L^T C_b L) with C_a = L L^T (same spectrum as C_a C_b), one
    Cholesky and one symmetric eigenvalue call per row instead of two eigendecompositions.
    """
    a, b = np.asarray(feat_a, dtype=np.float64), np.asarray(feat_b, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(1)  # [R]
    identity = eps * np.eye(a.shape[1])

    def moments(x):
        mean = w @ x / total[:, None]  # [R, D]
        centred = x[None] - mean[:, None]  # [R, N, D]
        cov = (centred * w[:, :, None]).transpose(0, 2, 1) @ centred / (total - 1.0)[:, None, None]
        return mean, cov + identity

    (mean_a, cov_a), (mean_b, cov_b) = moments(a), moments(b)
    lower = np.linalg.cholesky(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(lower.transpose(0, 2, 1) @ cov_b @ lower), 0.0, None)).sum(1)
    traces = np.trace(cov_a, axis1=1, axis2=2) + np.trace(cov_b, axis1=1, axis2=2)
    return np.maximum(0.0, ((mean_a - mean_b) ** 2).sum(1) + traces - 2.0 * cross)


def share_intervals(indicators: np.ndarray, groups: Sequence[Sequence[int]], draws: np.ndarray,
                    level: float = LEVEL) -> list[tuple[float, float]]:
    """Percentile interval of each column's share of 1s in `indicators` `[clips, columns]`, captions resampled.

    A replicate's share is sum over drawn captions of their clips' 1s / their number of clips, which is the
    mean over the concatenated clips of the drawn captions; per-caption sums make it one matrix product.
    """
    values = np.asarray(indicators, dtype=np.float64).reshape(len(indicators), -1)
    sums = np.stack([values[list(g)].sum(0) for g in groups])  # [captions, columns]
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    replicates = sums[draws].sum(1) / counts[draws].sum(1)[:, None]  # [resamples, columns]
    return [percentile_interval(replicates[:, c], level) for c in range(values.shape[1])]


def frechet_interval(feat_a: np.ndarray, feat_b: np.ndarray, groups: Sequence[Sequence[int]], draws: np.ndarray,
                     estimate: float, level: float = LEVEL) -> tuple[float, float]:
    """Bias-corrected interval of the Frechet distance of two models' clips at the same captions and seeds, both
    resampled with the same caption draws (the distance is paired, as the point estimate is)."""
    weights = clip_weights(groups, draws)
    keep = weights.sum(1) >= 2  # a covariance needs 2 clips
    if not keep.any():
        raise ValueError("a Frechet interval needs resamples with at least 2 clips")
    return bias_corrected_interval(weighted_frechet(feat_a, feat_b, weights[keep]), estimate, level)


def intervals_separate(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """Whether two intervals do not overlap, the condition under which an ordering of two models is called."""
    if a is None or b is None:
        return False
    return bool(a[1] < b[0] or b[1] < a[0])
