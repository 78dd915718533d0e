"""A loaded teacher: Wan transformer, VAE, umT5 text encoder and tokenizer behind one small interface
(text encoding with the negative prompt, velocity with optional CFG, block features, VAE encode/decode)."""

from __future__ import annotations

from typing import Sequence

import torch

from tmdcli.models import wan
from tmdcli.models.defaults import WAN_NEGATIVE_PROMPT, SamplingDefaults  # noqa: F401 (re-export)

class Teacher:
    """Frozen teacher components on one device. `transformer` may be None when only text/VAE are needed."""

    def __init__(self, *, name: str, source: str, defaults: SamplingDefaults, transformer, vae, text_encoder,
                 tokenizer, device: torch.device, dtype: torch.dtype):
        self.name, self.source, self.defaults = name, source, defaults
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.device, self.dtype = device, dtype
        self._negative: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.blocks)

    # --- text -------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_sequence_length, text_dim) umT5 embeddings, zero past each prompt's length."""
        emb, _ = wan.encode_text(self.tokenizer, self.text_encoder, prompts, self.defaults.max_sequence_length,
                                 self.device, self.dtype)
        return emb

    def negative_embedding(self, batch: int) -> torch.Tensor:
        """The negative prompt's embedding, computed once and repeated (CFG and the TM-MF null condition)."""
        if self._negative is None:
            self._negative = self.encode_prompts([self.defaults.negative_prompt])
        return self._negative.expand(batch, -1, -1)

    # --- transformer ------------------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, *,
                 text_neg: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 skip_block: int | None = None) -> torch.Tensor:
        """v(x_t, t) with optional CFG `v_neg + g (v_c - v_neg)` (and skip-layer guidance: `skip_block` left out
        of the negative pass)."""
        return wan.guided_velocity(self.transformer, x_t.to(self.dtype), t, text.to(self.dtype),
                                   None if text_neg is None else text_neg.to(self.dtype), guidance_scale,
                                   skip_block=skip_block)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, layers: Sequence[int]):
        """Unpatchified outputs of the given blocks (the GAN discriminator's inputs)."""
        return wan.block_features(self.transformer, x_t.to(self.dtype), (1000.0 * t).float(), text.to(self.dtype),
                                  layers)

    # --- VAE --------------------------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        config = self.transformer.config if self.transformer is not None else self._transformer_config
        return wan.latent_shape(self.vae, config, num_frames, height, width)

    def encode_video(self, video_B3FHW: torch.Tensor) -> torch.Tensor:
        return wan.vae_encode(self.vae, video_B3FHW.to(self.device))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return wan.vae_decode(self.vae, latents.to(self.device))

    _transformer_config = None  # set by the loader when the transformer itself is not loaded
