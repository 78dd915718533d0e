"""How the flow head's output becomes the MeanFlow average velocity u (TMD Eq. 14; decision D19, METHOD.md 2.4).

Two parametrisations, recorded in every student (`student.json` config `u_param`) and used by everything that
evaluates u: the Stage-1 target and its total derivative, Algorithm 1, the Stage-2 rollout, `tmd sample`, the API.
- `paper`:      u = y1 - head          (TMD Eq. 14)
- `consistent`: u = (y_s - head) / s   (D19). On r = s rows the Stage-1 loss makes head -> E[y | y_s]; then
  (y_s - head) / s = E[y1 - y | y_s] is the exact inner velocity, where Eq. 14 uses the initial noise y1 in place
  of E[y1 | y_s]. Both agree at s = 1 (y_s = y1), so init equivalence and the first inner step are unchanged.

Torch-free at import (plans read the names); the functions take tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def stored_u_param(student_config: dict) -> str:
    """The parametrisation recorded in a student's config (student.json). Students written before D19 carry none:
    they were trained and sampled with Eq. 14, so they read as `paper` (never as the current default)."""
    return student_config.get("u_param", "paper")


def _per_sample(s, like):
    """(B,) times -> (B, 1, ..., 1) in like's dtype, for broadcasting over a latent."""
    return s.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


U_PARAMS = ("paper", "consistent")  # D19: how the flow head's output becomes the average velocity u
DEFAULT_U_PARAM = "consistent"  # chosen by the analytic tests and the toy measurement (README, docs/u-param.md)
U_FORMS = {"paper": "u = y1 - head (Eq. 14)", "consistent": "u = (y_s - head)/s (D19)"}  # for plans and `tmd show`


def average_velocity(y1: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
    """The MeanFlow average velocity of the flow head, `u = y1 - head` (TMD Eq. 14, the `paper` form)."""
    return y1 - head_out


def average_velocity_consistent(y_s: torch.Tensor, s: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
    """The `consistent` average velocity `u = (y_s - head) / s` (D19; the form of TMD App. B.4's y = x variant).

    On r = s rows the loss makes head -> E[y | y_s]; then u = E[y1 - y | y_s] exactly, where Eq. 14 puts the
    initial noise y1 in place of E[y1 | y_s]. Equals Eq. 14 at s = 1 (y_s = y1), so init equivalence is kept.
    """
    return (y_s - head_out) / _per_sample(s, head_out)


def average_velocity_of(u_param: str, head_out: torch.Tensor, *, y_s: torch.Tensor, s: torch.Tensor,
                        y1: torch.Tensor) -> torch.Tensor:
    """u from the head output in the student's parametrisation (`paper`: Eq. 14; `consistent`: D19)."""
    if u_param == "paper":
        return average_velocity(y1, head_out)
    if u_param == "consistent":
        return average_velocity_consistent(y_s, s, head_out)
    raise ValueError(f"unknown average-velocity parametrisation {u_param!r}; expected one of {U_PARAMS}")


def average_velocity_total_derivative(u_param: str, dhead_ds: torch.Tensor, *, u: torch.Tensor,
                                      direction: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Total derivative du/ds along (dy_s/ds, ds/ds) = (direction, 1), from the head's own derivative (float64).

    paper (Eq. 14):  u = y1 - head, y1 fixed along the path        =>  du/ds = -dhead/ds.
    consistent (D19): s u = y_s - head; differentiate both sides:
                      u + s du/ds = dy_s/ds - dhead/ds             =>  du/ds = (direction - dhead/ds - u) / s.
    Differencing the head (not u) keeps the 1/s factor exact: a finite difference of (y_s - head)/s would add
    O(delta^2 / s^3) error near s = 0.001.
    """
    dh = dhead_ds.double()
    if u_param == "paper":
        return -dh
    if u_param == "consistent":
        return (direction.double() - dh - u.double()) / _per_sample(s, dh)
    raise ValueError(f"unknown average-velocity parametrisation {u_param!r}; expected one of {U_PARAMS}")


def residual_weight(u_param: str, s: torch.Tensor) -> torch.Tensor:
    """Per-sample factor on the Stage-1 residual u - u_tgt (TMD Eq. 9) before squaring: 1 for `paper`, s for
    `consistent` (D19).

    For the consistent form s (u - u_tgt) = (y_s - s u_tgt) - head: the error of the head against an endpoint
    target, on the scale of Eq. 14's loss (where u - u_tgt is already a head-space error); on r = s rows both
    forms then give the same loss, ||y - head||^2. The minimiser is unchanged (for given (y_s, s, r, x_t) the
    factor is a constant), but without it the u-space error carries 1/s^2: rows with s near 0.001 and r = 0 get
    gradients up to 1e3 times larger, beyond what the adaptive normalisation (l + c with c = d) absorbs, and
    training diverges (measured on the analytic mixture of tests/test_analytic_world.py, the small-network test's
    budget: within-component spread 100x the mixture's instead of 0.98-1.01x).
    """
    if u_param == "paper":
        return s.new_ones(s.shape)
    if u_param == "consistent":
        return s
    raise ValueError(f"unknown average-velocity parametrisation {u_param!r}; expected one of {U_PARAMS}")


def flow_map_step(u_param: str, y_s: torch.Tensor, head_out: torch.Tensor, y1: torch.Tensor, s: float,
                  r: float) -> torch.Tensor:
    """One inner flow-map step `f = y_s - (s - r) u` from s to r (TMD Eq. 13 with sign D4), u in `u_param` form.

    paper:      y_s - (s - r) y1 + (s - r) head   (written so that y_s = y1, s - r = 1 returns head bit for bit)
    consistent: (r / s) y_s + ((s - r) / s) head  (the DDIM step; s = 1, r = 0 also returns head bit for bit)
    """
    if u_param == "paper":
        return (y_s - (s - r) * y1) + (s - r) * head_out
    if u_param == "consistent":
        return (r / s) * y_s + ((s - r) / s) * head_out
    raise ValueError(f"unknown average-velocity parametrisation {u_param!r}; expected one of {U_PARAMS}")
