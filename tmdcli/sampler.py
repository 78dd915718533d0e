"""Samplers: TMD's Algorithm 1 (outer DTM transitions, inner flow-head steps) and the teacher's own sampler
(UniPC or flow Euler with CFG). Pure functions of tensors and callables; one generator per sample, so a sample
does not depend on what it was batched with (STYLE.md 3.7).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tmdcli.objectives.grids import shift
from tmdcli.objectives.u_param import flow_map_step

HeadFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (y_s, s, r) -> head output


def randn_per_sample(shape: Sequence[int], generators: Sequence[torch.Generator], *,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape (B, *shape), row b drawn from generators[b] (CPU generators, then moved)."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def inner_flow(head_fn: HeadFn, y1: torch.Tensor, inner_grid: Sequence[float], *, u_param: str,
               detach_between_steps: bool = False) -> torch.Tensor:
    """The inner flow map from s_N to s_0 = 0 (TMD Alg. 1, inner loop): y <- y - (s_j - s_{j-1}) u.

    u is the head's average velocity in the student's parametrisation (`paper`: y1 - head, Eq. 14; `consistent`:
    (y - head) / s, D19). Starts from y = y1 at s_N (the grid's last value) and returns y_hat, the sampled
    y = x1 - x. With gradients on, the whole N-step rollout is differentiated (TMD Sec. 3.2);
    `detach_between_steps` cuts the graph before each step, so only the last head call receives gradients (the
    no-rollout ablation, Fig. 7).
    """
    batch = y1.shape[0]
    y = y1
    for j in range(len(inner_grid) - 1, 0, -1):
        if detach_between_steps:
            y = y.detach()
        s = torch.full((batch,), inner_grid[j], dtype=torch.float64, device=y1.device)
        r = torch.full((batch,), inner_grid[j - 1], dtype=torch.float64, device=y1.device)
        y = flow_map_step(u_param, y, head_fn(y, s, r).to(y1.dtype), y1, inner_grid[j], inner_grid[j - 1])
    return y


def dtm_update(x_t: torch.Tensor, y_hat: torch.Tensor, t_i: float, t_prev: float) -> torch.Tensor:
    """Deterministic DTM outer transition `x_{t_{i-1}} = x_{t_i} - (t_i - t_{i-1}) y` (TMD Eq. 4)."""
    return x_t - (t_i - t_prev) * y_hat


@torch.no_grad()
def sample_tmd(student, noise: torch.Tensor, text: torch.Tensor, *, outer_grid: Sequence[float],
               inner_grid: Sequence[float], generators: Sequence[torch.Generator],
               callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """TMD Algorithm 1: M backbone passes, each followed by N flow-head steps on fresh inner noise y1.

    Args:
        student: a TMDStudent (backbone(x_t, t, c) and head(y_s, s, r, feats)).
        noise: (B, C, T, H, W) the input at t_M (plain N(0, I) noise, as for Wan).
        text: (B, S, text_dim) raw text embeddings. No CFG at inference (METHOD.md 3).
        outer_grid, inner_grid: ascending grids [0, ..., 0.999].
        generators: one CPU generator per sample for the inner noise.
    Returns the clean latent x_hat (float32).
    """
    x = noise.float()
    batch = x.shape[0]
    for i in range(len(outer_grid) - 1, 0, -1):
        t = torch.full((batch,), outer_grid[i], dtype=torch.float64, device=x.device)
        y1 = randn_per_sample(x.shape[1:], generators, device=x.device)  # fresh inner noise (App. A.5)
        y_hat = student.predict_y(x, t, text, y1, inner_grid=list(inner_grid))  # one backbone pass + N head steps
        x = dtm_update(x, y_hat, outer_grid[i], outer_grid[i - 1])
        if callback is not None:
            callback(len(outer_grid) - 1 - i, x)
    return x


def flow_sigmas(num_steps: int, flow_shift: float) -> list[float]:
    """Shifted flow-matching sigmas from 1 to 0 (num_steps + 1 values): shift(linspace(1, 0)), as Wan's sampler."""
    return [float(shift(1.0 - k / num_steps, flow_shift)) for k in range(num_steps + 1)]


@torch.no_grad()
def sample_teacher(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, *,
                   num_steps: int = 50, flow_shift: float = 5.0, sampler: str = "unipc",
                   callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The teacher's own sampler: `velocity_fn(x, t)` (already guided) integrated from t = 1 to 0.

    `unipc`: diffusers' UniPCMultistepScheduler (flow prediction, shifted flow sigmas, bh2, order 2), the scheduler
    of the Wan checkpoints, with the flow shift set explicitly (the checkpoints ship 3.0; Wan's T2V sampler uses 5.0).
    `euler`: first-order flow Euler on the same shifted sigmas, timesteps fed as float 1000 * sigma.
    """
    x = noise.float()
    batch = x.shape[0]
    if sampler == "euler":
        sigmas = flow_sigmas(num_steps, flow_shift)
        for k in range(num_steps):
            t = torch.full((batch,), sigmas[k], dtype=torch.float64, device=x.device)
            x = x + (sigmas[k + 1] - sigmas[k]) * velocity_fn(x, t).float()
            if callback is not None:
                callback(k, x)
        return x
    if sampler != "unipc":
        raise ValueError(f"unknown teacher sampler {sampler!r}; expected 'unipc' or 'euler'")
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=flow_shift, num_train_timesteps=1000, solver_order=2,
                                        solver_type="bh2", predict_x0=True, lower_order_final=True,
                                        final_sigmas_type="zero", timestep_spacing="linspace")
    scheduler.set_timesteps(num_steps, device=x.device)
    scheduler.set_begin_index(0)
    for k, timestep in enumerate(scheduler.timesteps):
        # The Wan pipeline feeds UniPC's integer timesteps to the model; we do the same for fidelity.
        t = torch.full((batch,), float(timestep) / 1000.0, dtype=torch.float64, device=x.device)
        v = velocity_fn(x, t).float()
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
        if callback is not None:
            callback(k, x)
    return x
