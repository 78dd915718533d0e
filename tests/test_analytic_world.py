"""The project's samplers and Stage-1 objective against an analytic Gaussian-mixture teacher (issue 14; METHOD.md
2.4 and D19). The closed forms live in tests/gaussian_mixture.py and are derived there, independently of tmdcli."""

import math

import pytest
import torch

from gaussian_mixture import (
    Features,
    Mixture,
    inner_scale_closed_form,
    inner_world,
    mixture_oracle,
    oracle_head,
    standard_normal_oracle,
    teacher_velocity,
    velocity,
)
from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.objectives import meanflow as mf
from tmdcli.objectives.grids import inner_grid
from tmdcli.sampler import generators_for, sample_teacher, sample_tmd

# three well-separated components (6 sigma apart at least), unequal weights
MIXTURE = Mixture.make([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], sigma=0.4)
# two wide, overlapping components: smooth inner flows, so that statistics of the Stage-1 residual (whose noise
# grows with the flow map's Jacobian, large between narrow components) and a small network's training converge fast
WIDE = Mixture.make([0.6, 0.4], [[-1.0, 0.0], [1.0, 0.5]], sigma=0.8)


def _moments_match(x: torch.Tensor, mixture: Mixture, *, slack: float = 0.0) -> None:
    """Mean, covariance, component weights and within-component spread within sampling error (about 4.5 standard
    errors; `slack` adds a relative allowance for a known bias such as the 0.999 start of the grids)."""
    x = x.double()
    n = x.shape[0]
    cov = mixture.covariance()
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert bool(((x.mean(0) - mixture.mean()).abs() <= 4.5 * se_mean + slack).all()), (x.mean(0), mixture.mean())
    emp = torch.cov(x.T)
    se_cov = (2 * torch.diagonal(cov).max() ** 2 / n) ** 0.5 * 2  # mixtures have heavier tails than a Gaussian
    assert bool(((emp - cov).abs() <= 4.5 * se_cov + slack * cov.abs().max()).all()), (emp, cov)
    k = mixture.nearest_component(x)
    freq = torch.bincount(k, minlength=len(mixture.weights)).double() / n
    se_w = (mixture.weights * (1 - mixture.weights) / n).sqrt()
    assert bool(((freq - mixture.weights).abs() <= 4.5 * se_w + slack).all()), (freq, mixture.weights)
    within = (x - mixture.means[k]).pow(2).mean().sqrt()  # per-coordinate spread inside the components
    assert abs(float(within) / mixture.sigma - 1) <= 4.5 / math.sqrt(n) * 2 + slack, float(within)


# --- the analytic world itself ------------------------------------------------------------------------------------

def test_inner_world_mean_equals_the_teacher_velocity():
    """Two independent derivations: E[y | x_t] from the inner posterior equals E[x1 - x | x_t] of the teacher."""
    g = torch.Generator().manual_seed(0)
    x_t = 2 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    pi, m, _ = inner_world(MIXTURE, x_t, t)
    torch.testing.assert_close((pi[..., None] * m).sum(1), teacher_velocity(MIXTURE)(x_t, t), rtol=1e-10,
                               atol=1e-10)


def test_mixture_velocity_matches_a_monte_carlo_estimate():
    """E[eps - x | x_t = q] by importance sampling over x ~ data: eps = (q - (1 - t) x) / t is then determined, and
    each x is weighted by the noise density N(eps; 0, I). Checked at points between and on the components."""
    g = torch.Generator().manual_seed(1)
    x = MIXTURE.sample(400_000, g)
    for t, q in ((0.6, [0.3, -0.2]), (0.3, [-1.2, 0.1]), (0.9, [0.5, 0.5])):
        eps = (torch.tensor(q, dtype=torch.float64) - (1 - t) * x) / t
        w = torch.softmax(-eps.pow(2).sum(1) / 2, dim=0)
        mc = (w[:, None] * (eps - x)).sum(0)
        exact = velocity(torch.tensor([q], dtype=torch.float64), torch.tensor([t], dtype=torch.float64),
                         MIXTURE.weights, MIXTURE.means, MIXTURE.sigma ** 2)[0]
        assert float((mc - exact).abs().max()) < 0.02, (t, q, mc, exact)


# --- the teacher's samplers ---------------------------------------------------------------------------------------

def test_unipc_at_50_steps_reproduces_the_mixture():
    noise = torch.randn(8000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = sample_teacher(teacher_velocity(MIXTURE), noise, num_steps=50, flow_shift=5.0, sampler="unipc")
    _moments_match(x, MIXTURE)


def test_flow_euler_converges_to_the_exact_flow_at_first_order():
    """Same noise, Euler at 8/32/128 steps against a 512-step RK4 of the same ODE on the same shifted sigmas."""
    from tmdcli.sampler import flow_sigmas

    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v = teacher_velocity(MIXTURE)
    ref = noise.clone()
    sig = flow_sigmas(512, 5.0)
    for a, b in zip(sig[:-1], sig[1:]):
        t = lambda s: torch.full((ref.shape[0],), s, dtype=torch.float64)  # noqa: E731
        h, mid = b - a, (a + b) / 2
        k1 = v(ref, t(a))
        k2 = v(ref + h / 2 * k1, t(mid))
        k3 = v(ref + h / 2 * k2, t(mid))
        k4 = v(ref + h * k3, t(b))
        ref = ref + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    errors = []
    for steps in (8, 32, 128):
        x = sample_teacher(v, noise, num_steps=steps, flow_shift=5.0, sampler="euler")
        errors.append(float((x - ref).norm(dim=1).mean()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] / errors[2] > 8, errors  # 16x the steps: first order gives about 16x less error
    _moments_match(sample_teacher(v, torch.randn(8000, 2, generator=torch.Generator().manual_seed(4),
                                                 dtype=torch.float64), num_steps=128, sampler="euler"), MIXTURE)


# --- Algorithm 1 with the oracle head -----------------------------------------------------------------------------

@pytest.mark.parametrize("num_inner_steps", [1, 2, 4])
@pytest.mark.parametrize("u_param", ["paper", "consistent"])
def test_inner_flow_of_the_oracle_head_scales_normal_noise_by_the_closed_form(u_param, num_inner_steps):
    """y ~ N(0, I): every inner step is linear, y_hat = alpha y1, with alpha in closed form (tests/gaussian_mixture
    .py): 1.001 (exact but for the 0.999 start) under `consistent`, about 0.62 under `paper` for every N
    (METHOD.md 2.4: more inner steps do not fix Eq. 14)."""
    config = StudentConfig(num_outer_steps=1, num_inner_steps=num_inner_steps, num_head_blocks=1, u_param=u_param)
    student = standard_normal_oracle(3, config)
    y1 = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y_hat = student.predict_y(torch.zeros(6, 3), torch.full((6,), 0.5), torch.zeros(6, 1, 1), y1)
    expected = inner_scale_closed_form(inner_grid(num_inner_steps), u_param)
    torch.testing.assert_close(y_hat.double() / y1, torch.full_like(y1, expected), rtol=1e-6, atol=0)
    if u_param == "paper":
        assert 0.6 < expected < 0.63
    else:
        assert abs(expected - 1) < 1.1e-3


def test_one_paper_step_from_s_equal_1_gives_asinh1_over_sqrt2():
    config = StudentConfig(num_outer_steps=1, num_inner_steps=1, num_head_blocks=1, u_param="paper")
    y1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        y_hat = standard_normal_oracle(2, config).predict_y(torch.zeros(4, 2), torch.full((4,), 0.5),
                                                            torch.zeros(4, 1, 1), y1, inner_grid=[0.0, 1.0])
    torch.testing.assert_close(y_hat.double() / y1, torch.full_like(y1, math.asinh(1) / math.sqrt(2)), rtol=1e-6,
                               atol=0)


def _algorithm_1(config: StudentConfig, n: int, seed: int, *, form: str | None = None) -> torch.Tensor:
    student = mixture_oracle(MIXTURE, config, form=form)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sample_tmd(student, noise, torch.zeros(n, 1, 1), outer_grid=config.outer_grid(),
                      inner_grid=config.inner_grid(), generators=generators_for(range(seed, seed + n)))


@pytest.mark.parametrize("m,n_inner", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4)])
def test_algorithm_1_with_the_oracle_head_is_exact_in_distribution_under_consistent(m, n_inner):
    config = StudentConfig(num_outer_steps=m, num_inner_steps=n_inner, num_head_blocks=1, u_param="consistent")
    _moments_match(_algorithm_1(config, 3000, seed=10 * m + n_inner), MIXTURE, slack=0.005)


@pytest.mark.parametrize("m,n_inner", [(1, 2), (2, 4)])
def test_algorithm_1_with_the_paper_oracle_is_not_exact(m, n_inner):
    """The paper form's perfect head (the fixed point of its own loss), run by the same sampler, misplaces the
    within-component spread by far more than sampling error: Eq. 14 puts y1 where E[y1 | y_s] belongs. (For
    N(0, 1) it under-disperses to 0.62, the closed form above; for these narrow components it over-disperses.)"""
    config = StudentConfig(num_outer_steps=m, num_inner_steps=n_inner, num_head_blocks=1, u_param="paper")
    x = _algorithm_1(config, 2000, seed=20 + m + n_inner)
    k = MIXTURE.nearest_component(x)
    within = float((x.double() - MIXTURE.means[k]).pow(2).mean().sqrt()) / MIXTURE.sigma
    assert abs(within - 1) > 0.15, within
    with pytest.raises(AssertionError):
        _moments_match(x, MIXTURE, slack=0.005)


def test_the_oracles_flow_map_is_converged_in_its_step_count():
    from gaussian_mixture import flow_map_and_mean_endpoint

    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(50, 2, generator=g, dtype=torch.float64)
    world = inner_world(MIXTURE, x_t, torch.full((50,), 0.909, dtype=torch.float64))
    y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    s, r = torch.full((50,), 0.999, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    coarse = flow_map_and_mean_endpoint(y, s, r, world)
    fine = flow_map_and_mean_endpoint(y, s, r, world, steps=512)
    for a, b in zip(coarse, fine):  # 4th order: 1e-4 at 64 steps, 1e-5 at 128; the tests' sampling error is 1e-2
        assert float((a - b).abs().max()) < 1e-3


# --- the Stage-1 loss at the oracle -------------------------------------------------------------------------------

def _oracle_loss_z_scores(u_param: str, form: str, *, batches: int = 24, batch: int = 500, seed: int = 100,
                          ) -> torch.Tensor:
    """z-scores (mean / standard error over batches) of the gradient of the project's tm_meanflow_loss wrt the
    head's probe parameters (head + s (b + y_s W)) at the oracle of `form`, on real mixture data with every row
    r < s (the MeanFlow part, with its finite difference). With c huge the adaptive normalisation is a constant
    1/c, so each entry is the mean residual E[(u - u_tgt) du/dprobe]."""
    config = StudentConfig(num_outer_steps=2, num_inner_steps=4, num_head_blocks=1, u_param=u_param)
    student = mixture_oracle(WIDE, config, form=form)
    params = mf.TMMeanFlowParams(outer_grid=tuple(config.outer_grid()), inner_grid=tuple(config.inner_grid()),
                                 norm_c=1e12, cfg_scale=1.0, cond_dropout=0.0, r_equals_s_prob=0.0,
                                 u_param=u_param)
    grads = []
    for b in range(batches):
        g = torch.Generator().manual_seed(seed + b)
        x = WIDE.sample(batch, g).float()
        student.zero_grad()
        loss, _ = mf.tm_meanflow_loss(student, x, torch.zeros(batch, 1, 1), torch.zeros(1, 1, 1), g, params)
        (loss * 1e12 / 2).backward()
        grads.append(torch.cat([student.bias.grad.flatten(), student.slope.grad.flatten()]))
    grads = torch.stack(grads)
    return grads.mean(0) / (grads.std(0) / math.sqrt(batches))


def test_the_consistent_oracle_is_a_stationary_point_of_the_consistent_loss():
    """At the consistent oracle the residual has mean 0 along every probe direction (within sampling error);
    the paper form's fixed point, scored by the same loss, is many standard errors away along some of them."""
    at_oracle = _oracle_loss_z_scores("consistent", "consistent")
    assert float(at_oracle.abs().max()) < 5.0, at_oracle  # 6 probes, t with 23 dof: p(|t| > 5) < 1e-4 each
    wrong = _oracle_loss_z_scores("consistent", "paper")
    assert float(wrong.abs().max()) > 8.0, wrong


def test_finite_difference_derivative_of_u_matches_jvp_and_the_meanflow_identity():
    """Along the marginal velocity, the exact average velocity satisfies d/ds u(z_s, s, r) = (v(z_s, s) - u) /
    (s - r) (the MeanFlow identity). The project's finite difference of the head plus its chain rule for the
    consistent form, torch.func.jvp through u = (y_s - head) / s, and that closed form agree (r < s rows)."""
    from tmdcli.objectives.u_param import average_velocity_consistent, average_velocity_total_derivative

    g = torch.Generator().manual_seed(8)
    n = 16
    x_t = torch.randn(n, 2, generator=g, dtype=torch.float64)
    world = inner_world(MIXTURE, x_t, torch.full((n,), 0.909, dtype=torch.float64))
    y_s = 1.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.6 + 0.35
    r = torch.where(torch.arange(n) % 2 == 0, torch.zeros(n, dtype=torch.float64), s - 0.2)
    direction = velocity(y_s, s, *world)  # the marginal inner velocity

    def head(y, s_in):
        return oracle_head(y, s_in, r, world, "consistent")

    u = average_velocity_consistent(y_s, s, head(y_s, s))
    fd_head = mf.finite_difference_total_derivative(head, y_s, s, r, direction, 1e-4)
    du_fd = average_velocity_total_derivative("consistent", fd_head, u=u, direction=direction, s=s)
    _, du_jvp = torch.func.jvp(lambda y, s_in: average_velocity_consistent(y, s_in, head(y, s_in)), (y_s, s),
                               (direction, torch.ones_like(s)))
    identity = (direction - u) / (s - r)[:, None]
    torch.testing.assert_close(du_jvp, identity, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(du_fd, identity, rtol=1e-3, atol=1e-3)
    # the paper form's chain rule would give -dhead/ds: far from the identity here
    paper = average_velocity_total_derivative("paper", fd_head, u=u, direction=direction, s=s)
    assert float((paper - identity).abs().max()) > 0.1


class SmallHead(torch.nn.Module):
    """A small network as the flow head of an M = 1 student of the mixture (t_1 = 0.999, so x_t is nearly the
    outer noise and y = x1 - x ~ x_t - x): head = x_t + MLP(y_s - (1 - s) x_t, s, s - r). The input
    y_s - (1 - s) x_t = -(1 - s) x + s y1 is a plain interpolant of -x, so the MLP learns a 2-d problem that does
    not move with x_t. `predict_y` is TMDStudent's own (the project's Algorithm 1)."""

    predict_y = TMDStudent.predict_y

    def __init__(self, config: StudentConfig, dim: int = 2, width: int = 128):
        super().__init__()
        self.config = config
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 2, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, dim))

    def backbone(self, x_t, t, text):
        return Features(m=x_t.float(), text=text, temb=torch.as_tensor(t, dtype=torch.float64))

    def head(self, y_s, s, r, feats):
        s_col = s.float()[:, None]
        z = y_s.float() - (1 - s_col) * feats.m
        return feats.m + self.net(torch.cat([z, s_col, (s - r).float()[:, None]], 1))


def _train_and_sample(u_param: str, *, steps: int = 1200, batch: int = 512, n: int = 4000) -> torch.Tensor:
    torch.manual_seed(0)
    config = StudentConfig(num_outer_steps=1, num_inner_steps=2, num_head_blocks=1, u_param=u_param)
    student = SmallHead(config)
    params = mf.TMMeanFlowParams(outer_grid=tuple(config.outer_grid()), inner_grid=tuple(config.inner_grid()),
                                 norm_c=2.0, cfg_scale=1.0, cond_dropout=0.0, u_param=u_param)  # c = d
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss, _ = mf.tm_meanflow_loss(student, WIDE.sample(batch, g).float(), torch.zeros(batch, 1, 1),
                                      torch.zeros(1, 1, 1), g, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return sample_tmd(student, noise, torch.zeros(n, 1, 1), outer_grid=config.outer_grid(),
                          inner_grid=config.inner_grid(), generators=generators_for(range(n))).double()


def _dispersion(x: torch.Tensor, mixture: Mixture) -> tuple[float, float, torch.Tensor]:
    k = mixture.nearest_component(x)
    within = float((x - mixture.means[k]).pow(2).mean().sqrt()) / mixture.sigma
    total = float(torch.cov(x.T).trace() / mixture.covariance().trace())
    return within, total, torch.bincount(k, minlength=len(mixture.weights)).double() / x.shape[0]


@pytest.mark.slow
def test_a_small_head_trained_with_the_project_loss_reaches_the_mixtures_dispersion_under_consistent():
    """Stage 1 (the project's tm_meanflow_loss: TM-MF, r = s for 75%, c = d) then Algorithm 1 (the project's
    sampler), M = 1, N = 2. Consistent: the within-component spread and the weights are right (measured 0.98-1.01
    and +-0.01 over three seeds; total variance 1.07-1.15). Paper, same budget: within-component spread 0.62-0.64,
    the under-dispersion METHOD.md 2.4 predicts (asinh(1)/sqrt(2) = 0.62 for N(0, 1))."""
    within, total, weights = _dispersion(_train_and_sample("consistent"), WIDE)
    assert 0.9 < within < 1.1 and 0.85 < total < 1.25, (within, total)
    assert float((weights - WIDE.weights).abs().max()) < 0.05, weights
    within_paper, total_paper, _ = _dispersion(_train_and_sample("paper"), WIDE)
    assert within_paper < 0.75 and total_paper < 0.7, (within_paper, total_paper)
