"""Teacher registry and loading: the real diffusers loading code against a tiny folder in Wan layout."""

import pytest
import torch

from tmdcli.errors import TeacherNotFoundError, UsageError
from tmdcli.models import wan
from tmdcli.models.teacher import WAN_NEGATIVE_PROMPT
from tmdcli.registry import REGISTRY, load_teacher, resolve_teacher


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tmdcli.models.tiny import build_tiny_components, save_wan_layout

    folder = tmp_path_factory.mktemp("wan-tiny")
    save_wan_layout(build_tiny_components(seed=0), folder)
    return folder


def test_registry_has_the_documented_teachers_with_their_defaults():
    assert {"wan2.1-1.3b", "wan2.1-14b", "toy", "tiny-random"} <= set(REGISTRY)
    wan13 = REGISTRY["wan2.1-1.3b"]
    d = wan13.defaults
    assert (d.num_frames, d.height, d.width, d.num_steps, d.guidance_scale, d.flow_shift) == (81, 480, 832, 50, 5.0,
                                                                                            5.0)
    assert d.negative_prompt == WAN_NEGATIVE_PROMPT and d.max_sequence_length == 512


def test_local_folder_in_wan_layout_loads_with_the_real_code_and_matches(wan_folder, tiny_teacher):
    loaded = load_teacher(str(wan_folder), device="cpu", dtype="float32")
    x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    text_a = loaded.encode_prompts(["a cat surfing"])
    text_b = tiny_teacher.encode_prompts(["a cat surfing"])
    # same tokens, same weights; the last bits may differ (memory-mapped tensors take other CPU kernel paths)
    assert text_a.shape[1] == 512 and text_b.shape[1] == 32  # Wan defaults (512 tokens) vs tiny-random's 32
    assert torch.allclose(text_a[:, :32], text_b, atol=1e-6) and text_a[:, 32:].abs().sum() == 0
    assert torch.allclose(loaded.velocity(x, t, text_b), tiny_teacher.velocity(x, t, text_b), atol=1e-6)
    assert loaded.defaults.num_frames == 81  # a plain folder takes Wan defaults unless it ships tmd_teacher.json


def test_text_embeddings_are_zero_past_the_prompt_length(tiny_teacher):
    emb, lengths = wan.encode_text(tiny_teacher.tokenizer, tiny_teacher.text_encoder, ["a cat", "a red car at night"],
                                   32, "cpu", torch.float32)
    assert lengths[0] < lengths[1]
    assert emb[0, lengths[0]:].abs().sum() == 0 and emb[0, : lengths[0]].abs().sum() > 0


def test_vae_round_trip_shapes_and_normalisation(tiny_teacher):
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    latents = tiny_teacher.encode_video(video)
    assert latents.shape == (1, 16, 3, 4, 4)
    raw = tiny_teacher.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(tiny_teacher.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(tiny_teacher.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-5)
    decoded = tiny_teacher.decode_latents(latents)
    assert decoded.shape == video.shape and decoded.min() >= -1 and decoded.max() <= 1


def test_block_features_have_unpatchified_shapes(tiny_teacher):
    x = torch.randn(2, 16, 3, 4, 4)
    text = tiny_teacher.encode_prompts(["a", "b"])
    feats = tiny_teacher.features(x, torch.tensor([0.3, 0.6]), text, [1, 3])
    assert [f.shape for f in feats] == [(2, 6, 3, 4, 4)] * 2  # D / (1 * 2 * 2) = 24 / 4 channels


def test_missing_hub_checkpoint_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(TeacherNotFoundError) as err:
        load_teacher("wan2.1-1.3b", device="cpu")
    assert str(tmp_path / "empty-cache") in err.value.message
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err.value.hint and err.value.exit_code == 2


def test_incomplete_folder_lists_missing_parts(wan_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(wan_folder, broken)
    shutil.rmtree(broken / "vae")
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(TeacherNotFoundError) as err:
        load_teacher(str(broken), device="cpu")
    assert "vae/" in err.value.message and "transformer/*.safetensors" in err.value.message


def test_unknown_teacher_name_is_a_usage_error_listing_known_names():
    with pytest.raises(UsageError) as err:
        resolve_teacher("wan3-mega")
    assert "tiny-random" in err.value.hint


def test_teacher_override_replaces_every_teacher(monkeypatch):
    monkeypatch.setenv("TMD_TEACHER_OVERRIDE", "tiny-random")
    assert resolve_teacher("wan2.1-14b").name == "tiny-random"


def test_only_requested_parts_are_loaded():
    teacher = load_teacher("tiny-random", device="cpu", parts=("vae", "text_encoder"))
    assert teacher.transformer is None and teacher.vae is not None
    assert teacher.latent_shape(9, 32, 32) == (16, 3, 4, 4)
    with pytest.raises(ValueError):
        teacher.latent_shape(8, 32, 32)
