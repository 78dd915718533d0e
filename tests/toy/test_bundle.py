"""The toy teacher bundle: tokenizer, Wan-layout save/load round trip, and the resumable training script."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tmdcli.toy import bundle, grammar, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models are dominated by small ops, which extra threads only slow down on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return bundle.build_tokenizer()


@pytest.fixture(scope="module")
def components():
    return bundle.build_components(seed=0)


def _assert_whole_words(tok, text: str) -> None:
    ids = tok(text).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-1] == "</s>" and tok.unk_token_id not in ids, (text, pieces)
    words = grammar.tokenize(text)
    expected = ["," if w == "," else "\u2581" + w for w in words]
    assert pieces[:-1] == expected, (text, pieces)
    assert len(ids) <= bundle.TOY_MAX_SEQUENCE_LENGTH


def test_tokenizer_whole_words(tokenizer):
    captions = grammar.all_captions("all")
    assert len(captions) == 640
    for text in captions:
        _assert_whole_words(tokenizer, text)
    for i, text in enumerate(captions[::7]):
        for seed in range(3):
            _assert_whole_words(tokenizer, grammar.expand_caption(text, seed=seed + i))
    for scene in grammar.sample_scenes(30, seed=1, split="all", two_object_prob=1.0):
        text = grammar.caption(scene)
        _assert_whole_words(tokenizer, text)
        _assert_whole_words(tokenizer, grammar.expand_caption(text, seed=5))


def test_tokenizer_specials_match_text_encoder(tokenizer, components):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    cfg = components["text_encoder"].config
    assert cfg.vocab_size == len(tokenizer) and cfg.pad_token_id == 0 and cfg.eos_token_id == 1
    # something outside the grammar still tokenizes (by characters), never to <unk>
    assert tokenizer.unk_token_id not in tokenizer("Zebra 42!").input_ids


def test_components_shapes(components):
    vae, transformer = components["vae"], components["transformer"]
    assert transformer.rope.freqs_cos.dtype == torch.float32
    assert len(transformer.blocks) >= 12
    assert vae.config.scale_factor_spatial == 4 and vae.config.z_dim == 8
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert z.shape == (1, 8, 5, 8, 8)
        assert torch.equal(train.decode_unclamped(vae, z).clamp(-1, 1), vae.decode(z).sample)
        out = transformer(z, torch.tensor([500.0]), torch.zeros(1, bundle.TOY_MAX_SEQUENCE_LENGTH, 64)).sample
    assert out.shape == z.shape


def test_save_load_round_trip(tmp_path, components):
    from diffusers import WanPipeline

    out = bundle.save_bundle(components, tmp_path / "toy", teacher_defaults=bundle.teacher_defaults(flow_shift=3.0),
                             metrics={"note": 1})
    for rel in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
                "scheduler/scheduler_config.json", "tmd_teacher.json", "metrics.json"):
        assert (out / rel).is_file(), rel
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    teacher = json.loads((out / "tmd_teacher.json").read_text())
    assert teacher["name"] == "toy" and teacher["family"] == "wan2.1" and teacher["flow_shift"] == 3.0
    assert (teacher["num_frames"], teacher["height"], teacher["width"]) == (17, 32, 32)
    assert json.loads((out / "scheduler/scheduler_config.json").read_text())["flow_shift"] == 3.0
    assert not any(p.name.startswith(".toy.tmp") for p in tmp_path.iterdir())

    loaded = bundle.load_bundle(out)
    assert loaded["teacher"] == teacher and loaded["metrics"] == {"note": 1}
    assert loaded["transformer"].rope.freqs_cos.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 8, 5, 8, 8, generator=g), torch.randn(2, 32, 64, generator=g)
    t = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        a = components["transformer"](x, t, text).sample
        b = loaded["transformer"](x, t, text).sample
    assert torch.equal(a, b)
    caption = grammar.all_captions("train")[3]
    assert loaded["tokenizer"](caption).input_ids == components["tokenizer"](caption).input_ids

    # the folder is a plain diffusers Wan checkpoint: WanPipeline loads it and reads the VAE's 4x spatial factor
    pipe = WanPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    lat = pipe(prompt=caption, negative_prompt="", height=32, width=32, num_frames=17, num_inference_steps=2,
               guidance_scale=4.0, max_sequence_length=bundle.TOY_MAX_SEQUENCE_LENGTH, output_type="latent",
               generator=torch.Generator().manual_seed(0)).frames
    assert lat.shape == (1, 8, 5, 8, 8)


def test_device_sampler_keeps_objects_inside():
    g = torch.Generator().manual_seed(0)
    combos = train._combo_table(grammar.TRAIN_COMBOS, "cpu")
    obj = train.sample_objects(combos, 256, g)
    frames = torch.arange(grammar.NUM_FRAMES).view(1, -1)
    for pos, vel in (("x0", "vx"), ("y0", "vy")):
        centre = obj[pos].view(-1, 1) + obj[vel].view(-1, 1) * frames
        half = obj["half"].view(-1, 1)
        assert (centre - half >= grammar.EDGE_MARGIN_PX - 1e-4).all()
        assert (centre + half <= grammar.FRAME_SIZE - grammar.EDGE_MARGIN_PX + 1e-4).all()
    # caption ids index train_captions() and agree with the sampled attributes
    bg = torch.randint(4, (256,), generator=g)
    captions = train.train_captions()
    for i in range(0, 256, 37):
        spec = grammar.parse_caption(captions[int(obj["pick"][i]) * 4 + int(bg[i])])
        assert spec.objects[0] == (grammar.COLOUR_NAMES[obj["colour"][i]], grammar.SHAPES[obj["shape"][i]],
                                   grammar.MOTIONS[obj["motion"][i]])
        assert spec.background == grammar.BACKGROUND_NAMES[bg[i]]


def test_flow_matching_batch():
    g = torch.Generator().manual_seed(0)
    pool = dict(latents=torch.randn(10, 8, 5, 8, 8), caption_id=torch.arange(10) % 3,
                emb=torch.randn(3, 2, 32, 64), null=torch.zeros(32, 64))
    cfg = train.TrainConfig(out="x", ckpt_dir="y", device="cpu", caption_dropout=0.5)
    x_t, timestep, text, v = train.flow_matching_batch(pool, 64, g, cfg)
    assert x_t.shape == v.shape == (64, 8, 5, 8, 8) and text.shape == (64, 32, 64)
    assert ((timestep >= 0) & (timestep <= 1000)).all()
    assert (text.abs().sum((1, 2)) == 0).any()  # some captions dropped to the null embedding


def test_teacher_recovers_from_a_non_finite_loss(tmp_path, monkeypatch):
    comps = bundle.build_components(seed=0)
    pool = dict(latents=torch.randn(6, 8, 5, 8, 8), caption_id=torch.zeros(6, dtype=torch.long),
                emb=torch.randn(1, 1, 32, 64), null=torch.zeros(32, 64))
    cfg = train.TrainConfig(out=str(tmp_path), ckpt_dir=str(tmp_path / "ckpt"), device="cpu", teacher_steps=4,
                            batch=2, log_every=1)
    calls = []
    real = train.flow_matching_batch

    def poisoned(*args, **kwargs):
        calls.append(1)
        x_t, timestep, text, v = real(*args, **kwargs)
        return (x_t, timestep, text, v * float("nan")) if len(calls) == 2 else (x_t, timestep, text, v)

    from tmdcli.toy import train_teacher as teacher_phase  # the phase's own module looks the name up

    monkeypatch.setattr(teacher_phase, "flow_matching_batch", poisoned)
    ema, summary = train.train_teacher(cfg, comps["transformer"], pool, torch.device("cpu"), None)
    # the poisoned step 2 is caught at its log, the step-0 checkpoint is restored and steps 1-4 are redone
    assert summary["steps"] == 4 and len(calls) == 6 and summary["bf16"] is False
    assert all(torch.isfinite(t).all() for t in ema.values())
    assert all(torch.isfinite(p).all() for p in comps["transformer"].parameters())


@pytest.mark.slow
def test_train_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--device", "cpu", "--vae-steps", "2", "--vae-batch", "2", "--teacher-steps", "3",
            "--batch", "4", "--pool-size", "8", "--caption-variants", "0", "--stats-clips", "8", "--eval-prompts", "2",
            "--eval-steps", "3", "--log-every", "1", "--threads", "1"]
    assert train.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["teacher_steps"] == 3 and summary["vae_steps"] == 2
    b = out / "bundle"
    metrics = json.loads((b / "metrics.json").read_text())
    for key in ("vae", "teacher", "teacher_few_step", "ground_truth", "timings", "device", "acceptance", "training"):
        assert key in metrics, key
    assert {"psnr", "adherence"} <= set(metrics["vae"])
    for name in ("teacher", "teacher_few_step"):
        assert {"seen", "heldout", "seed_diversity"} <= set(metrics[name]), metrics[name]
        assert {"adherence", "frechet"} <= set(metrics[name]["seen"])
        assert {"all", "colour", "shape", "motion", "background", "clean"} <= set(metrics[name]["seen"]["adherence"])
    assert metrics["teacher"]["steps"] == 3 and metrics["teacher_few_step"]["steps"] == 2
    vae_config = json.loads((b / "vae/config.json").read_text())
    assert len(vae_config["latents_mean"]) == 8 and vae_config["latents_mean"] != [0.0] * 8
    assert vae_config["latents_std"] != [1.0] * 8
    assert (b / "tmd_teacher.json").is_file() and (out / "ckpt/vae/done.json").is_file()

    # a rerun of a finished run is a no-op
    assert train.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] is True

    # resume: the VAE is not retrained and the teacher continues from its checkpoint
    import shutil

    shutil.rmtree(b)
    argv[argv.index("--teacher-steps") + 1] = "5"
    assert train.main(argv) == 0
    metrics = json.loads((b / "metrics.json").read_text())
    assert metrics["training"]["vae"]["skipped"] is True
    assert metrics["training"]["teacher"]["steps"] == 5
    assert metrics["training"]["teacher"]["steps_this_run"] == 2
