"""A chunked, compile-friendly Wan2.1 VAE decode built from diffusers' own AutoencoderKLWan modules (same weights,
same math), and the PSNR used to compare decoders.

Why: the stock `AutoencoderKLWan._decode` runs its decoder one latent frame at a time and threads a Python list of
cached frames (with a "Rep" string marker) through every causal convolution; torch.compile breaks that into many
graphs and each frame is a tiny batch. Here the same computation is written as:

- a causal 3D convolution with an explicit state: the last 2 input frames of the previous chunk (zeros at the
  start). `conv(x, state)` is the module's own forward with `cache_x = state`; since the state always holds exactly
  2 frames, no temporal zero padding is added, and zeros at the start equal the module's causal padding;
- the temporal up-sampler (`upsample3d`) skips its time convolution on latent frame 0 and runs it causally, from
  zeros, on frames 1.. (what the stock "Rep" marker does), then interleaves the two output halves in time;
- per-frame parts (RMS norms, SiLU, the mid-block attention, spatial up-sampling) are called as they are.

The video is decoded in chunks: latent frame 0 alone (it is not up-sampled in time), then `chunk_frames` latent
frames at a time. Every chunk after the first has the same shape, so a compiled chunk function is traced twice at
most (plus once for a shorter last chunk). With chunk_frames = T - 1 the whole video is one chunk.
Memory grows with the chunk: its activations at full resolution hold 4 x chunk_frames frames (diffusers' holds 4).
Tolerance: with chunk_frames = 1 the pixels are bit-identical to diffusers' on the CPU; larger chunks change only
the convolutions' summation order (max abs difference <= 1e-5 in fp32, tests/test_speed.py).
Only the Wan2.1 decoder (`is_residual=False`, no patching) is covered; Wan2.2's residual decoder raises.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class CausalStates:
    """The rolling 2-frame inputs of each causal convolution, keyed by call order within one chunk."""

    def __init__(self):
        self.states: list[torch.Tensor | None] = []
        self.index = 0

    def start_chunk(self) -> None:
        self.index = 0

    def skip(self) -> None:
        """Keep a slot (still unstarted) for a convolution this chunk does not run: the call order stays fixed."""
        if self.index == len(self.states):
            self.states.append(None)
        self.index += 1

    def step(self, conv, x: torch.Tensor) -> torch.Tensor:
        """Causal conv of `x` continuing the previous chunk: `conv(x, last 2 frames before x)` (zeros at start)."""
        if conv._padding[4] == 0:  # temporal kernel 1 (shortcuts): no history needed
            return conv(x)
        if self.index == len(self.states):
            self.states.append(None)
        state = self.states[self.index]
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[1], 2, *x.shape[3:])
        self.states[self.index] = torch.cat([state, x], dim=2)[:, :, -2:].clone()
        self.index += 1
        return conv(x, state)


def _residual_block(block, x: torch.Tensor, states: CausalStates) -> torch.Tensor:
    """WanResidualBlock.forward with its two causal convolutions carried across chunks."""
    h = block.conv_shortcut(x)
    x = block.nonlinearity(block.norm1(x))
    x = states.step(block.conv1, x)
    x = block.dropout(block.nonlinearity(block.norm2(x)))
    x = states.step(block.conv2, x)
    return x + h


def _resample(resample, x: torch.Tensor, states: CausalStates, first: bool) -> torch.Tensor:
    """WanResample (decoder modes): time up-sampling x2 except on latent frame 0, then per-frame spatial resample."""
    b, c, t, h, w = x.shape
    if resample.mode == "upsample3d" and not first:  # latent frame 0 passes the time conv untouched
        x = states.step(resample.time_conv, x)  # (B, 2C, T, H, W): two output frames per input frame
        x = torch.stack((x[:, :c], x[:, c:]), dim=3).reshape(b, c, 2 * t, h, w)
    elif resample.mode == "upsample3d":
        states.skip()
    t = x.shape[2]
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    x = resample.resample(x)
    return x.view(b, t, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)


def decode_chunk(decoder, x: torch.Tensor, states: CausalStates, first: bool) -> torch.Tensor:
    """WanDecoder3d.forward on consecutive latent frames `x` (B, z_dim, T, H, W), continuing `states`."""
    states.start_chunk()
    x = states.step(decoder.conv_in, x)
    mid = decoder.mid_block
    x = _residual_block(mid.resnets[0], x, states)
    for attention, block in zip(mid.attentions, mid.resnets[1:]):
        x = _residual_block(block, attention(x), states)
    for up_block in decoder.up_blocks:
        for block in up_block.resnets:
            x = _residual_block(block, x, states)
        if up_block.upsamplers is not None:
            x = _resample(up_block.upsamplers[0], x, states, first)
    x = decoder.nonlinearity(decoder.norm_out(x))
    return states.step(decoder.conv_out, x)


def check_supported(vae) -> None:
    """Raise ValueError for VAEs this decode does not reproduce (Wan2.2's residual decoder, patched VAEs)."""
    config = vae.config
    if getattr(config, "is_residual", False) or getattr(config, "patch_size", None) is not None:
        raise ValueError("the chunked decode covers the Wan2.1 VAE only (is_residual=False, no patch_size)")


def chunked_decode(vae, z: torch.Tensor, *, chunk_frames: int = 4,
                   chunk_fn: Callable | None = None) -> torch.Tensor:
    """`vae.decode(z).sample` (un-normalised latents z (B, C, T, H, W)) computed chunk by chunk; clamped to [-1, 1].

    `chunk_fn` replaces `decode_chunk` (e.g. its torch.compile'd version); it receives the same arguments.
    """
    check_supported(vae)
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    run = chunk_fn or decode_chunk
    x = vae.post_quant_conv(z)
    states = CausalStates()
    outputs = [run(vae.decoder, x[:, :, :1], states, True)]
    for start in range(1, x.shape[2], chunk_frames):
        outputs.append(run(vae.decoder, x[:, :, start:start + chunk_frames], states, False))
    return torch.cat(outputs, dim=2).clamp(-1.0, 1.0)


def psnr(video: torch.Tensor, reference: torch.Tensor, *, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of `video` against `reference` (pixels in [-1, 1]: range 2); inf if equal."""
    mse = float(torch.mean((video.float() - reference.float()) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)
