"""Stage 1 objective: Transition-Matching MeanFlow (TM-MF; TMD Sec. 3.1, Alg. 2, App. A.2; METHOD.md section 4).

Pure functions of tensors. The model enters only as callables, so the same code serves the training stage, the
tests (finite differences against `torch.func.jvp`) and the benchmarks.

Symbols (METHOD.md 1): outer time t_i, clean latent x, outer noise x1, y = x1 - x (DTM target), inner noise y1,
inner time s and the MeanFlow end point r <= s, y_s = (1 - s) y + s y1, head output `head`, and the average
velocity u, in one of two parametrisations (D19, METHOD.md 2.4):
- `paper`:      u = y1 - head          (TMD Eq. 14)
- `consistent`: u = (y_s - head) / s   (equal at s = 1; exact for every s with an exact endpoint-predicting head)
All times are float64 tensors of shape (B,) (TMD Table 7: "time t in FP64").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tmdcli.objectives.grids import T_MAX, interpolate, sample_shifted_uniform
from tmdcli.objectives.u_param import (  # noqa: F401  (average_velocity is part of this module's API)
    DEFAULT_U_PARAM,
    average_velocity,
    average_velocity_of,
    average_velocity_total_derivative,
    residual_weight,
)

S_MIN = 0.001  # min of s_mf (TMD Table 7)
UFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (y_s, s) -> u(y_s, s, r) with r, m, c bound


def _b(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`, in like's dtype."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _any_rank(flags: torch.Tensor) -> bool:
    """Whether any row on any rank is flagged. Under FSDP2 every call of a sharded module all-gathers its weights,
    so all ranks must make the same calls: a data-dependent branch is taken on every rank or on none."""
    hit = flags.any()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        hit = hit.to(torch.int32)
        torch.distributed.all_reduce(hit, op=torch.distributed.ReduceOp.MAX)
    return bool(hit)


def _mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) bool -> (B, 1, 1, ...) bool, for torch.where against `like`."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def dtm_target(x: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The DTM difference variable `y = x1 - x` (TMD Eq. 3)."""
    return x1 - x


def conditional_inner_velocity(y: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """Conditional inner velocity `v(y_s, s | y) = y1 - y` along y_s = (1 - s) y + s y1 (TMD Eq. 6, conditional)."""
    return y1 - y


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG target velocity `v_g = v_u + w (v - v_u)` (MeanFlow Eq. 17 with kappa = 0; TMD App. A.2; D5)."""
    return v_uncond + scale * (v_cond - v_uncond)


def sample_s_and_r(batch: int, inner_grid: list[float], *, generator: torch.Generator | None = None,
                   gamma: float = 3.0, r_equals_s_prob: float = 0.75, device: str | torch.device = "cpu",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, r) tailored to the inference grid (TMD App. A.2; D6).

    s = shift_3(U[0.001, 0.999]); r = the largest inner-grid point <= s; then r = s per sample with probability
    `r_equals_s_prob` (1.0 gives plain transition matching, the Table 6 "TM" ablation). Draws s first and the
    Bernoulli second from the same generator. Returns float64 tensors of shape (B,).
    """
    s = sample_shifted_uniform(batch, gamma, generator=generator, t_min=S_MIN, t_max=T_MAX, device=device)
    grid = torch.tensor(sorted(inner_grid), dtype=torch.float64, device=device)
    index = torch.searchsorted(grid, s, right=True) - 1  # largest j with grid[j] <= s
    r = grid[index.clamp(min=0)]
    keep_s = torch.rand(batch, generator=generator, dtype=torch.float64, device=device) < r_equals_s_prob
    return s, torch.where(keep_s, s, r)


def finite_difference_times(s: torch.Tensor, r: torch.Tensor, delta: float, *, s_min: float = S_MIN,
                            s_max: float = T_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation times (s_plus, s_minus) of the central difference, one-sided where s +- delta leaves [s_min,
    s_max] or s - delta would cross r (TMD App. A.2). Rows where both sides fail (only when r == s) get s_plus ==
    s_minus; their derivative is multiplied by s - r = 0 and never used."""
    forward_ok = s + delta <= s_max
    backward_ok = (s - delta >= s_min) & (s - delta > r)
    return torch.where(forward_ok, s + delta, s), torch.where(backward_ok, s - delta, s)


def finite_difference_total_derivative(u_fn: UFn, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                                       direction: torch.Tensor, delta: float) -> torch.Tensor:
    """Total derivative `d/ds u(y_s, s, r)` along dy_s/ds = direction (TMD App. A.2, central finite difference).

    `u_fn` may be any function of (y_s, s) with r bound: the loss differences the head and applies the chain rule
    of its parametrisation (`average_velocity_total_derivative`). u(y_s +- h direction, s +- h) is evaluated at
    `finite_difference_times`, and the difference is formed in float64 (FastGen does the same; the bf16 network
    outputs differ in few bits at delta = 5e-3). `u_fn` is called twice and should run without grad. Returns
    float64.
    """
    s_plus, s_minus = finite_difference_times(s, r, delta)
    y64, d64 = y_s.to(torch.float64), direction.to(torch.float64)
    y_plus = (y64 + _b(s_plus - s, y64) * d64).to(y_s.dtype)
    y_minus = (y64 + _b(s_minus - s, y64) * d64).to(y_s.dtype)
    u_plus = u_fn(y_plus, s_plus).to(torch.float64)
    u_minus = u_fn(y_minus, s_minus).to(torch.float64)
    step = (s_plus - s_minus).clamp(min=torch.finfo(torch.float64).tiny)
    return (u_plus - u_minus) / _b(step, u_plus)


def meanflow_target(v_target: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                    du_ds: torch.Tensor | None) -> torch.Tensor:
    """MeanFlow target `u_tgt = v - (s - r) du/ds` (TMD Eq. 10, from identity Eq. 8), in float64.

    `du_ds` may be None when every row has r == s (transition matching): the target is then v.
    """
    v64 = v_target.to(torch.float64)
    if du_ds is None:
        return v64
    return v64 - _b(s - r, v64) * du_ds.to(torch.float64)


def per_sample_squared_error(u: torch.Tensor, u_target: torch.Tensor) -> torch.Tensor:
    """`||u - u_tgt||^2` summed over all d elements of each sample (TMD Eq. 9), float32 accumulation. (B,)"""
    diff = u.float() - u_target.float()
    return diff.pow(2).flatten(1).sum(1)


def adaptive_normalised_loss(squared_error: torch.Tensor, c: float) -> torch.Tensor:
    """Adaptive loss normalisation `mean_b( l_b / sg(l_b + c) )` (TMD App. A.2; MeanFlow's w = 1/(l + c)^p, p = 1).

    c = d for Wan2.1 1.3B and 1e-5 d for 14B (TMD Table 7). The gradient of each sample is its squared-error
    gradient divided by (l_b + c): large errors cannot dominate the batch.
    """
    return (squared_error / (squared_error.detach() + c)).mean()


def noisy_outer_input(x: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_{t_i} = (1 - t_i) x + t_i x1 from real latents (TMD Eq. 1, Alg. 2)."""
    return interpolate(x, x1, t)


def inner_input(y: torch.Tensor, y1: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y_s = (1 - s) y + s y1 (TMD Eq. 5)."""
    return interpolate(y, y1, s)


# --- one TM-MF training loss (TMD Alg. 2 for one batch; METHOD.md 4.2) -------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TMMeanFlowParams:
    """Stage 1 hyperparameters (TMD Table 7, METHOD.md 4.1)."""

    outer_grid: tuple[float, ...]  # ascending [0, ..., 0.999]; t_i is drawn from grid[1:]
    inner_grid: tuple[float, ...]  # ascending [0, ..., 0.999]; r snaps to it
    norm_c: float  # adaptive-loss constant c (absolute: d for 1.3B, 1e-5 d for 14B)
    cfg_scale: float = 3.0
    cond_dropout: float = 0.1
    fd_delta: float = 5e-3
    r_equals_s_prob: float = 0.75  # 1.0: plain transition matching (Table 6 "TM")
    s_gamma: float = 3.0
    u_param: str = DEFAULT_U_PARAM  # "paper" (Eq. 14) or "consistent" (D19)


def _dropout_rows(r_is_s: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Condition-dropout mask with the MeanFlow batch ordering (METHOD.md 4.2 notes): as many rows as a per-sample
    Bernoulli(p) draw gives, placed on the r == s rows first (MeanFlow and FastGen put both at the batch front)."""
    batch = r_is_s.shape[0]
    count = int((torch.rand(batch, generator=generator, device=r_is_s.device) < p).sum())
    order = torch.argsort((~r_is_s).to(torch.int8), stable=True)  # r == s rows first, then the rest, stable
    drop = torch.zeros(batch, dtype=torch.bool, device=r_is_s.device)
    drop[order[:count]] = True
    return drop


def _rows(feats, index: torch.Tensor | None):
    """BackboneOut restricted to some rows, detached (the FD passes re-run the head only; TMD App. A.2)."""
    from dataclasses import replace

    pick = (lambda x: x.detach()) if index is None else (lambda x: x.detach()[index])
    return replace(feats, m=pick(feats.m), text=pick(feats.text), temb=pick(feats.temb))


def tm_meanflow_loss(student, latents: torch.Tensor, text: torch.Tensor, negative: torch.Tensor,
                     generator: torch.Generator, p: TMMeanFlowParams) -> tuple[torch.Tensor, dict]:
    """The TM-MF loss of one batch (TMD Alg. 2, Eqs. 9-10, 14; decisions D5, D6, D19).

    Args:
        student: TMDStudent (backbone(x_t, t, c) -> feats; head(y_s, s, r, feats) -> latent-shaped output).
        latents: (B, C, T, H, W) clean normalised latents x. text: (B, S, D) raw text embeddings c.
        negative: (1 or B, S, D) negative-prompt embedding c_neg (the "null" condition).
        generator: the iteration's generator (all noise, times and masks come from it).
    Returns (loss, terms) with terms: loss, mse (per element, vs the target), frac_r_eq_s, frac_dropped.
    """
    x = latents.float()
    batch, device = x.shape[0], x.device
    d = x[0].numel()
    x1 = torch.randn(x.shape, generator=generator, device=device)
    y1 = torch.randn(x.shape, generator=generator, device=device)
    outer = torch.tensor(p.outer_grid, dtype=torch.float64, device=device)
    t = outer[torch.randint(1, len(p.outer_grid), (batch,), generator=generator, device=device)]
    s, r = sample_s_and_r(batch, list(p.inner_grid), generator=generator, gamma=p.s_gamma,
                          r_equals_s_prob=p.r_equals_s_prob, device=device)
    drop = _dropout_rows(r == s, p.cond_dropout, generator)
    x_t = noisy_outer_input(x, x1, t)
    y = dtm_target(x, x1)
    y_s = inner_input(y, y1, s)
    v = conditional_inner_velocity(y, y1)
    c_neg = negative.expand(batch, -1, -1).to(text.dtype)

    def velocity(head_out: torch.Tensor) -> torch.Tensor:  # u at (y_s, s) in the student's parametrisation
        return average_velocity_of(p.u_param, head_out.float(), y_s=y_s, s=s, y1=y1)

    if p.cfg_scale != 1.0:
        with torch.no_grad():  # D5: the student's own unconditional velocity u(y_s, s, s | c_neg), negative
            feats_u = student.backbone(x_t, t, c_neg)  # prompt in backbone and head
            v_u = velocity(student.head(y_s, s, s, feats_u))
        v_g = torch.where(_mask(drop, v), v, guided_velocity(v, v_u, p.cfg_scale))
    else:
        v_g = v
    c_in = torch.where(_mask(drop, text), c_neg, text)

    feats = student.backbone(x_t, t, c_in)  # with grad: the backbone is trained too (TMD Sec. 3.1)
    u = velocity(student.head(y_s, s, r, feats))

    needs_fd = r < s
    du_ds = None
    if _any_rank(needs_fd):
        with torch.no_grad():
            # all rows when none here needs it but another rank does (their result is multiplied by s - r = 0)
            index = None if bool(needs_fd.all()) or not bool(needs_fd.any()) else needs_fd.nonzero().squeeze(1)
            sub = (lambda z: z) if index is None else (lambda z: z[index])
            feats_fd, r_fd = _rows(feats, index), sub(r)

            def head_fn(y_in: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
                return student.head(y_in, s_in, r_fd, feats_fd).float()

            # d/ds of the head along (v_g, 1) by finite differences, then du/ds by the chain rule of the
            # parametrisation (exact in s; see average_velocity_total_derivative)
            dhead_ds = finite_difference_total_derivative(head_fn, sub(y_s), sub(s), r_fd, sub(v_g), p.fd_delta)
            du_fd = average_velocity_total_derivative(p.u_param, dhead_ds, u=sub(u.detach()), direction=sub(v_g),
                                                      s=sub(s))
        if index is None:
            du_ds = du_fd
        else:  # rows with r == s get 0, which (s - r) multiplies away anyway
            du_ds = torch.zeros(x.shape, dtype=torch.float64, device=device)
            du_ds[index] = du_fd
    u_target = meanflow_target(v_g, s, r, du_ds)
    weight = residual_weight(p.u_param, s)  # consistent: the head-space error s (u - u_tgt), D19
    squared = per_sample_squared_error(_b(weight, u) * u, _b(weight, u) * u_target.float())
    loss = adaptive_normalised_loss(squared, p.norm_c)
    terms = {"loss": loss.detach(), "mse": (squared.detach() / d).mean(),
             "frac_r_eq_s": (r == s).float().mean(), "frac_dropped": drop.float().mean()}
    return loss, terms
