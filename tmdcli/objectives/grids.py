"""Time grids of TMD (METHOD.md sections 2.5 and 3): the shift function, the outer and inner grids, the
outer/inner interpolations and the effective NFE.

Convention (Wan2.1, rectified flow): t = 1 is pure noise, t = 0 is data. Grids are returned in ascending order,
index 0 holding 0: `grid[i]` is `t_i` (outer) or `s_j` (inner), so `grid[-1]` is `t_M` or `s_N`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made, so plans that only need the grids stay torch-free
    import torch

T_MAX = 0.999  # t_M = s_N = 0.999 (TMD App. A fn. 2): the first input is (almost) pure noise.


def shift(tp: float | torch.Tensor, gamma: float) -> float | torch.Tensor:
    """Timestep shift `shift_gamma(t') = gamma t' / ((gamma - 1) t' + 1)` (TMD Sec. 3.2); gamma >= 1 pushes t to 1."""
    if gamma < 1:
        raise ValueError(f"shift gamma must be >= 1, got {gamma}")
    return gamma * tp / ((gamma - 1) * tp + 1)


def shifted_grid(num_steps: int, gamma: float, t_max: float = T_MAX) -> list[float]:
    """A grid [0, shift(1/K), ..., shift((K-1)/K), t_max] with K = num_steps intervals (TMD Sec. 3, D9).

    Used for the outer grid (M steps, gamma_t = 10) and the inner grid (N steps, gamma_s = 10).
    """
    if num_steps < 1:
        raise ValueError(f"a grid needs at least one step, got {num_steps}")
    interior = [float(shift(i / num_steps, gamma)) for i in range(1, num_steps)]
    return [0.0, *interior, float(t_max)]


def outer_grid(num_outer_steps: int, gamma: float = 10.0) -> list[float]:
    """Outer (backbone) transition grid `0 = t_0 < ... < t_M = 0.999` (TMD Alg. 1, Table 7: gamma_t = 10)."""
    return shifted_grid(num_outer_steps, gamma)


def inner_grid(num_inner_steps: int, gamma: float = 10.0) -> list[float]:
    """Inner (flow-head) grid `0 = s_0 < ... < s_N = 0.999` (TMD App. A.2: gamma_s = 10).

    N = 2 gives [0, 0.909, 0.999]; N = 4 gives [0, 0.769, 0.909, 0.968, 0.999].
    """
    return shifted_grid(num_inner_steps, gamma)


def effective_nfe(num_outer_steps: int, num_inner_steps: int, num_head_blocks: int, num_blocks: int) -> float:
    """Effective NFE `M (1 + (N - 1) H / L)` (TMD Eq. 16): DiT blocks evaluated per sample, divided by L."""
    if not 0 <= num_head_blocks < num_blocks:
        raise ValueError(f"head blocks H must satisfy 0 <= H < L = {num_blocks}, got {num_head_blocks}")
    return num_outer_steps * (1 + (num_inner_steps - 1) * num_head_blocks / num_blocks)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation `(1 - t) x0 + t x1` with t broadcast over a batch (TMD Eq. 1 and Eq. 5).

    Outer: `x_t = (1 - t) x + t x1`. Inner: `y_s = (1 - s) y + s y1`.
    """
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * x1


def sample_shifted_uniform(batch: int, gamma: float, *, generator: torch.Generator | None = None,
                           t_min: float = 0.001, t_max: float = T_MAX, device: str | torch.device = "cpu",
                           ) -> torch.Tensor:
    """`shift_gamma(U[t_min, t_max])` in float64 (TMD Table 7: t_dmd with gamma 5, s_mf with gamma 3)."""
    import torch

    u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
    t = shift(t_min + (t_max - t_min) * u, gamma)
    return t.clamp(t_min, t_max)
