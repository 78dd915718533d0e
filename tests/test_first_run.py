"""A newcomer's first run on a plain install (issue 15): no matplotlib (the `plot` extra), a missing ffmpeg said
before any work, and a bad --home refused. Optional packages are hidden with sys.modules[name] = None, which makes
both find_spec and import fail as on a machine without them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tmdcli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
HIDE_MATPLOTLIB = 'import sys, runpy; sys.modules["matplotlib"] = None; sys.argv[0] = "tmd"; ' \
                  'runpy.run_module("tmdcli", run_name="__main__", alter_sys=True)'


@pytest.fixture()
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_eval_without_matplotlib_writes_the_report_without_the_png(tmp_path, no_matplotlib):
    """The first command's last stage on a plain install: results.json, report.md (with the note), gallery.html;
    no PNG; exit 0; the note also on stderr."""
    from tmdcli.evaluation.report import PLOT_MISSING_NOTE

    (tmp_path / "p.txt").write_text("a cat surfing\n")
    result = runner.invoke(app, ["eval", "--model", "tiny-random", "--prompts", str(tmp_path / "p.txt"),
                                 "--teacher-steps", "1", "--samples-per-prompt", "1", "--home", str(tmp_path / "H")])
    assert result.exit_code == 0, result.output
    root = Path(result.stdout.strip())
    assert (root / "results.json").is_file() and (root / "gallery.html").is_file()
    assert not (root / "quality_vs_nfe.png").exists()
    report = (root / "report.md").read_text()
    assert f"Note: {PLOT_MISSING_NOTE}." in report and "`quality_vs_nfe.png`" not in report
    assert "pip install 'tmdcli[plot]'" in report
    assert f"note: {PLOT_MISSING_NOTE}" in result.stderr
    files = {f["path"] for f in json.loads((root / "manifest.json").read_text())["files"]}
    assert "report.md" in files and "quality_vs_nfe.png" not in files


def test_eval_dry_run_without_matplotlib_plans_and_notes_the_plot(tmp_path, no_matplotlib):
    result = runner.invoke(app, ["eval", "--model", "tiny-random", "--suite", "toy", "--toy-prompts", "1",
                                 "--dry-run", "--home", str(tmp_path / "H")])
    assert result.exit_code == 0, result.output
    assert "plot: quality_vs_nfe.png not drawn: matplotlib is not installed" in " ".join(result.stderr.split())
    assert "'tmdcli[plot]'" in result.stderr  # rich markup must not eat the extra's brackets


def test_eval_with_matplotlib_plans_no_plot_note(tmp_path):
    """The note is about a missing matplotlib, not always there."""
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["eval", "--model", "tiny-random", "--suite", "toy", "--toy-prompts", "1",
                                 "--dry-run", "--home", str(tmp_path / "H")])
    assert result.exit_code == 0, result.output
    assert "plot:" not in result.stderr


def test_recipe_dry_run_without_matplotlib(tmp_path):
    """`DRY_RUN=1 bash recipes/wan1.3b-m1.sh` on a plain install (every teacher replaced by tiny-random, as in
    tests/test_recipes.py): every stage's plan, no error about a plotting library."""
    shim = tmp_path / "bin" / "tmd"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec \"{sys.executable}\" -c '{HIDE_MATPLOTLIB}' \"$@\"\n")
    shim.chmod(0o755)
    (tmp_path / "hf").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "VIDPROM_FILE", "TMD_HOME")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TMD_HOME=str(tmp_path / "home"), TMD=str(shim),
               DRY_RUN="1", TMD_TEACHER_OVERRIDE="tiny-random", PATH=f"{shim.parent}{os.pathsep}{env['PATH']}")
    result = subprocess.run(["bash", str(ROOT / "recipes" / "wan1.3b-m1.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval ->" in result.stderr and "matplotlib is not installed" in " ".join(result.stderr.split())
    assert not any((tmp_path / "home").rglob("manifest.json"))


# --------------------------------------------------------------------------------------------------------------
# ffmpeg, before any work


@pytest.fixture()
def no_ffmpeg(monkeypatch, tmp_path):
    """IMAGEIO_FFMPEG_EXE pointing at nothing: what a machine with a broken or absent ffmpeg looks like."""
    from tmdcli.artifacts import media

    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-such-ffmpeg"))
    monkeypatch.setattr(media, "_FFMPEG_FOUND", {})


def _says_how_to_fix(text: str) -> bool:
    text = " ".join(text.split())
    return "is not an executable ffmpeg" in text and "pip install 'imageio-ffmpeg>=0.4.9'" in text \
        and "IMAGEIO_FFMPEG_EXE" in text


def test_sample_without_ffmpeg_exits_2_before_loading_anything(tmp_path, no_ffmpeg, monkeypatch):
    from tmdcli import api

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the ffmpeg check")

    monkeypatch.setattr(api, "VideoGenerator", must_not_load)
    args = ["sample", "a cat", "--model", "tiny-random", "--out", str(tmp_path / "x.mp4"), "--home", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and _says_how_to_fix(result.stderr), result.output
    dry = runner.invoke(app, args + ["--dry-run"])
    assert dry.exit_code == 0 and "ffmpeg: NOT FOUND" in dry.stderr and _says_how_to_fix(dry.stderr)


def test_synth_videos_and_eval_without_ffmpeg_exit_2_with_a_plan_line_in_dry_runs(tmp_path, no_ffmpeg):
    home = str(tmp_path / "H")
    made = runner.invoke(app, ["make-prompts", "--source", "toy:2", "--home", home])
    assert made.exit_code == 0, made.output
    for args in (["synth-videos", "--teacher", "tiny-random", "--steps", "1"],
                 ["eval", "--model", "tiny-random", "--suite", "toy", "--toy-prompts", "1"]):
        result = runner.invoke(app, args + ["--home", home])
        assert result.exit_code == 2 and _says_how_to_fix(result.stderr), (args, result.output)
        assert not any(p.name.startswith(".staging") for p in (tmp_path / "H").rglob("*")), args  # no work begun
        dry = runner.invoke(app, args + ["--home", home, "--dry-run"])
        assert dry.exit_code == 0 and "ffmpeg: NOT FOUND" in dry.stderr, (args, dry.output)


def test_find_ffmpeg_reports_the_binary_and_its_version():
    from tmdcli.artifacts.media import find_ffmpeg

    exe, version = find_ffmpeg()
    assert Path(exe).is_file() and version.startswith("ffmpeg version")


def test_find_ffmpeg_without_any_binary(monkeypatch):
    """No IMAGEIO_FFMPEG_EXE and imageio-ffmpeg finds nothing (a platform without its binary, no system ffmpeg)."""
    import imageio_ffmpeg

    from tmdcli.artifacts import media

    def nothing():
        raise RuntimeError("No ffmpeg exe could be found.")

    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE", raising=False)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", nothing)
    with pytest.raises(media.MediaError) as caught:
        media.find_ffmpeg()
    assert "no ffmpeg found" in caught.value.message and "imageio-ffmpeg>=0.4.9" in caught.value.hint
    assert caught.value.exit_code == 2


# --------------------------------------------------------------------------------------------------------------
# --home


def test_a_home_that_is_a_file_exits_2(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for home in (afile, afile / "below"):
        result = runner.invoke(app, ["ls", "--home", str(home)])
        assert result.exit_code == 2 and "a file, not a folder" in result.stderr, result.output
    assert runner.invoke(app, ["ls", "--home", str(tmp_path / "not-yet")]).exit_code == 0  # a new home is fine
