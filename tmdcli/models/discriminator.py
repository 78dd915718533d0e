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

import math
from dataclasses import asdict, dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

DEFAULT_SCALES = (1, 2, 4, 8, 16)
MAX_GROUPS = 32
CHANNEL_REDUCTION_14B = 2  # D8: the multi-scale head at C/2 gives ~188M for 3 heads (paper: 172M)
WIDTH_14B = 5120


@dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig:
    """Shape of the discriminator (METHOD.md 5.2). 1.3B: in_channels = channels = 384, layers (15, 22, 29)."""

    in_channels: int  # C of the unpatchified teacher features, D / 4
    channels: int  # width of the conv branches; in_channels / channel_reduction (D8)
    layers: tuple[int, ...]  # teacher blocks (0-indexed) whose outputs feed one head each
    hidden_dim: int = 1024  # width of the logit MLP
    scales: tuple[int, ...] = DEFAULT_SCALES  # average-pool factors k of the branches (k = 1: no pooling)
    negative_slope: float = 0.2  # LeakyReLU
    dropout: float = 0.1  # in the logit MLP


def num_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Largest g <= max_groups dividing `channels` with >= 2 channels per group (1 if channels < 2)."""
    for g in range(min(max_groups, channels // 2), 0, -1):
        if channels % g == 0:
            return g
    return 1


def pool_kernel(scale: int, size_THW: tuple[int, ...]) -> tuple[int, ...]:
    """AvgPool3d kernel (= stride) for a scale: `scale` per dimension, clamped to the input size there."""
    return tuple(min(scale, s) for s in size_THW)


def default_disc_layers(num_blocks: int) -> tuple[int, ...]:
    """Feature layers (0-indexed): `(L-1-2q, L-1-q, L-1)` with `q = L // 4` (TMD Table 7 generalised).

    Gives (15, 22, 29) for L = 30 and (19, 29, 39) for L = 40, the paper's layers; (5, 8, 11) for L = 12 and
    (1, 2, 3) for L = 4. With fewer than 4 blocks every block feeds a head.
    """
    if num_blocks < 1:
        raise ValueError(f"a teacher needs at least one block, got {num_blocks}")
    if num_blocks < 4:
        return tuple(range(num_blocks))
    q = num_blocks // 4
    return (num_blocks - 1 - 2 * q, num_blocks - 1 - q, num_blocks - 1)


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


def _config_value(transformer_config, key: str):
    return transformer_config[key] if isinstance(transformer_config, dict) else getattr(transformer_config, key)


def discriminator_config_for(transformer_config, layers: tuple[int, ...] | None = None, *,
                             channel_reduction: int | None = None, **overrides) -> DiscriminatorConfig:
    """The discriminator shape for a Wan transformer config (diffusers config, FrozenDict or dict).

    Args:
        layers: feature layers; default `default_disc_layers(num_layers)`.
        channel_reduction: conv width = C / this; default 2 for the 14B width (D = 5120, decision D8), else 1.
        overrides: other `DiscriminatorConfig` fields (hidden_dim, scales, ...).
    """
    dim = _config_value(transformer_config, "num_attention_heads") * _config_value(transformer_config,
                                                                                   "attention_head_dim")
    in_channels = dim // math.prod(_config_value(transformer_config, "patch_size"))
    if channel_reduction is None:
        channel_reduction = CHANNEL_REDUCTION_14B if dim >= WIDTH_14B else 1
    if channel_reduction < 1 or in_channels % channel_reduction:
        raise ValueError(f"channel_reduction {channel_reduction} must be >= 1 and divide C = {in_channels}")
    if layers is None:
        layers = default_disc_layers(_config_value(transformer_config, "num_layers"))
    return DiscriminatorConfig(in_channels=in_channels, channels=in_channels // channel_reduction,
                               layers=tuple(layers), **overrides)


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


def count_parameters(cfg: DiscriminatorConfig) -> int:
    """Parameter count from the layer shapes alone (no allocation); equals `sum(p.numel())` of the built model."""
    c_in, c, k = cfg.in_channels, cfg.channels, len(cfg.scales)
    per_scale = (c_in * c + c) + 2 * c + (27 * c * c + c) + 2 * c  # conv1, GN, conv3, GN
    mlp = (k * c * cfg.hidden_dim + cfg.hidden_dim) + (cfg.hidden_dim + 1)
    return len(cfg.layers) * (k * per_scale + mlp)
