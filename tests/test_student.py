"""The TMD student split (METHOD.md section 2, WAN.md section 7) and Algorithm 1 (METHOD.md 3, 11.1)."""

import pytest
import torch

from tmdcli.models import wan
from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.sampler import dtm_update, generators_for, inner_flow, randn_per_sample, sample_teacher, sample_tmd

LATENT = (16, 3, 4, 4)  # tiny-random latent for 9x32x32 videos


@pytest.fixture()
def batch(tiny_teacher):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *LATENT, generator=g)
    t = torch.tensor([0.7, 0.3])
    text = tiny_teacher.encode_prompts(["a cat surfing", "a red car at night"])
    return x_t, t, text


def make_student(transformer, h=1, n=2, m=2, seed=0, u_param="consistent"):
    return TMDStudent.from_teacher(transformer, StudentConfig(num_outer_steps=m, num_inner_steps=n,
                                                              num_head_blocks=h, teacher="tiny-random",
                                                              u_param=u_param), seed=seed)


@pytest.mark.parametrize("h", [1, 2, 3])
def test_split_backbone_then_head_equals_teacher_forward_exactly(tiny_teacher, batch, h):
    x_t, t, text = batch
    reference = wan.velocity(tiny_teacher.transformer, x_t, t, text)
    student = make_student(tiny_teacher.transformer, h=h)
    with torch.no_grad():
        feats = student.backbone(x_t, t, text)
        # at init the fusion is closed and the r-embedder outputs 0: any y_s and any r give the teacher output
        out = student.head(torch.randn_like(x_t), t, torch.zeros_like(t), feats)
    assert torch.equal(out, reference)


def test_split_is_not_trivially_equal_when_fusion_gate_opens(tiny_teacher, batch):
    """Negative control: a non-zero gate makes the head depend on y_s."""
    x_t, t, text = batch
    student = make_student(tiny_teacher.transformer, h=1)
    with torch.no_grad():
        student.extras.fusion.gate_lin.bias.fill_(0.5)
        feats = student.backbone(x_t, t, text)
        a = student.head(torch.randn_like(x_t), t, t, feats)
        b = student.head(torch.randn_like(x_t), t, t, feats)
    assert not torch.allclose(a, b)


def test_block_features_match_backbone_tokens(tiny_teacher, batch):
    x_t, t, text = batch
    student = make_student(tiny_teacher.transformer, h=2)
    with torch.no_grad():
        feats = student.backbone(x_t, t, text)
        (f1,) = wan.block_features(tiny_teacher.transformer, x_t, 1000 * t, text, [1])
    expected = wan.unpatchify_features(feats.m, feats.grid, tiny_teacher.transformer.config.patch_size)
    assert f1.shape == (2, 24 // 4, 3, 4, 4) and torch.equal(f1, expected)


@pytest.mark.parametrize("u_param", ["paper", "consistent"])
def test_init_student_outer_step_equals_teacher_euler_step_exactly(tiny_teacher, batch, u_param):
    """METHOD.md 11.1: N = 1, a test-only inner grid from s = 1 to r = 0, the head fed t_i. Both parametrisations
    of u agree at s = 1 (D19), so init equivalence holds for both, to the bit."""
    x_t, t, text = batch
    t_i, t_prev = 0.7, 0.2
    t_vec = torch.full((2,), t_i)
    student = make_student(tiny_teacher.transformer, h=2, n=1, u_param=u_param)
    y1 = torch.randn_like(x_t)
    with torch.no_grad():
        y_hat = student.predict_y(x_t, t_vec, text, y1, inner_grid=[0.0, 1.0], head_time=t_vec)
        x_prev = dtm_update(x_t, y_hat, t_i, t_prev)
        v = wan.velocity(tiny_teacher.transformer, x_t, t_vec, text)
    assert torch.equal(x_prev, x_t - (t_i - t_prev) * v)


@pytest.mark.parametrize("u_param", ["paper", "consistent"])
def test_init_student_with_real_grid_differs_from_teacher_only_slightly(tiny_teacher, batch, u_param):
    """With s_N = 0.999 and N = 1 the head sees temb(0.999) (= t_i here). Eq. 14 steps to 0.001 y1 + 0.999 head;
    the consistent form steps to (0 / 0.999) y1 + (0.999 / 0.999) head = head."""
    x_t, _, text = batch
    t_i = 0.999
    t_vec = torch.full((2,), t_i)
    student = make_student(tiny_teacher.transformer, h=2, n=1, u_param=u_param)
    y1 = torch.randn_like(x_t)
    with torch.no_grad():
        y_hat = student.predict_y(x_t, t_vec, text, y1)
        v = wan.velocity(tiny_teacher.transformer, x_t, t_vec, text)
    if u_param == "paper":  # |y_hat - v| = 0.001 |y1 - v|
        assert torch.allclose(y_hat, 0.001 * y1 + 0.999 * v, atol=1e-5)
        assert 0 < (y_hat - v).abs().max() < 0.01
    else:
        assert torch.allclose(y_hat, v, atol=1e-5)


def test_new_modules_are_inert_at_init_and_get_gradients(fresh_tiny_transformer, tiny_teacher, batch):
    x_t, t, text = batch
    student = make_student(fresh_tiny_transformer, h=2)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=1e-2)

    def loss_fn():
        feats = student.backbone(x_t, t, text)
        return student.head(torch.randn_like(x_t), t, t * 0.5, feats).square().mean()

    loss_fn().backward()
    grads = {n: p.grad for n, p in student.extras.named_parameters()}
    # first backward: the zero-initialised output layers receive gradient (the rest is multiplied by them)
    for name in ("fusion.gate_lin.weight", "fusion.gate_lin.bias", "r_embedder.time_embedder.linear_2.weight",
                 "r_embedder.time_proj.bias"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(p.grad is not None for p in student.transformer.blocks[0].parameters())  # backbone is trained too
    opt.step()
    opt.zero_grad()
    loss_fn().backward()
    # after one step every new parameter has a non-zero gradient
    for name, p in student.extras.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients(fresh_tiny_transformer, batch):
    x_t, t, text = batch
    student = make_student(fresh_tiny_transformer, h=2)
    with torch.no_grad():
        student.extras.fusion.gate_lin.bias.fill_(0.1)

    def grads(ckpt):
        student.zero_grad()
        student.checkpointing = ckpt
        feats = student.backbone(x_t, t, text)
        student.head(x_t * 0.5, t, t * 0.5, feats).square().mean().backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    plain, ckpt = grads(False), grads(True)
    assert len(plain) == len(ckpt) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


def test_save_load_round_trip_gives_identical_outputs(fresh_tiny_transformer, tiny_teacher, tmp_path):
    student = make_student(fresh_tiny_transformer, h=1)
    with torch.no_grad():
        for p in student.extras.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.save(tmp_path / "s")
    loaded = TMDStudent.load(tmp_path / "s")
    assert loaded.config == student.config and loaded.effective_nfe == student.effective_nfe
    text = tiny_teacher.encode_prompts(["a cat surfing"])
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(1))
    kw = dict(outer_grid=student.config.outer_grid(), inner_grid=student.config.inner_grid())
    a = sample_tmd(student, noise, text, generators=generators_for([3]), **kw)
    b = sample_tmd(loaded, noise, text, generators=generators_for([3]), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("m,n,h", [(2, 2, 4), (2, 2, 0), (2, 0, 1), (0, 2, 1)])
def test_student_config_rejects_bad_m_n_h(tiny_teacher, m, n, h):
    with pytest.raises(ValueError):
        make_student(tiny_teacher.transformer, h=h, n=n, m=m)


def test_tmd_sampler_is_independent_of_batch_composition(tiny_teacher):
    student = make_student(tiny_teacher.transformer, h=1)
    text = tiny_teacher.encode_prompts(["a cat surfing", "a dog"])
    kw = dict(outer_grid=student.config.outer_grid(), inner_grid=student.config.inner_grid())
    noise = randn_per_sample(LATENT, generators_for([5, 6]))
    both = sample_tmd(student, noise, text, generators=generators_for([5, 6]), **kw)
    alone = sample_tmd(student, noise[1:], text[1:], generators=generators_for([6]), **kw)
    assert torch.allclose(both[1:], alone, atol=1e-6)


def test_tmd_sampler_uses_m_backbone_and_mn_head_calls(tiny_teacher):
    """METHOD.md 11.6: block evaluations per sample are M (L - H) + M N H."""
    student = make_student(tiny_teacher.transformer, h=1, n=3, m=2)
    calls = {"backbone": 0, "head": 0}
    orig_b, orig_h = student.backbone, student.head
    student.backbone = lambda *a: (calls.__setitem__("backbone", calls["backbone"] + 1), orig_b(*a))[1]
    student.head = lambda *a: (calls.__setitem__("head", calls["head"] + 1), orig_h(*a))[1]
    text = tiny_teacher.encode_prompts(["a cat"])
    sample_tmd(student, torch.randn(1, *LATENT), text, outer_grid=student.config.outer_grid(),
               inner_grid=student.config.inner_grid(), generators=generators_for([0]))
    assert calls == {"backbone": 2, "head": 6}


def test_teacher_euler_and_unipc_samplers_agree_roughly(tiny_teacher):
    text = tiny_teacher.encode_prompts(["a cat"])
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(0))
    v = lambda x, t: tiny_teacher.velocity(x, t, text)  # noqa: E731
    euler = sample_teacher(v, noise, num_steps=40, sampler="euler")
    unipc = sample_teacher(v, noise, num_steps=40, sampler="unipc")
    assert (euler - unipc).abs().mean() < 0.05 * unipc.abs().mean()
    with pytest.raises(ValueError):
        sample_teacher(v, noise, num_steps=2, sampler="dpm")
