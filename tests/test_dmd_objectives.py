"""Stage 2 objectives (METHOD.md 5.1-5.3, D2, D11-D13, sanity check 11.5): VSD, fake score, GAN, time sampling."""

import copy
import math

import pytest
import torch

from tmdcli.models import wan
from tmdcli.objectives.dmd import (cfg_x0, fake_score_loss, is_student_iteration, noisy, sample_dmd_time,
                                   student_input, vsd_loss, vsd_weight, x0_from_velocity)
from tmdcli.objectives.gan import discriminator_loss, generator_loss
from tmdcli.objectives.grids import outer_grid, shift

LATENT = (16, 3, 4, 4)  # tiny-random latent for 9x32x32 videos


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- VSD -----------------------------------------------------------------------------------------------------------

def test_vsd_gradient_is_exactly_zero_when_fake_equals_teacher():
    x_hat = randn(2, *LATENT, seed=0).requires_grad_()
    x0 = randn(2, *LATENT, seed=1)
    vsd_loss(x_hat, x0.clone(), x0).backward()
    assert torch.equal(x_hat.grad, torch.zeros_like(x_hat))


def test_vsd_gradient_is_weighted_dmd_direction_over_numel():
    x_hat = randn(2, *LATENT, seed=0, dtype=torch.float64).requires_grad_()
    x0_fake, x0_teacher = randn(2, *LATENT, seed=1, dtype=torch.float64), randn(2, *LATENT, seed=2, dtype=torch.float64)
    (grad,) = torch.autograd.grad(vsd_loss(x_hat, x0_fake, x0_teacher), x_hat)
    w = 1.0 / ((x_hat.detach() - x0_teacher).abs().mean(dim=(1, 2, 3, 4)) + 1e-6)
    expected = w.view(-1, 1, 1, 1, 1) * (x0_fake - x0_teacher) / x_hat.numel()
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)  # w itself is fp32 (D2)


def test_vsd_weight_is_per_sample_and_fp32_without_grad():
    x0_teacher = torch.zeros(2, *LATENT)
    x_hat = torch.cat([torch.full((1, *LATENT), 0.5), torch.full((1, *LATENT), 4.0)]).requires_grad_()
    w = vsd_weight(x_hat, x0_teacher)
    assert w.shape == (2,) and w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([1 / (0.5 + 1e-6), 1 / (4.0 + 1e-6)]))
    # changing sample 1 leaves the gradient of sample 0 unchanged
    x0_fake = randn(2, *LATENT, seed=3)
    (g_a,) = torch.autograd.grad(vsd_loss(x_hat, x0_fake, x0_teacher), x_hat)
    x_hat_b = x_hat.detach().clone()
    x_hat_b[1] *= 10
    (g_b,) = torch.autograd.grad(vsd_loss(x_hat_b.requires_grad_(), x0_fake, x0_teacher), x_hat_b)
    assert torch.equal(g_a[0], g_b[0]) and not torch.allclose(g_a[1], g_b[1])


def test_fake_score_copy_of_teacher_with_cfg_1_gives_exactly_zero_vsd(tiny_teacher):
    """METHOD.md 11.5: fake == teacher and CFG 1 -> x0_fake - x0_teacher is exactly 0 and so is the VSD gradient."""
    teacher_tf = tiny_teacher.transformer
    fake_tf = copy.deepcopy(teacher_tf)
    g = torch.Generator().manual_seed(0)
    x_hat = randn(2, *LATENT, seed=0).requires_grad_()
    t = sample_dmd_time(2, g)
    x_hat_t = noisy(x_hat, t, randn(2, *LATENT, seed=1))
    text = tiny_teacher.encode_prompts(["a cat surfing", "a red car at night"])
    text_neg = tiny_teacher.negative_embedding(2)
    with torch.no_grad():
        x0_fake = x0_from_velocity(x_hat_t, t, wan.velocity(fake_tf, x_hat_t, t, text))
        x0_cond = x0_from_velocity(x_hat_t, t, wan.velocity(teacher_tf, x_hat_t, t, text))
        x0_neg = x0_from_velocity(x_hat_t, t, wan.velocity(teacher_tf, x_hat_t, t, text_neg))
    assert torch.equal(x0_fake - cfg_x0(x0_cond, x0_neg, 1.0), torch.zeros_like(x0_fake))
    assert not torch.equal(x0_fake, cfg_x0(x0_cond, x0_neg, 5.0))  # control: CFG 5 moves the teacher
    (grad,) = torch.autograd.grad(vsd_loss(x_hat, x0_fake, cfg_x0(x0_cond, x0_neg, 1.0)), x_hat)
    assert torch.equal(grad, torch.zeros_like(grad))


# --- x0 parametrisation, CFG and the fake-score loss ------------------------------------------------------------

def test_x0_from_exact_velocity_recovers_data():
    x, eps = randn(3, *LATENT, seed=0), randn(3, *LATENT, seed=1)
    t = torch.tensor([0.1, 0.5, 0.999], dtype=torch.float64)
    torch.testing.assert_close(x0_from_velocity(noisy(x, t, eps), t, eps - x), x, rtol=1e-5, atol=1e-5)


def test_cfg_x0_is_exact_at_scale_1_and_extrapolates_otherwise():
    x0_c, x0_n = randn(2, *LATENT, seed=0), randn(2, *LATENT, seed=1)
    assert torch.equal(cfg_x0(x0_c, x0_n, 1.0), x0_c)
    torch.testing.assert_close(cfg_x0(x0_c, x0_n, 5.0), x0_n + 5.0 * (x0_c - x0_n))


def test_fake_score_loss_trains_only_the_fake_score():
    x0_fake = randn(2, *LATENT, seed=0).requires_grad_()
    x_hat = randn(2, *LATENT, seed=1).requires_grad_()
    loss = fake_score_loss(x0_fake, x_hat)
    torch.testing.assert_close(loss, ((x0_fake - x_hat) ** 2).mean())
    loss.backward()
    assert x_hat.grad is None and x0_fake.grad.abs().sum() > 0
    assert fake_score_loss(x_hat.detach(), x_hat) == 0


# --- time sampling and student inputs ---------------------------------------------------------------------------

def test_dmd_time_is_bounded_float64_shifted_and_seeded():
    t = sample_dmd_time(20_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.shape == (20_000,)
    assert t.min() >= 0.001 and t.max() <= 0.999
    # shift is monotone, so the median of shift_5(U) is shift_5(0.5) = 5 * 0.5 / (4 * 0.5 + 1) = 0.8333
    assert shift(0.5, 5.0) == pytest.approx(5 / 6)
    assert t.median().item() == pytest.approx(5 / 6, abs=0.01)
    assert t.median() > 0.5 + 0.3  # far above the unshifted median
    assert torch.equal(t, sample_dmd_time(20_000, torch.Generator().manual_seed(0)))


def test_one_step_student_input_is_scaled_noise_at_t_max():
    x_real, eps = randn(4, *LATENT, seed=0), randn(4, *LATENT, seed=1)
    x_in, t_i = student_input(x_real, eps, outer_grid(1), torch.Generator().manual_seed(0))
    assert torch.equal(t_i, torch.full((4,), 0.999, dtype=torch.float64))
    assert torch.equal(x_in, 0.999 * eps)  # D12: no data in the one-step input


def test_multi_step_student_input_noises_real_data_at_outer_grid_points():
    grid = outer_grid(4)
    x_real, eps = randn(256, 1, 1, 1, 1, seed=0), randn(256, 1, 1, 1, 1, seed=1)
    x_in, t_i = student_input(x_real, eps, grid, torch.Generator().manual_seed(0))
    assert t_i.dtype == torch.float64
    assert set(t_i.tolist()) == set(grid[1:])  # every t_1..t_M appears, t_0 = 0 never
    t = t_i.float().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_in, (1 - t) * x_real + t * eps)


def test_student_iterations_are_every_fifth_xor_critic():
    student_its = [it for it in range(20) if is_student_iteration(it)]
    assert student_its == [0, 5, 10, 15]
    with pytest.raises(ValueError):
        is_student_iteration(3, every=0)


# --- GAN losses ----------------------------------------------------------------------------------------------------

def test_gan_losses_at_zero_logits_are_log2_and_2log2():
    zeros = torch.zeros(4, 3)
    assert generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))


def test_generator_loss_decreases_as_fake_logits_increase():
    values = [generator_loss(torch.full((2, 3), v)).item() for v in (-3.0, -1.0, 0.0, 1.0, 3.0)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_discriminator_loss_is_minimised_by_real_high_and_fake_low():
    lo, hi = torch.full((2, 3), -4.0), torch.full((2, 3), 4.0)
    good = discriminator_loss(logits_fake=lo, logits_real=hi)
    assert good < discriminator_loss(lo, lo) and good < discriminator_loss(hi, hi)
    assert good < discriminator_loss(logits_fake=hi, logits_real=lo)
    logits_fake, logits_real = torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3, requires_grad=True)
    discriminator_loss(logits_fake, logits_real).backward()
    assert (logits_fake.grad > 0).all() and (logits_real.grad < 0).all()  # descent pushes fake down, real up
