"""The one-step DMD2-v baseline's KD warm-up (METHOD.md 5.4; issue 14, section 4): pairs sampled with CFG +
skip-layer guidance by `synth-videos --kd-pairs`, read back by `distill --kd-warmup` (noise and target as stored)."""

import copy

import pytest
import torch
from typer.testing import CliRunner

from tmdcli.artifacts.store import Store
from tmdcli.cli import app
from tmdcli.models import wan
from tmdcli.stages import distill
from tmdcli.stages.kd_pairs import skip_block_for

from conftest import write_tiny_latents


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_skip_layer_guidance_equals_cfg_with_a_manual_run_without_that_block(fresh_tiny_transformer):
    block = 2  # of 4: a middle block (the paper skips block 10 of 30)
    g = torch.Generator().manual_seed(0)
    x, text, neg = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 8, 32, generator=g), \
        torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([0.7, 0.3])
    pruned = copy.deepcopy(fresh_tiny_transformer)
    del pruned.blocks[block]  # the teacher without block k, run through diffusers' own forward
    with torch.no_grad():
        v_c = wan.velocity(fresh_tiny_transformer, x, t, text)
        v_n = wan.velocity(pruned, x, t, neg)
        ours = wan.guided_velocity(fresh_tiny_transformer, x, t, text, neg, 5.0, skip_block=block)
        plain = wan.guided_velocity(fresh_tiny_transformer, x, t, text, neg, 5.0)
    torch.testing.assert_close(ours, v_n + 5.0 * (v_c - v_n), rtol=0, atol=1e-6)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the skipped block matters


def test_the_skip_block_is_kept_when_the_teacher_has_it_and_scaled_by_depth_otherwise():
    assert skip_block_for(10, 30) == (10, None) and skip_block_for(10, 40) == (10, None)
    assert skip_block_for(10, 12) == (10, None)
    block, note = skip_block_for(10, 4)
    assert block == 1 and "scaled by depth to block 1" in note


def test_kd_warmup_without_pairs_exits_2_naming_the_command_that_makes_them(home):
    write_tiny_latents(home)
    result = invoke("distill", "--method", "dmd2v", "--m", 1, "--teacher", "tiny-random", "--kd-warmup", 2,
                    "--iters", 2, "--batch", 2, "--home", home)
    assert result.exit_code == 2 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert "no KD pairs of tiny-random" in out and "tmd synth-videos --teacher tiny-random --kd-pairs" in out


@pytest.mark.slow  # the whole data chain (make-prompts, synth-videos, encode-latents) then distill: ~15 s alone
def test_kd_warmup_trains_on_the_stored_pairs_not_on_the_training_latents(home, tmp_path, monkeypatch):
    """The pairs come from `synth-videos --kd-pairs` (CFG + skip-layer guidance, noise and latents saved); the
    training latents are another (random) artifact, which the old warm-up regressed onto."""
    from tmdcli.data.shards import VideosShard, shard_files
    from tmdcli.objectives import dmd
    from tmdcli.stages.common import execute

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat surfing a wave\na dog running in a park\n")
    for args in (["make-prompts", "--source", prompts, "--expander", "none"],
                 ["synth-videos", "--teacher", "tiny-random", "--steps", 2, "--kd-pairs"],
                 ["encode-latents", "--teacher", "tiny-random"]):
        result = invoke(*args, "--home", home)
        assert result.exit_code == 0, result.output
    store = Store(home)
    videos = store.resolve("videos:latest")
    assert videos.manifest.facts["kd_pairs"] and videos.manifest.facts["skip_layer"] == 1  # 10 of 30 -> 1 of 4
    with VideosShard(videos.file(shard_files(videos.manifest.files, "videos")[0][1])) as shard:
        stored = shard.tensors()
    training = write_tiny_latents(home, seed=3, name="random-training-latents")
    seen = {"inputs": [], "targets": []}
    real_sample, real_loss = dmd.generator_sample, distill.kd_loss

    def spy_sample(student, x_in, *args, **kwargs):
        seen["inputs"].append(x_in.detach().clone())
        return real_sample(student, x_in, *args, **kwargs)

    def spy_loss(x_hat, sample):
        seen["targets"].append(sample.detach().clone())
        return real_loss(x_hat, sample)

    monkeypatch.setattr(dmd, "generator_sample", spy_sample)
    monkeypatch.setattr(distill, "kd_loss", spy_loss)
    student = execute(distill, distill.DistillConfig(method="dmd2v", num_outer_steps=1, teacher="tiny-random",
                                                     latents=training.id, kd_warmup=1, iters=1, batch=2,
                                                     num_sample_prompts=0, diversity_seeds=0), home=home,
                      device="cpu")
    assert student is not None and student.manifest.facts["kd_warmup"] == 1
    assert '"kd"' in (student.path / "metrics-kd.jsonl").read_text().splitlines()[-1]
    roles = {i["role"]: i["id"] for i in student.manifest.inputs}
    assert roles["kd_videos"] == videos.id and roles["latents"] == training.id
    targets = torch.cat(seen["targets"])  # one call per micro-batch; the KD calls come before any DMD step
    kd_input = torch.cat(seen["inputs"][:len(seen["targets"])])
    ids = sorted(int(k.split(".")[1]) for k in stored if k.startswith("latent."))
    assert targets.shape[0] == 2
    for row in range(2):  # each target is one stored sample, and its input is 0.999 x that item's stored noise
        match = [i for i in ids if torch.equal(targets[row], stored[f"latent.{i}"])]
        assert len(match) == 1
        assert torch.equal(kd_input[row], 0.999 * stored[f"noise.{match[0]}"])
