"""Tests for the toy analyzer: attribute read-back, "no clean object", adherence, Frechet distance, diversity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tmdcli.toy.analyzer import (
    NO_CLEAN_OBJECT,
    adherence,
    analyze_clip,
    analyze_clips,
    clip_features,
    frechet_distance,
    motion_of,
    seed_diversity,
)
from tmdcli.toy.grammar import (
    BACKGROUNDS,
    MOTIONS,
    SHAPES,
    SPEED_PX_PER_FRAME,
    Scene,
    ToyObject,
    caption,
    sample_scenes,
    spec_of,
)
from tmdcli.toy.render import render_scenes


@pytest.fixture(scope="module")
def rendered():
    """Single-object scenes from every split and their clips."""
    scenes = [scene for split, seed in (("train", 0), ("heldout", 1), ("all", 2))
              for scene in sample_scenes(96, seed=seed, split=split)]
    return scenes, render_scenes(scenes)


@pytest.fixture(scope="module")
def analyses(rendered):
    return analyze_clips(rendered[1])


def _background_clip(name: str, num_frames: int = 17, size: int = 32) -> torch.Tensor:
    rgb = torch.tensor(BACKGROUNDS[name], dtype=torch.float32) / 255.0 * 2 - 1
    return rgb.view(3, 1, 1, 1).expand(3, num_frames, size, size).clone()


def test_adherence_on_rendered_clips_is_at_least_097(rendered, analyses):
    scenes, _ = rendered
    scores = adherence(analyses, [spec_of(s) for s in scenes])
    assert set(scores) == {"all", "colour", "shape", "motion", "background", "clean"}
    assert all(value >= 0.97 for value in scores.values()), scores


def test_adherence_accepts_caption_strings(rendered, analyses):
    scenes, _ = rendered
    by_spec = adherence(analyses[:20], [spec_of(s) for s in scenes[:20]])
    assert adherence(analyses[:20], [caption(s) for s in scenes[:20]]) == by_spec
    with pytest.raises(ValueError):
        adherence(analyses[:3], [spec_of(s) for s in scenes[:2]])


def test_wrong_captions_do_not_match(rendered, analyses):
    scenes, _ = rendered
    shifted = [spec_of(s) for s in scenes[1:] + scenes[:1]]  # each clip judged against another clip's caption
    assert adherence(analyses, shifted)["all"] < 0.2


def test_uint8_frames_read_the_same(rendered, analyses):
    _, clips = rendered
    frames = ((clips[:8].permute(0, 2, 3, 4, 1) + 1) * 127.5).round().to(torch.uint8)
    for analysis, expected in zip(analyze_clips(frames), analyses[:8]):
        assert (analysis.colour, analysis.shape, analysis.motion, analysis.background) == (
            expected.colour, expected.shape, expected.motion, expected.background)


def test_background_only_clip_is_no_clean_object_and_never_matches():
    analysis = analyze_clip(_background_clip("gray"))
    assert not analysis.ok and analysis.reason == NO_CLEAN_OBJECT
    assert analysis.colour is None and analysis.shape is None and analysis.motion is None
    assert np.isnan(analysis.track).all()
    spec = spec_of(sample_scenes(1, seed=0)[0])
    spec = dataclasses.replace(spec, background="gray")  # even the background is right
    scores = adherence([analysis], [spec])
    assert scores["all"] == 0.0 and scores["background"] == 0.0 and scores["clean"] == 0.0


def test_noise_and_two_objects_are_not_clean():
    noise = torch.rand(3, 17, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert not analyze_clip(noise).ok
    pairs = render_scenes(sample_scenes(8, seed=3, split="all", two_object_prob=1.0))
    assert not any(a.ok for a in analyze_clips(pairs))


@pytest.mark.parametrize("motion", MOTIONS)
def test_track_follows_the_object(motion):
    for shape in SHAPES:
        obj = ToyObject(shape, "green", motion, 16.0, 16.0, 4.5)
        analysis = analyze_clip(render_scenes([Scene((obj,), "brown")])[0])
        assert analysis.ok and analysis.motion == motion and analysis.shape == shape
        truth = np.array([obj.centre_at(frame) for frame in range(17)])
        assert np.abs(analysis.track - truth).max() < 0.3
        assert np.allclose(analysis.velocity, obj.velocity(), atol=0.05)


def test_motion_of_thresholds():
    assert motion_of((0.05, -0.05)) == "still"
    assert motion_of((SPEED_PX_PER_FRAME, 0.1)) == "right"
    assert motion_of((0.1, -SPEED_PX_PER_FRAME)) == "up"  # y grows downward


def test_clip_features_are_finite_with_fixed_width(rendered, analyses):
    _, clips = rendered
    features = clip_features(clips[:4], analyses=analyses[:4])
    assert features.shape == (4, 86) and np.isfinite(features).all()
    assert np.allclose(features, clip_features(clips[:4]))
    unclean = clip_features([_background_clip("black")])
    assert unclean.shape == (1, 86) and np.isfinite(unclean).all()


def test_frechet_distance_separates_distributions(rendered, analyses):
    scenes, clips = rendered
    features = clip_features(clips, analyses=analyses)
    first, second = features[:144], features[144:]
    assert frechet_distance(first, first) == pytest.approx(0.0, abs=1e-6)
    # The same scenes with every object turned white: only the colour distribution changes.
    whitened = [Scene(tuple(dataclasses.replace(o, colour="white") for o in s.objects), s.background)
                for s in scenes[144:]]
    white = clip_features(render_scenes(whitened))
    same_distribution = frechet_distance(first, second)
    assert frechet_distance(first, white) > 3 * same_distribution > 0
    with pytest.raises(ValueError):
        frechet_distance(first[:1], second)


def test_seed_diversity(rendered):
    _, clips = rendered
    identical = [clips[0:1].expand(4, -1, -1, -1, -1), clips[1:2].expand(3, -1, -1, -1, -1)]
    assert seed_diversity(identical) == 0.0
    different = [clips[0:4], clips[4:6], clips[6:7]]  # the single-clip group is skipped
    assert seed_diversity(different) > 0.05
    assert seed_diversity([clips[0:4].numpy()]) == pytest.approx(seed_diversity([clips[0:4]]))
    with pytest.raises(ValueError):
        seed_diversity([clips[0:1]])
