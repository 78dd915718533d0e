"""`--dry-run` of a whole chain of stages in an empty home (a recipe's DRY_RUN): each stage plans with inputs the
stage before would make, instead of failing; without --dry-run a missing input is still an error (exit 2)."""

from typer.testing import CliRunner

from tmdcli.cli import app

CHAIN = [
    ["synth-videos", "--teacher", "tiny-random"],
    ["encode-latents", "--teacher", "tiny-random"],
    ["pretrain-head", "--teacher", "tiny-random", "--n", "2", "--h", "1"],
    ["distill", "--teacher", "tiny-random", "--n", "2", "--h", "1"],
    ["distill", "--teacher", "tiny-random", "--method", "dmd2v", "--m", "1"],
    ["sample", "a cat surfing"],
]


def test_every_stage_plans_in_an_empty_home_when_dry_running(home):
    for args in CHAIN:
        result = CliRunner().invoke(app, [*args, "--home", str(home), "--dry-run"])
        assert result.exit_code == 0, (args, result.output)
        assert "not made yet" in result.output or "made by the stage before" in result.output, result.output
    assert not home.exists() or not any(home.rglob("manifest.json"))


def test_missing_inputs_are_still_errors_without_dry_run(home):
    for args in CHAIN[1:4]:
        result = CliRunner().invoke(app, [*args, "--home", str(home), "--iters", "1"] if "--n" in args
                                    else [*args, "--home", str(home)])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_a_dry_run_with_an_explicit_missing_reference_is_an_error(home):
    result = CliRunner().invoke(app, ["encode-latents", "--teacher", "tiny-random", "--videos", "nosuch",
                                      "--home", str(home), "--dry-run"])
    assert result.exit_code == 2 and "nosuch" in result.output


def test_training_plans_import_no_torch(home, tmp_path):
    """--dry-run answers in a second: the training stages' plans (estimates included) never import torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tmdcli.artifacts.store import Store\n"
        "from tmdcli.stages import distill, pretrain_head\n"
        f"store = Store({str(home)!r}); store.plan_missing_inputs = True\n"
        "pretrain_head.plan(pretrain_head.PretrainHeadConfig(teacher='tiny-random', num_head_blocks=1), store)\n"
        "distill.plan(distill.DistillConfig(teacher='tiny-random', num_head_blocks=1), store)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
