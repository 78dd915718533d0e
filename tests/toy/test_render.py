"""Tests for the toy renderer: shapes, colours, motion and determinism of rendered clips."""

from __future__ import annotations

import torch

from tmdcli.toy.grammar import BACKGROUNDS, COLOURS, SHAPES, Scene, ToyObject, sample_scenes
from tmdcli.toy.render import CROSS_ARM_HALF_WIDTH, render_scenes, render_tensors, scene_tensors


def _rgb(name_to_rgb: dict, name: str) -> torch.Tensor:
    return torch.tensor(name_to_rgb[name], dtype=torch.float32) / 255.0 * 2 - 1


def test_shape_dtype_range_and_determinism():
    scenes = sample_scenes(16, seed=0, split="all", two_object_prob=0.3)
    clips = render_scenes(scenes)
    assert clips.shape == (16, 3, 17, 32, 32) and clips.dtype == torch.float32
    assert clips.min() >= -1.0 and clips.max() <= 1.0
    assert torch.equal(clips, render_scenes(scenes))
    assert render_scenes(scenes, num_frames=5, size=24).shape == (16, 3, 5, 24, 24)


def test_object_colour_at_centre_and_background_elsewhere():
    for shape in SHAPES:
        obj = ToyObject(shape, "yellow", "still", 16.0, 16.0, 5.0)
        clip = render_scenes([Scene((obj,), "navy")])[0]
        # The centre pixel of every shape lies inside it (the triangle's centre row is 2.5 px wide at half 5).
        assert torch.allclose(clip[:, :, 16, 16], _rgb(COLOURS, "yellow")[:, None].expand(3, 17), atol=1e-5)
        assert torch.allclose(clip[:, :, 2, 2], _rgb(BACKGROUNDS, "navy")[:, None].expand(3, 17), atol=1e-5)


def test_shape_areas_are_distinct():
    areas = {}
    for shape in SHAPES:
        clip = render_scenes([Scene((ToyObject(shape, "white", "still", 16.0, 16.0, 5.0),), "black")])[0]
        coverage = (clip[0, 0] - clip[0, 0, 0, 0]) / (clip[0, 0].max() - clip[0, 0, 0, 0])
        areas[shape] = coverage.sum().item() / 100.0  # coverage / bounding-box area
    assert abs(areas["square"] - 1.0) < 0.05
    assert abs(areas["circle"] - torch.pi / 4) < 0.05
    assert abs(areas["triangle"] - 0.5) < 0.05
    arm = 2 * CROSS_ARM_HALF_WIDTH  # arm width over the box width
    assert abs(areas["cross"] - (4 * arm - arm**2) / 4) < 0.05


def test_motion_moves_the_object_in_the_right_direction():
    expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
    for motion, (sign_x, sign_y) in expected.items():
        obj = ToyObject("square", "red", motion, 16.0, 16.0, 4.0)
        clip = render_scenes([Scene((obj,), "black")])[0]
        weight = clip[0] - clip[0, 0, 0, 0]  # red channel above the background's
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx = (weight * xs).sum((1, 2)) / weight.sum((1, 2))
        cy = (weight * ys).sum((1, 2)) / weight.sum((1, 2))
        dx, dy = (cx[-1] - cx[0]).item(), (cy[-1] - cy[0]).item()
        assert abs(dx - sign_x * 12) < 0.5 and abs(dy - sign_y * 12) < 0.5, motion


def test_later_objects_draw_over_earlier_ones():
    below = ToyObject("square", "red", "still", 16.0, 16.0, 5.0)
    above = ToyObject("circle", "blue", "still", 16.0, 16.0, 3.0)
    clip = render_scenes([Scene((below, above), "gray")])[0]
    assert torch.allclose(clip[:, 0, 16, 16], _rgb(COLOURS, "blue"), atol=1e-5)
    assert torch.allclose(clip[:, 0, 16, 12], _rgb(COLOURS, "red"), atol=1e-5)


def test_render_tensors_matches_render_scenes():
    scenes = sample_scenes(12, seed=3, split="all")
    packed = scene_tensors(scenes)
    direct = render_tensors(packed.shape_id[:, 0], packed.rgb[:, 0], packed.bg_rgb, packed.x0[:, 0],
                            packed.y0[:, 0], packed.vx[:, 0], packed.vy[:, 0], packed.half[:, 0])
    assert torch.allclose(direct, render_scenes(scenes))
