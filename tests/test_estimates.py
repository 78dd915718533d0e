"""The --dry-run memory model (runtime/estimates.py) against what was measured on a GPU (docs/bench/
train_memory_h200.json: H200, 1.3B shapes, micro-batch 1, checkpointing on), and what the plan claims for 14B."""

import json
from pathlib import Path

import pytest

from tmdcli.models.defaults import WAN21_TRANSFORMER_CONFIGS
from tmdcli.models.discriminator_config import count_parameters, default_disc_layers, discriminator_config_for
from tmdcli.runtime import estimates

MEASURED = json.loads((Path(__file__).resolve().parents[1] / "docs" / "bench" / "train_memory_h200.json").read_text())
LATENT = (16, 21, 60, 104)
TOLERANCE = 0.10  # the estimate is a model: within 10% of every measured peak


def stage2(config: str, **kw):
    tc = WAN21_TRANSFORMER_CONFIGS[config]
    layers = default_disc_layers(tc["num_layers"])
    args = dict(num_head_blocks=5, num_inner_steps=2, method="tmd", last_disc_layer=max(layers), batch=64,
                micro_batch=1, world_size=1, checkpointing=True,
                discriminator_params=count_parameters(discriminator_config_for(tc, layers)))
    return estimates.dmd_estimate(estimates.WanShape.from_config(tc), LATENT, **{**args, **kw})


def test_the_estimates_are_within_10_percent_of_the_measured_h200_peaks():
    shape = estimates.WanShape.from_config(WAN21_TRANSFORMER_CONFIGS["wan2.1-1.3b"])
    stage1 = estimates.tm_meanflow_estimate(shape, LATENT, num_head_blocks=5, batch=64, micro_batch=1, world_size=1,
                                            checkpointing=True, cfg_scale=3.0, r_equals_s_prob=0.75)
    student = stage2("wan2.1-1.3b", critic_state=False).step_peaks_gib["student"]  # measured before any critic step
    critic = stage2("wan2.1-1.3b").step_peaks_gib["critic"]
    measured = MEASURED["peak_gib"]
    for name, estimate in (("pretrain_head", stage1.peak_gib), ("distill_student_step", student),
                           ("distill_critic_step", critic)):
        assert estimate == pytest.approx(measured[name], rel=TOLERANCE), name


def test_the_critic_step_is_the_larger_one_and_the_plan_shows_both():
    e = stage2("wan2.1-1.3b")
    assert e.step_peaks_gib["critic"] > e.step_peaks_gib["student"] and e.peak_gib == e.step_peaks_gib["critic"]
    memory_row = dict(e.rows(True))["memory/GPU (estimate)"]
    assert "student step" in memory_row and "critic step" in memory_row


def test_fsdp2_shards_the_frozen_teacher_too():
    one, eight = stage2("wan2.1-1.3b"), stage2("wan2.1-1.3b", world_size=8, sharded=True)
    assert eight.frozen_gib == pytest.approx(one.frozen_gib / 8)
    assert eight.optimizer_gib == pytest.approx(one.optimizer_gib / 8)


def test_14b_stage2_fits_8x80gb_with_lora_256_and_fsdp2_but_not_without():
    full = stage2("wan2.1-14b", num_inner_steps=4, world_size=8, sharded=True)
    lora = stage2("wan2.1-14b", num_inner_steps=4, world_size=8, sharded=True, lora_rank=256)
    gib_80gb = 80e9 / 2**30
    assert full.peak_gib > gib_80gb > lora.peak_gib
    assert lora.trainable_params < 0.2 * full.trainable_params


def test_the_readme_fit_table_is_the_one_benchmarks_fit_table_prints():
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fit_table", root / "benchmarks" / "fit_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table() in (root / "README.md").read_text()  # regenerate with `python benchmarks/fit_table.py`
