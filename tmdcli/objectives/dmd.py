"""Stage 2 (DMD2-v with flow-head rollout) objectives: time sampling, x0 parametrisation, teacher CFG, the VSD
generator loss and the fake-score loss (TMD Sec. 2 "DMD", Sec. 3.2, App. A.3; METHOD.md 5.1-5.3, D2, D11-D13).

Convention (Wan2.1, rectified flow): t = 1 is pure noise. Times are float64 tensors of shape (B,); latents are
(B, C, T, H, W). Everything here is a pure function: randomness comes in through an explicit `torch.Generator`.
"""

from __future__ import annotations

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
