"""Wan2.1 transformer, called submodule by submodule (WAN.md section 7), plus the teacher's text and VAE paths.

We never fork `transformer_wan.py`: these functions call the diffusers model's own submodules in the order of its
`forward` (rope, patch embedding, condition embedder, blocks, output layer), so that the backbone/head split can stop
between blocks. `test_split_exactness` checks that the composition equals `forward` bit for bit.

Legend: B batch, N video tokens, D model width, S text tokens, C latent channels; `t1000` = 1000 * t (Wan's timestep).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class BackboneOut:
    """What the backbone computes once per outer step and every head call reuses (WAN.md 7.1)."""

    m: torch.Tensor  # (B, N, D) tokens after block L-H-1
    rotary_emb: tuple[torch.Tensor, torch.Tensor]  # grid-only, identical for y_s (same shape as x_t)
    text: torch.Tensor  # (B, S, D) projected text
    grid: tuple[int, int, int]  # (F', H', W') patch grid, for unpatchify
    temb: torch.Tensor  # (B, D) time embedding of t_i (diagnostics)


def time_embedding(transformer, t1000: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's own time path: sinusoid -> time_embedder -> (temb (B, D), timestep_proj (B, 6, D))."""
    ce = transformer.condition_embedder
    freq = ce.timesteps_proj(t1000)
    embedder_dtype = next(iter(ce.time_embedder.parameters())).dtype
    temb = ce.time_embedder(freq.to(embedder_dtype)).type_as(like)  # diffusers casts temb to the raw text dtype
    tproj = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
    return temb, tproj


def patch_tokens(transformer, x_BCTHW: torch.Tensor) -> torch.Tensor:
    """Patch embedding as (B, N, D) contiguous tokens (shared by x_t and y_s in the student)."""
    return transformer.patch_embedding(x_BCTHW).flatten(2).transpose(1, 2).contiguous()


def patch_grid(transformer, x_BCTHW: torch.Tensor) -> tuple[int, int, int]:
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, f, h, w = x_BCTHW.shape
    return f // p_t, h // p_h, w // p_w


def run_blocks(transformer, blocks: Sequence[torch.nn.Module], h: torch.Tensor, text: torch.Tensor,
               tproj: torch.Tensor, rotary_emb, *, checkpointing: bool = False) -> torch.Tensor:
    """Run DiT blocks in order. With `checkpointing` (and grad on) each block recomputes its activations in the
    backward pass: the split bypasses `forward`, so diffusers' own checkpointing switch does not apply here."""
    use_ckpt = checkpointing and torch.is_grad_enabled()
    for block in blocks:
        if use_ckpt:
            h = checkpoint(block, h, text, tproj, rotary_emb, use_reentrant=False)
        else:
            h = block(h, text, tproj, rotary_emb)
    return h


def output_layer(transformer, h: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Wan's output layer: fp32 LayerNorm modulated by `scale_shift_table + temb`, proj_out, unpatchify."""
    shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    h = (transformer.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
    h = transformer.proj_out(h)
    return unpatchify(h, grid, transformer.config.patch_size)


def unpatchify(tokens_BNX: torch.Tensor, grid: tuple[int, int, int], patch_size) -> torch.Tensor:
    """(B, N, p_t p_h p_w C) -> (B, C, F, H, W), the permutation of diffusers' Wan forward."""
    f, hh, ww = grid
    p_t, p_h, p_w = patch_size
    b = tokens_BNX.shape[0]
    x = tokens_BNX.reshape(b, f, hh, ww, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def unpatchify_features(tokens_BND: torch.Tensor, grid: tuple[int, int, int], patch_size) -> torch.Tensor:
    """Block features (B, N, D) -> (B, D / (p_t p_h p_w), F, H, W) at latent resolution (METHOD.md 10.6)."""
    return unpatchify(tokens_BND, grid, patch_size)


def prologue(transformer, x_t: torch.Tensor, t1000: torch.Tensor, text_raw: torch.Tensor):
    """Steps 1-3 of Wan's forward: rope, patch tokens, time and text embeddings."""
    rotary_emb = transformer.rope(x_t)
    h = patch_tokens(transformer, x_t)
    temb, tproj = time_embedding(transformer, t1000, like=text_raw)
    text = transformer.condition_embedder.text_embedder(text_raw)
    return h, rotary_emb, text, temb, tproj


def backbone_forward(transformer, x_t: torch.Tensor, t1000: torch.Tensor, text_raw: torch.Tensor,
                     num_backbone_blocks: int, *, checkpointing: bool = False) -> BackboneOut:
    """Patch + condition embedding + the first L-H blocks (TMD Sec. 3, Fig. 2): m = m_theta(x_t, t, c)."""
    h, rotary_emb, text, temb, tproj = prologue(transformer, x_t, t1000, text_raw)
    h = run_blocks(transformer, transformer.blocks[:num_backbone_blocks], h, text, tproj, rotary_emb,
                   checkpointing=checkpointing)
    return BackboneOut(m=h, rotary_emb=rotary_emb, text=text, grid=patch_grid(transformer, x_t), temb=temb)


def block_features(transformer, x_t: torch.Tensor, t1000: torch.Tensor, text_raw: torch.Tensor,
                   layers: Sequence[int], *, checkpointing: bool = False) -> list[torch.Tensor]:
    """Unpatchified outputs of the given blocks (0-indexed), stopping after the last one needed (GAN features)."""
    wanted = sorted(set(layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= len(transformer.blocks):
        raise ValueError(f"feature layers {layers} out of range for {len(transformer.blocks)} blocks")
    h, rotary_emb, text, _, tproj = prologue(transformer, x_t, t1000, text_raw)
    grid = patch_grid(transformer, x_t)
    feats = {}
    for i, block in enumerate(transformer.blocks[: wanted[-1] + 1]):
        h = run_blocks(transformer, [block], h, text, tproj, rotary_emb, checkpointing=checkpointing)
        if i in wanted:
            feats[i] = unpatchify_features(h, grid, transformer.config.patch_size)
    return [feats[i] for i in layers]


def velocity_and_features(transformer, x_t: torch.Tensor, t: torch.Tensor, text_raw: torch.Tensor,
                          layers: Sequence[int], *, checkpointing: bool = False
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One full forward giving the velocity and the unpatchified outputs of `layers` (the Stage-2 student step
    needs both from the teacher's conditional pass: x0 for VSD, features for the GAN generator loss)."""
    t1000 = (1000.0 * t.to(torch.float64)).float()
    h, rotary_emb, text, temb, tproj = prologue(transformer, x_t, t1000, text_raw)
    grid = patch_grid(transformer, x_t)
    feats = {}
    for i, block in enumerate(transformer.blocks):
        h = run_blocks(transformer, [block], h, text, tproj, rotary_emb, checkpointing=checkpointing)
        if i in layers:
            feats[i] = unpatchify_features(h, grid, transformer.config.patch_size)
    return output_layer(transformer, h, temb, grid), [feats[i] for i in layers]


def velocity(transformer, x_t: torch.Tensor, t: torch.Tensor, text_raw: torch.Tensor) -> torch.Tensor:
    """Teacher velocity v(x_t, t) = E[x1 - x | x_t] (TMD Eq. 2): Wan's network output, fed 1000 * t."""
    t1000 = (1000.0 * t).to(torch.float32)
    return transformer(x_t, t1000, text_raw, return_dict=False)[0]


def velocity_skipping_block(transformer, x_t: torch.Tensor, t: torch.Tensor, text_raw: torch.Tensor,
                            skip_block: int) -> torch.Tensor:
    """The teacher's velocity with block `skip_block` (0-indexed) left out: its input goes straight to the next
    block (skip-layer guidance's perturbed pass; METHOD.md 5.4, FastGen `skip_layers`). Same time input as
    `velocity`."""
    if not 0 <= skip_block < len(transformer.blocks):
        raise ValueError(f"skip block {skip_block} out of range for {len(transformer.blocks)} blocks")
    t1000 = (1000.0 * t).to(torch.float32)
    h, rotary_emb, text, temb, tproj = prologue(transformer, x_t, t1000, text_raw)
    kept = [block for i, block in enumerate(transformer.blocks) if i != skip_block]
    h = run_blocks(transformer, kept, h, text, tproj, rotary_emb)
    return output_layer(transformer, h, temb, patch_grid(transformer, x_t))


def guided_velocity(transformer, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                    text_neg: torch.Tensor | None, guidance_scale: float,
                    skip_block: int | None = None) -> torch.Tensor:
    """CFG velocity `v_neg + g (v_c - v_neg)`; two passes as in the Wan pipeline (one when g == 1).

    With `skip_block` the unconditional pass runs without that block (CFG + skip-layer guidance, the KD pairs of
    METHOD.md 5.4): `v_neg^skip + g (v_c - v_neg^skip)`, which pushes the sample away from the degraded network too.
    """
    v_c = velocity(transformer, x_t, t, text)
    if text_neg is None or guidance_scale == 1.0:
        return v_c
    if skip_block is None:
        v_n = velocity(transformer, x_t, t, text_neg)
    else:
        v_n = velocity_skipping_block(transformer, x_t, t, text_neg, skip_block)
    return v_n + guidance_scale * (v_c - v_n)


# --- text encoder (umT5) ---------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The Wan pipeline's prompt cleaning (HTML unescape, collapsed whitespace); ftfy is optional there, unused here."""
    return _WHITESPACE.sub(" ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: Sequence[str], max_sequence_length: int,
                device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """umT5 embeddings as the Wan pipeline makes them: rows past each prompt's true length are exactly zero.

    Returns (embeddings (B, max_sequence_length, text_dim) in `dtype`, lengths (B,) int64).
    """
    batch = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=max_sequence_length,
                      truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    lengths = mask.gt(0).sum(dim=1).long()
    hidden = text_encoder(ids, mask).last_hidden_state.to(dtype)
    keep = torch.arange(max_sequence_length, device=hidden.device)[None, :] < lengths[:, None]
    return hidden * keep[..., None].to(hidden.dtype), lengths.cpu()


# --- VAE -------------------------------------------------------------------------------------------------------

def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


@torch.no_grad()
def vae_encode(vae, video_B3FHW: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> normalised latents `(mode - latents_mean) / latents_std` (the Wan pipeline's convention)."""
    vae_dtype = next(vae.parameters()).dtype
    z = vae.encode(video_B3FHW.to(vae_dtype)).latent_dist.mode().float()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor, *, decode=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalised latents -> pixels in [-1, 1] (the VAE clamps), float32.

    `decode` (un-normalised z -> pixels) replaces `vae.decode(z).sample`, e.g. the chunked or tiny decoders of
    runtime/speed.py; `dtype` is the one it computes in (default: the VAE's)."""
    vae_dtype = dtype or next(vae.parameters()).dtype
    z = latents.float()
    mean, std = _latent_stats(vae, z)
    run = decode or (lambda z_: vae.decode(z_).sample)
    return run((z * std + mean).to(vae_dtype)).float()


def latent_shape(vae, transformer_config, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the latent for a video; raises ValueError for sizes the Wan VAE/patching cannot take."""
    st = int(getattr(vae.config, "scale_factor_temporal", 4))
    ss = int(getattr(vae.config, "scale_factor_spatial", 8))
    _, p_h, p_w = transformer_config.patch_size
    if (num_frames - 1) % st != 0:
        raise ValueError(f"frames must be {st}k+1 (e.g. {st * ((num_frames - 1) // st) + 1}), got {num_frames}")
    if height % (ss * p_h) or width % (ss * p_w):
        raise ValueError(f"height and width must be multiples of {ss * p_h}, got {height}x{width}")
    return (vae.config.z_dim, (num_frames - 1) // st + 1, height // ss, width // ss)


def float32_rope(transformer) -> None:
    """diffusers builds the rotary tables in float64 on CPU; keep them float32 so rotary products stay float32."""
    rope = transformer.rope
    for name, buf in list(rope.named_buffers(recurse=False)):
        if buf.dtype == torch.float64:
            setattr(rope, name, buf.float())
