"""Tests for the toy scene grammar: attributes, held-out split, sampling, captions, parser and expander."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from tmdcli.toy import grammar
from tmdcli.toy.grammar import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_COMBOS,
    MOTIONS,
    SHAPES,
    TRAIN_COMBOS,
    CaptionSpec,
    Scene,
    ToyObject,
    all_captions,
    caption,
    expand_caption,
    parse_caption,
    sample_scenes,
    spec_of,
    split_of,
    tokenize,
    vocabulary,
)


def test_palette_is_well_separated():
    objects = [pair for pair in itertools.combinations(COLOURS.values(), 2)]
    assert min(math.dist(a, b) for a, b in objects) >= 100
    assert min(math.dist(c, b) for c in COLOURS.values() for b in BACKGROUNDS.values()) >= 130
    assert not set(COLOURS) & set(BACKGROUNDS)  # the parser relies on disjoint colour words
    assert len(COLOURS) == 8 and len(BACKGROUNDS) == 4 and len(SHAPES) == 4 and len(MOTIONS) == 5


def test_held_out_is_twenty_percent_and_keeps_every_value_and_pair_in_training():
    assert len(HELD_OUT_COMBOS) == 32 and len(TRAIN_COMBOS) == 128
    for position, values in enumerate((COLOURS, SHAPES, MOTIONS)):
        assert {combo[position] for combo in TRAIN_COMBOS} == set(values)
    for i, j in itertools.combinations(range(3), 2):
        train_pairs = {(combo[i], combo[j]) for combo in TRAIN_COMBOS}
        all_pairs = {(combo[i], combo[j]) for combo in grammar.ALL_COMBOS}
        assert train_pairs == all_pairs


def test_split_of_matches_held_out_combos():
    held = sample_scenes(50, seed=1, split="heldout")
    train = sample_scenes(50, seed=1, split="train")
    assert all(split_of(s) == "heldout" for s in held)
    assert all(split_of(s) == "train" for s in train)
    mixed = sample_scenes(20, seed=2, split="heldout", two_object_prob=1.0)
    assert all(len(s.objects) == 2 and split_of(s) == "heldout" for s in mixed)
    assert all(split_of(spec_of(s)) == split_of(s) for s in sample_scenes(100, seed=3, split="all"))


def test_sample_scenes_is_deterministic_and_seed_dependent():
    assert sample_scenes(20, seed=7, split="all") == sample_scenes(20, seed=7, split="all")
    assert sample_scenes(20, seed=7, split="all") != sample_scenes(20, seed=8, split="all")


@pytest.mark.parametrize("two_object_prob", [0.0, 1.0])
def test_objects_stay_inside_the_frame_and_apart(two_object_prob):
    num_frames, size = 17, 32
    for scene in sample_scenes(300, seed=0, split="all", two_object_prob=two_object_prob):
        for obj in scene.objects:
            assert grammar.MIN_HALF_SIZE <= obj.size <= grammar.MAX_HALF_SIZE
            for frame in range(num_frames):
                x, y = obj.centre_at(frame)
                assert obj.size <= x <= size - obj.size and obj.size <= y <= size - obj.size
        if len(scene.objects) == 2:
            a, b = scene.objects
            for frame in range(num_frames):
                (ax, ay), (bx, by) = a.centre_at(frame), b.centre_at(frame)
                assert max(abs(ax - bx), abs(ay - by)) >= a.size + b.size


def test_scene_dict_round_trip_is_json_friendly():
    scene = sample_scenes(1, seed=4, two_object_prob=1.0)[0]
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_canonical_captions():
    red = ToyObject("circle", "red", "left", 10.0, 10.0, 4.0)
    orange = ToyObject("square", "orange", "still", 20.0, 20.0, 4.0)
    assert caption(Scene((red,), "gray")) == "a red circle moving left on a gray background"
    assert caption(Scene((orange,), "black")) == "an orange square standing still on a black background"
    assert caption(Scene((red, orange), "navy")) == (
        "a red circle moving left and an orange square standing still on a navy background")


def test_all_captions_sizes_and_parse_back():
    assert len(all_captions("all")) == 640
    assert len(all_captions("train")) == 512 and len(all_captions("heldout")) == 128
    for text in all_captions("all"):
        spec = parse_caption(text)
        assert len(spec.objects) == 1 and spec.background in BACKGROUNDS


def test_every_expansion_parses_back_to_the_same_spec():
    vocab = set(vocabulary())
    for text in all_captions("all"):
        spec = parse_caption(text)
        for seed in range(4):
            expanded = expand_caption(text, seed)
            assert parse_caption(expanded) == spec, (text, expanded)
            assert set(tokenize(expanded)) <= vocab, expanded


def test_two_object_expansions_parse_back():
    for index, scene in enumerate(sample_scenes(100, seed=5, split="all", two_object_prob=1.0)):
        text = caption(scene)
        assert parse_caption(text) == spec_of(scene)
        assert parse_caption(expand_caption(text, index)) == spec_of(scene)


def test_expander_is_deterministic_and_varies_with_seed():
    text = "a red circle moving left on a gray background"
    assert expand_caption(text, 3) == expand_caption(text, 3)
    assert len({expand_caption(text, seed) for seed in range(20)}) > 5


@pytest.mark.parametrize("text", [
    "a photo of a cat",
    "a red circle moving left",  # no background
    "a circle moving left on a gray background",  # no colour
    "a red circle on a gray background",  # no motion
    "a red circle moving left and up on a gray background",
    "a red circle moving left on a gray and black background",
])
def test_parse_rejects_non_toy_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_parse_handles_word_order_and_synonyms():
    assert parse_caption("On a grey backdrop, a box in vivid yellow rises.") == CaptionSpec(
        (("yellow", "square", "up"),), "gray")
