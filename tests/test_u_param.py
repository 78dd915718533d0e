"""`--u-param` through the stages (issue 14 part 1, METHOD.md D19): stored in the student, used by every consumer,
refused by distill when it contradicts Stage 1; students written before D19 read as `paper`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tmdcli.artifacts.store import Store
from tmdcli.cli import app
from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.sampler import inner_flow

from conftest import write_tiny_latents


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


PRETRAIN = ["pretrain-head", "--teacher", "tiny-random", "--n", 2, "--h", 1, "--iters", 2, "--batch", 2,
            "--num-sample-prompts", 0]
DISTILL = ["distill", "--teacher", "tiny-random", "--n", 2, "--h", 1, "--iters", 2, "--batch", 2,
           "--num-sample-prompts", 0]


def _export_config(artifact) -> dict:
    return json.loads((artifact.path / "export" / "student.json").read_text())["config"]


def test_paper_form_is_stored_by_pretrain_head_kept_by_distill_and_shown(home, tmp_path):
    write_tiny_latents(home)
    result = invoke(*PRETRAIN, "--u-param", "paper", "--home", home)
    assert result.exit_code == 0, result.output
    stage1 = Store(home).resolve("student:latest")
    assert stage1.manifest.facts["u_param"] == "paper" and _export_config(stage1)["u_param"] == "paper"
    assert "u_param: paper" in invoke("show", stage1.id, "--home", home).output

    refused = invoke(*DISTILL, "--u-param", "consistent", "--home", home)
    assert refused.exit_code == 2, refused.output
    assert "contradicts the Stage-1 student" in refused.output and "Traceback" not in refused.output

    plan = invoke(*DISTILL, "--dry-run", "--home", home)
    assert plan.exit_code == 0 and "u = y1 - head (Eq. 14)" in plan.output.replace("\n", " ")
    result = invoke(*DISTILL, "--home", home)
    assert result.exit_code == 0, result.output
    stage2 = Store(home).resolve("student:latest")
    assert stage2.manifest.stage == "distill" and stage2.manifest.facts["u_param"] == "paper"
    assert _export_config(stage2)["u_param"] == "paper"
    sampled = invoke("sample", "a cat", "--home", home, "--out", tmp_path / "cat.mp4", "--dry-run")
    assert "u = y1 - head (Eq. 14)" in sampled.output.replace("\n", " ")


def test_default_is_consistent_and_an_unknown_form_exits_2(home):
    write_tiny_latents(home)
    plan = invoke(*PRETRAIN, "--dry-run", "--home", home)
    assert plan.exit_code == 0 and "u = (y_s - head)/s (D19)" in plan.output.replace("\n", " ")
    bad = invoke(*PRETRAIN, "--u-param", "mean", "--home", home)
    assert bad.exit_code == 2 and "--u-param must be one of paper, consistent" in bad.output
    dmd2v = invoke("distill", "--method", "dmd2v", "--teacher", "tiny-random", "--u-param", "paper", "--home", home)
    assert dmd2v.exit_code == 2 and "DMD2-v has no flow head" in dmd2v.output


def _opened_student(transformer, u_param):
    student = TMDStudent.from_teacher(transformer, StudentConfig(num_inner_steps=2, num_head_blocks=1,
                                                                 u_param=u_param), seed=0)
    with torch.no_grad():  # open the fusion gate so the head depends on y_s and the two forms differ
        student.extras.fusion.gate_lin.bias.fill_(0.5)
    return student


def test_a_loaded_student_samples_with_its_stored_form_and_old_students_read_as_paper(fresh_tiny_transformer,
                                                                                        tmp_path):
    student = _opened_student(fresh_tiny_transformer, "paper")
    folder = student.save(tmp_path / "paper")
    info = json.loads((folder / "student.json").read_text())
    del info["config"]["u_param"]  # as written before D19
    (folder / "student.json").write_text(json.dumps(info))
    loaded = TMDStudent.load(folder)
    assert loaded.config.u_param == "paper"

    g = torch.Generator().manual_seed(0)
    x_t, y1 = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    text, t = torch.randn(2, 8, 32, generator=g), torch.tensor([0.999, 0.909], dtype=torch.float64)
    with torch.no_grad():
        got = loaded.predict_y(x_t, t, text, y1)
        feats = loaded.backbone(x_t, t, text)
        by_form = {form: inner_flow(lambda y, s, r: loaded.head(y, s, r, feats).float(), y1,
                                    loaded.config.inner_grid(), u_param=form) for form in ("paper", "consistent")}
    assert torch.equal(got, by_form["paper"]) and not torch.allclose(got, by_form["consistent"])


@pytest.mark.parametrize("form", ["paper", "consistent"])
def test_the_stored_form_survives_a_save_and_load(fresh_tiny_transformer, tmp_path, form):
    folder = _opened_student(fresh_tiny_transformer, form).save(tmp_path / form)
    assert TMDStudent.load(folder).config.u_param == form
