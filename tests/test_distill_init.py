"""What `tmd distill` starts from (issue 14, section 4): the outer grid of its Stage-1 student, and fp32 copies of
the teacher for the trained networks even when the frozen teacher runs in bf16."""

import torch
from typer.testing import CliRunner

from tmdcli.cli import app
from tmdcli.models.tiny import build_tiny_components
from tmdcli.stages import distill

from conftest import write_tiny_latents


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def test_trained_copies_hold_the_fp32_teacher_weights_when_the_frozen_teacher_is_bf16():
    """On a GPU the frozen teacher is bf16; the fake score (and the DMD2-v student) must start from the fp32 weights,
    not from their bf16 rounding. Simulated on the CPU by asking for a bf16 frozen teacher."""
    teacher, frozen, fake_score, student_net = distill.load_networks("tiny-random", "dmd2v", torch.device("cpu"),
                                                                    "bfloat16")
    reference = build_tiny_components(seed=0)["transformer"].state_dict()  # what tiny-random's fp32 weights are
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16} and teacher.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in frozen.parameters())
    assert {b.dtype for b in frozen.rope.buffers()} == {torch.float32}  # as a bf16 from_pretrained load leaves them
    rounded = 0
    for net in (fake_score, student_net):
        state = net.state_dict()
        for k, v in reference.items():
            assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
            rounded += not torch.equal(v.bfloat16().float(), v)
    assert rounded > 0  # the check can tell fp32 weights from their bf16 rounding


def test_distill_takes_the_outer_grid_of_its_stage1_student_and_refuses_another(home):
    """Issue 14: --outer-gamma was shown in the plan and manifest but training used the Stage-1 grid."""
    from tmdcli.objectives.grids import outer_grid

    write_tiny_latents(home)
    assert invoke("pretrain-head", "--teacher", "tiny-random", "--n", 1, "--h", 1, "--outer-gamma", 3, "--iters", 1,
                  "--batch", 2, "--num-sample-prompts", 0, "--home", home).exit_code == 0
    grid = [round(v, 3) for v in outer_grid(2, 3.0)]
    args = ["distill", "--teacher", "tiny-random", "--n", 1, "--h", 1, "--iters", 2, "--batch", 2,
            "--num-sample-prompts", 0, "--home", home]
    planned = invoke(*args, "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert f"outer grid {grid}" in flat(planned.output) and "outer_gamma=3.0" in flat(planned.output)
    refused = invoke(*args, "--outer-gamma", 10)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "--outer-gamma 10 contradicts the Stage-1 student" in flat(refused.output)
    from tmdcli.stages.common import execute

    # the same value is accepted (run through execute: the diversity alarm's 50-step teacher run is not needed here)
    student = execute(distill, distill.DistillConfig(teacher="tiny-random", num_inner_steps=1, num_head_blocks=1,
                                                     iters=1, batch=2, num_sample_prompts=0, diversity_seeds=0,
                                                     outer_gamma=3.0), home=home, device="cpu")
    assert student.manifest.stage == "distill" and student.manifest.config["outer_gamma"] == 3.0
    assert student.manifest.facts["outer_grid"] == outer_grid(2, 3.0)
