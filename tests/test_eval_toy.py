"""`tmd eval --suite toy`: toy-grammar captions (seen and held out) read back by the toy analyzer.

End to end on the bundled `toy` teacher at a few steps, the `NAME@S` model spec, and a check that the metric
measures something: rendered ground-truth clips of the captions score high through the same scoring path (mp4 and
all), and the same clips against other captions score low.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tmdcli.cli import app

runner = CliRunner()
ARGS = ["eval", "--suite", "toy", "--model", "toy@2", "--model", "toy@1", "--model", "toy", "--teacher-steps", "2",
        "--toy-prompts", "2", "--samples-per-prompt", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    """The teacher at 2 steps (reference), at 1 step, and plain `toy` with --teacher-steps 2 (the same model)."""
    home = tmp_path_factory.mktemp("eval-toy") / "H"
    return runner.invoke(app, [*ARGS, "--home", str(home)]), home


def test_toy_suite_writes_the_four_files_with_per_split_rows(accepted):
    from tmdcli.toy.grammar import HELD_OUT_COMBOS, parse_caption

    result, home = accepted
    assert result.exit_code == 0, result.output
    root = Path(result.stdout.strip())
    for name in ("results.json", "report.md", "quality_vs_nfe.png", "gallery.html"):
        assert (root / name).is_file(), name
    assert (root / "quality_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((root / "results.json").read_text())
    assert results["suite"] == "toy" and results["settings"]["splits"] == {"train": 2, "heldout": 2}
    splits = [p["split"] for p in results["prompts"]]
    assert splits == ["train", "train", "heldout", "heldout"]
    for p in results["prompts"]:  # held-out captions use a held-out combination, train captions never do
        assert (parse_caption(p["prompt"]).objects[0] in HELD_OUT_COMBOS) == (p["split"] == "heldout")
    ref, one, plain = results["models"]
    assert [m["effective_nfe"] for m in results["models"]] == [4.0, 2.0, 4.0]  # steps x 2 (CFG)
    assert [m["sampler"]["num_steps"] for m in results["models"]] == [2, 1, 2]
    assert plain["sample_dir"] == ref["sample_dir"]  # toy at --teacher-steps 2 is toy@2: sampled once
    assert ref["timings"]["num_videos"] == one["timings"]["num_videos"] == 8
    for split in ("train", "heldout"):
        assert set(one["splits"][split]) >= {"adherence", "adherence_colour", "adherence_shape", "adherence_motion",
                                             "adherence_background", "clean_object", "seed_diversity",
                                             "frechet_analyzer_features", "frechet_pixel_features",
                                             "diversity_ratio"}
        assert 0.0 <= one["splits"][split]["adherence"] <= 1.0
        assert plain["splits"][split]["frechet_pixel_features"] == pytest.approx(0.0, abs=1e-6)
    assert len(one["readings"]) == 4 and len(one["readings"][0]) == 2
    report = (root / "report.md").read_text()
    assert "| toy@1 | train | teacher | 2 |" in report and "| toy@1 | heldout | teacher | 2 |" in report
    assert re.search(r"toy@1\s+heldout\s+teacher\s+2", result.stderr)  # the table is printed
    page = (root / "gallery.html").read_text()
    assert len(re.findall(r"<video src=", page)) == 4 * 2 * 3 and "[heldout caption]" in page


def test_rerun_is_up_to_date(accepted):
    result, home = accepted
    again = runner.invoke(app, [*ARGS, "--home", str(home)])
    assert again.exit_code == 0 and again.stdout == result.stdout and "up to date" in again.stderr


@pytest.mark.parametrize("text,parsed", [("toy@2", ("toy", 2)), ("toy", ("toy", None)),
                                         ("wan2.1-1.3b@50", ("wan2.1-1.3b", 50)), ("student:latest", ("student:latest",
                                                                                                       None))])
def test_model_spec_parsing(text, parsed):
    from tmdcli.stages.eval import parse_model_spec

    assert parse_model_spec(text) == parsed


def test_step_override_sets_nfe_per_model_and_teacher_steps_the_rest(tmp_path):
    result = runner.invoke(app, ["eval", "--suite", "toy", "--model", "toy", "--model", "toy@1", "--model", "toy@2",
                                 "--teacher-steps", "3", "--dry-run", "--home", str(tmp_path / "H")])
    assert result.exit_code == 0, result.output
    nfes = re.findall(r"model \d: (\S+): teacher toy, effective NFE (\d+)", result.stderr)
    assert nfes == [("toy", "6"), ("toy@1", "2"), ("toy@2", "4")]
    assert "32 from toy grammar, 16 train + 16 held-out" in " ".join(result.stderr.split())


def test_toy_prompts_are_distinct_deterministic_and_split():
    from tmdcli.evaluation.toy import toy_prompts
    from tmdcli.toy.grammar import split_of, parse_caption

    a, b = toy_prompts(128, seed=3), toy_prompts(128, seed=3)
    assert a == b and len({p["prompt"] for p in a}) == 256  # every held-out caption, none twice
    assert all(split_of(parse_caption(p["prompt"])) == p["split"] for p in a)
    assert [p["prompt"] for p in toy_prompts(4, seed=4)] != [p["prompt"] for p in toy_prompts(4, seed=3)]


def test_ground_truth_clips_score_high_and_mismatched_captions_low(tmp_path):
    """Rendered scenes of the captions, through mp4 and the suite's scoring: the metric measures adherence."""
    from tmdcli.artifacts.media import write_mp4_from_tensor
    from tmdcli.evaluation import scoring
    from tmdcli.evaluation.toy import toy_prompts
    from tmdcli.toy.grammar import Scene
    from tmdcli.toy.render import render_scenes

    prompts = toy_prompts(4, seed=1)
    clips = render_scenes([Scene.from_dict(p["scene"]) for p in prompts])
    (tmp_path / "samples" / "gt").mkdir(parents=True)
    for p, clip in zip(prompts, clips):
        p["files"], p["seeds"] = [f"p{p['index']}.mp4"], [p["index"]]
        write_mp4_from_tensor(clip, tmp_path / "samples" / "gt" / p["files"][0], fps=8)
    truth = SimpleNamespace(key="gt", label="ground truth", sample_dir="gt")
    [scores] = scoring.score_toy([truth], prompts, tmp_path, collapse_ratio=0.5)
    for split in ("train", "heldout"):
        assert scores["splits"][split]["adherence"] > 0.9, scores["splits"][split]
        assert scores["splits"][split]["track_wobble_px"] < 0.2
    assert all(r["match"] for row in scores["readings"] for r in row)

    rotated = [dict(p, prompt=prompts[(j + 1) % len(prompts)]["prompt"]) for j, p in enumerate(prompts)]
    [wrong] = scoring.score_toy([truth], rotated, tmp_path, collapse_ratio=0.5)
    assert wrong["metrics"]["adherence"] < 0.3 and wrong["metrics"]["clean_object"] > 0.9


def make_student(home: Path):
    from tmdcli.artifacts.store import Store
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.models.tiny import build_tiny_components

    student = TMDStudent.from_teacher(build_tiny_components()["transformer"],
                                      StudentConfig(num_outer_steps=1, num_inner_steps=1, num_head_blocks=1,
                                                    teacher="tiny-random"))
    staging = Store(home).begin(kind="student", stage="pretrain-head", stage_version=1, config={"n": 1},
                                identity_config={"n": 1})
    student.save(staging.path / "export")
    return staging.commit(facts={"teacher": "tiny-random", "effective_nfe": student.effective_nfe})


@pytest.mark.parametrize("extra,needle", [
    (["--model", "toy@0"], "bad --model 'toy@0'"),
    (["--model", "toy@x"], "bad --model 'toy@x'"),
    (["--model", "toy@"], "bad --model"),
    (["--model", "@2"], "bad --model"),
    (["--model", "no-such-teacher@2"], "neither a teacher"),
    (["--model", "latest@2"], "is a student"),
    (["--model", "toy", "--toy-prompts", "0"], "--toy-prompts must be in [1, 128]"),
    (["--model", "toy", "--toy-prompts", "129"], "--toy-prompts must be in [1, 128]"),
    (["--model", "toy", "--prompts", "p.txt"], "not apply"),
    (["--model", "toy", "--frames", "9"], "17x32x32"),
    (["--model", "toy", "--suite", "quick", "--prompts", "p.txt", "--toy-prompts", "2"], "not apply"),
])
def test_bad_toy_input_exits_2_with_a_message(tmp_path, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    if "latest@2" in extra:
        make_student(tmp_path / "H")
    args = ["eval", "--suite", "toy", *extra] if "--suite" not in extra else ["eval", *extra]
    result = runner.invoke(app, [*args, "--home", str(tmp_path / "H")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and needle in result.stderr
    assert not (tmp_path / "H" / "eval").exists()
