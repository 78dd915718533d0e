"""Read a toy clip back into attributes, and compare sets of clips.

`analyze_clip` estimates the background from the frame border, marks pixels far from it as foreground, and reads
one object from the foreground: its colour (palette vote), shape (best template fit), position track (centre per
frame) and motion (line fit of the track). A clip without exactly one compact object in most frames is reported
as "no clean object"; such a clip never counts as following its prompt.

On top of that: `adherence` (how often clips show what their captions ask for), `clip_features` with
`frechet_distance` (distribution distance on analyzer and pixel features) and `seed_diversity` (how different
clips of one prompt are, which falls to 0 under mode collapse).

Clips are float `[3, F, H, W]` in [-1, 1] (torch or numpy) or uint8 `[F, H, W, 3]`. Positions are in pixels in
the grammar's convention: pixel column j spans [j, j + 1], and y grows downward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from tmdcli.evaluation.metrics import area_pool, frechet_distance  # noqa: F401 (frechet_distance: re-exported)
from tmdcli.toy.grammar import (
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    SPEED_PX_PER_FRAME,
    CaptionSpec,
    parse_caption,
)
from tmdcli.toy.render import CROSS_ARM_HALF_WIDTH, SHAPE_IDS, object_alpha

NO_CLEAN_OBJECT = "no clean object"
FOREGROUND_THRESHOLD = 0.25  # RGB distance in [0, 1] units; every object colour is >= 0.53 from every background
MAX_FOREGROUND_THRESHOLD = 0.4  # the noise-adapted threshold stops here, still below every object's distance
MIN_VISIBLE_FRACTION = 0.75  # a clean object is visible in at least this share of frames
MIN_AREA_PX, MAX_AREA_FRACTION = 6.0, 0.25  # plausible object area per frame
MIN_SHAPE_IOU = 0.6  # below this no template fits: several blobs, smears or noise
TEMPLATE_BLUR_SIGMAS = (0.0, 0.5, 0.8)  # px; templates are also compared this much softened
STILL_SPEED = 0.3 * SPEED_PX_PER_FRAME  # px/frame; slower tracks read as "still"

# Area of each shape relative to its bounding box (2 * half)^2, and its centroid's offset below the box centre
# (in units of half); they turn a mask's area and centroid into the template's half-extent and centre.
_ARM = 2 * CROSS_ARM_HALF_WIDTH
_AREA_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": (4 * _ARM - _ARM**2) / 4}
_CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "cross": 0.0}

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64) / 255.0
_BACKGROUND_PALETTE = np.array([BACKGROUNDS[b] for b in BACKGROUND_NAMES], dtype=np.float64) / 255.0


@dataclass
class ClipAnalysis:
    """What the analyzer read from one clip. Attributes are None when `ok` is False (no clean object)."""

    ok: bool
    colour: str | None
    shape: str | None
    motion: str | None
    background: str | None  # estimated from the border even when there is no clean object
    track: np.ndarray  # [F, 2] object centre (x, y) per frame in pixels, nan where not visible
    fill_ratio: float  # object area / bounding-box area, mean over visible frames (nan if none)
    reason: str  # "ok" or NO_CLEAN_OBJECT
    detail: str = ""  # why there is no clean object
    velocity: tuple[float, float] = (float("nan"), float("nan"))  # px/frame from the line fit of `track`
    half_size: float = float("nan")  # half-extent of the best-fitting template, px
    area_fraction: float = float("nan")  # object area / frame area, mean over visible frames
    visible_fraction: float = 0.0  # share of frames with a plausible object
    track_residual: float = float("nan")  # RMS distance (px) of the track from its line fit: temporal smoothness
    shape_scores: dict[str, float] = field(default_factory=dict)  # mean template IoU per shape
    colour_rgb: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))  # mean confident object colour
    background_rgb: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))  # border median, [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Reading one clip
# ---------------------------------------------------------------------------------------------------------------


def to_frames(clip) -> np.ndarray:
    """Frames `[F, H, W, 3]` float64 in [0, 1] from a float clip `[3, F, H, W]` in [-1, 1] or uint8 `[F, H, W, 3]`."""
    if isinstance(clip, torch.Tensor):
        clip = clip.detach().cpu()
        clip = clip.numpy() if clip.dtype == torch.uint8 else clip.float().numpy()
    clip = np.asarray(clip)
    if clip.ndim != 4:
        raise ValueError(f"expected a clip [3, F, H, W] or [F, H, W, 3], got shape {clip.shape}")
    if clip.dtype == np.uint8:
        if clip.shape[-1] != 3:
            raise ValueError(f"uint8 clips are [F, H, W, 3], got shape {clip.shape}")
        return clip.astype(np.float64) / 255.0
    if clip.shape[0] != 3:
        raise ValueError(f"float clips are [3, F, H, W] in [-1, 1], got shape {clip.shape}")
    return (np.clip(np.moveaxis(clip.astype(np.float64), 0, -1), -1.0, 1.0) + 1.0) / 2.0


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette entry for each colour `[..., 3]`."""
    return np.argmin(((rgb[..., None, :] - palette) ** 2).sum(-1), axis=-1)


def _border_pixels(frames: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of every frame, `[N, 3]`: objects never touch it in the grammar."""
    ring = np.concatenate([frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1)
    return ring.reshape(-1, 3)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a `[F, H, W]` mask by one pixel (8-neighbourhood) within the frame."""
    grown = mask.copy()
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    height, width = mask.shape[1:]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[:, dy:dy + height, dx:dx + width]
    return grown


def _coverage(frames: np.ndarray, background_rgb: np.ndarray,
              border: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground mask `[F, H, W]` and soft coverage in [0, 1] (zero away from the mask).

    A rendered pixel is background + alpha * (object - background), so its distance from the background divided
    by the object's distance recovers alpha; the object's distance is taken from the most distant mask pixels.
    The threshold rises above FOREGROUND_THRESHOLD when the border itself is noisy, so noise is not foreground;
    coverage is kept one pixel beyond the mask so blurred edges still count towards area and centroid.
    """
    distance = np.sqrt(((frames - background_rgb) ** 2).sum(-1))
    border_noise = np.quantile(np.sqrt(((border - background_rgb) ** 2).sum(-1)), 0.99)
    threshold = min(max(FOREGROUND_THRESHOLD, 1.2 * border_noise), MAX_FOREGROUND_THRESHOLD)
    mask = distance > threshold
    object_distance = np.percentile(distance[mask], 90) if mask.any() else 1.0
    coverage = np.clip(distance / max(object_distance, threshold), 0.0, 1.0)
    return mask, np.where(_dilate(mask), coverage, 0.0)


def _colour_vote(frames: np.ndarray, coverage: np.ndarray, visible: np.ndarray) -> tuple[str, np.ndarray]:
    """Palette name most pixels of the object's interior are nearest to, and their mean colour."""
    weights = coverage[visible]
    pixels = frames[visible]
    confident = weights > 0.9  # interior pixels: edges blend with the background
    if confident.sum() < 3:
        confident = weights > 0.5
    chosen = pixels[confident]
    votes = np.bincount(_nearest(chosen, _PALETTE), minlength=len(COLOUR_NAMES))
    return COLOUR_NAMES[int(votes.argmax())], chosen.mean(axis=0)


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 5-tap Gaussian blur of `[..., H, W]` images (zero padding: templates are zero at the border)."""
    if sigma <= 0:
        return images
    kernel = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    kernel /= kernel.sum()
    height, width = images.shape[-2:]
    pad = [(0, 0)] * (images.ndim - 2)
    padded = np.pad(images, pad + [(0, 0), (2, 2)])
    images = sum(k * padded[..., :, i:i + width] for i, k in enumerate(kernel))
    padded = np.pad(images, pad + [(2, 2), (0, 0)])
    return sum(k * padded[..., i:i + height, :] for i, k in enumerate(kernel))


def _fit_shapes(coverage: np.ndarray, area: np.ndarray, centroid: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """Mean soft IoU of each shape's template over the frames given; plus per shape the template centres and halves.

    Each template is placed from the coverage's moments (half-extent from area, centre from centroid), which is
    robust to a few stray pixels where a bounding box would not be. Generated clips are often softer than
    rendered ones, and blur rounds every shape towards a disc, so each template is also compared blurred
    (TEMPLATE_BLUR_SIGMAS) and a shape scores its best blur level.
    """
    num_frames, size = coverage.shape[0], coverage.shape[-1]
    shape_ids, centres, halves = [], [], []
    for shape in SHAPES:
        half = np.sqrt(area / (4.0 * _AREA_RATIO[shape]))
        centre = centroid - np.stack([np.zeros_like(half), _CENTROID_OFFSET[shape] * half], axis=-1)
        shape_ids.append(np.full(num_frames, SHAPE_IDS[shape]))
        centres.append(centre)
        halves.append(half)
    centres_all, halves_all = np.concatenate(centres), np.concatenate(halves)
    zeros = torch.zeros(len(halves_all))
    templates = object_alpha(torch.from_numpy(np.concatenate(shape_ids)), torch.from_numpy(centres_all[:, 0]).float(),
                             torch.from_numpy(centres_all[:, 1]).float(), zeros, zeros,
                             torch.from_numpy(halves_all).float(), num_frames=1, size=size)
    templates = templates[:, 0].numpy().astype(np.float64).reshape(len(SHAPES), num_frames, size, size)
    observed = coverage[None]
    # numpy rather than torch here: many small torch ops cost far more than their arithmetic on a busy CPU.
    iou_by_blur = []
    for sigma in TEMPLATE_BLUR_SIGMAS:
        blurred = _gaussian_blur(templates, sigma)
        overlap = np.minimum(blurred, observed).sum((2, 3))
        union = np.maximum(blurred, observed).sum((2, 3))
        iou_by_blur.append((overlap / np.maximum(union, 1e-6)).mean(1))  # [shapes]
    best_iou = np.max(iou_by_blur, axis=0)
    scores = {shape: float(best_iou[i]) for i, shape in enumerate(SHAPES)}
    return scores, np.stack(centres), np.stack(halves)


def _line_fit(frames_index: np.ndarray, track: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares velocity `[2]` (px/frame) of a track `[N, 2]`, and the RMS residual in px."""
    design = np.stack([frames_index, np.ones_like(frames_index)], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design, track, rcond=None)
    residual = track - design @ coefficients
    return coefficients[0], float(np.sqrt((residual**2).sum(1).mean()))


def motion_of(velocity: Sequence[float]) -> str:
    """Motion name of a velocity (vx, vy) in px/frame; y grows downward, so "up" is negative vy."""
    vx, vy = velocity
    if np.hypot(vx, vy) < STILL_SPEED:
        return "still"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def analyze_clip(clip) -> ClipAnalysis:
    """Read background, and the single object's colour, shape, track and motion, from one clip."""
    frames = to_frames(clip)
    num_frames, height, width, _ = frames.shape
    border = _border_pixels(frames)
    background_rgb = np.median(border, axis=0)
    background = BACKGROUND_NAMES[int(_nearest(background_rgb, _BACKGROUND_PALETTE))]
    mask, coverage = _coverage(frames, background_rgb, border)
    visible = (mask.sum((1, 2)) >= MIN_AREA_PX) & (coverage.sum((1, 2)) <= MAX_AREA_FRACTION * height * width)
    track = np.full((num_frames, 2), np.nan)

    def unclean(detail: str, **measured) -> ClipAnalysis:
        return ClipAnalysis(ok=False, colour=None, shape=None, motion=None, background=background, track=track,
                            fill_ratio=measured.pop("fill_ratio", float("nan")), reason=NO_CLEAN_OBJECT,
                            detail=detail, visible_fraction=float(visible.mean()), background_rgb=background_rgb,
                            **measured)

    if visible.mean() < MIN_VISIBLE_FRACTION:
        return unclean(f"a plausible object in {int(visible.sum())} of {num_frames} frames")

    weights = coverage[visible]
    area, centroid = _moments(weights)
    fill_ratio = float(np.mean([_fill_ratio(m) for m in mask[visible]]))
    colour, colour_rgb = _colour_vote(frames, coverage, visible)
    scores, centres, halves = _fit_shapes(weights, area, centroid)
    best = max(scores, key=scores.get)
    best_index = SHAPES.index(best)
    track[visible] = centres[best_index]
    velocity, residual = _line_fit(np.flatnonzero(visible), centres[best_index])
    measured = dict(fill_ratio=fill_ratio, velocity=(float(velocity[0]), float(velocity[1])),
                    half_size=float(halves[best_index].mean()), area_fraction=float(area.mean() / (height * width)),
                    track_residual=residual, shape_scores=scores, colour_rgb=colour_rgb)
    if scores[best] < MIN_SHAPE_IOU:
        return unclean(f"no shape fits the foreground (best {best} IoU {scores[best]:.2f})", **measured)
    return ClipAnalysis(ok=True, colour=colour, shape=best, motion=motion_of(velocity), background=background,
                        track=track, reason="ok", visible_fraction=float(visible.mean()),
                        background_rgb=background_rgb, **measured)


def _moments(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area `[N]` and centroid `[N, 2]` (x, y in pixel-centre coordinates) of soft coverage maps `[N, H, W]`."""
    height, width = weights.shape[1:]
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    area = weights.sum((1, 2))
    centroid = np.stack([(weights.sum(1) * xs).sum(1), (weights.sum(2) * ys).sum(1)], axis=1) / area[:, None]
    return area, centroid


def _fill_ratio(mask: np.ndarray) -> float:
    """Mask area over its bounding-box area."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return float(mask.sum() / box)


def analyze_clips(clips) -> list[ClipAnalysis]:
    """`analyze_clip` over a batch `[B, 3, F, H, W]` (or `[B, F, H, W, 3]` uint8) or a sequence of clips."""
    return [analyze_clip(clip) for clip in _on_cpu(clips)]


def _on_cpu(clips):
    """A torch batch copied to the CPU in one transfer (rather than one per clip); anything else unchanged."""
    if isinstance(clips, torch.Tensor):
        clips = clips.detach().cpu()
        return clips if clips.dtype == torch.uint8 else clips.float()
    return clips


# ---------------------------------------------------------------------------------------------------------------
# Prompt adherence
# ---------------------------------------------------------------------------------------------------------------

ATTRIBUTES = ("colour", "shape", "motion", "background")


def _matches(analysis: ClipAnalysis, spec: CaptionSpec) -> dict[str, bool]:
    """Per attribute, whether a clean analysis shows what the spec's first object and background ask for."""
    if not analysis.ok:
        return {name: False for name in ATTRIBUTES}
    colour, shape, motion = spec.objects[0]
    return {"colour": analysis.colour == colour, "shape": analysis.shape == shape,
            "motion": analysis.motion == motion, "background": analysis.background == spec.background}


def adherence(analyses: Sequence[ClipAnalysis], specs: Sequence[CaptionSpec | str]) -> dict[str, float]:
    """Fractions of clips that show what their captions ask for: "all" attributes, each attribute, and "clean".

    The analyzer reads one object per clip, so a two-object spec is judged on its first object (and a clip with
    two objects is usually not clean at all). A clip without a clean object matches nothing.
    """
    if len(analyses) != len(specs):
        raise ValueError(f"{len(analyses)} analyses but {len(specs)} captions")
    if not analyses:
        raise ValueError("adherence needs at least one clip")
    rows = [_matches(a, parse_caption(s) if isinstance(s, str) else s) for a, s in zip(analyses, specs)]
    result = {"all": float(np.mean([all(row.values()) for row in rows]))}
    result |= {name: float(np.mean([row[name] for row in rows])) for name in ATTRIBUTES}
    result["clean"] = float(np.mean([a.ok for a in analyses]))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Distribution distance and diversity
# ---------------------------------------------------------------------------------------------------------------


def _nan_to(value, default: float) -> np.ndarray:
    """Missing measurements become a neutral default so every clip has a finite feature vector."""
    array = np.asarray(value, dtype=np.float64)
    return np.where(np.isfinite(array), array, default)


def analyzer_features(analysis: ClipAnalysis, size: int) -> np.ndarray:
    """22 numbers from an analysis: colours, clean flag, visibility, area, fill, size, velocity, start/end, fit."""
    visible = np.flatnonzero(np.isfinite(analysis.track[:, 0]))
    start = analysis.track[visible[0]] / size if len(visible) else np.full(2, 0.5)
    end = analysis.track[visible[-1]] / size if len(visible) else np.full(2, 0.5)
    scores = [analysis.shape_scores.get(shape, 0.0) for shape in SHAPES]
    return np.concatenate([
        _nan_to(analysis.background_rgb, 0.0), _nan_to(analysis.colour_rgb, 0.0),
        [float(analysis.ok), analysis.visible_fraction], _nan_to([analysis.area_fraction, analysis.fill_ratio], 0.0),
        _nan_to([analysis.half_size / size], 0.0), _nan_to(analysis.velocity, 0.0), start, end,
        _nan_to([analysis.track_residual], 0.0), scores,
    ])


def pixel_features(clip) -> np.ndarray:
    """64 numbers: the mean frame pooled to 4x4 per channel (48) and frame-difference energy pooled to 4x4 (16)."""
    frames = to_frames(clip)
    if len(frames) > 1:
        difference = np.abs(np.diff(frames, axis=0)).sum(-1).mean(0)
    else:
        difference = np.zeros(frames.shape[1:3])
    return np.concatenate([area_pool(frames.mean(0), 4).ravel(), area_pool(difference, 4).ravel()])


def clip_features(clips, analyses: Sequence[ClipAnalysis] | None = None) -> np.ndarray:
    """Features `[B, 86]` for `frechet_distance`: `analyzer_features` then `pixel_features` of each clip.

    Pass `analyses` to reuse analyses already computed for the same clips. Pixel features are pooled coarsely
    (4x4) so the dimension stays well below the few hundred clips an evaluation compares.
    """
    clips = list(_on_cpu(clips))
    if analyses is None:
        analyses = analyze_clips(clips)
    rows = []
    for clip, analysis in zip(clips, analyses, strict=True):
        size = to_frames(clip).shape[2]
        rows.append(np.concatenate([analyzer_features(analysis, size), pixel_features(clip)]))
    return np.stack(rows) if rows else np.zeros((0, 86))


def seed_diversity(clips_by_prompt: Sequence) -> float:
    """Mean pairwise RMS pixel distance (in [-1, 1] units) between clips of the same prompt, averaged over prompts.

    Each group is `[K, 3, F, H, W]`; groups with fewer than 2 clips are skipped. 0 means every seed gave the same
    clip (mode collapse).
    """
    per_prompt = []
    for group in clips_by_prompt:
        group = group.detach().cpu().float().numpy() if isinstance(group, torch.Tensor) else np.asarray(group)
        flat = group.reshape(len(group), -1).astype(np.float64)
        if len(flat) < 2:
            continue
        pairs = [np.sqrt(((flat[i] - flat[j]) ** 2).mean()) for i in range(len(flat)) for j in range(i + 1, len(flat))]
        per_prompt.append(np.mean(pairs))
    if not per_prompt:
        raise ValueError("seed_diversity needs at least one prompt with 2 or more clips")
    return float(np.mean(per_prompt))
