"""An analytic teacher for the tests (issue 14): a Gaussian mixture in a small latent space.

Data x ~ sum_k w_k N(mu_k, sigma^2 I) in R^D, rectified-flow interpolation x_t = (1 - t) x + t eps (t = 1 noise).
Everything the method needs has a closed form here, derived independently of tmdcli's code:

- Any "data" a ~ sum_k pi_k N(c_k, v I) interpolated as z_s = (1 - s) a + s n, n ~ N(0, I), has
  z_s | k ~ N((1 - s) c_k, V_s I) with V_s = (1 - s)^2 v + s^2, responsibilities rho_k(z) ~ pi_k N(z; (1-s) c_k, V_s),
  E[a | z, k] = c_k + (1 - s) v / V_s (z - (1 - s) c_k),  E[n | z, k] = s / V_s (z - (1 - s) c_k), and the
  velocity E[n - a | z] (finite at s = 0, unlike (z - E[a|z]) / s).
- The teacher is that velocity for (pi, c, v) = (w, mu, sigma^2).
- The inner y-world of TMD: given x_t, y = x1 - x has x = x_t - t y and x1 = x_t + (1 - t) y, so
  p(y | x_t, k) ~ N(x_t - t y; mu_k, sigma^2) N(x_t + (1 - t) y; 0, I): a Gaussian with precision
  lam = t^2 / sigma^2 + (1 - t)^2 and mean (t (x_t - mu_k) / sigma^2 - (1 - t) x_t) / lam; the component
  weights are the teacher's responsibilities at (x_t, t). So p(y | x_t) is again a mixture, and the inner flow
  y_s = (1 - s) y + s y1 uses the same formulas with (pi, c, v) = (rho(x_t), m(x_t), 1 / lam).
- The exact inner flow map Phi_{s->r} (no closed form for a mixture) is integrated with RK4 in float64 on the
  closed-form velocity (48 steps crowded towards r: within 1e-3 of 512 steps, checked in the tests, far below
  the sampling error of the distribution tests).

Oracle heads (what a perfectly trained Stage-1 head is, per parametrisation of u; METHOD.md 2.4, D19):
- r = s: both losses reduce to ||head - y||^2 (up to a 1/s^2 weight), so head = E[y | y_s].
- consistent, u = (y_s - head) / s: MeanFlow's fixed point is u = (y_s - Phi_{s->r}(y_s)) / (s - r), so
  head = y_s - s u: the endpoint at s = 0 of the straight line through (s, y_s) and (r, Phi_{s->r}(y_s)).
- paper, u = y1 - head: u depends on y1, which y_s does not determine, so the MeanFlow identity breaks. The
  loss's fixed point is head + (s - r) D head = E[y | y_s] along the marginal flow, i.e. the average of the
  endpoint predictor along the trajectory: head = 1/(s - r) int_r^s E[y | Phi_{s->sigma}(y_s)] dsigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tmdcli.models.student import StudentConfig, TMDStudent


@dataclass(frozen=True)
class Mixture:
    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    sigma: float

    @staticmethod
    def make(weights, means, sigma: float) -> "Mixture":
        w = torch.tensor(weights, dtype=torch.float64)
        return Mixture(w / w.sum(), torch.tensor(means, dtype=torch.float64), float(sigma))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.sigma * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        second = self.sigma ** 2 * torch.eye(self.dim, dtype=torch.float64) + torch.einsum(
            "k,ki,kj->ij", self.weights, self.means, self.means)
        mean = self.mean()
        return second - torch.outer(mean, mean)

    def nearest_component(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), self.means).argmin(1)


def _batched(z: torch.Tensor, s, pi, centers, var):
    batch, (num_k, dim) = z.shape[0], centers.shape[-2:]
    s = torch.as_tensor(s, dtype=torch.float64).expand(batch)[:, None, None]
    var = torch.as_tensor(var, dtype=torch.float64).expand(batch)[:, None, None]
    return s, pi.expand(batch, num_k), centers.expand(batch, num_k, dim), var


def posterior(z: torch.Tensor, s, pi, centers, var):
    """rho (B, K), z - (1 - s) c_k (B, K, D), V_s (B, 1, 1) for z_s = (1 - s) a + s n, a ~ sum pi_k N(c_k, v I)."""
    s, pi, centers, var = _batched(z, s, pi, centers, var)
    big_v = (1 - s) ** 2 * var + s ** 2
    diff = z.double()[:, None, :] - (1 - s) * centers
    logits = torch.log(pi) - diff.pow(2).sum(-1) / (2 * big_v[:, :, 0])
    return torch.softmax(logits, dim=1), diff, big_v


def denoiser_and_velocity(z: torch.Tensor, s, pi, centers, var) -> tuple[torch.Tensor, torch.Tensor]:
    """E[a | z_s] and the velocity E[n - a | z_s] = sum_k rho_k ((s - (1 - s) v) / V_s (z - (1 - s) c_k) - c_k)."""
    rho, diff, big_v = posterior(z, s, pi, centers, var)
    s_, _, centers_, var_ = _batched(z, s, pi, centers, var)
    mean_a = (rho[..., None] * (centers_ + (1 - s_) * var_ / big_v * diff)).sum(1)
    vel = (rho[..., None] * ((s_ - (1 - s_) * var_) / big_v * diff - centers_)).sum(1)
    return mean_a, vel


def denoiser(z: torch.Tensor, s, pi, centers, var) -> torch.Tensor:
    """E[a | z_s]."""
    return denoiser_and_velocity(z, s, pi, centers, var)[0]


def velocity(z: torch.Tensor, s, pi, centers, var) -> torch.Tensor:
    """E[n - a | z_s]."""
    return denoiser_and_velocity(z, s, pi, centers, var)[1]


def teacher_velocity(mixture: Mixture):
    """The teacher's velocity v(x_t, t) (x of any shape (B, D, ...), t (B,))."""
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        return velocity(flat, t, mixture.weights, mixture.means, mixture.sigma ** 2).reshape(x.shape).to(x.dtype)
    return v


def inner_world(mixture: Mixture, x_t: torch.Tensor, t: torch.Tensor):
    """p(y | x_t) = sum_k pi_k N(m_k, tau^2 I): returns (pi (B, K), m (B, K, D), tau^2 (B,))."""
    x_t, t = x_t.double(), torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
    rho, _, _ = posterior(x_t, t, mixture.weights, mixture.means, mixture.sigma ** 2)
    sig2 = mixture.sigma ** 2
    lam = t ** 2 / sig2 + (1 - t) ** 2
    m = ((t[:, None, None] * (x_t[:, None, :] - mixture.means) / sig2 - (1 - t)[:, None, None] * x_t[:, None, :])
         / lam[:, None, None])
    return rho, m, 1.0 / lam


def flow_map_and_mean_endpoint(z: torch.Tensor, s: torch.Tensor, r: torch.Tensor, world, steps: int = 48):
    """RK4 from s down to r of dz/dsigma = velocity, with the running integral of E[a | z_sigma]:
    returns (Phi_{s->r}(z), int_r^s E[a | Phi_{s->sigma}(z)] dsigma). The nodes sigma_k = r + (s - r)(1 - k/n)^2
    crowd towards r, where narrow components make the flow stiff as sigma -> 0."""
    pi, centers, var = world
    z = z.double()
    acc = torch.zeros_like(z)

    def rhs(zz, ss):  # (dz/dsigma, E[a | z_sigma])
        mean_a, vel = denoiser_and_velocity(zz, ss, pi, centers, var)
        return vel, mean_a

    def node(k):
        return r + (s - r) * (1 - k / steps) ** 2

    for k in range(steps):
        a, b = node(k), node(k + 1)
        h, mid = (b - a)[:, None], (a + b) / 2  # h < 0: integrate backwards in s
        k1 = rhs(z, a)
        k2 = rhs(z + 0.5 * h * k1[0], mid)
        k3 = rhs(z + 0.5 * h * k2[0], mid)
        k4 = rhs(z + h * k3[0], b)
        z = z + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        acc = acc - h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])  # - because h < 0 and the integral runs r..s
    return z, acc


def oracle_head(y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, world, u_param: str) -> torch.Tensor:
    """The perfectly trained Stage-1 head for the given inner world (see the module docstring)."""
    pi, centers, var = world
    s = torch.as_tensor(s, dtype=torch.float64).expand(y_s.shape[0])
    r = torch.as_tensor(r, dtype=torch.float64).expand(y_s.shape[0])
    endpoint = denoiser(y_s, s, pi, centers, var)
    same = (s - r).abs() < 1e-12
    if bool(same.all()):
        return endpoint
    phi, integral = flow_map_and_mean_endpoint(y_s, s, torch.where(same, s - 1e-3, r), world)
    gap = torch.where(same, torch.ones_like(s), s - r)[:, None]
    if u_param == "consistent":
        head = y_s.double() - s[:, None] * (y_s.double() - phi) / gap
    elif u_param == "paper":
        head = integral / gap
    else:
        raise ValueError(u_param)
    return torch.where(same[:, None], endpoint, head)


@dataclass
class Features:
    """What the oracle's "backbone" passes to its head (fields named as tmdcli's BackboneOut, which the loss
    restricts to rows with dataclasses.replace)."""

    m: torch.Tensor  # x_t
    text: torch.Tensor
    temb: torch.Tensor  # t


class OracleStudent(torch.nn.Module):
    """A TMD student whose head is the oracle of an analytic inner world. `predict_y` is TMDStudent's own, so
    Algorithm 1 (sample_tmd -> predict_y -> inner_flow -> flow_map_step) runs the project's code unchanged.

    `world_of(features)` gives the inner world (pi, m, tau^2) of each row; `bias` (D,) and `slope` (D, D) are
    zero parameters added to the head as head + s (bias + y_s slope), so tests can read the loss's gradient
    along those directions of function space."""

    predict_y = TMDStudent.predict_y

    def __init__(self, world_of, config: StudentConfig, dim: int, *, form: str | None = None):
        super().__init__()
        self.world_of, self.config = world_of, config
        self.form = form or config.u_param  # which oracle (default: the one of the student's own u)
        self.bias = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.slope = torch.nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))

    def backbone(self, x_t, t, text):
        return Features(m=x_t.double(), text=text, temb=torch.as_tensor(t, dtype=torch.float64))

    def head(self, y_s, s, r, feats):
        out = oracle_head(y_s.double(), s, r, self.world_of(feats), self.form)
        return (out + s.double()[:, None] * (self.bias + y_s.double() @ self.slope)).to(y_s.dtype)


def mixture_oracle(mixture: Mixture, config: StudentConfig, *, form: str | None = None) -> OracleStudent:
    """The oracle student of the mixture teacher: each row's inner world is p(y | x_t)."""
    return OracleStudent(lambda f: inner_world(mixture, f.m, f.temb), config, mixture.dim, form=form)


def standard_normal_oracle(dim: int, config: StudentConfig, *, form: str | None = None) -> OracleStudent:
    """An oracle whose inner world is y ~ N(0, I) whatever x_t (the setting of METHOD.md 2.4's 0.62)."""
    world = (torch.ones(1, dtype=torch.float64), torch.zeros(1, dim, dtype=torch.float64), 1.0)
    return OracleStudent(lambda f: world, config, dim, form=form)


# --- closed forms for y ~ N(0, 1) (every step of the inner sampler is linear: y = alpha y1) -----------------------

def _antiderivative(sig: float) -> float:
    """F with F' = (1 - sigma) / sqrt(V_sigma), V_sigma = (1 - sigma)^2 + sigma^2 (substitute u = sigma - 1/2)."""
    v = (1 - sig) ** 2 + sig ** 2
    return math.asinh(2 * sig - 1) / (2 * math.sqrt(2)) - math.sqrt(v) / 2


def inner_scale_closed_form(grid: list[float], u_param: str) -> float:
    """alpha with y_hat = alpha y1 for the oracle head of y ~ N(0, 1), run on `grid` (ascending, from grid[-1]).

    Trajectories of N(0, 1) are Phi_{s->r}(z) = z sqrt(V_r / V_s) and E[y | z_s] = (1 - s) z / V_s, so
    consistent: alpha = sqrt(V_0 / V_{s_N}) (exact: the flow map of the marginal flow);
    paper: each step y_r = y_s - (s - r) y1 + y_s A(s, r) / sqrt(V_s) with A = F(s) - F(r), so
    alpha <- alpha (1 + A / sqrt(V_s)) - (s - r). One step from s = 1 gives A(1, 0) = asinh(1) / sqrt(2) = 0.623.
    """
    big_v = lambda s: (1 - s) ** 2 + s ** 2  # noqa: E731
    if u_param == "consistent":
        return math.sqrt(big_v(grid[0]) / big_v(grid[-1]))
    alpha = 1.0
    for j in range(len(grid) - 1, 0, -1):
        s, r = grid[j], grid[j - 1]
        alpha = alpha * (1 + (_antiderivative(s) - _antiderivative(r)) / math.sqrt(big_v(s))) - (s - r)
    return alpha
