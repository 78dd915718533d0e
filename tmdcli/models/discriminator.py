"""GAN discriminator of Stage 2 (DMD2-v; METHOD.md 5.1, 5.2, decision D8): one multi-scale Conv3D head per teacher
feature layer, reading unpatchified teacher block outputs at latent resolution.

Legend: B batch, C feature channels (teacher width D / (p_t p_h p_w) = D / 4), T, H, W latent grid, K heads.

Two rules make the head usable on the tiny test teachers (latent grids like 3x4x4) as well as on Wan (21x60x104):
- Pool kernels are clamped per dimension to the input size (`pool_kernel`). The architecture, and so the parameter
  count and the state dict, never depend on the input size; on a small grid the coarse scales all pool to 1x1x1.
- GroupNorm uses the largest group count <= 32 that divides C and leaves >= 2 channels per group (`num_groups`).
  This is 32 for every Wan width (C = 384, 640, 1280); one channel per group would make a 1x1x1 branch constant.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from tmdcli.models.discriminator_config import (  # noqa: F401 (re-exported: the torch-free half)
    CHANNEL_REDUCTION_14B,
    DEFAULT_SCALES,
    MAX_GROUPS,
    WIDTH_14B,
    DiscriminatorConfig,
    count_parameters,
    default_disc_layers,
    discriminator_config_for,
    num_groups,
    pool_kernel,
)

class MultiScaleHead(nn.Module):
    """One head: per scale k, Conv1 -> GN -> LReLU -> AvgPool(k) -> Conv3 -> GN -> LReLU -> global average;
    the K branch vectors are concatenated and mapped to one logit (METHOD.md 5.2, FastGen `multiscale_down_mlp_large`
    structure). `channels < in_channels` is the D8 channel reduction, applied by the first 1x1x1 conv."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        c_in, c, slope = cfg.in_channels, cfg.channels, cfg.negative_slope
        self.scales = tuple(cfg.scales)
        self.pre = nn.ModuleList(nn.Sequential(nn.Conv3d(c_in, c, 1), nn.GroupNorm(num_groups(c), c),
                                               nn.LeakyReLU(slope)) for _ in self.scales)
        self.post = nn.ModuleList(nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.GroupNorm(num_groups(c), c),
                                                nn.LeakyReLU(slope)) for _ in self.scales)
        self.mlp = nn.Sequential(nn.Linear(len(self.scales) * c, cfg.hidden_dim), nn.LeakyReLU(slope),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden_dim, 1))

    def forward(self, feat_BCTHW: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B,) logits."""
        vectors_BC = []
        for scale, pre, post in zip(self.scales, self.pre, self.post):
            h = pre(feat_BCTHW)
            if scale > 1:
                kernel = pool_kernel(scale, tuple(h.shape[2:]))
                h = F.avg_pool3d(h, kernel_size=kernel, stride=kernel)
            vectors_BC.append(post(h).mean(dim=(2, 3, 4)))  # AdaptiveAvgPool3d(1) + flatten
        return self.mlp(torch.cat(vectors_BC, dim=1)).squeeze(1)


class Discriminator(ModelMixin, ConfigMixin):
    """One `MultiScaleHead` per teacher feature layer; forward(features) -> logits (B, K) (METHOD.md 5.1).

    Saved and loaded like diffusers models (`save_pretrained` / `from_pretrained`), with `DiscriminatorConfig`'s
    fields as its config.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int, channels: int, layers: tuple[int, ...] | list[int], hidden_dim: int = 1024,
                 scales: tuple[int, ...] | list[int] = DEFAULT_SCALES, negative_slope: float = 0.2,
                 dropout: float = 0.1):
        super().__init__()
        cfg = DiscriminatorConfig(in_channels=in_channels, channels=channels, layers=tuple(layers),
                                  hidden_dim=hidden_dim, scales=tuple(scales), negative_slope=negative_slope,
                                  dropout=dropout)
        if not cfg.layers:
            raise ValueError("the discriminator needs at least one feature layer")
        if any(k < 1 for k in cfg.scales) or not cfg.scales:
            raise ValueError(f"scales must be positive integers, got {cfg.scales}")
        self.heads = nn.ModuleList(MultiScaleHead(cfg) for _ in cfg.layers)

    @classmethod
    def from_dataclass(cls, cfg: DiscriminatorConfig) -> "Discriminator":
        return cls(**asdict(cfg))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: K tensors (B, C, T, H, W), in `layers` order -> logits (B, K), in float32.

        Inputs are cast to the parameters' dtype (the teacher may run in bf16); gradients flow back through the cast.
        """
        if len(features) != self.num_heads:
            raise ValueError(f"expected {self.num_heads} feature tensors (layers {self.config.layers}), "
                             f"got {len(features)}")
        dtype = self.heads[0].mlp[0].weight.dtype
        logits = [head(f.to(dtype)) for head, f in zip(self.heads, features)]
        return torch.stack(logits, dim=1).float()


def discriminator_for(transformer_config, layers: tuple[int, ...] | None = None, *,
                      channel_reduction: int | None = None, seed: int = 0, **overrides) -> Discriminator:
    """Build a freshly initialised (PyTorch default init, fixed seed) discriminator for a Wan transformer config.

    The RNG is forked, so building does not disturb the caller's global random state.
    """
    cfg = discriminator_config_for(transformer_config, layers, channel_reduction=channel_reduction, **overrides)
    return init_discriminator(cfg, seed=seed)


def init_discriminator(cfg: DiscriminatorConfig, *, seed: int = 0) -> Discriminator:
    """The discriminator's init rule: PyTorch's default Conv3d/Linear/GroupNorm init under `manual_seed(seed)`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Discriminator.from_dataclass(cfg)
