"""The Stage 2 GAN discriminator (METHOD.md 5.1, 5.2, D8): shapes, tiny inputs, gradients, size, save/load."""

import pytest
import torch

from tmdcli.models import wan
from tmdcli.models.discriminator import (Discriminator, DiscriminatorConfig, count_parameters, default_disc_layers,
                                         discriminator_config_for, discriminator_for, num_groups, pool_kernel)
from tmdcli.models.tiny import TINY_TRANSFORMER_CONFIG
from tmdcli.objectives.gan import discriminator_loss
from tmdcli.models.family import family_defaults

WAN_1P3B = dict(num_attention_heads=12, attention_head_dim=128, patch_size=(1, 2, 2), num_layers=30)
WAN_14B = dict(num_attention_heads=40, attention_head_dim=128, patch_size=(1, 2, 2), num_layers=40)


def built_on_meta(cfg: DiscriminatorConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Discriminator.from_dataclass(cfg).parameters())


def test_1p3b_discriminator_has_the_papers_68m_parameters():
    cfg = discriminator_config_for(WAN_1P3B)
    assert (cfg.in_channels, cfg.channels, cfg.layers) == (384, 384, (15, 22, 29))
    assert built_on_meta(cfg) == count_parameters(cfg) == 67_870_467  # 3 heads x 22,623,489; paper: 68M


def test_14b_discriminator_uses_channel_reduction_2_for_about_188m():
    cfg = discriminator_config_for(WAN_14B)
    assert (cfg.in_channels, cfg.channels, cfg.layers) == (1280, 640, (19, 29, 39))
    assert built_on_meta(cfg) == count_parameters(cfg) == 188_070_147  # D8; paper: 172M
    # without the reduction the head is FastGen's public 708M 14B configuration
    assert count_parameters(discriminator_config_for(WAN_14B, channel_reduction=1)) == 707_910_147


@pytest.mark.parametrize("num_blocks, layers", [(30, (15, 22, 29)), (40, (19, 29, 39)), (12, (5, 8, 11)),
                                                (4, (1, 2, 3)), (2, (0, 1))])
def test_default_layers_follow_the_paper_and_scale_with_depth(num_blocks, layers):
    assert default_disc_layers(num_blocks) == layers
    assert all(0 <= i < num_blocks for i in layers) and len(set(layers)) == len(layers)


def test_default_layers_are_the_papers_for_the_published_configs():
    for config, layers in [(WAN_1P3B, (15, 22, 29)), (WAN_14B, (19, 29, 39)), (TINY_TRANSFORMER_CONFIG, (1, 2, 3))]:
        assert discriminator_config_for(config).layers == family_defaults(config).disc_layers == layers


def test_pool_kernel_is_clamped_to_small_inputs():
    assert pool_kernel(16, (3, 4, 4)) == (3, 4, 4)
    assert pool_kernel(2, (21, 60, 104)) == (2, 2, 2)
    assert pool_kernel(16, (21, 60, 104)) == (16, 16, 16)


@pytest.mark.parametrize("channels, groups", [(384, 32), (640, 32), (1280, 32), (32, 16), (6, 3), (1, 1)])
def test_group_count_divides_channels_with_two_or_more_per_group(channels, groups):
    assert num_groups(channels) == groups


@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 4, 4), (3, 4, 4), (5, 8, 8), (3, 17, 9)])
def test_discriminator_accepts_grids_smaller_than_its_pool_kernels(grid):
    disc = discriminator_for(TINY_TRANSFORMER_CONFIG).eval()
    logits = disc([torch.randn(2, 6, *grid) for _ in range(disc.num_heads)])
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_discriminator_on_tiny_teacher_features_passes_gradient_to_every_head_and_the_input(tiny_teacher):
    layers = family_defaults(TINY_TRANSFORMER_CONFIG).disc_layers
    disc = discriminator_for(tiny_teacher.transformer.config, layers)
    x_t = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    text = tiny_teacher.encode_prompts(["a cat surfing", "a red car at night"])
    feats = wan.block_features(tiny_teacher.transformer, x_t, torch.tensor([700.0, 300.0]), text, layers)
    assert [f.shape for f in feats] == [(2, 6, 3, 4, 4)] * 3
    logits = disc(feats)
    assert logits.shape == (2, disc.num_heads) and logits.dtype == torch.float32
    loss = discriminator_loss(logits, -logits)
    head_params = [next(iter(head.pre[0].parameters())) for head in disc.heads]  # each head's first conv
    grads = torch.autograd.grad(loss, [x_t, *feats, *head_params])  # leaves the shared teacher's .grad alone
    assert all(g.abs().sum() > 0 for g in grads)


def test_discriminator_rejects_a_wrong_number_of_features():
    disc = discriminator_for(TINY_TRANSFORMER_CONFIG)
    with pytest.raises(ValueError, match="expected 3 feature tensors"):
        disc([torch.randn(1, 6, 2, 4, 4)] * 2)


def test_discriminator_build_is_seeded_and_save_load_round_trips(tmp_path):
    disc = discriminator_for(TINY_TRANSFORMER_CONFIG, seed=1).eval()
    same = discriminator_for(TINY_TRANSFORMER_CONFIG, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(disc.state_dict().values(), same.state_dict().values()))
    disc.save_pretrained(tmp_path / "disc")
    loaded = Discriminator.from_pretrained(tmp_path / "disc").eval()
    assert tuple(loaded.config.layers) == (1, 2, 3) and loaded.config.channels == 6
    assert disc.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, loaded.state_dict()[k]) for k, a in disc.state_dict().items())
    feats = [torch.randn(2, 6, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        # weights are bit-identical; the outputs may differ in the last bit only because safetensors loads tensors
        # at other memory alignments, which changes the CPU BLAS summation order in the Linear layers
        torch.testing.assert_close(loaded(feats), disc(feats), rtol=1e-6, atol=1e-7)
