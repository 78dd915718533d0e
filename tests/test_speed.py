"""Sampling speed options (issue 18): the chunked Wan VAE decode against diffusers' own, the tiny TAEHV-style
decoder's shapes and loader, and the option plumbing of the API and `tmd sample` (compile, attention, CUDA graphs)."""

import math

import pytest
import torch
from typer.testing import CliRunner

from tmdcli.errors import UsageError
from tmdcli.models import taehv
from tmdcli.models.vae_decode import chunked_decode, decode_chunk, psnr
from tmdcli.runtime import speed
from tmdcli.runtime.speed import SpeedOptions

CHUNK_TOLERANCE = 1e-5  # fp32 max abs pixel difference of the chunked decode against diffusers' per-frame decode


def _wider_vae():
    """A small random Wan2.1 VAE whose decoder changes width between stages (exercises the shortcut convs)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(3)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def test_chunked_decode_matches_diffusers(tiny_teacher):
    """Chunks of 1 latent frame (diffusers' own granularity) and 3 (4 frames after frame 0: a short last chunk) on
    the tiny VAE, the whole video at once on a wider one: diffusers' pixels, for a batch of two clips."""
    z = torch.randn(2, 16, 5, 2, 3, generator=torch.Generator().manual_seed(0))
    for vae, chunks in ((tiny_teacher.vae, (1, 3)), (_wider_vae(), (100,))):
        with torch.no_grad():
            reference = vae.decode(z).sample
            for chunk in chunks:
                out = chunked_decode(vae, z, chunk_frames=chunk)
                assert out.shape == reference.shape == (2, 3, 17, 16, 24)
                assert (out - reference).abs().max() <= CHUNK_TOLERANCE, chunk
                assert psnr(out, reference) > 100.0


def test_chunked_decode_compiles_to_the_same_pixels(tiny_teacher):
    """The compile plumbing (a torch.compile'd chunk function, here with the eager backend) gives the same video."""
    z = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(decode_chunk, backend="eager", dynamic=False)
    calls = []

    def counted(*args):
        calls.append(args[3])  # `first`
        return compiled(*args)

    with torch.no_grad():
        reference = tiny_teacher.vae.decode(z).sample
        out = chunked_decode(tiny_teacher.vae, z, chunk_frames=100, chunk_fn=counted)
    assert calls == [True, False]  # frame 0 alone, then the other two latent frames in one chunk
    assert (out - reference).abs().max() <= CHUNK_TOLERANCE


def test_chunked_decode_refuses_the_wan22_decoder(tiny_teacher):
    from types import SimpleNamespace

    fake = SimpleNamespace(config=SimpleNamespace(is_residual=True, patch_size=2))
    with pytest.raises(ValueError, match="Wan2.1"):
        chunked_decode(fake, torch.zeros(1, 16, 2, 2, 2))


def test_psnr():
    a = torch.zeros(2, 3, 4)
    assert psnr(a, a) == math.inf
    assert psnr(a + 0.02, a) == pytest.approx(10 * math.log10(4 / 0.0004))


# --- the tiny TAEHV-style decoder --------------------------------------------------------------------------------

def _random_taew_file(tmp_path, *, latent_channels=16, tgrow_extra=False):
    """A weights file laid out like taew2_1.pth: random decoder tensors, plus encoder tensors the loader ignores."""
    torch.manual_seed(0)
    state = {f"decoder.{k}": v for k, v in taehv.build_decoder(latent_channels).state_dict().items()}
    if tgrow_extra:  # stored with time up-scaling on at stage 0: twice the channels the model keeps
        state["decoder.7.conv.weight"] = torch.randn(512, 256, 1, 1)
    state["encoder.0.weight"] = torch.randn(64, 3, 3, 3)
    path = tmp_path / "taew2_1.pth"
    torch.save(state, path)
    return path, state


def test_tiny_decoder_shapes_and_frame_mapping(tmp_path):
    path, _ = _random_taew_file(tmp_path)
    model = taehv.load_tiny_decoder(path)
    with torch.no_grad():
        video = model(torch.randn(2, 16, 3, 4, 6))
    assert video.shape == (2, 3, 9, 32, 48)
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert taehv.output_size(21, 60, 104) == (81, 480, 832)
    with torch.device("meta"):  # the full Wan2.1 size, shapes only
        big = taehv.TinyVideoDecoder()(torch.empty(1, 16, 21, 60, 104))
    assert big.shape == (1, 3, 81, 480, 832)


def test_tiny_decoder_is_causal_in_time(tmp_path):
    """Output frames 0..4 come from latent frames 0 and 1 only (frame memory looks back, never ahead)."""
    model = taehv.load_tiny_decoder(_random_taew_file(tmp_path)[0])
    z = torch.randn(1, 16, 3, 2, 2)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = model(z), model(changed)
    assert torch.equal(a[:, :, :5], b[:, :, :5])
    assert not torch.equal(a[:, :, 5:], b[:, :, 5:])


def test_tiny_decoder_time_grow_order():
    """TGrow: channel group k of frame t becomes frame t * stride + k."""
    grow = taehv.TGrow(2, 2)
    with torch.no_grad():
        grow.conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]).view(4, 2, 1, 1))
    x = torch.arange(2 * 2, dtype=torch.float32).view(2, 2, 1, 1)  # frames t = 0, 1 with channels (2t, 2t + 1)
    out = taehv._grow(grow, x).flatten(1)
    assert out.tolist() == [[0.0, 1.0], [0.0, 2.0], [2.0, 3.0], [4.0, 6.0]]


def test_tiny_decoder_keeps_the_last_tgrow_group(tmp_path):
    path, state = _random_taew_file(tmp_path, tgrow_extra=True)
    model = taehv.load_tiny_decoder(path)
    assert torch.equal(model.decoder[7].conv.weight, state["decoder.7.conv.weight"][256:])


def test_tiny_decoder_loader_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(taehv.TaehvWeightsError, match="not a readable weights file"):
        taehv.load_tiny_decoder(junk)
    other = tmp_path / "other.pth"
    torch.save({"decoder.1.weight": torch.zeros(1)}, other)
    with pytest.raises(taehv.TaehvWeightsError, match="missing"):
        taehv.load_tiny_decoder(other)
    path, _ = _random_taew_file(tmp_path, latent_channels=48)  # a Wan2.2-like file
    with pytest.raises(taehv.TaehvWeightsError, match=r"decoder.1.weight has shape"):
        taehv.load_tiny_decoder(path)


def test_sample_with_a_wrong_taehv_file_exits_2(tmp_path):
    from tmdcli.cli import app

    junk = tmp_path / "taew2_1.pth"
    junk.write_bytes(b"junk")
    result = CliRunner().invoke(app, ["sample", "a cat", "--model", "tiny-random", "--device", "cpu",
                                      "--decoder", f"taehv:{junk}", "--out", str(tmp_path / "a.mp4"),
                                      "--home", str(tmp_path / "h")])
    assert result.exit_code == 2, result.output
    assert "not a readable weights file" in result.output and "Traceback" not in result.output


# --- option checks and plumbing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts, message", [
    (SpeedOptions(vae_dtype="fp8"), "--vae-dtype"),
    (SpeedOptions(decoder="fast"), "--decoder"),
    (SpeedOptions(decoder="taehv:/no/such/file.pth"), "does not exist"),
    (SpeedOptions(vae_chunk=0), "chunk"),
    (SpeedOptions(attention=" "), "--attention is empty"),
])
def test_bad_options_are_usage_errors(opts, message):
    with pytest.raises(UsageError, match=message):
        speed.check(opts)


def test_runtime_checks():
    with pytest.raises(UsageError, match="needs a CUDA device"):
        speed.check_runtime(SpeedOptions(cuda_graphs=True), torch.device("cpu"))
    with pytest.raises(UsageError, match="not a diffusers attention backend"):
        speed.check_runtime(SpeedOptions(attention="bogus"), torch.device("cpu"))
    with pytest.raises(UsageError, match="Hugging Face Hub"):
        speed.check_runtime(SpeedOptions(attention="flash_hub"), torch.device("cpu"))
    from diffusers.models import attention_dispatch

    if not attention_dispatch._CAN_USE_FLASH_ATTN_3:
        with pytest.raises(UsageError) as info:
            speed.check_runtime(SpeedOptions(attention="fa3"), torch.device("cpu"))
        assert "flash_attn_3" in info.value.hint
    speed.check_runtime(SpeedOptions(attention="native"), torch.device("cpu"))  # always available


@pytest.fixture(scope="module")
def reference_generation():
    from tmdcli.api import load_generator

    gen = load_generator("tiny-random", device="cpu", dtype="float32", init_student=(1, 2, 1))
    return gen.generate(["a cat surfing"], [0])


def test_generator_options_keep_the_output(reference_generation):
    """Compiled blocks (eager backend: the plumbing without a compiler), an explicit attention backend and the
    stock decoder reproduce the default generation (chunked decode, diffusers' default attention)."""
    from tmdcli.api import load_generator

    opts = SpeedOptions(compile=True, compile_backend="eager", attention="native", decoder="wan-stock")
    gen = load_generator("tiny-random", device="cpu", dtype="float32", init_student=(1, 2, 1), speed=opts)
    out = gen.generate(["a cat surfing"], [0])
    assert torch.equal(out.latents, reference_generation.latents)
    assert (out.videos - reference_generation.videos).abs().max() <= CHUNK_TOLERANCE
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in gen.student.transformer.blocks)
    assert all(m.processor._attention_backend == "native" for m in gen.student.transformer.modules()
               if hasattr(getattr(m, "processor", None), "_attention_backend"))


def test_bfloat16_decode_is_close_not_equal(reference_generation, tiny_teacher):
    decode = speed.make_decoder(tiny_teacher.vae, SpeedOptions(vae_dtype="bfloat16"), torch.device("cpu"))
    video = decode(reference_generation.latents)
    assert next(tiny_teacher.vae.parameters()).dtype == torch.float32  # the shared VAE is not cast
    difference = (video - reference_generation.videos).abs().max()
    assert 0 < difference < 0.1


# --- synth-videos and eval take the same options ------------------------------------------------------------------

def _synth(home, *extra):
    from tmdcli.cli import app

    return CliRunner().invoke(app, ["synth-videos", "--teacher", "tiny-random", "--frames", "5", "--height", "32",
                                    "--width", "32", "--steps", "2", "--limit", "2", "--save-latents", *extra,
                                    "--home", str(home)])


@pytest.mark.parametrize("args, needle", [
    (["--vae-dtype", "bfloat16"], "exact Wan decoder"),
    (["--attention", "sage"], "not exact"),
    (["--decoder", "fast"], "--decoder"),
])
def test_synth_videos_and_eval_refuse_inexact_options(tmp_path, args, needle):
    from tmdcli.cli import app

    synth = _synth(tmp_path / "h", "--dry-run", *args)
    assert synth.exit_code == 2 and needle in synth.output, synth.output
    evaluation = CliRunner().invoke(app, ["eval", "--model", "tiny-random", "--prompts", str(tmp_path / "p.txt"),
                                          "--dry-run", *args, "--home", str(tmp_path / "h")])
    assert evaluation.exit_code == 2 and needle in evaluation.output, evaluation.output


def test_synth_videos_with_speed_options_makes_the_same_clips(tmp_path, monkeypatch):
    """Compiled blocks, an explicit attention backend and the stock decoder: the same latents, the same frames."""
    import sys

    from tmdcli.artifacts.media import read_mp4
    from tmdcli.artifacts.store import Store
    from tmdcli.data.shards import VideosShard

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_synth_encode import make_prompts

    monkeypatch.setenv("TMD_COMPILE_BACKEND", "eager")
    clips = {}
    for name, extra in (("plain", ()), ("fast", ("--compile", "--attention", "native", "--decoder", "wan-stock"))):
        home = tmp_path / name
        make_prompts(home, n=2)
        result = _synth(home, *extra)
        assert result.exit_code == 0, result.output
        videos = Store(home).resolve("latest", kind="videos")
        assert videos.manifest.config["compile"] is bool(extra)  # the options reached the stage (and its manifest)
        [shard_path] = sorted(videos.path.glob("shards/*"))
        with VideosShard(shard_path) as shard:
            clips[name] = (shard.tensors(), {i: shard.mp4(i) for i in (0, 1)})
    assert clips["plain"][0].keys() == clips["fast"][0].keys()
    for key in clips["plain"][0]:
        assert torch.equal(clips["plain"][0][key], clips["fast"][0][key])
    for i in (0, 1):
        frames = []
        for k in ("plain", "fast"):
            (tmp_path / f"{k}{i}.mp4").write_bytes(clips[k][1][i])
            frames.append(torch.as_tensor(read_mp4(tmp_path / f"{k}{i}.mp4")).int())
        assert (frames[0] - frames[1]).abs().max() <= 1  # uint8: the decoders agree within 1e-5 before rounding
