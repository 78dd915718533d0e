"""Stage 2 (`tmd distill`): the generator output, the rollout's gradients, the VSD at init, the alternation, resume,
bad input, and the CLI end to end on the tiny-random teacher."""

import copy
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
from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.models.tiny import build_tiny_components
from tmdcli.objectives import dmd
from tmdcli.runtime import checkpoint as ckpt
from tmdcli.stages.distill import DiversityAlarm

from conftest import write_tiny_latents

SHAPE = (16, 3, 4, 4)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, *SHAPE, generator=g), "text": torch.randn(b, 8, 32, generator=g),
            "negative": torch.randn(1, 8, 32, generator=g)}


def _students(h=2):
    teacher = build_tiny_components(seed=0)["transformer"].requires_grad_(False)
    tmd = TMDStudent.from_teacher(copy.deepcopy(teacher).requires_grad_(True),
                                  StudentConfig(num_inner_steps=2, num_head_blocks=h))
    return teacher, tmd


def test_tmd_generator_output_at_init_equals_the_dmd2v_parametrisation_exactly():
    """METHOD.md 5.3 note and 11.1: N = 1, test-only inner grid [0, 1] and the head fed t_i -> x_t - t v_teacher."""
    teacher, _ = _students()
    cfg = StudentConfig(num_inner_steps=1, num_head_blocks=2)
    student = TMDStudent.from_teacher(teacher, cfg)
    baseline = TMDStudent.from_teacher(teacher, StudentConfig(num_inner_steps=1, num_head_blocks=1, method="dmd2v"))
    batch = _batch()
    x_in, t_i = batch["latents"], torch.tensor([0.999, 0.909], dtype=torch.float64)
    y1 = torch.randn_like(x_in)
    with torch.no_grad():
        ours = dmd.generator_sample(student, x_in, t_i, batch["text"], y1, inner_grid=[0.0, 1.0], head_time=t_i)
        theirs = dmd.generator_sample(baseline, x_in, t_i, batch["text"], y1)
        from tmdcli.models import wan

        direct = x_in - t_i.float().view(-1, 1, 1, 1, 1) * wan.velocity(teacher, x_in, t_i, batch["text"])
    assert torch.equal(ours, theirs)
    assert torch.equal(theirs, direct)


def _head_calls_with_gradient(student, rollout):
    reached = []
    original = student.head

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        index = len(reached)
        reached.append(False)
        out.register_hook(lambda g, i=index: reached.__setitem__(i, True))
        return out

    student.head = spy
    batch = _batch()
    t_i = torch.tensor([0.999, 0.909], dtype=torch.float64)
    x_hat = dmd.generator_sample(student, batch["latents"], t_i, batch["text"], torch.randn_like(batch["latents"]),
                                 rollout=rollout)
    x_hat.square().mean().backward()
    student.head = original
    return reached


def test_rollout_sends_gradients_through_every_inner_step_to_backbone_and_every_head_block():
    _, student = _students(h=2)
    assert _head_calls_with_gradient(student, rollout=True) == [True, True]
    tr = student.transformer
    for block in list(tr.blocks):  # backbone blocks 0, 1 and head blocks 2, 3
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in block.parameters())
    assert float(tr.patch_embedding.weight.grad.abs().sum()) > 0


def test_no_rollout_sends_gradients_through_the_last_inner_step_only():
    _, student = _students(h=2)
    assert _head_calls_with_gradient(student, rollout=False) == [False, True]


def test_student_loss_is_exactly_zero_gradient_vsd_when_fake_equals_teacher_and_cfg_is_1():
    teacher, student = _students()
    fake = copy.deepcopy(teacher)
    from tmdcli.models.discriminator import discriminator_for

    disc = discriminator_for(teacher.config, (1, 2, 3)).requires_grad_(False)
    p = dmd.DMDParams(outer_grid=tuple(student.config.outer_grid()), disc_layers=(1, 2, 3), guidance_scale=1.0,
                      gan_weight=0.0)
    loss, terms = dmd.student_step_loss(student, teacher, fake, disc, _batch(), torch.Generator().manual_seed(0), p)
    loss.backward()
    assert float(terms["vsd"]) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in student.parameters())
    # with the GAN term the student does get a gradient (through the frozen teacher's features)
    p_gan = dmd.DMDParams(outer_grid=p.outer_grid, disc_layers=(1, 2, 3), guidance_scale=1.0, gan_weight=0.03)
    student.zero_grad()
    loss, _ = dmd.student_step_loss(student, teacher, fake, disc, _batch(), torch.Generator().manual_seed(0), p_gan)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in disc.parameters())


def test_critic_loss_trains_fake_score_and_discriminator_but_not_the_student():
    teacher, student = _students()
    fake = copy.deepcopy(teacher).requires_grad_(True)
    from tmdcli.models.discriminator import discriminator_for

    disc = discriminator_for(teacher.config, (1, 2, 3))
    p = dmd.DMDParams(outer_grid=tuple(student.config.outer_grid()), disc_layers=(1, 2, 3))
    loss, terms = dmd.critic_step_loss(student, teacher, fake, disc, _batch(), torch.Generator().manual_seed(0), p)
    loss.backward()
    assert {"fake_dsm", "gan_d"} <= set(terms)
    assert all(q.grad is None for q in student.parameters())
    assert any(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in fake.parameters())
    assert all(q.grad is not None for q in disc.parameters())


def test_seed_diversity_is_zero_for_identical_samples_and_an_rms_distance_otherwise():
    same = torch.ones(3, 4, 5)
    assert DiversityAlarm.pairwise_rms(same) == 0.0
    two = torch.stack([torch.zeros(8), torch.full((8,), 2.0)])
    assert DiversityAlarm.pairwise_rms(two) == pytest.approx(2.0)


@pytest.fixture()
def pretrained(home):
    write_tiny_latents(home)
    result = invoke("pretrain-head", "--teacher", "tiny-random", "--n", 2, "--h", 1, "--iters", 2, "--batch", 2,
                    "--num-sample-prompts", 0, "--home", home)
    assert result.exit_code == 0, result.output
    return Store(home).resolve("student:latest")


DISTILL = ["distill", "--teacher", "tiny-random", "--n", "2", "--h", "1", "--batch", "2", "--num-sample-prompts", "1"]


def test_distill_after_pretrain_then_sample_and_show(home, pretrained, tmp_path):
    result = invoke(*DISTILL, "--iters", 10, "--save-every", 5, "--home", home)
    assert result.exit_code == 0, result.output
    student = Store(home).resolve("student:latest")
    assert student.manifest.stage == "distill"
    facts = student.manifest.facts
    assert facts["init"] == pretrained.id and facts["method"] == "tmd" and facts["rollout"] is True
    assert facts["effective_nfe"] == pytest.approx(2.5)
    assert facts["diversity"]["teacher_seed_diversity"] > 0
    assert [a.id for a in Store(home).lineage(student)][:2] == [student.id, student.manifest.inputs[0]["id"]] or \
        pretrained.id in [a.id for a in Store(home).lineage(student)]
    out = tmp_path / "cat.mp4"
    assert invoke("sample", "a cat surfing", "--home", home, "--out", out).exit_code == 0 and out.is_file()
    shown = invoke("show", "latest", "--home", home)
    assert "stage distill" in shown.output and "effective_nfe: 2.5" in shown.output


def test_dmd2v_baseline_trains_from_the_teacher_and_samples(home, tmp_path):
    write_tiny_latents(home)
    result = invoke("distill", "--method", "dmd2v", "--m", 2, "--teacher", "tiny-random", "--iters", 10,
                    "--batch", 2, "--num-sample-prompts", 0, "--checkpointing", "--home", home)
    assert result.exit_code == 0, result.output
    student = Store(home).resolve("student:latest")
    assert student.manifest.facts["method"] == "dmd2v" and student.manifest.facts["effective_nfe"] == 2.0
    assert invoke("sample", "a cat", "--home", home, "--out", tmp_path / "c.mp4").exit_code == 0


def test_alternation_steps_the_student_at_iteration_0_and_the_critics_at_1_to_4(home, pretrained):
    assert invoke(*DISTILL, "--iters", 10, "--save-every", 1, "--stop-after", 2, "--home", home).exit_code == 0
    root = next((home / "student").glob(".staging-*/checkpoints"))
    states = {i: (load_file(str(p / "model-student.safetensors")), load_file(str(p / "model-critic.safetensors")))
              for i, p in ckpt.list_checkpoints(root)}
    teacher = build_tiny_components(seed=0)["transformer"].state_dict()
    init = load_file(str(pretrained.path / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    s1, c1 = states[1]  # after iteration 0: the student stepped
    s2, c2 = states[2]  # after iteration 1: the critics stepped
    assert any(not torch.equal(s1[f"student.transformer.{k}"], v) for k, v in init.items())
    assert all(torch.equal(c1[f"fake_score.{k}"], v) for k, v in teacher.items())
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(c1[k], c2[k]) for k in c1)


def test_stop_after_then_rerun_equals_an_uninterrupted_run(tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    for h in homes:
        write_tiny_latents(h)
        assert invoke("pretrain-head", "--teacher", "tiny-random", "--n", 2, "--h", 1, "--iters", 2, "--batch", 2,
                      "--num-sample-prompts", 0, "--home", h).exit_code == 0
    args = [*DISTILL, "--iters", 7, "--save-every", 3, "--num-sample-prompts", 0]
    assert invoke(*args, "--home", homes[0]).exit_code == 0
    assert invoke(*args, "--stop-after", 3, "--home", homes[1]).exit_code == 0
    rerun = invoke(*args, "--home", homes[1])
    assert rerun.exit_code == 0 and "resuming from iter-0000003" in rerun.output
    a, b = (Store(h).resolve("student:latest") for h in homes)
    for part in ("transformer", "extras"):
        ta, tb = (load_file(str(x.path / "export" / part / "diffusion_pytorch_model.safetensors")) for x in (a, b))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_sigkill_during_distill_then_rerun_completes(home, pretrained):
    args = [sys.executable, "-m", "tmdcli", *DISTILL, "--iters", "15", "--save-every", "2",
            "--num-sample-prompts", "0", "--home", str(home)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, found = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None and not found:
        found = list((home / "student").glob(".staging-*/checkpoints/iter-0000004"))
        time.sleep(0.05)
    assert found, "no checkpoint appeared before the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [a.manifest.stage for a in Store(home).list("student")] == ["pretrain-head"]
    rerun = subprocess.run(args, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from iter-" in rerun.stderr
    student = Store(home).resolve("student:latest")
    assert student.manifest.stage == "distill" and student.manifest.stats["iterations"] == 15


@pytest.mark.parametrize("case", ["no_init", "kd_for_tmd", "init_mismatch", "disc_layers"])
def test_bad_input_exits_2_with_a_message(home, case):
    write_tiny_latents(home)
    if case == "no_init":
        args, expect = DISTILL, "tmd pretrain-head --teacher tiny-random --m 2 --n 2 --h 1"
    elif case == "kd_for_tmd":
        args, expect = [*DISTILL, "--kd-warmup", "5"], "one-step DMD2-v baseline only"
    elif case == "init_mismatch":
        assert invoke("pretrain-head", "--teacher", "tiny-random", "--n", 1, "--h", 1, "--iters", 1, "--batch", 1,
                      "--num-sample-prompts", 0, "--home", home).exit_code == 0
        args, expect = [*DISTILL, "--init", "student:latest"], "M2 N1 H1"
    else:
        args, expect = ["distill", "--method", "dmd2v", "--teacher", "tiny-random", "--disc-layers", "1,7"], \
            "blocks 0..3"
    result = invoke(*args, "--iters", 2, "--home", home)
    assert result.exit_code == 2, result.output
    assert expect in result.output.replace("\n", " ") and "Traceback" not in result.output


def test_mode_collapse_alarm_warns_when_student_seeds_give_the_same_video(home, capsys, monkeypatch):
    import tmdcli.sampler
    from tmdcli.artifacts.store import Store as _Store
    from tmdcli.data.loaders import LatentLoader
    from tmdcli.registry import REGISTRY, teacher_defaults

    latents = write_tiny_latents(home)
    staging = _Store(home).begin(kind="student", stage="distill", stage_version=1, config={}, identity_config={})
    teacher, student = _students()
    defaults = teacher_defaults(REGISTRY["tiny-random"])
    alarm = DiversityAlarm(student, teacher, LatentLoader(latents, batch_size=1), staging,
                           type(defaults)(**{**defaults.__dict__, "num_steps": 4}), SHAPE, 3, 5.0, is_main=True)
    healthy = alarm.check(10)
    assert healthy["teacher_seed_diversity"] > 0 and "mode collapse" not in capsys.readouterr().err
    monkeypatch.setattr(tmdcli.sampler, "sample_tmd", lambda student, noise, *a, **k: torch.zeros_like(noise))
    collapsed = alarm.check(20)
    assert collapsed["diversity_ratio"] == 0.0
    assert "possible mode collapse at iteration 20" in capsys.readouterr().err
