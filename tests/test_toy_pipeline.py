"""recipes/toy.sh end to end at tiny budgets: all seven stages on the bundled toy teacher, ending in the report."""

import json
import os
import subprocess
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy.sh"


@pytest.mark.slow
def test_toy_recipe_runs_all_seven_stages_and_reports(tmp_path):
    env = {**os.environ, "TMD_HOME": str(tmp_path / "home"), "TOY_PROMPTS": "16", "SYNTH_STEPS": "4",
           "PRETRAIN_ITERS": "3", "PRETRAIN_BATCH": "8", "DISTILL_ITERS": "6", "DISTILL_BATCH": "4",
           "EVAL_PROMPTS": "1", "DEVICE": "cpu", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", str(RECIPE)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for k in range(1, 8):
        assert f"[toy] {k}/7" in result.stderr
    home = tmp_path / "home"
    kinds = {p.name: len(list(p.glob("*/manifest.json"))) for p in home.iterdir()
             if p.is_dir() and not p.name.startswith(".")}  # .cache: the input-hash cache
    assert kinds == {"prompts": 1, "videos": 1, "latents": 1, "student": 2, "eval": 1}, kinds
    assert (home / "toy-sample.mp4").stat().st_size > 0
    results = json.loads(next((home / "eval").glob("*/results.json")).read_text())
    labels = [m["label"] for m in results["models"]] if "models" in results else list(results)
    assert len(labels) >= 4 and labels[:2] == ["toy", "toy@2"], labels
    assert "adherence" in result.stderr  # the report table is printed


def test_toy_recipe_dry_run_plans_every_stage_and_writes_nothing(tmp_path):
    env = {**os.environ, "TMD_HOME": str(tmp_path / "home"), "DRY_RUN": "1"}
    result = subprocess.run(["bash", str(RECIPE)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for header in ("make-prompts ->", "synth-videos ->", "encode-latents ->", "pretrain-head ->", "distill ->",
                   "sample ->", "eval ->"):
        assert header in result.stderr, header
    assert not any((tmp_path / "home").rglob("manifest.json"))
