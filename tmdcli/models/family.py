"""Per-family training defaults, derived from a teacher's transformer config (stdlib only: plans never import torch).

TMD Table 7 (METHOD.md 4.1 and 6) gives two columns, Wan2.1 1.3B and 14B. Which column a teacher belongs to is a
property of its network, not of the name it was given on the command line: a 14B checkpoint passed as a folder must
train with the 14B values. So the family is recognised from the transformer's depth and width
(`num_layers`, `num_attention_heads * attention_head_dim`), read from `transformer/config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tmdcli.models.discriminator_config import default_disc_layers

STAGE2_LR = 1e-5  # Table 7: student, fake score and discriminator, both sizes


@dataclass(frozen=True)
class FamilyDefaults:
    """The Table-7 values a training stage uses when the user does not set them."""

    family: str  # "Wan2.1 1.3B", "Wan2.1 14B", or "unknown shape"
    num_layers: int  # L
    width: int  # D
    stage1_lr: float  # TM-MF pretraining lr
    stage2_lr: float  # DMD2-v lr (student, fake score, discriminator)
    norm_c: float  # TM-MF adaptive-loss constant c in units of d
    disc_layers: tuple[int, ...]  # teacher blocks feeding the GAN heads
    note: str | None = None  # set when the shape is not one of the paper's

    def describe(self) -> str:
        """The plan row: which column of Table 7 and why."""
        return (f"defaults for {self.family} (from the transformer config: L={self.num_layers}, width {self.width}): "
                f"Stage-1 lr {self.stage1_lr:g}, c = {self.norm_c:g} d; Stage-2 lr {self.stage2_lr:g}; "
                f"discriminator blocks {self.disc_layers}")


# (L, D) -> (family, Stage-1 lr, c per element). TMD Table 7; the 14B c is read as d / 1e5 (METHOD.md 6).
KNOWN_SHAPES: dict[tuple[int, int], tuple[str, float, float]] = {
    (30, 1536): ("Wan2.1 1.3B", 3e-5, 1.0),
    (40, 5120): ("Wan2.1 14B", 1e-5, 1e-5),
}
FALLBACK = KNOWN_SHAPES[(30, 1536)]  # other shapes (toy, tiny-random, custom): the 1.3B values


def _value(config, key: str):
    return config[key] if isinstance(config, dict) else getattr(config, key)


def family_defaults(transformer_config) -> FamilyDefaults:
    """The Table-7 defaults for a Wan transformer config (dict, FrozenDict or object with attributes).

    Recognised shapes: L = 30, D = 1536 (1.3B) and L = 40, D = 5120 (14B). Any other shape gets the 1.3B Stage-1
    values (lr 3e-5, c = d) with a note saying so. Discriminator blocks follow `default_disc_layers(L)`, which gives
    the paper's (15, 22, 29) and (19, 29, 39) for the two known depths.
    """
    num_layers = int(_value(transformer_config, "num_layers"))
    width = int(_value(transformer_config, "num_attention_heads")) * int(_value(transformer_config,
                                                                                "attention_head_dim"))
    known = KNOWN_SHAPES.get((num_layers, width))
    family, lr, c = known or FALLBACK
    note = None
    if known is None:
        family = "unknown shape"
        note = (f"L={num_layers}, width {width} is neither Wan2.1 1.3B (30, 1536) nor 14B (40, 5120): using the 1.3B "
                f"Stage-1 values (lr {lr:g}, c = {c:g} d) and discriminator blocks by the (L-1-2q, L-1-q, L-1) rule; "
                f"set --lr / --norm-c / --disc-layers to choose others")
    return FamilyDefaults(family=family, num_layers=num_layers, width=width, stage1_lr=lr, stage2_lr=STAGE2_LR,
                          norm_c=c, disc_layers=default_disc_layers(num_layers), note=note)
