"""The discriminator's shape without torch: its config, the feature-layer rule, the group and pool rules and the
exact parameter count, so `--dry-run` plans can size it without importing torch (the modules are in
discriminator.py, which re-exports these names)."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def count_parameters(cfg: DiscriminatorConfig) -> int:
    """Parameter count from the layer shapes alone (no allocation); equals `sum(p.numel())` of the built model."""
    c_in, c, k = cfg.in_channels, cfg.channels, len(cfg.scales)
    per_scale = (c_in * c + c) + 2 * c + (27 * c * c + c) + 2 * c  # conv1, GN, conv3, GN
    mlp = (k * c * cfg.hidden_dim + cfg.hidden_dim) + (cfg.hidden_dim + 1)
    return len(cfg.layers) * (k * per_scale + mlp)
