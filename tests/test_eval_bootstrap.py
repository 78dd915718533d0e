"""95% bootstrap intervals over captions for the toy suite (evaluation/bootstrap.py, toy.intervals, report.md).

Constructed readings, no model and no video: shares against a brute-force bootstrap that concatenates the drawn
captions' clips, closed forms (identical captions: zero width), joint resampling of the Frechet distance (a model
against itself: exactly zero), and the report's cells and called orderings.
"""

import numpy as np
import pytest

from tmdcli.evaluation import bootstrap
from tmdcli.evaluation.bootstrap import (
    bias_corrected_interval,
    caption_draws,
    clip_weights,
    intervals_separate,
    percentile_interval,
    share_intervals,
    weighted_frechet,
)


def test_share_interval_equals_a_brute_force_bootstrap_of_the_drawn_captions_clips():
    rng = np.random.default_rng(5)
    groups = [[2 * c, 2 * c + 1] for c in range(20)]  # 20 captions x 2 seeds
    hits = (rng.random(40) < 0.4).astype(float)
    draws = caption_draws(20, resamples=1000, seed=0)
    brute = [hits[np.concatenate([groups[c] for c in row])].mean() for row in draws]
    expected = tuple(np.quantile(brute, [0.025, 0.975]))
    [got] = share_intervals(hits[:, None], groups, draws)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] <= hits.mean() <= got[1] and got[1] - got[0] > 0.1


def test_same_seed_same_interval_and_draws_are_uniform_over_captions():
    assert np.array_equal(caption_draws(8, seed=3), caption_draws(8, seed=3))
    assert not np.array_equal(caption_draws(8, seed=3), caption_draws(8, seed=4))
    counts = np.bincount(caption_draws(4, resamples=5000).ravel(), minlength=4) / 20000
    assert counts == pytest.approx([0.25] * 4, abs=0.02)


def test_captions_with_identical_readings_give_a_zero_width_interval():
    """Every caption has 1 of its 2 seeds right: any caption draw gives 0.5. Resampling single clips instead of
    whole captions would give a wide interval."""
    groups = [[2 * c, 2 * c + 1] for c in range(16)]
    hits = np.tile([1.0, 0.0], 16)
    [(low, high)] = share_intervals(hits[:, None], groups, caption_draws(16))
    assert low == high == 0.5


def test_bias_corrected_interval_is_the_percentile_one_without_bias_and_moves_by_the_bias():
    reps = np.linspace(0.0, 10.0, 1001)  # mean 5
    assert bias_corrected_interval(reps, 5.0) == pytest.approx(percentile_interval(reps), abs=1e-9)
    low, high = percentile_interval(reps)
    assert bias_corrected_interval(reps + 3.0, 5.0) == pytest.approx((low, high), abs=1e-9)
    assert bias_corrected_interval(reps, 1.0)[0] == 0.0  # a distance's interval stops at 0


def test_intervals_separate_only_without_overlap():
    assert intervals_separate([0.1, 0.2], [0.3, 0.4]) and intervals_separate([0.3, 0.4], [0.1, 0.2])
    assert not intervals_separate([0.1, 0.3], [0.3, 0.4]) and not intervals_separate([0.1, 0.5], [0.2, 0.3])
    assert not intervals_separate(None, [0.1, 0.2])


def _clips(prompts, right_shape_every: int, rng):
    """One ToyClip per seed: a clean reading of the caption, with the wrong shape except every n-th caption."""
    from tmdcli.evaluation.toy import ToyClip
    from tmdcli.toy.analyzer import ClipAnalysis
    from tmdcli.toy.grammar import parse_caption

    clips = []
    for j, p in enumerate(prompts):
        colour, shape, motion = parse_caption(p["prompt"]).objects[0]
        for _ in p["seeds"]:
            read = shape if j % right_shape_every == 0 else ("circle" if shape != "circle" else "square")
            analysis = ClipAnalysis(ok=True, colour=colour, shape=read, motion=motion,
                                    background=parse_caption(p["prompt"]).background, track=np.zeros((17, 2)),
                                    fill_ratio=1.0, reason="ok", velocity=(0.0, 0.0), track_residual=0.0)
            clips.append(ToyClip(analysis=analysis, analyzer_features=rng.normal(size=22),
                                 pixel_features=rng.normal(size=64), pixels=rng.normal(size=32).astype(np.float32)))
    return clips


def test_toy_scores_carry_intervals_and_a_model_against_itself_has_a_zero_frechet_interval():
    from tmdcli.evaluation.toy import model_scores, toy_prompts

    prompts = toy_prompts(8, seed=0)
    for p in prompts:
        p["seeds"] = [0, 1]
    rng = np.random.default_rng(0)
    ref = _clips(prompts, right_shape_every=1, rng=rng)
    other = _clips(prompts, right_shape_every=2, rng=rng)
    ref_scores = model_scores(ref, prompts)
    same = model_scores(ref, prompts, ref, ref_scores)
    scores = model_scores(other, prompts, ref, ref_scores)
    for split in ("train", "heldout"):
        s = scores["splits"][split]
        assert ref_scores["splits"][split]["adherence_ci95"] == [1.0, 1.0]
        assert s["adherence_colour_ci95"] == [1.0, 1.0] and s["adherence"] == 0.5
        low, high = s["adherence_ci95"]
        assert low < 0.5 < high and s["adherence_shape_ci95"] == s["adherence_ci95"]
        for key in ("frechet_analyzer_features", "frechet_pixel_features"):
            low, high = s[key + "_ci95"]
            assert low <= s[key] <= high and high > low
            assert same["splits"][split][key + "_ci95"] == pytest.approx([0.0, 0.0], abs=1e-6)  # joint resampling
    assert "frechet_pixel_features_ci95" not in ref_scores["metrics"]  # no reference, no distance


def test_weighted_frechet_equals_frechet_distance_of_the_repeated_clips():
    """Brute force: stack each resample's clips (duplicates included) and call metrics.frechet_distance."""
    from tmdcli.evaluation.metrics import frechet_distance

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 5)), rng.normal(0.5, 2.0, size=(12, 5))
    groups = [[0, 1, 2], [3, 4, 5], [6, 7], [8], [9, 10, 11]]  # unequal seeds per caption
    draws = caption_draws(len(groups), resamples=20, seed=2)
    weights = clip_weights(groups, draws)
    assert weights.sum(1).tolist() == [sum(len(groups[c]) for c in row) for row in draws]
    for row, got in zip(draws, weighted_frechet(a, b, weights)):
        index = np.concatenate([groups[c] for c in row])
        assert got == pytest.approx(frechet_distance(a[index], b[index]), rel=1e-8, abs=1e-9)


def _results(ref_ci, other_ci, other_value):
    split = lambda v, ci: {"adherence": v, "adherence_ci95": ci}  # noqa: E731
    models = [{"label": "teacher", "kind": "teacher", "effective_nfe": 100.0, "sample_dir": "a",
               "metrics": {"adherence": 0.9}, "splits": {"train": split(0.9, ref_ci), "heldout": split(0.9, ref_ci)}},
              {"label": "student", "kind": "student", "effective_nfe": 2.0, "sample_dir": "b",
               "metrics": {"adherence": other_value},
               "splits": {"train": split(other_value, other_ci), "heldout": split(other_value, other_ci)}}]
    return {"suite": "toy", "models": models}


def test_report_prints_intervals_bolds_separation_and_calls_only_separated_orderings():
    from tmdcli.evaluation.report import called_orderings, markdown_table, table_rows

    apart = _results([0.8, 0.95], [0.3, 0.5], 0.4)
    table = markdown_table(apart)
    assert "| teacher (ref) | train | teacher | 100 | 0.9 [0.8, 0.95] |" in table
    assert "| student | train | student | 2 | **0.4** [0.3, 0.5] |" in table
    assert called_orderings(apart) == ["- train, adherence: teacher better than student",
                                       "- heldout, adherence: teacher better than student"]
    assert table_rows(apart)[1][2][4] == "0.4"  # the gallery and terminal keep plain numbers
    overlap = _results([0.8, 0.95], [0.3, 0.85], 0.4)
    assert "| 0.4 [0.3, 0.85] |" in markdown_table(overlap) and called_orderings(overlap) == []


def test_constants_are_what_the_report_says():
    assert bootstrap.NUM_RESAMPLES == 1000 and bootstrap.LEVEL == 0.95 and bootstrap.CI_SUFFIX == "_ci95"


def test_a_lower_frechet_interval_is_called_better_and_the_report_explains_the_intervals():
    from tmdcli.evaluation.report import _interval_section, called_orderings

    results = _results([0.8, 0.95], [0.7, 0.9], 0.8)  # adherence overlaps: no call
    near, far = ({"frechet_analyzer_features": v, "frechet_analyzer_features_ci95": ci} for v, ci in
                 ((1.0, [0.5, 1.5]), (4.0, [3.0, 5.0])))
    results["models"].append(dict(results["models"][1], label="far", sample_dir="c",
                                  splits={"train": far, "heldout": far}))
    results["models"][1]["splits"] = {s: dict(results["models"][1]["splits"][s], **near) for s in ("train", "heldout")}
    assert called_orderings(results) == ["- train, Frechet (analyzer): student better than far",
                                         "- heldout, Frechet (analyzer): student better than far"]
    text = "\n".join(_interval_section(results))
    assert "95% interval by bootstrap over captions (1000 resamples" in text and "student better than far" in text
