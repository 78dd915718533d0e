"""The `tmd` command line: help, exit codes, stdout discipline, sample, ls/show/verify."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from tmdcli.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Default outputs (./tmd-samples) land in a temporary folder, never in the repository."""
    monkeypatch.chdir(tmp_path)


def tmd(*args, home=None):
    argv = [*args] + (["--home", str(home)] if home is not None else [])
    return runner.invoke(app, argv)


@pytest.mark.parametrize("command", ["sample", "ls", "show", "verify", "make-prompts", "synth-videos",
                                     "encode-latents"])
def test_every_command_has_help_with_an_example(command):
    result = tmd(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and "tmd " in result.output


def test_version_prints_and_exits_zero():
    result = tmd("--version")
    assert result.exit_code == 0 and result.stdout.startswith("tmd ")


def test_sample_tiny_random_writes_readable_mp4_with_requested_frames(tmp_path, home):
    from tmdcli.artifacts.media import read_mp4

    out = tmp_path / "out.mp4"
    result = tmd("sample", "a cat surfing", "--model", "tiny-random", "--out", str(out), "--frames", "5",
                 "--steps", "4", home=home)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # stdout holds only the result
    assert "effective NFE 8" in result.stderr and "VAE decode" in result.stderr
    frames = read_mp4(out)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8


def test_sample_init_student_reports_effective_nfe(tmp_path, home):
    out = tmp_path / "s.mp4"
    result = tmd("sample", "a cat", "--model", "tiny-random", "--m", "2", "--n", "2", "--h", "1", "--out", str(out),
                 home=home)
    assert result.exit_code == 0, result.output
    assert "effective NFE 2.5" in result.stderr  # 2 (1 + 1 * 1 / 4)
    assert out.is_file()


def test_sample_prompts_file_is_batched_into_a_folder(tmp_path, home):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat surfing\n\na dog running\na red car\n")
    result = tmd("sample", "--prompts-file", str(prompts), "--model", "tiny-random", "--out", str(tmp_path / "o"),
                 "--steps", "2", "--batch-size", "2", "--json", home=home)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["paths"]) == 3 and all((tmp_path / "o").joinpath(p.split("/")[-1]).is_file()
                                              for p in payload["paths"])


@pytest.mark.parametrize("args,needle", [
    (["sample", "", "--model", "tiny-random"], "prompt is empty"),
    (["sample", "   ", "--model", "tiny-random"], "prompt is empty"),
    (["sample", "a cat", "--model", "no-such-teacher"], "neither a teacher"),
    (["sample", "a cat", "--model", "tiny-random", "--m", "2", "--n", "2", "--h", "4"], "H (head blocks)"),
    (["sample", "a cat", "--model", "tiny-random", "--m", "2", "--n", "0", "--h", "1"], "must be >= 1"),
    (["sample", "a cat", "--model", "tiny-random", "--frames", "6"], "4k+1"),
    (["sample", "a cat"], "no student"),
])
def test_bad_sample_input_exits_2_with_message_and_no_traceback(args, needle, home):
    result = tmd(*args, home=home)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


def test_unwritable_output_exits_2_before_loading_models(tmp_path, home):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    result = tmd("sample", "a cat", "--model", "tiny-random", "--out", str(blocker / "x.mp4"), home=home)
    assert result.exit_code == 2 and "cannot write" in result.stderr


def test_dry_run_writes_nothing(tmp_path, home):
    out = tmp_path / "d.mp4"
    result = tmd("sample", "a cat", "--model", "tiny-random", "--out", str(out), "--dry-run", home=home)
    assert result.exit_code == 0 and not out.exists() and not home.exists()


def test_ls_show_verify_cycle(home):
    from tmdcli.artifacts.store import Store

    staging = Store(home).begin(kind="prompts", stage="make-prompts", stage_version=1, config={"a": 1},
                                identity_config={"a": 1})
    staging.write_bytes("prompts.txt", b"a cat surfing\n")
    artifact = staging.commit(stats={"num_items": 1}, facts={"teacher": "none"})
    listed = tmd("ls", "--json", home=home)
    assert listed.exit_code == 0 and json.loads(listed.stdout)[0]["id"] == artifact.id
    shown = tmd("show", "latest", home=home)
    assert shown.exit_code == 0 and artifact.id in shown.stdout and "num_items" in shown.stdout
    assert json.loads(tmd("show", artifact.id, "--json", home=home).stdout)["manifest"]["id"] == artifact.id
    ok = tmd("verify", "prompts:latest", home=home)
    assert ok.exit_code == 0 and ok.stdout.strip() == artifact.id
    (artifact.path / "prompts.txt").write_bytes(b"a cat surfinG\n")
    bad = tmd("verify", artifact.id, home=home)
    assert bad.exit_code == 1 and "prompts.txt" in bad.stderr


def test_unknown_kind_and_unknown_ref_exit_2(home):
    assert tmd("ls", "widgets", home=home).exit_code == 2
    result = tmd("show", "student-000000000000", home=home)
    assert result.exit_code == 2 and "error:" in result.stderr


def test_tmd_debug_shows_traceback():
    env = {"TMD_DEBUG": "1", "PATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tmdcli", "ls", "widgets"], capture_output=True, text=True,
                          env={**__import__("os").environ, **env})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_help_is_fast_and_needs_no_torch():
    code = "import sys; from tmdcli import cli; assert 'torch' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def make_student_artifact(home, n=2, h=1):
    """A student artifact as the training stages write it: export/ holds the student folder."""
    from tmdcli.artifacts.store import Store
    from tmdcli.models.student import StudentConfig, TMDStudent
    from tmdcli.models.tiny import build_tiny_components

    student = TMDStudent.from_teacher(build_tiny_components()["transformer"],
                                      StudentConfig(num_outer_steps=2, num_inner_steps=n, num_head_blocks=h,
                                                    teacher="tiny-random"))
    staging = Store(home).begin(kind="student", stage="pretrain-head", stage_version=1, config={"n": n, "h": h},
                                identity_config={"n": n, "h": h})
    student.save(staging.path / "export")
    return staging.commit(facts={"teacher": "tiny-random", "effective_nfe": student.effective_nfe})


def test_sample_without_model_uses_the_newest_student(tmp_path, home):
    artifact = make_student_artifact(home)
    out = tmp_path / "st.mp4"
    result = tmd("sample", "a cat surfing", "--out", str(out), home=home)
    assert result.exit_code == 0, result.output
    assert artifact.id in result.stderr and "effective NFE 2.5" in result.stderr and out.is_file()
    # --n overrides the inner steps at inference; --h cannot change
    assert "effective NFE 2 " in tmd("sample", "a cat", "--n", "1", "--out", str(out), home=home).stderr
    assert tmd("sample", "a cat", "--h", "2", "--out", str(out), home=home).exit_code == 2


def test_dry_runs_import_no_torch(tmp_path):
    """STYLE.md 3.6: plans are cheap; --dry-run never imports torch."""
    code = ("import sys; from typer.testing import CliRunner; from tmdcli.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); print(r.exit_code, 'torch' in sys.modules)")
    for args in (["sample", "a cat", "--model", "tiny-random", "--dry-run"],
                 ["make-prompts", "--source", "toy:8", "--dry-run"]):
        proc = subprocess.run([sys.executable, "-c", code, *args, "--home", str(tmp_path / "h")], capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.stdout.split() == ["0", "False"], (args, proc.stdout, proc.stderr[-500:])
