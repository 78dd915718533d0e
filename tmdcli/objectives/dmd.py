"""Stage 2 (DMD2-v with flow-head rollout) objectives: time sampling, x0 parametrisation, teacher CFG, the VSD
generator loss and the fake-score loss (TMD Sec. 2 "DMD", Sec. 3.2, App. A.3; METHOD.md 5.1-5.3, D2, D11-D13).

Convention (Wan2.1, rectified flow): t = 1 is pure noise. Times are float64 tensors of shape (B,); latents are
(B, C, T, H, W). Everything here is a pure function: randomness comes in through an explicit `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from tmdcli.objectives.grids import interpolate, sample_shifted_uniform

VSD_EPS = 1e-6  # added to the per-sample normaliser mean|x_hat - x0_teacher| (D2)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in `like`'s dtype and device, for broadcasting over a latent."""
    return t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def sample_dmd_time(batch: int, generator: torch.Generator | None, gamma: float = 5.0, lo: float = 0.001,
                    hi: float = 0.999, *, device: str | torch.device | None = None) -> torch.Tensor:
    """t_dmd = clamp(shift_gamma(U[lo, hi]), lo, hi) in float64, shape (B,) (TMD Sec. 3.2, Table 7: gamma = 5).

    The noise level of the VSD, fake-score and GAN terms. Drawn on the generator's device unless `device` is given.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return sample_shifted_uniform(batch, gamma, generator=generator, t_min=lo, t_max=hi, device=device)


def noisy(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Forward process `x_t = (1 - t) x + t eps` (TMD Eq. 1), t of shape (B,)."""
    return interpolate(x, eps, t)


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0-prediction from a velocity, `g(x_t, t) = x_t - t v(x_t, t)` (TMD Eq. 17), t of shape (B,)."""
    return x_t - _per_sample(t, v) * v


def cfg_x0(x0_cond: torch.Tensor, x0_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Teacher CFG in x0 space, `x0_neg + scale (x0_cond - x0_neg)` (METHOD.md 5.2; scale 5).

    Written as `x0_cond + (scale - 1)(x0_cond - x0_neg)`, equal in exact arithmetic, so that scale 1 returns
    x0_cond bit for bit (METHOD.md 11.5).
    """
    return x0_cond + (scale - 1.0) * (x0_cond - x0_neg)


def vsd_weight(x_hat: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample VSD normaliser `w = 1 / (mean_{C,T,H,W} |x_hat - x0_teacher| + 1e-6)`, fp32, no grad (D2).

    Returns (B,) float32.
    """
    with torch.no_grad():
        diff = (x_hat.detach().float() - x0_teacher.detach().float()).abs()
        return 1.0 / (diff.flatten(1).mean(dim=1) + VSD_EPS)


def vsd_loss(x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """VSD generator loss (TMD Eq. 11 with the App. A.3 normalisation read as D2), a scalar in at least fp32.

    `0.5 mse(x_hat, sg(x_hat - w (x0_fake - x0_teacher)))`: its gradient wrt x_hat is
    `w (x0_fake - x0_teacher) / numel`, the DMD direction; x0_fake and x0_teacher get no gradient.

    Args:
        x_hat: (B, C, T, H, W) generator output, with grad (through the whole inner rollout).
        x0_fake: fake-score x0 prediction at (x_hat_t, t); x0_teacher: the teacher's CFG x0 prediction there.
    """
    dtype = torch.promote_types(x_hat.dtype, torch.float32)  # at least fp32 (bf16 latents are upcast)
    x_hat_f = x_hat.to(dtype)
    with torch.no_grad():
        w = vsd_weight(x_hat, x0_teacher)
        grad = (x0_fake.to(dtype) - x0_teacher.to(dtype)) * _per_sample(w, x_hat_f)
        target = x_hat_f.detach() - grad
    return 0.5 * F.mse_loss(x_hat_f, target)


def fake_score_loss(x0_fake: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fake-score denoising score matching in x0 space, `mse(x0_fake(x_hat_t, t), x_hat)` (D13), float32 scalar.

    x_hat is the student's sample, produced without grad; only the fake score is trained by this loss.
    """
    return F.mse_loss(x0_fake.float(), x_hat.detach().float())


def sample_student_time(batch: int, outer_grid: list[float], generator: torch.Generator | None, *,
                        device: str | torch.device | None = None) -> torch.Tensor:
    """t_i per sample, uniform over the outer grid points t_1 .. t_M (never t_0 = 0), float64 (B,) (App. A.3).

    For M = 1 this is always t_M = 0.999.
    """
    num_outer_steps = len(outer_grid) - 1
    if num_outer_steps < 1:
        raise ValueError(f"the outer grid needs at least two points, got {outer_grid}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    idx = torch.randint(1, num_outer_steps + 1, (batch,), generator=generator, device=device)
    return torch.tensor(outer_grid, dtype=torch.float64, device=device)[idx]


def student_input(x_real: torch.Tensor, eps: torch.Tensor, outer_grid: list[float],
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's input x_{t_i} and t_i (METHOD.md 5.3): no backward simulation of the outer loop.

    M = 1: `x_in = t_M eps` at t_M = 0.999 (D12: no data leaks into the one-step input).
    M >= 2: t_i drawn from t_1 .. t_M, `x_in = (1 - t_i) x_real + t_i eps` (real data, forward process).

    Returns (x_in like x_real, t_i (B,) float64 on x_real's device).
    """
    t_i = sample_student_time(x_real.shape[0], outer_grid, generator).to(x_real.device)
    if len(outer_grid) == 2:
        return _per_sample(t_i, eps) * eps, t_i
    return noisy(x_real, t_i, eps), t_i


def is_student_iteration(iteration: int, every: int = 5) -> bool:
    """TTUR alternation, XOR (D11): the student steps when `iteration % every == 0`, the critics otherwise."""
    if every < 1:
        raise ValueError(f"student update interval must be >= 1, got {every}")
    return iteration % every == 0


# --- the two alternating losses of Stage 2 (METHOD.md 5.3) --------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DMDParams:
    """Stage 2 hyperparameters (TMD Table 7 "DMD2-v"; METHOD.md 5.1)."""

    outer_grid: tuple[float, ...]
    disc_layers: tuple[int, ...]
    guidance_scale: float = 5.0
    gan_weight: float = 0.03
    t_gamma: float = 5.0
    rollout: bool = True  # gradients through all N inner steps (False: Fig. 7 ablation)


def generator_sample(student, x_in: torch.Tensor, t_i: torch.Tensor, text: torch.Tensor, y1: torch.Tensor, *,
                     rollout: bool = True, inner_grid: list[float] | None = None,
                     head_time: torch.Tensor | None = None) -> torch.Tensor:
    """The unrolled student as a sample generator, `x_hat = x_{t_i} - t_i y_hat` (TMD Eq. 15 read as D3).

    For a DMD2-v student y_hat is its velocity, so this is Eq. 17's `x_t - t v`. `inner_grid` and `head_time` are
    the test switches of METHOD.md 11.1.
    """
    y_hat = student.predict_y(x_in, t_i, text, y1, rollout=rollout, inner_grid=inner_grid, head_time=head_time)
    return x_in.float() - _per_sample(t_i, y_hat) * y_hat


def _draw(x_real: torch.Tensor, generator: torch.Generator, p: DMDParams):
    """All noise of one Stage-2 micro-batch, in a fixed order: student input, inner noise, t_dmd, DMD noise."""
    eps_student = torch.randn(x_real.shape, generator=generator, device=x_real.device)
    x_in, t_i = student_input(x_real, eps_student, list(p.outer_grid), generator)
    y1 = torch.randn(x_real.shape, generator=generator, device=x_real.device)
    t = sample_dmd_time(x_real.shape[0], generator, p.t_gamma, device=x_real.device)
    eps = torch.randn(x_real.shape, generator=generator, device=x_real.device)
    return x_in, t_i, y1, t, eps


def student_step_loss(student, teacher, fake_score, discriminator, batch: dict, generator: torch.Generator,
                      p: DMDParams) -> tuple[torch.Tensor, dict]:
    """VSD + lambda GAN generator loss through the student's full rollout (TMD Eq. 11, Alg. 2 Stage 2).

    The teacher is frozen; its conditional pass keeps the graph to its input for the GAN term and gives x0_c; the
    negative pass and the fake score run without grad. The discriminator is frozen and in eval mode.
    """
    from tmdcli.models import wan
    from tmdcli.objectives.gan import generator_loss

    x_real, text = batch["latents"].float(), batch["text"]
    neg = batch["negative"].expand(x_real.shape[0], -1, -1)
    x_in, t_i, y1, t, eps = _draw(x_real, generator, p)
    x_hat = generator_sample(student, x_in, t_i, text, y1, rollout=p.rollout)
    x_hat_t = noisy(x_hat, t, eps)
    with torch.no_grad():
        x0_fake = x0_from_velocity(x_hat_t, t, wan.velocity(fake_score, x_hat_t, t, text).float())
        x0_neg = x0_from_velocity(x_hat_t, t, wan.velocity(teacher, x_hat_t, t, neg).float())
    v_cond, feats = wan.velocity_and_features(teacher, x_hat_t, t, text, p.disc_layers,
                                              checkpointing=getattr(student, "checkpointing", False))
    x0_cond = x0_from_velocity(x_hat_t, t, v_cond.float()).detach()
    x0_teacher = cfg_x0(x0_cond, x0_neg, p.guidance_scale)
    vsd = vsd_loss(x_hat, x0_fake, x0_teacher)
    gan = generator_loss(discriminator(feats)) if p.gan_weight > 0 else torch.zeros((), device=x_hat.device)
    loss = vsd + p.gan_weight * gan
    return loss, {"vsd": vsd.detach(), "gan_g": gan.detach(),
                  "vsd_weight": vsd_weight(x_hat, x0_teacher).mean()}


def critic_step_loss(student, teacher, fake_score, discriminator, batch: dict, generator: torch.Generator,
                     p: DMDParams) -> tuple[torch.Tensor, dict]:
    """Fake-score DSM (x0 space, D13) + discriminator loss on the current student's full rollout (D16).

    The real clip is noised with the same t and noise as the fake one (FastGen's `gan_use_same_t_noise`).
    """
    from tmdcli.models import wan
    from tmdcli.objectives.gan import discriminator_loss

    x_real, text = batch["latents"].float(), batch["text"]
    x_in, t_i, y1, t, eps = _draw(x_real, generator, p)
    with torch.no_grad():
        x_hat = generator_sample(student, x_in, t_i, text, y1)
    x_hat_t = noisy(x_hat, t, eps)
    fake = fake_score_loss(x0_from_velocity(x_hat_t, t, wan.velocity(fake_score, x_hat_t, t, text).float()), x_hat)
    terms = {"fake_dsm": fake.detach()}
    if p.gan_weight <= 0:
        return fake, terms
    with torch.no_grad():
        t1000 = (1000.0 * t.to(torch.float64)).float()
        f_fake = wan.block_features(teacher, x_hat_t, t1000, text, p.disc_layers)
        f_real = wan.block_features(teacher, noisy(x_real, t, eps), t1000, text, p.disc_layers)
    logits_fake, logits_real = discriminator(f_fake), discriminator(f_real)
    d_loss = discriminator_loss(logits_fake, logits_real)
    terms.update(gan_d=d_loss.detach(), logit_real=logits_real.detach().mean(), logit_fake=logits_fake.detach().mean())
    return fake + d_loss, terms
