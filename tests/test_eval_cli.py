"""`tmd eval --suite quick` end to end on CPU: the four report files, `tmd show`, the gallery, resume, exit codes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tmdcli.cli import app

runner = CliRunner()


def make_student(home: Path):
    """A student artifact as the training stages write it (untrained: built from tiny-random at init)."""
    from tmdcli.artifacts.store import Store
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.models.tiny import build_tiny_components

    student = TMDStudent.from_teacher(build_tiny_components()["transformer"],
                                      StudentConfig(num_outer_steps=2, num_inner_steps=2, num_head_blocks=1,
                                                    teacher="tiny-random"))
    staging = Store(home).begin(kind="student", stage="pretrain-head", stage_version=1, config={"n": 2},
                                identity_config={"n": 2})
    student.save(staging.path / "export")
    return staging.commit(facts={"teacher": "tiny-random", "effective_nfe": student.effective_nfe})


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    """The acceptance command: a teacher and the newest student on two prompts (teacher at 4 steps for speed)."""
    work = tmp_path_factory.mktemp("eval")
    prompts = work / "prompts.txt"
    prompts.write_text("a cat surfing\na red car\n")
    home = work / "H"
    make_student(home)
    result = runner.invoke(app, ["eval", "--suite", "quick", "--model", "tiny-random", "--model", "latest",
                                 "--prompts", str(prompts), "--teacher-steps", "4", "--samples-per-prompt", "2",
                                 "--home", str(home)])
    return result, home


def test_eval_quick_writes_the_four_report_files(accepted):
    result, home = accepted
    assert result.exit_code == 0, result.output
    root = Path(result.stdout.strip())  # stdout holds only the artifact path
    assert root.parent == home / "eval"
    for name in ("results.json", "report.md", "quality_vs_nfe.png", "gallery.html", "manifest.json"):
        assert (root / name).is_file(), name
    assert (root / "quality_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((root / "results.json").read_text())
    teacher, student = results["models"]
    assert (teacher["effective_nfe"], student["effective_nfe"]) == (8.0, 2.5)  # 4 steps x CFG; M(1+(N-1)H/L)
    for model in results["models"]:
        assert model["timings"]["num_videos"] == 4 and model["timings"]["transformer_s"] > 0
    assert set(student["metrics"]) >= {"frame_consistency_pixels", "flicker_abs_diff", "seed_diversity_pixels",
                                       "frechet_pixel_stats", "diversity_ratio"}
    assert "clip_score" not in student["metrics"]  # no --clip-model: no CLIP metrics, no error
    assert results["prompts"][1]["seeds"] == [2, 3]  # seed + K * p + i, the same for every model
    assert "| latest | student | 2.5 |" in (root / "report.md").read_text()
    assert "Frechet (pixel stats)" in result.stderr  # the table is printed


def test_show_prints_the_report_table(accepted):
    _, home = accepted
    shown = runner.invoke(app, ["show", "eval:latest", "--home", str(home)])
    assert shown.exit_code == 0
    assert re.search(r"latest\s+student\s+2\.5", shown.stdout) and "tiny-random (ref)" in shown.stdout
    assert "lineage:" in shown.stdout and "student-" in shown.stdout  # the student is an input


def test_rerun_is_up_to_date_and_prints_the_same_path(accepted):
    result, home = accepted
    again = runner.invoke(app, ["eval", "--model", "tiny-random", "--model", "latest", "--prompts",
                                str(Path(result.stdout.strip()).parents[2] / "prompts.txt"), "--teacher-steps", "4",
                                "--samples-per-prompt", "2", "--home", str(home)])
    assert again.exit_code == 0 and again.stdout == result.stdout and "up to date" in again.stderr


def video_sources(page: str) -> list[str]:
    return re.findall(r'<video src="([^"]+)"', page)


def test_gallery_references_only_files_inside_the_artifact(accepted):
    from urllib.parse import unquote

    result, _ = accepted
    root = Path(result.stdout.strip())
    page = (root / "gallery.html").read_text()
    sources = video_sources(page)
    assert len(sources) == 2 * 2 * 2  # prompts x seeds x models
    for src in sources:
        assert not src.startswith(("/", "file:", "http")) and ".." not in src
        assert (root / unquote(src)).is_file()
    assert "<table>" in page and "a cat surfing" in page


def test_gallery_escapes_prompts_and_encodes_file_names():
    from tmdcli.evaluation.report import gallery_html

    results = {"suite": "vbench", "artifact_id": "eval-x", "settings": {}, "prompts": [
        {"prompt": "<b>a & b</b>", "generate_from": "<b>a & b</b>", "seeds": [0]}],
        "models": [{"label": "m", "kind": "teacher", "effective_nfe": 2.0, "sample_dir": "samples/0-m",
                    "files": [["<b>a & b</b>-0.mp4"]], "metrics": {}, "vbench": {"total": 0.8}}]}
    page = gallery_html(results)
    assert "<b>a" not in page and "&lt;b&gt;a &amp; b" in page
    assert video_sources(page) == ["samples/0-m/%3Cb%3Ea%20%26%20b%3C/b%3E-0.mp4"]


# The gallery in a real browser (playback, tables, moved folder, screenshot): tests/test_gallery_browser.py.


def test_interrupted_eval_resumes_without_regenerating(tmp_path, monkeypatch):
    """Interrupted while writing the report: the rerun samples only the clip that is missing, then commits."""
    from tmdcli.api import VideoGenerator
    from tmdcli.evaluation import report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat surfing\n")
    args = ["eval", "--model", "tiny-random", "--prompts", "p.txt", "--teacher-steps", "2",
            "--samples-per-prompt", "2", "--home", str(tmp_path / "H")]
    real_plot = report.plot_quality_vs_nfe

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_quality_vs_nfe", interrupt)
    first = runner.invoke(app, args)
    assert first.exit_code == 130
    staged = next((tmp_path / "H" / "eval").glob(".staging-*"))
    clips = sorted((staged / "samples").glob("*/*.mp4"))
    assert len(clips) == 2
    clips[1].unlink()

    generated = []
    real_generate = VideoGenerator.generate

    def counting(self, prompts, seeds, **kwargs):
        generated.extend(seeds)
        return real_generate(self, prompts, seeds, **kwargs)

    monkeypatch.setattr(report, "plot_quality_vs_nfe", real_plot)
    monkeypatch.setattr(VideoGenerator, "generate", counting)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert generated == [1]  # only the deleted clip (prompt 0, seed 1) was sampled again
    results = json.loads((Path(second.stdout.strip()) / "results.json").read_text())
    assert results["models"][0]["timings"]["num_videos"] == 3  # 2 + 1: time is kept across runs


@pytest.mark.parametrize("extra,needle", [
    ([], "needs --prompts"),
    (["--prompts", "missing.txt"], "no prompts artifact"),
    (["--prompts", "empty.txt"], "holds no prompt"),
    (["--prompts", "p.txt", "--suite", "fast"], "unknown suite"),
    (["--prompts", "p.txt", "--dimensions", "color"], "not apply"),
    (["--prompts", "p.txt", "--suite", "vbench"], "not apply"),
    (["--prompts", "p.txt", "--samples-per-prompt", "0"], "must be >= 1"),
    (["--prompts", "p.txt", "--model", "no-such-model"], "neither a teacher"),
    (["--prompts", "p.txt", "--frames", "6"], "4k+1"),
    (["--prompts", "p.txt", "--clip-model", "nope"], "does not exist"),
])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    result = runner.invoke(app, ["eval", "--model", "tiny-random", *extra, "--home", str(tmp_path / "H")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and needle in result.stderr
    assert not (tmp_path / "H" / "eval").exists()


def test_eval_help_has_examples():
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "tmd eval" in result.output


def test_eval_dry_run_imports_no_torch_and_writes_nothing(tmp_path):
    (tmp_path / "p.txt").write_text("a cat surfing\n")
    code = ("import sys; from typer.testing import CliRunner; from tmdcli.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); print(r.exit_code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--model", "tiny-random", "--prompts", "p.txt",
                           "--dry-run", "--home", str(tmp_path / "H")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.split() == ["0", "False"], proc.stderr[-500:]
    assert not (tmp_path / "H").exists()
