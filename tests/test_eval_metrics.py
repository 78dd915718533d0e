"""Quick-suite metrics (EVAL.md 3) on constructed clips with known answers, and the local CLIP encoder."""

import json
import string

import numpy as np
import pytest

from tmdcli.evaluation import metrics as m


def moving_square(num_frames=9, size=32, speed=2, seed=0):
    """A bright square sliding right over a grey background: smooth motion, known frame differences."""
    rng = np.random.default_rng(seed)
    frames = np.full((num_frames, size, size, 3), 90, np.uint8)
    start = int(rng.integers(0, 4))
    for t in range(num_frames):
        x = start + speed * t
        frames[t, 10:18, x:x + 8] = (230, 40, 40)
    return frames


def static_clip(num_frames=9, size=32, seed=0):
    frame = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.repeat(frame[None], num_frames, axis=0)


def test_static_clip_has_zero_flicker_and_full_consistency():
    clip = static_clip()
    assert m.flicker_abs_diff(clip) == 0.0
    assert m.frame_consistency(m.pooled_pixels(clip)) == pytest.approx(1.0)


def test_flicker_is_the_mean_absolute_frame_difference():
    clip = np.zeros((3, 4, 4, 3), np.uint8)
    clip[1] = 255  # black, white, black: every pixel changes by 255 twice
    assert m.flicker_abs_diff(clip) == pytest.approx(1.0)
    assert m.flicker_abs_diff(clip[:1]) == 0.0


def test_shuffled_frames_lower_consistency():
    clip = moving_square(num_frames=13, speed=2)
    shuffled = clip[np.random.default_rng(1).permutation(len(clip))]
    ordered_score = m.frame_consistency(m.pooled_pixels(clip))
    assert ordered_score > m.frame_consistency(m.pooled_pixels(shuffled))
    assert 0.0 < ordered_score < 1.0


def test_identical_seeds_have_zero_diversity_and_different_ones_do_not():
    same = [m.clip_embedding(m.pooled_pixels(moving_square(seed=0)))] * 3
    assert m.seed_diversity(np.stack(same)) == pytest.approx(0.0, abs=1e-12)
    different = [m.clip_embedding(m.pooled_pixels(static_clip(seed=s))) for s in range(3)]
    assert m.seed_diversity(np.stack(different)) > 0.1
    with pytest.raises(ValueError):
        m.seed_diversity(np.stack(same[:1]))


def test_frechet_distance_of_a_set_to_itself_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(loc=0.5, size=(40, 6))
    assert m.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert m.frechet_distance(a, b) == pytest.approx(m.frechet_distance(b, a), rel=1e-9)
    assert m.frechet_distance(a, b) > m.frechet_distance(a, a + 0.01)
    # mean term: shifting every feature by 1 adds D to the distance
    assert m.frechet_distance(a, a + 1.0) == pytest.approx(6.0, rel=1e-6)
    with pytest.raises(ValueError):
        m.frechet_distance(a, b[:, :5])


def test_clip_score_is_100_times_the_clipped_cosine():
    image = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert m.clip_score(image, np.array([1.0, 0.0])) == pytest.approx((100 + 0 + 0) / 3)


def test_model_metrics_against_itself_and_against_a_collapsed_model():
    groups = [[0, 1, 2], [3, 4, 5]]
    diverse = [m.measure_clip(static_clip(seed=s)) for s in range(6)]
    collapsed = [m.measure_clip(static_clip(seed=0)) for _ in range(6)]
    ref, _ = m.model_metrics(diverse, groups)
    assert "frechet_pixel_stats" not in ref and ref["seed_diversity_pixels"] > 0
    same, per_prompt = m.model_metrics(diverse, groups, reference=diverse,
                                       reference_diversity=ref["seed_diversity_pixels"])
    assert same["diversity_ratio"] == pytest.approx(1.0) and same["frechet_pixel_stats"] == pytest.approx(0, abs=1e-4)
    assert len(per_prompt) == 2
    bad, _ = m.model_metrics(collapsed, groups, reference=diverse, reference_diversity=ref["seed_diversity_pixels"])
    assert bad["seed_diversity_pixels"] == pytest.approx(0.0, abs=1e-12)
    assert m.mode_collapse(bad["diversity_ratio"], 0.5)
    assert bad["frechet_pixel_stats"] > same["frechet_pixel_stats"]


def test_single_seed_reports_no_diversity():
    metrics, per_prompt = m.model_metrics([m.measure_clip(static_clip())], [[0]])
    assert metrics["seed_diversity_pixels"] is None and per_prompt == [None]


def test_measures_are_deterministic():
    a, b = m.measure_clip(moving_square()), m.measure_clip(moving_square())
    assert a.consistency == b.consistency and np.array_equal(a.stats, b.stats)


def test_toy_metrics_read_rendered_toy_clips_as_adherent_and_skip_other_prompts():
    from tmdcli.artifacts.media import frames_to_uint8
    from tmdcli.toy.grammar import caption, sample_scenes
    from tmdcli.toy.render import render_scenes

    scenes = sample_scenes(4, seed=0)
    clips = [frames_to_uint8(c, layout="CFHW") for c in render_scenes(scenes)]
    out = m.toy_metrics(clips, [caption(s) for s in scenes], clips)
    assert out["toy_adherence"] == 1.0 and out["frechet_toy_features"] == pytest.approx(0.0, abs=1e-4)
    assert m.toy_metrics(clips, ["a cat surfing"] * 4, None) == {}


# --------------------------------------------------------------------------------------------------------------
# Local CLIP


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A tiny transformers CLIP (random weights) with a character-level tokenizer, saved like a local checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    out = folder / "model"
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_local_clip_folder_gives_bounded_deterministic_clip_scores(tiny_clip_folder):
    from tmdcli.evaluation.clip import load_clip

    clip = load_clip(tiny_clip_folder)
    frames = moving_square(size=48)
    image = clip.encode_frames(frames)
    text = clip.encode_texts(["a red square", "a cat surfing"])
    assert image.shape == (9, 8) and text.shape == (2, 8)
    assert np.allclose(np.linalg.norm(image, axis=1), 1.0)
    score = m.clip_score(image, text[0])
    assert 0.0 <= score <= 100.0 and score == m.clip_score(clip.encode_frames(frames), text[0])
    measured = m.measure_clip(frames, clip_image=clip.encode_frames, text_feature=text[0])
    assert measured.clip_score == pytest.approx(score) and 0 <= measured.clip_consistency <= 1


def test_clip_path_errors_are_usage_errors(tmp_path, tiny_clip_folder):
    from tmdcli.errors import UsageError
    from tmdcli.evaluation.clip import check_clip

    assert check_clip(tiny_clip_folder, "ViT-B-32")["kind"] == "transformers"
    with pytest.raises(UsageError, match="does not exist"):
        check_clip(tmp_path / "nope", "ViT-B-32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="without config.json"):
        check_clip(tmp_path / "empty", "ViT-B-32")
    checkpoint = tmp_path / "open_clip_model.safetensors"
    checkpoint.write_bytes(b"0")
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(UsageError, match="open_clip"):
            check_clip(checkpoint, "ViT-B-32")
