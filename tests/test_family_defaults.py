"""Table-7 defaults follow the teacher's transformer config, not its name (issue 14, section 4): a 14B checkpoint
given as a folder trains with lr 1e-5, c = 1e-5 d and discriminator blocks (19, 29, 39)."""

import json

import pytest
from typer.testing import CliRunner

from tmdcli.artifacts.store import Store
from tmdcli.cli import app
from tmdcli.models.defaults import WAN21_TRANSFORMER_CONFIGS
from tmdcli.models.family import family_defaults
from tmdcli.stages import distill, pretrain_head

from conftest import write_tiny_latents


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def wan_shaped_folder(root, transformer_config: dict):
    """A folder in diffusers Wan layout holding configs only: weight *indexes* stand in for the safetensors, so the
    layout check passes and nothing of 14B size is built (plans read configs, never weights)."""
    for part, config in (("transformer", {"_class_name": "WanTransformer3DModel", **transformer_config}),
                         ("vae", {"_class_name": "AutoencoderKLWan", "z_dim": 16, "scale_factor_temporal": 4,
                                  "scale_factor_spatial": 8}),
                         ("text_encoder", {"model_type": "umt5"})):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(config))
        (root / part / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": {}}')
    (root / "tokenizer").mkdir()
    return root


@pytest.mark.parametrize("name, family, shape, lr1, c, layers", [
    ("wan2.1-14b", "Wan2.1 14B", "L=40, width 5120", 1e-5, 1e-5, (19, 29, 39)),
    ("wan2.1-1.3b", "Wan2.1 1.3B", "L=30, width 1536", 3e-5, 1.0, (15, 22, 29)),
])
def test_a_teacher_folder_gets_the_defaults_of_its_transformer_shape(home, tmp_path, name, family, shape, lr1, c,
                                                                     layers):
    folder = wan_shaped_folder(tmp_path / "some-checkpoint", WAN21_TRANSFORMER_CONFIGS[name])
    write_tiny_latents(home, text_dim=4096, seq=8)
    result = invoke("pretrain-head", "--teacher", folder, "--n", 2, "--h", 5, "--iters", 2, "--batch", 2, "--dry-run", "--home", home)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert f"defaults for {family} (from the transformer config: {shape})" in out
    assert f"lr={lr1}" in out and f"norm_c={c}" in out and f"c = {c:g} d" in out
    store = Store(home)
    stage1 = pretrain_head.plan(pretrain_head.PretrainHeadConfig(teacher=str(folder), iters=2, batch=2), store)
    assert (stage1.config["lr"], stage1.config["norm_c"]) == (lr1, c)
    stage2 = distill.plan(distill.DistillConfig(teacher=str(folder), method="dmd2v", iters=2, batch=2), store)
    assert stage2.config["lr"] == 1e-5 and tuple(stage2.config["disc_layers"]) == layers
    result = invoke("distill", "--method", "dmd2v", "--teacher", folder, "--iters", 2, "--batch", 2, "--dry-run",
                    "--home", home)
    assert result.exit_code == 0, result.output
    assert f"discriminator blocks {layers}" in flat(result.output) and "lr=1e-05" in flat(result.output)


def test_an_unknown_shape_gets_the_documented_fallback_with_a_note(home):
    write_tiny_latents(home)
    result = invoke("pretrain-head", "--teacher", "tiny-random", "--n", 2, "--h", 1, "--iters", 2, "--batch", 2, "--dry-run",
                    "--home", home)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "defaults for unknown shape (from the transformer config: L=4, width 24)" in out
    assert "neither Wan2.1 1.3B (30, 1536) nor 14B (40, 5120): using the 1.3B Stage-1 values" in out
    assert "lr=3e-05" in out and "norm_c=1.0" in out
    fallback = family_defaults({"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 12})
    assert (fallback.stage1_lr, fallback.norm_c, fallback.disc_layers) == (3e-5, 1.0, (1, 2, 3))

