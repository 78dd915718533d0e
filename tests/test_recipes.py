"""The reproduction recipes (recipes/*.sh) and their accelerate configs cannot drift from the CLI.

Every recipe runs in DRY_RUN mode with every teacher replaced by `tiny-random` (no GPU, no weights, no VidProM file)
and must print the plan of each of its stages; without the override, the first stage that needs Wan weights must
stop with the message that says how to get them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCEL = RECIPES / "accelerate"

# recipe -> (extra environment, {plan header: minimum count})
DATA = {"make-prompts ->": 1, "synth-videos ->": 1, "encode-latents ->": 1}
CASES = {
    "wan1.3b-n2h5": ({}, {**DATA, "pretrain-head ->": 1, "distill ->": 1, "sample ->": 1, "eval ->": 1}),
    "wan1.3b-m1": ({}, {**DATA, "pretrain-head ->": 1, "distill ->": 1, "sample ->": 1, "eval ->": 1}),
    "wan14b-n4h5": ({}, {**DATA, "pretrain-head ->": 2, "distill ->": 2, "sample ->": 2, "eval ->": 1}),
    "baselines-dmd2v": ({}, {**DATA, "distill ->": 3, "sample ->": 1, "eval ->": 1}),
    # one sweep point beyond the other tables' runs keeps the test short; every option the recipe uses still runs
    "ablations": ({"SWEEP": "4:2"}, {**DATA, "pretrain-head ->": 7, "distill ->": 9, "eval ->": 4}),
}


def recipe_env(tmp_path, **extra):
    """A clean environment: an empty HF cache, a fresh home, no VidProM file, `tmd` = this interpreter's tmdcli."""
    shim = tmp_path / "bin" / "tmd"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tmdcli "$@"\n')
    shim.chmod(0o755)
    (tmp_path / "hf").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TMD_TEACHER_OVERRIDE", "HF_HUB_CACHE", "VIDPROM_FILE", "TMD_HOME", "DRY_RUN")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TMD_HOME=str(tmp_path / "home"), TMD=str(shim), DRY_RUN="1", PYTHONUNBUFFERED="1",
               PATH=f"{shim.parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def run_recipe(name, env, cwd):
    return subprocess.run(["bash", str(RECIPES / f"{name}.sh")], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.sh")), ids=lambda p: p.name)
def test_recipe_is_valid_bash_with_strict_mode(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    if not path.name.startswith("_"):  # _lib.sh and _toy_lib.sh are sourced, not run
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text
        header = text.split("set -euo pipefail")[0]
        for word in ("Goal:", "Target", "Hardware:", "Wall time", "TFLOP/s"):
            assert word in header, f"{path.name}: the header lacks {word!r}"


def test_every_recipe_the_issue_lists_exists():
    assert {p.stem for p in RECIPES.glob("*.sh")} >= set(CASES) | {"_lib"}


def test_launched_stages_use_long_student_options():
    """accelerate's own parser would take --n/--h/--m as abbreviations of its options: recipes use the long aliases."""
    for path in RECIPES.glob("*.sh"):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue
            assert not re.search(r"(^|\s)--(n|h|m)(\s|=|$)", line), f"{path.name}: {line.strip()}"


def test_accelerate_configs_load_and_name_real_options():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    dests = {action.dest for action in launch_command_parser()._actions}
    configs = {p.name: p for p in ACCEL.glob("*.yaml")}
    assert set(configs) == {"1gpu.yaml", "ddp-8gpu.yaml", "fsdp-8gpu.yaml", "fsdp-multinode.yaml", "fsdp-cpu.yaml"}
    loaded = {}
    for name, path in configs.items():
        config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
        unknown = [k for k in (config.fsdp_config or {}) if k not in dests]
        assert not unknown, f"{name}: fsdp_config keys accelerate launch does not know: {unknown}"
        assert config.mixed_precision == "no"  # tmd autocasts itself over fp32 master weights
        loaded[name] = config
    assert loaded["1gpu.yaml"].distributed_type.value == "NO"
    assert loaded["ddp-8gpu.yaml"].distributed_type.value == "MULTI_GPU"
    assert loaded["ddp-8gpu.yaml"].num_processes == 8
    for name in ("fsdp-8gpu.yaml", "fsdp-multinode.yaml", "fsdp-cpu.yaml"):  # fsdp-cpu: the multi-rank tests'
        config = loaded[name]
        assert config.distributed_type.value == "FSDP"
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's full shard
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "WanTransformerBlock"
        assert fsdp["fsdp_activation_checkpointing"] is False  # left to `--checkpointing`
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert loaded["fsdp-8gpu.yaml"].num_processes == 8
    multinode = yaml.safe_load((ACCEL / "fsdp-multinode.yaml").read_text())
    assert {"machine_rank", "main_process_ip", "main_process_port", "num_machines"} <= set(multinode)


def test_the_wrapped_block_class_exists_in_diffusers():
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    assert WanTransformerBlock.__name__ == "WanTransformerBlock"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_dry_run_prints_every_plan(name, tmp_path):
    extra, headers = CASES[name]
    result = run_recipe(name, recipe_env(tmp_path, TMD_TEACHER_OVERRIDE="tiny-random", **extra), tmp_path)
    log = result.stderr
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{log[-3000:]}"
    assert result.stdout == ""  # a dry run makes no artifact, so it has no result to print
    assert "VIDPROM_FILE" in log and "not found" in log
    assert "source: NOT AVAILABLE" in log  # the missing VidProM file is shown in make-prompts' plan, not an error
    for header, count in headers.items():
        found = len(re.findall(rf"^{re.escape(header)}", log, flags=re.M))
        assert found >= count, f"{name}: {found} x {header!r}, expected {count}:\n{log[-3000:]}"
    launches = [line for line in log.splitlines() if "would run: accelerate launch" in line]
    assert launches, f"{name}: no stage would run under accelerate launch"
    for line in launches:
        assert "--config_file" in line and str(ACCEL) in line and "-m tmdcli" in line
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("manifest.json"))


@pytest.mark.slow
def test_without_the_override_missing_wan_weights_stop_with_one_clear_message(tmp_path):
    result = run_recipe("wan1.3b-n2h5", recipe_env(tmp_path), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1
    assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers" in result.stderr
    assert "Traceback" not in result.stderr
