"""Print README's "Does it fit?" table from the memory model (tmdcli/runtime/estimates.py), so it can be regenerated
after any change to the model: `python benchmarks/fit_table.py`.

Peak GiB per GPU at 81x480x832 (latent 16x21x60x104, 32,760 tokens), micro-batch 1, fp32 master weights + AdamW,
bf16 frozen teacher; Stage 2 is the larger of its student and critic steps. No torch needed.
"""

from __future__ import annotations

from tmdcli.models.defaults import WAN21_TRANSFORMER_CONFIGS
from tmdcli.models.discriminator_config import count_parameters, default_disc_layers, discriminator_config_for
from tmdcli.runtime.estimates import WanShape, dmd_estimate, tm_meanflow_estimate

LATENT = (16, 21, 60, 104)
COLUMNS = (("1 GPU or DDP, checkpointing", 1, False, True), ("FSDP2 8 GPUs, checkpointing", 8, True, True),
           ("FSDP2 8 GPUs, no checkpointing", 8, True, False), ("FSDP2 16 GPUs, checkpointing", 16, True, True))


def stage1(config: str, n: int, world: int, sharded: bool, ckpt: bool) -> float:
    shape = WanShape.from_config(WAN21_TRANSFORMER_CONFIGS[config])
    return tm_meanflow_estimate(shape, LATENT, num_head_blocks=5, batch=64, micro_batch=1, world_size=world,
                                checkpointing=ckpt, sharded=sharded, cfg_scale=3.0, r_equals_s_prob=0.75).peak_gib


def stage2(config: str, n: int, world: int, sharded: bool, ckpt: bool, method: str = "tmd", lora: int = 0) -> float:
    tc = WAN21_TRANSFORMER_CONFIGS[config]
    layers = default_disc_layers(tc["num_layers"])
    return dmd_estimate(WanShape.from_config(tc), LATENT, num_head_blocks=5, num_inner_steps=n, method=method,
                        discriminator_params=count_parameters(discriminator_config_for(tc, layers)),
                        last_disc_layer=max(layers), batch=64, micro_batch=1, world_size=world, checkpointing=ckpt,
                        sharded=sharded, lora_rank=lora).peak_gib


def fmt(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib < 100 else f"{gib:.0f} GiB"


ROWS = (
    ("1.3B Stage 1 (N2H5)", lambda *c: fmt(stage1("wan2.1-1.3b", 2, *c))),
    ("1.3B Stage 2 (TMD N2H5 / N4H5)",
     lambda *c: f"{fmt(stage2('wan2.1-1.3b', 2, *c))} / {fmt(stage2('wan2.1-1.3b', 4, *c))}"),
    ("1.3B Stage 2 (DMD2-v)", lambda *c: fmt(stage2("wan2.1-1.3b", 1, *c, method="dmd2v"))),
    ("14B Stage 1 (N4H5)", lambda *c: fmt(stage1("wan2.1-14b", 4, *c))),
    ("14B Stage 2 (TMD N4H5)", lambda *c: fmt(stage2("wan2.1-14b", 4, *c))),
    ("14B Stage 2 (TMD N4H5, `--lora-rank 256`)", lambda *c: fmt(stage2("wan2.1-14b", 4, *c, lora=256))),
)


def table() -> str:
    lines = ["| run | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, cell in ROWS:
        lines.append(f"| {name} | " + " | ".join(cell(world, sharded, ckpt) for _, world, sharded, ckpt in COLUMNS)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
