"""A tiny TAEHV-style video decoder for Wan2.1 latents (`--decoder taehv:PATH`), our implementation of the public
MIT-licensed design by madebyollin ("taehv"), loading a user-supplied `taew2_1.pth` / `.safetensors` weights file.

It is an *approximate* decoder: a ~10M-parameter 2D conv net with a one-frame memory per block, trained to mimic
the Wan VAE decoder. It is much cheaper than the exact decoder but loses fine detail and can flicker; use it for
previews and speed, not for metrics against the exact decoder.

Architecture (the weight file's `decoder.<i>` indices are the positions in this sequence):

    0 Clamp (3 tanh(x / 3))  1 conv3x3(16 -> 256)  2 ReLU
    3-5   MemBlock(256)  6 Upsample x2   7 TGrow(256, 1)  8 conv3x3(256 -> 128, no bias)
    9-11  MemBlock(128) 12 Upsample x2  13 TGrow(128, 2) 14 conv3x3(128 -> 64, no bias)
    15-17 MemBlock(64)  18 Upsample x2  19 TGrow(64, 2)  20 conv3x3(64 -> 64, no bias)
    21 ReLU 22 conv3x3(64 -> 3)

A MemBlock sees its own input at the previous frame (zeros at frame 0): relu(convs(cat[x_t, x_{t-1}]) + x_t).
A TGrow turns each frame into `stride` frames with a 1x1 conv to stride x C channels. Latent frames T give 4T frames,
of which the first 3 are dropped: T = 21 -> 81 frames, 60x104 -> 480x832 pixels (8x). Output in [0, 1], mapped to
[-1, 1] like the Wan VAE's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = (256, 128, 64, 64)
TIME_UPSCALE = (False, True, True)  # Wan2.1: x4 in time over the three stages


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(x / 3.0)


class MemBlock(nn.Module):
    """Residual 3-conv block over the frame and the same block's previous input frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """One frame -> `stride` frames: a 1x1 conv to stride x C channels, split in time (earliest frame first)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def build_decoder(latent_channels: int = 16) -> nn.Sequential:
    """The decoder sequence in the weight file's index order (see the module docstring)."""
    c = CHANNELS
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, c[0]), nn.ReLU()]
    for stage in range(3):
        layers += [MemBlock(c[stage]), MemBlock(c[stage]), MemBlock(c[stage]), nn.Upsample(scale_factor=2),
                   TGrow(c[stage], 2 if TIME_UPSCALE[stage] else 1), _conv(c[stage], c[stage + 1], bias=False)]
    layers += [nn.ReLU(), _conv(c[3], 3)]
    return nn.Sequential(*layers)


class TinyVideoDecoder(nn.Module):
    """Wan2.1 latents (B, 16, T, H, W), un-normalised -> video (B, 3, 4T - 3, 8H, 8W) in [-1, 1]."""

    frames_to_trim = 3  # 2 ** (number of time up-scalings) - 1: aligns frame 0 with the Wan VAE's

    def __init__(self, latent_channels: int = 16):
        super().__init__()
        self.decoder = build_decoder(latent_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = z.shape
        x = z.permute(0, 2, 1, 3, 4).reshape(b * t, *z.shape[1:2], *z.shape[3:])  # frames as a batch, (B T) C H W
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                x = layer(x, _previous_frame(x, b))
            elif isinstance(layer, TGrow):
                x = _grow(layer, x)
            else:
                x = layer(x)
        frames = x.shape[0] // b
        video = x.view(b, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)[:, :, self.frames_to_trim:]
        return video.clamp(0.0, 1.0) * 2.0 - 1.0


def _previous_frame(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B T) C H W -> each frame's predecessor in its own clip, zeros for frame 0."""
    frames = x.view(batch, -1, *x.shape[1:])
    return F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1].reshape(x.shape)


def _grow(layer: TGrow, x: torch.Tensor) -> torch.Tensor:
    """(B T) C H W -> (B T stride) C H W: frame t's channel group k becomes frame t * stride + k."""
    n, c, h, w = x.shape
    return layer(x).reshape(n * layer.stride, c, h, w)


# --- loading ---------------------------------------------------------------------------------------------------

class TaehvWeightsError(ValueError):
    """The weights file is not a TAEHV Wan2.1 decoder (the message says why)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a `torch.save`d state dict (loaded with weights_only=True: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise TaehvWeightsError(f"{path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors all mean: not a readable weights file
        raise TaehvWeightsError(f"{path} is not a readable weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TaehvWeightsError(f"{path} holds no state dict of tensors")
    return state


def decoder_state(state: dict[str, torch.Tensor], model: TinyVideoDecoder) -> dict[str, torch.Tensor]:
    """The `decoder.*` tensors (the encoder's are ignored), TGrow weights trimmed to the kept time stride.

    A TGrow stored with more output channels than the model uses (time up-scaling disabled) keeps its last
    channel group, the one for the latest frame, as the reference implementation does.
    """
    wanted = model.state_dict()
    picked = {k: v for k, v in state.items() if k.startswith("decoder.")}
    missing = sorted(set(wanted) - set(picked))
    if missing:
        raise TaehvWeightsError(f"missing {len(missing)} decoder tensors (e.g. {missing[0]}): not a TAEHV decoder")
    out = {}
    for key, ref in wanted.items():
        value = picked[key]
        if value.ndim == ref.ndim and value.shape[1:] == ref.shape[1:] and value.shape[0] > ref.shape[0] \
                and key.endswith("conv.weight") and value.shape[2:] == (1, 1):
            value = value[-ref.shape[0]:]
        if value.shape != ref.shape:
            raise TaehvWeightsError(f"{key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)} "
                                    "(a TAEHV file for another model? Wan2.1 needs taew2_1)")
        out[key] = value
    return out


def load_tiny_decoder(path: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32) -> TinyVideoDecoder:
    """A TinyVideoDecoder with the weights of `path` (taew2_1.pth or .safetensors), in eval mode."""
    model = TinyVideoDecoder()
    model.load_state_dict(decoder_state(read_state_dict(path), model))
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def output_size(latent_frames: int, latent_height: int, latent_width: int) -> tuple[int, int, int]:
    """(frames, height, width) the tiny decoder makes from a latent of (T, H, W)."""
    return 4 * latent_frames - TinyVideoDecoder.frames_to_trim, 8 * latent_height, 8 * latent_width
