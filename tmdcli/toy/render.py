"""Vectorised renderer for toy scenes: float32 clips `[B, 3, F, H, W]` in [-1, 1], on any torch device.

Each shape is a signed distance (pixels, positive inside) evaluated on the pixel-centre grid for all frames at
once; `alpha = clamp(0.5 + distance, 0, 1)` gives a one-pixel anti-aliased edge. Objects are composited over the
background in scene order. There is no noise, so a scene always renders to the same clip.

Two entry points:
- `render_scenes(scenes)` for `grammar.Scene` lists (one or two objects each);
- `render_tensors(...)` for single-object batches whose attributes already live in tensors, e.g. sampled on the GPU
  inside a training loop; `scene_tensors(scenes)` builds those tensors from scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tmdcli.toy.grammar import (
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOUR_NAMES,
    COLOURS,
    FRAME_SIZE,
    NUM_FRAMES,
    SHAPES,
    Scene,
)

SHAPE_IDS: dict[str, int] = {name: i for i, name in enumerate(SHAPES)}
CROSS_ARM_HALF_WIDTH = 0.35  # arm half-thickness as a fraction of the half-extent: fill ratio ~0.58 of the bbox
_TRIANGLE_EDGE_NORM = (1.0 + 0.25) ** 0.5  # the slanted edge |dx| = (y - top) / 2 has normal length sqrt(1 + 1/4)


def palette(device: torch.device | str = "cpu") -> torch.Tensor:
    """Object colours `[8, 3]` in [0, 1], indexed like `grammar.COLOUR_NAMES`."""
    return torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32, device=device) / 255.0


def background_palette(device: torch.device | str = "cpu") -> torch.Tensor:
    """Background colours `[4, 3]` in [0, 1], indexed like `grammar.BACKGROUND_NAMES`."""
    return torch.tensor([BACKGROUNDS[b] for b in BACKGROUND_NAMES], dtype=torch.float32, device=device) / 255.0


def pixel_grid(size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (x `[1, 1, 1, W]`, y `[1, 1, H, 1]`), pixel j spanning [j, j + 1]."""
    coords = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    return coords.view(1, 1, 1, size), coords.view(1, 1, size, 1)


def _edge(distance: torch.Tensor) -> torch.Tensor:
    """Coverage of a pixel whose centre lies `distance` pixels inside an edge: a one-pixel linear ramp."""
    return (distance + 0.5).clamp_(0.0, 1.0)


def shape_alpha(shape: str, dx: torch.Tensor, dy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of one shape at offsets dx `[..., 1, W]`, dy `[..., H, 1]` from its centre.

    Every shape fills the box [-half, half]^2: a circle of radius half, a square, an upward isosceles triangle
    (apex at the top of the box, base at the bottom) and a plus sign whose arms span the box. Coverage is
    `clamp(0.5 + signed distance, 0, 1)`; because clamping is monotonic it commutes with the min/max that
    intersect and unite half-planes, so most of the work happens on the small `[..., 1, W]` and `[..., H, 1]`
    factors and only one or two full-size tensors are allocated (large CPU allocations dominate the cost).
    """
    adx, ady = dx.abs(), dy.abs()
    if shape == "circle":
        return torch.hypot(dx, dy).neg_().add_(half + 0.5).clamp_(0.0, 1.0)
    if shape == "square":
        return torch.minimum(_edge(half - adx), _edge(half - ady))
    if shape == "triangle":
        # Inside when above the base (dy <= half) and within the slanted edges |dx| <= (dy + half) / 2.
        slanted = _edge((0.5 * (dy + half) - adx) / _TRIANGLE_EDGE_NORM)
        return torch.minimum(slanted, _edge(half - dy), out=slanted)
    if shape == "cross":
        arm = CROSS_ARM_HALF_WIDTH * half
        horizontal_bar = torch.minimum(_edge(half - adx), _edge(arm - ady))
        vertical_bar = torch.minimum(_edge(half - ady), _edge(arm - adx))
        return torch.maximum(horizontal_bar, vertical_bar, out=horizontal_bar)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def centre_tracks(x0: torch.Tensor, y0: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
                  num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (cx, cy), each `[B, F]`, of objects moving at constant velocity."""
    frames = torch.arange(num_frames, dtype=torch.float32, device=x0.device).view(1, num_frames)
    return x0.view(-1, 1) + vx.view(-1, 1) * frames, y0.view(-1, 1) + vy.view(-1, 1) * frames


def object_alpha(shape_id: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
                 half: torch.Tensor, *, num_frames: int, size: int) -> torch.Tensor:
    """Anti-aliased coverage `[B, F, H, W]` in [0, 1] of one object per batch element, moving at constant speed."""
    cx, cy = centre_tracks(x0.float(), y0.float(), vx.float(), vy.float(), num_frames)
    grid_x, grid_y = pixel_grid(size, x0.device)
    dx = grid_x - cx[:, :, None, None]  # [B, F, 1, W]
    dy = grid_y - cy[:, :, None, None]  # [B, F, H, 1]
    half = half.float().view(-1, 1, 1, 1)
    alpha = torch.empty(len(x0), num_frames, size, size, device=x0.device)
    shape_id = shape_id.long().view(-1)
    # Each element evaluates only its own shape's distance: a quarter of the work of evaluating all four.
    for index, shape in enumerate(SHAPES):
        rows = (shape_id == index).nonzero().squeeze(1)
        if len(rows):
            # index_copy_ rather than `alpha[rows] = ...`: CPU index_put costs milliseconds even for small batches.
            alpha.index_copy_(0, rows, shape_alpha(shape, dx[rows], dy[rows], half[rows]))
    return alpha


def composite(background_rgb: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Paint `(alpha [B, F, H, W], rgb [B, 3])` layers in order over a background `[B, 3]`; returns [-1, 1] clips."""
    batch, num_frames, height, width = layers[0][0].shape
    video = torch.empty(batch, 3, num_frames, height, width, device=layers[0][0].device)
    # Work in [-1, 1] directly (lerp is affine, so mapping the colours first equals mapping the result) and
    # in place, since every full-size temporary costs as much as the arithmetic.
    previous = (background_rgb.float() * 2 - 1).view(batch, 3, 1, 1, 1).expand_as(video)
    for alpha, rgb in layers:
        rgb = (rgb.float() * 2 - 1).view(batch, 3, 1, 1, 1).expand_as(video)
        torch.lerp(previous, rgb, alpha.unsqueeze(1).expand_as(video), out=video)
        previous = video
    return video


def render_tensors(shape_id: torch.Tensor, rgb: torch.Tensor, bg_rgb: torch.Tensor, x0: torch.Tensor,
                   y0: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor, half: torch.Tensor, *,
                   num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE) -> torch.Tensor:
    """Render single-object clips `[B, 3, F, H, W]` in [-1, 1] from per-element tensors on one device.

    shape_id `[B]` (index into `grammar.SHAPES`), rgb and bg_rgb `[B, 3]` in [0, 1], x0/y0 the centre at frame 0
    and vx/vy the velocity in pixels (per frame), half `[B]` the half-extent in pixels.
    """
    alpha = object_alpha(shape_id, x0.float(), y0.float(), vx.float(), vy.float(), half,
                         num_frames=num_frames, size=size)
    return composite(bg_rgb.float(), [(alpha, rgb.float())])


@dataclass(frozen=True)
class SceneTensors:
    """Per-object-slot tensors of a batch of scenes; slot k of a scene with fewer objects has `present` False."""

    shape_id: torch.Tensor  # [B, K] long
    rgb: torch.Tensor  # [B, K, 3] in [0, 1]
    bg_rgb: torch.Tensor  # [B, 3] in [0, 1]
    x0: torch.Tensor  # [B, K]
    y0: torch.Tensor  # [B, K]
    vx: torch.Tensor  # [B, K]
    vy: torch.Tensor  # [B, K]
    half: torch.Tensor  # [B, K]
    present: torch.Tensor  # [B, K] bool


def scene_tensors(scenes: Sequence[Scene], device: torch.device | str = "cpu") -> SceneTensors:
    """Pack scenes into slot tensors (K = the most objects in any scene)."""
    num_slots = max(len(scene.objects) for scene in scenes)
    rows: dict[str, list] = {k: [] for k in ("shape_id", "rgb", "x0", "y0", "vx", "vy", "half", "present")}
    for scene in scenes:
        for slot in range(num_slots):
            present = slot < len(scene.objects)
            obj = scene.objects[slot if present else 0]
            vx, vy = obj.velocity()
            rows["shape_id"].append(SHAPE_IDS[obj.shape])
            rows["rgb"].append(COLOURS[obj.colour])
            for key, value in (("x0", obj.x0), ("y0", obj.y0), ("vx", vx), ("vy", vy), ("half", obj.size)):
                rows[key].append(value)
            rows["present"].append(present)
    batch = len(scenes)

    def slots(values: list, dtype: torch.dtype) -> torch.Tensor:
        flat = torch.tensor(values, dtype=dtype, device=device)  # [B * K] or [B * K, 3]
        return flat.view(batch, num_slots, *flat.shape[1:])

    return SceneTensors(
        shape_id=slots(rows["shape_id"], torch.long),
        rgb=slots(rows["rgb"], torch.float32) / 255.0,
        bg_rgb=torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32, device=device) / 255.0,
        x0=slots(rows["x0"], torch.float32), y0=slots(rows["y0"], torch.float32),
        vx=slots(rows["vx"], torch.float32), vy=slots(rows["vy"], torch.float32),
        half=slots(rows["half"], torch.float32), present=slots(rows["present"], torch.bool),
    )


def render_scenes(scenes: Sequence[Scene], *, num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Render scenes to float32 clips `[B, 3, F, H, W]` in [-1, 1]; later objects draw over earlier ones."""
    if len(scenes) == 0:
        return torch.empty(0, 3, num_frames, size, size, device=device)
    packed = scene_tensors(scenes, device)
    layers = []
    for slot in range(packed.shape_id.shape[1]):
        alpha = object_alpha(packed.shape_id[:, slot], packed.x0[:, slot], packed.y0[:, slot], packed.vx[:, slot],
                             packed.vy[:, slot], packed.half[:, slot], num_frames=num_frames, size=size)
        alpha.mul_(packed.present[:, slot].view(-1, 1, 1, 1))  # absent slots draw nothing
        layers.append((alpha, packed.rgb[:, slot]))
    return composite(packed.bg_rgb, layers)
