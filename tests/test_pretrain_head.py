"""`tmd pretrain-head` end to end on the tiny-random teacher: the artifact, resume (also after SIGKILL), bad input,
--dry-run estimates."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tmdcli.artifacts.store import Store
from tmdcli.cli import app
from tmdcli.runtime import estimates

from conftest import write_tiny_latents

BASE = ["pretrain-head", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2",
        "--num-sample-prompts", "1"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _export_tensors(artifact_path):
    out = {}
    for part in ("transformer", "extras"):
        for k, v in load_file(str(artifact_path / "export" / part / "diffusion_pytorch_model.safetensors")).items():
            out[f"{part}.{k}"] = v
    return out


def test_pretrain_then_sample_the_newest_student(home, tiny_latents, tmp_path):
    result = invoke(*BASE, "--iters", 5, "--save-every", 2, "--home", home)
    assert result.exit_code == 0, result.output
    student = Store(home).resolve("student:latest")
    facts = student.manifest.facts
    assert (facts["num_outer_steps"], facts["num_inner_steps"], facts["num_head_blocks"]) == (2, 2, 1)
    assert facts["effective_nfe"] == pytest.approx(2 * (1 + 1 / 4))
    assert student.manifest.stats["iterations"] == 5
    files = {f["path"] for f in student.manifest.files}
    assert {"metrics.jsonl", "export/student.json", "samples/iter-0000005/0.mp4"} <= files
    assert any(p.startswith("checkpoints/iter-0000005/") for p in files)
    # the export differs from the teacher: training changed the weights
    from tmdcli.models.tiny import build_tiny_components

    teacher = build_tiny_components(seed=0)["transformer"].state_dict()
    exported = _export_tensors(student.path)
    assert any(not torch.equal(exported[f"transformer.{k}"], v) for k, v in teacher.items())

    out = tmp_path / "cat.mp4"
    result = invoke("sample", "a cat surfing", "--home", home, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.stat().st_size > 0
    shown = invoke("show", "latest", "--home", home)
    assert "effective_nfe: 2.5" in shown.output


def test_stop_after_then_rerun_equals_an_uninterrupted_run(tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    for h in homes:
        write_tiny_latents(h)
    assert invoke(*BASE, "--iters", 4, "--save-every", 2, "--home", homes[0]).exit_code == 0
    first = invoke(*BASE, "--iters", 4, "--save-every", 2, "--stop-after", 2, "--home", homes[1])
    assert first.exit_code == 0 and "stopped after iteration 2" in first.output
    assert Store(homes[1]).list("student") == []
    second = invoke(*BASE, "--iters", 4, "--save-every", 2, "--home", homes[1])
    assert second.exit_code == 0 and "resuming from iter-0000002" in second.output
    a, b = (Store(h).resolve("student:latest") for h in homes)
    assert a.id == b.id  # the run-control options are not part of the identity
    ta, tb = _export_tensors(a.path), _export_tensors(b.path)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sigkill_in_the_middle_then_rerun_completes_like_an_uninterrupted_run(tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    for h in homes:
        write_tiny_latents(h)
    args = [*BASE, "--iters", "12", "--save-every", "2", "--sample-every", "0", "--num-sample-prompts", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tmdcli", *args, "--home", str(homes[1])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging_ckpts = list((homes[1] / "student").glob(".staging-*/checkpoints")) if (homes[1] / "student").exists() \
        else []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        staging_ckpts = list((homes[1] / "student").glob(".staging-*/checkpoints/iter-0000004"))
        if staging_ckpts:
            break
        time.sleep(0.05)
    assert staging_ckpts, "no checkpoint appeared before the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Store(homes[1]).list("student") == []  # nothing committed by the killed run
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from iter-" in rerun.stderr
    uninterrupted = subprocess.run([sys.executable, "-m", "tmdcli", *args, "--home", str(homes[0])], env=env,
                                   capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    a, b = (Store(h).resolve("student:latest") for h in homes)
    ta, tb = _export_tensors(a.path), _export_tensors(b.path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("case", ["family", "text_dim", "head_blocks", "no_latents", "batch"])
def test_bad_input_exits_2_with_a_message(home, case):
    if case == "family":
        write_tiny_latents(home, family="wan2.2")
        args, expect = BASE, "family"
    elif case == "text_dim":
        write_tiny_latents(home, text_dim=48)
        args, expect = BASE, "text embeddings"
    elif case == "head_blocks":
        write_tiny_latents(home)
        args, expect = [a if a != "1" else "4" for a in BASE], "1 <= H < L = 4"
    elif case == "no_latents":
        args, expect = BASE, "latents"
    else:
        write_tiny_latents(home)
        args, expect = [*BASE, "--micro-batch", "3"], "not a multiple"
    result = invoke(*args, "--iters", 2, "--home", home)
    assert result.exit_code == 2, result.output
    assert expect in result.output
    assert "Traceback" not in result.output
    assert not (home / "student").exists() or Store(home).list("student") == []


def test_dry_run_prints_parameters_memory_and_flops_and_writes_nothing(home, tiny_latents):
    result = invoke(*BASE, "--dry-run", "--home", home)
    assert result.exit_code == 0, result.output
    for word in ("parameters", "54.30k trained", "memory/GPU", "checkpointing", "FLOP per iteration",
                 "effective NFE 2.5"):
        assert word in result.output, word
    assert not (home / "student").exists()


def test_parameter_counts_are_exact_for_wan_transformers_and_student_extras():
    from diffusers import WanTransformer3DModel

    from tmdcli.models.defaults import TINY_TRANSFORMER_CONFIG, WAN21_TRANSFORMER_CONFIGS
    from tmdcli.models.fusion import init_extras_for

    for config in (TINY_TRANSFORMER_CONFIG, WAN21_TRANSFORMER_CONFIGS["wan2.1-1.3b"]):
        with torch.device("meta"):
            model = WanTransformer3DModel(**config)
        shape = estimates.WanShape.from_config(dict(model.config))
        assert estimates.transformer_params(shape)["total"] == sum(p.numel() for p in model.parameters())
    assert estimates.transformer_params(estimates.WanShape.from_config(dict(model.config)))["total"] == 1_418_996_800
    tiny = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    shape = estimates.WanShape.from_config(dict(tiny.config))
    for fusion in ("gated", "concat"):
        extras = init_extras_for(tiny, fusion=fusion)
        assert estimates.extras_params(shape, fusion) == sum(p.numel() for p in extras.parameters())


def test_full_size_estimate_says_checkpointing_is_needed_for_81_frames_on_one_gpu():
    from tmdcli.models.defaults import WAN21_TRANSFORMER_CONFIGS

    shape = estimates.WanShape.from_config(WAN21_TRANSFORMER_CONFIGS["wan2.1-1.3b"])
    kw = dict(num_head_blocks=5, batch=64, micro_batch=1, world_size=8, cfg_scale=3.0, r_equals_s_prob=0.75)
    off = estimates.tm_meanflow_estimate(shape, (16, 21, 60, 104), checkpointing=False, **kw)
    on = estimates.tm_meanflow_estimate(shape, (16, 21, 60, 104), checkpointing=True, **kw)
    assert shape.tokens((16, 21, 60, 104)) == 32760
    assert on.activations_gib < 0.2 * off.activations_gib and on.peak_gib < 80 < off.peak_gib
    assert on.flops_per_iteration > off.flops_per_iteration  # recomputation costs one more forward


def test_two_processes_train_the_same_model_as_one_process_accumulating(tmp_path):
    """DDP over gloo on the CPU (torchrun, 2 ranks x micro-batch 1) against one process accumulating 2 micro-batches:
    the same samples with the same noise, so the same weights up to float summation order."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    homes = [tmp_path / "one", tmp_path / "two"]
    for h in homes:
        write_tiny_latents(h)
    args = ["pretrain-head", "--teacher", "tiny-random", "--inner-steps", "2", "--head-blocks", "1", "--batch", "2",
            "--iters", "2", "--save-every", "2", "--num-sample-prompts", "0", "--lr", "1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "tmdcli", *args, "--home", str(homes[1])], env=env, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 GPU(s)" in two.stderr
    one = invoke(*args, "--home", homes[0])
    assert one.exit_code == 0, one.output
    a, b = (Store(h).resolve("student:latest") for h in homes)
    assert a.manifest.facts["world_size"] == 1 and b.manifest.facts["world_size"] == 2
    ta, tb = _export_tensors(a.path), _export_tensors(b.path)
    from tmdcli.models.tiny import build_tiny_components

    init = build_tiny_components(seed=0)["transformer"].state_dict()
    moved = 0
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)
        if k.startswith("transformer.") and not torch.equal(ta[k], init[k.removeprefix("transformer.")]):
            moved += 1
    assert moved > 10  # both runs trained; they agree on where they went
