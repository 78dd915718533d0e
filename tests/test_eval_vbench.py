"""VBench (EVAL.md 2.3-2.4, 7): the scorer's test vectors, the prompt suite and file names, the runner's plumbing
against a fake VBench interpreter and a recorded result file, and the preflight errors."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from tmdcli.errors import UsageError
from tmdcli.evaluation import vbench
from tmdcli.evaluation.vbench_runner import VBenchEnv, preflight, run_dimension

DATA = Path(__file__).parent / "data"
FAKE_SITE = DATA / "fake_vbench"
FULL_INFO = FAKE_SITE / "vbench" / "VBench_full_info.json"
RECORDED = DATA / "vbench" / "recorded_eval_results.json"

# EVAL.md 2.4 C: a full raw vector and the scores derived from scripts/constant.py.
RAW_C = {"subject_consistency": 0.95, "background_consistency": 0.96, "temporal_flickering": 0.98,
         "motion_smoothness": 0.98, "dynamic_degree": 0.60, "aesthetic_quality": 0.60, "imaging_quality": 0.65,
         "object_class": 0.85, "multiple_objects": 0.60, "human_action": 0.95, "color": 0.85,
         "spatial_relationship": 0.70, "scene": 0.40, "appearance_style": 0.21, "temporal_style": 0.24,
         "overall_consistency": 0.26}

# EVAL.md 2.4 A: published (Quality, Semantic, Total) rows that the Total formula reproduces within 0.01.
PUBLISHED = [(85.30, 80.09, 84.26), (85.71, 80.55, 84.68), (85.72, 80.47, 84.67), (85.07, 78.69, 83.80),
             (84.28, 79.10, 83.24), (86.67, 84.44, 86.22), (84.89, 81.65, 84.24), (82.20, 73.42, 80.44),
             (83.95, 79.26, 83.02), (85.38, 80.63, 84.43), (83.60, 78.82, 82.65), (85.57, 82.95, 85.05),
             (85.58, 80.50, 84.56)]


# --------------------------------------------------------------------------------------------------------------
# Scorer


@pytest.mark.parametrize("quality,semantic,total", PUBLISHED)
def test_total_reproduces_published_rows(quality, semantic, total):
    assert abs(vbench.total_from(quality, semantic) - total) <= 0.01


def test_full_vector_gives_the_derived_quality_semantic_total():
    s = vbench.score(RAW_C)
    assert s.quality == pytest.approx(0.8189674, abs=1e-6)
    assert s.semantic == pytest.approx(0.7272046, abs=1e-6)
    assert s.total == pytest.approx(0.8006148, abs=1e-6)


def test_normalisation_is_not_clipped_below_min():
    s = vbench.score({**RAW_C, "appearance_style": 0.0})
    assert s.normalised["appearance_style"] == pytest.approx(-0.0031623, abs=1e-6)
    assert s.semantic == pytest.approx(0.6452182, abs=1e-6) and s.total == pytest.approx(0.7842176, abs=1e-6)


@pytest.mark.parametrize("end,expected", [("max", 1.0), ("min", 0.0)])
def test_every_dimension_at_its_max_or_min_scores_one_or_zero(end, expected):
    s = vbench.score({n: getattr(d, end) for n, d in vbench.DIMENSIONS.items()})
    assert (s.quality, s.semantic, s.total) == pytest.approx((expected,) * 3, abs=1e-12)


def test_dynamic_degree_has_half_weight_and_quality_divides_by_six_and_a_half():
    low = vbench.score({**RAW_C, "dynamic_degree": 0.0}).quality
    high = vbench.score({**RAW_C, "dynamic_degree": 1.0}).quality
    assert high - low == pytest.approx(0.5 / 6.5)


@pytest.mark.parametrize("dropped", list(vbench.DIMENSIONS))
def test_a_missing_dimension_raises_instead_of_scoring_zero(dropped):
    with pytest.raises(ValueError, match=dropped):
        vbench.score({k: v for k, v in RAW_C.items() if k != dropped})


def test_an_unknown_dimension_raises():
    with pytest.raises(ValueError, match="camera_motion"):
        vbench.score({**RAW_C, "camera_motion": 0.5})


def test_partial_score_gives_only_complete_groups():
    quality_only = {k: v for k, v in RAW_C.items() if vbench.DIMENSIONS[k].group == vbench.QUALITY}
    out = vbench.partial_score(quality_only)
    assert out["quality"] == pytest.approx(0.8189674, abs=1e-6) and "semantic" not in out and "total" not in out


def test_recorded_result_file_parses_to_the_aggregates():
    assert vbench.read_eval_results(RECORDED) == RAW_C


def test_malformed_result_entry_is_rejected():
    with pytest.raises(ValueError, match="aggregate"):
        vbench.parse_eval_results({"subject_consistency": 0.9})


# --------------------------------------------------------------------------------------------------------------
# Prompt suite and file names


def test_suite_generates_a_prompt_listed_twice_once_with_its_first_index():
    info = vbench.load_full_info(FULL_INFO)
    prompts = vbench.suite_prompts(info, list(vbench.DIMENSIONS))
    names = [p.prompt for p in prompts]
    assert len(info) == 12 and len(names) == 11 and len(set(names)) == 11
    beach = next(p for p in prompts if p.prompt.startswith("A beautiful coastal beach"))
    assert beach.index == 7 and {"appearance_style", "overall_consistency"} <= set(beach.dimensions)


def test_dimension_subset_keeps_indices_so_seeds_do_not_move():
    info = vbench.load_full_info(FULL_INFO)
    subset = vbench.suite_prompts(info, ["subject_consistency"])
    assert [(p.index, p.prompt) for p in subset] == [(6, "a cat running happily")]
    assert vbench.video_seed(100, 6, 3) == 100 + 5 * 6 + 3


def test_video_names_are_what_vbench_standard_mode_looks_for():
    assert vbench.video_name("a red bicycle", 4) == "a red bicycle-4.mp4"
    with pytest.raises(ValueError, match="file name"):
        vbench.check_file_names([vbench.SuitePrompt(0, "a/b", ("color",), "a/b")])


def test_augmented_prompts_from_tsv_and_json_and_missing_entries(tmp_path):
    info = vbench.load_full_info(FULL_INFO)
    tsv = tmp_path / "aug.tsv"
    tsv.write_text("a cat running happily\tA fluffy cat runs joyfully across a sunny lawn, camera tracking.\n")
    prompts = vbench.suite_prompts(info, ["subject_consistency"], vbench.read_augmented(tsv))
    assert prompts[0].prompt == "a cat running happily" and prompts[0].generate_from.startswith("A fluffy cat")
    js = tmp_path / "aug.json"
    js.write_text(json.dumps({"a dog": "A golden dog."}))
    with pytest.raises(ValueError, match="no augmented version"):
        vbench.suite_prompts(info, ["subject_consistency"], vbench.read_augmented(js))


# --------------------------------------------------------------------------------------------------------------
# Runner: a fake VBench interpreter (this Python with tests/data/fake_vbench on its path)


def fake_python(tmp_path: Path, site: Path | None = FAKE_SITE) -> str:
    script = tmp_path / "vbench-python"
    path = f'PYTHONPATH="{site}" ' if site is not None else ""
    script.write_text(f'#!/bin/sh\n{path}exec "{sys.executable}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def fill_weights(env: VBenchEnv, dimensions) -> None:
    for req in vbench.requirements_for(dimensions):
        path = env.roots[req.root] / req.path
        if req.root == "hf":
            path = path / "snapshots" / "abc" / "vocab.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def make_env(tmp_path, site=FAKE_SITE) -> VBenchEnv:
    return VBenchEnv(python=fake_python(tmp_path, site), cache_dir=tmp_path / "cache", torch_home=tmp_path / "torch",
                     hf_home=tmp_path / "hf")


def test_preflight_lists_every_missing_weight_with_its_path(tmp_path):
    env = make_env(tmp_path)
    with pytest.raises(UsageError) as err:
        preflight(env, ["subject_consistency", "scene"])
    message = err.value.message
    assert err.value.exit_code == 2
    assert str(tmp_path / "cache" / "dino_model" / "dino_vitbase16_pretrain.pth") in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth") in message
    assert "caption_model/tag2text_swin_14m.pth" in message and "bert-base-uncased" in message
    assert "amt-s.pth" not in message  # only what the chosen dimensions need


def test_preflight_passes_with_weights_present_and_finds_the_packaged_prompt_list(tmp_path):
    env = make_env(tmp_path)
    fill_weights(env, list(vbench.DIMENSIONS))
    found = preflight(env, list(vbench.DIMENSIONS))
    assert found.full_info == FULL_INFO.resolve() or found.full_info.samefile(FULL_INFO)


def test_preflight_reports_an_environment_without_vbench_or_detectron2(tmp_path):
    env = make_env(tmp_path, site=None)  # this Python: no vbench, no detectron2
    fill_weights(env, ["color"])
    with pytest.raises(UsageError) as err:
        preflight(env, ["color"])
    assert "python module vbench" in err.value.message and "python module detectron2" in err.value.message


def test_preflight_rejects_a_missing_interpreter(tmp_path):
    env = VBenchEnv(python=str(tmp_path / "nope"), cache_dir=tmp_path, torch_home=tmp_path, hf_home=tmp_path)
    with pytest.raises(UsageError, match="not an executable"):
        preflight(env, ["color"])


def test_run_dimension_finds_videos_by_vbench_names_offline(tmp_path):
    env = make_env(tmp_path)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        (videos / f"a cat running happily-{i}.mp4").write_bytes(b"")
    data = run_dimension(env, videos=videos, full_info=FULL_INFO, dimension="subject_consistency",
                         out_dir=tmp_path / "out", name="m0", device="cpu")
    assert vbench.parse_eval_results(data) == {"subject_consistency": 0.95}
    assert sorted(Path(p).name for p in vbench.videos_scored(data, "subject_consistency")) == [
        "a cat running happily-0.mp4", "a cat running happily-1.mp4"]
    log = (tmp_path / "out" / "m0.log").read_text()
    assert "'HF_HUB_OFFLINE': '1'" in log and "'TRANSFORMERS_OFFLINE': '1'" in log and str(env.cache_dir) in log


def test_temporal_flickering_runs_the_static_filter_first(tmp_path):
    env = make_env(tmp_path)
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "In a still frame, a stop sign-0.mp4").write_bytes(b"")
    data = run_dimension(env, videos=videos, full_info=FULL_INFO, dimension="temporal_flickering",
                         out_dir=tmp_path / "out", name="tf", device="cpu")
    scored = vbench.videos_scored(data, "temporal_flickering")
    assert len(scored) == 1 and "filtered_videos" in scored[0]
    assert "raft-things.pth" in (tmp_path / "out" / "tf.log").read_text()


def test_a_failing_vbench_run_raises_with_the_log_tail(tmp_path):
    from tmdcli.errors import StageError

    env = make_env(tmp_path)
    with pytest.raises(StageError, match="VBench failed on color"):
        run_dimension(env, videos=tmp_path / "missing", full_info=FULL_INFO, dimension="color",
                      out_dir=tmp_path / "out", name="c", device="cpu")


# --------------------------------------------------------------------------------------------------------------
# The stage end to end with the fake interpreter


def test_eval_vbench_scores_sixteen_dimensions_from_the_recorded_results(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tmdcli.cli import app

    env = make_env(tmp_path)
    fill_weights(env, list(vbench.DIMENSIONS))
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    args = ["eval", "--suite", "vbench", "--model", "tiny-random", "--vbench-python", env.python, "--vbench-cache",
            str(env.cache_dir), "--samples-per-prompt", "2", "--teacher-steps", "2", "--batch-size", "8",
            "--device", "cpu", "--home", str(home)]
    monkeypatch.setenv("TORCH_HOME", str(env.torch_home))
    monkeypatch.setenv("HF_HOME", str(env.hf_home))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    root = Path(result.stdout.strip())
    results = json.loads((root / "results.json").read_text())
    scores = results["models"][0]["vbench"]
    assert scores["total"] == pytest.approx(0.8006148, abs=1e-6) and scores["quality"] == pytest.approx(0.8189674,
                                                                                                       abs=1e-6)
    assert results["models"][0]["notes"] == []  # VBench found every clip under the name it expects
    clips = sorted(p.name for p in (root / "samples" / "0-tiny-random").iterdir())
    assert len(clips) == 22 and "a red bicycle-1.mp4" in clips
    assert (root / "vbench" / "0-tiny-random" / "color_eval_results.json").is_file()
    assert "VBench Total" in (root / "report.md").read_text()
    assert "80.06" in CliRunner().invoke(app, ["show", str(root), "--home", str(home)]).stdout


def test_eval_vbench_exits_2_before_sampling_when_weights_are_missing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tmdcli.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VBENCH_CACHE_DIR", raising=False)
    home = tmp_path / "home"
    result = CliRunner().invoke(app, ["eval", "--suite", "vbench", "--model", "tiny-random", "--vbench-python",
                                      fake_python(tmp_path), "--vbench-cache", str(tmp_path / "empty"),
                                      "--home", str(home)])
    assert result.exit_code == 2 and "missing" in result.stderr and "raft-things.pth" in result.stderr
    assert not home.exists()  # nothing generated, nothing written


def test_eval_vbench_without_an_interpreter_exits_2(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tmdcli.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TMD_VBENCH_PYTHON", raising=False)
    result = CliRunner().invoke(app, ["eval", "--suite", "vbench", "--model", "tiny-random", "--home",
                                      str(tmp_path / "h")])
    assert result.exit_code == 2 and "TMD_VBENCH_PYTHON" in result.stderr
    assert os.environ.get("TMD_VBENCH_PYTHON") is None
