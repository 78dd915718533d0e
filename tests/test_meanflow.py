"""TM-MeanFlow (Stage 1) objective: the finite-difference derivative, (s, r) sampling, the target, the loss."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.objectives import meanflow as mf
from tmdcli.objectives.grids import inner_grid, outer_grid


def _student(transformer, num_head_blocks=1, *, perturb=0.05, dtype=torch.float64):
    """A student whose new modules are perturbed away from their inert init, so every path carries a derivative."""
    student = TMDStudent.from_teacher(transformer, StudentConfig(num_head_blocks=num_head_blocks), seed=0).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.extras.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return student


def _fd_and_jvp(student, delta, shape=(16, 3, 4, 4), text_dim=32):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x_t, y_s, y1, v = rand(2, *shape), rand(2, *shape), rand(2, *shape), rand(2, *shape)
    text = rand(2, 8, text_dim)
    t = torch.tensor([0.9, 0.5], dtype=torch.float64)
    s = torch.tensor([0.6, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.1], dtype=torch.float64)
    # forward-mode AD is implemented only by the math attention kernel on CPU (METHOD.md 11.2)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        feats = student.backbone(x_t, t, text)

        def u_fn(y, s_in):
            return mf.average_velocity(y1, student.head(y, s_in, r, feats))

        _, jvp = torch.func.jvp(u_fn, (y_s, s), (v, torch.ones_like(s)))
        fd = mf.finite_difference_total_derivative(u_fn, y_s, s, r, v, delta)
    return fd, jvp


def test_finite_difference_total_derivative_matches_jvp_at_a_small_step(fresh_tiny_transformer):
    fd, jvp = _fd_and_jvp(_student(fresh_tiny_transformer), delta=1e-4)
    rel = float((fd - jvp).norm() / jvp.norm())
    assert fd.dtype == torch.float64
    assert rel <= 1e-2, rel


def test_finite_difference_at_the_papers_step_is_far_less_accurate_on_a_random_model(fresh_tiny_transformer):
    # METHOD.md 11.2: 5e-3 is several radians of the highest timestep-embedding frequency; the derivative along
    # time is then mostly wrong on an untrained network (benchmarks/fd_accuracy.py measures the trained toy teacher)
    student = _student(fresh_tiny_transformer)
    small = _fd_and_jvp(student, 1e-4)
    paper = _fd_and_jvp(student, 5e-3)
    err = [float((fd - jvp).norm() / jvp.norm()) for fd, jvp in (small, paper)]
    assert err[1] > 20 * err[0]


def test_finite_difference_is_exact_for_a_linear_path():
    # u(y, s) = 3 y + 2 s: du/ds along dy/ds = v is 3 v + 2, central or one-sided
    y = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    s = torch.tensor([0.5, 0.998, 0.0012], dtype=torch.float64)  # interior, near s_max, near s_min
    r = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    got = mf.finite_difference_total_derivative(lambda y_, s_: 3 * y_ + 2 * s_[:, None], y, s, r, v, 5e-3)
    torch.testing.assert_close(got, 3 * v + 2, rtol=1e-9, atol=1e-9)


def test_finite_difference_times_fall_back_to_one_sided_at_the_ends_and_never_cross_r():
    s = torch.tensor([0.5, 0.998, 0.003, 0.5], dtype=torch.float64)
    r = torch.tensor([0.0, 0.0, 0.0, 0.497], dtype=torch.float64)
    plus, minus = mf.finite_difference_times(s, r, 5e-3)
    assert plus.tolist() == pytest.approx([0.505, 0.998, 0.008, 0.505])
    assert minus.tolist() == pytest.approx([0.495, 0.993, 0.003, 0.5])


def test_s_and_r_sampling_snaps_r_to_the_inner_grid_below_s_and_keeps_r_equal_s_three_quarters():
    grid = inner_grid(4)
    g = torch.Generator().manual_seed(0)
    s, r = mf.sample_s_and_r(20000, grid, generator=g)
    assert s.dtype == r.dtype == torch.float64
    assert bool((r <= s).all()) and float(s.min()) >= 0.001 and float(s.max()) <= 0.999
    equal = r == s
    assert abs(float(equal.float().mean()) - 0.75) < 0.015
    on_grid = torch.isclose(r[~equal][:, None], torch.tensor(grid, dtype=torch.float64)[None]).any(1)
    assert bool(on_grid.all())
    # r is the largest grid point <= s
    grid_t = torch.tensor(grid, dtype=torch.float64)
    below = torch.where(grid_t[None] <= s[~equal][:, None], grid_t[None], -1.0).max(1).values
    torch.testing.assert_close(r[~equal], below)
    # s = shift_3(U): its median is shift_3(0.5) = 0.75
    assert abs(float(s.median()) - 0.75) < 0.01


def test_plain_transition_matching_always_has_r_equal_s():
    s, r = mf.sample_s_and_r(1000, inner_grid(2), generator=torch.Generator().manual_seed(1), r_equals_s_prob=1.0)
    assert torch.equal(s, r)


def test_target_reduces_to_the_conditional_velocity_when_r_equals_s():
    v = torch.randn(2, 3)
    s = torch.tensor([0.4, 0.9], dtype=torch.float64)
    target = mf.meanflow_target(v, s, s, torch.randn(2, 3, dtype=torch.float64))
    assert torch.equal(target, v.double())
    # ... so the head regresses y = x1 - x: u - u_tgt = (y1 - head) - (y1 - y) = y - head
    y, y1 = torch.randn(2, 3), torch.randn(2, 3)
    head = torch.randn(2, 3)
    u = mf.average_velocity(y1, head)
    torch.testing.assert_close((u.double() - mf.meanflow_target(mf.conditional_inner_velocity(y, y1), s, s, None)),
                               (y - head).double())


def test_adaptive_normalisation_divides_each_samples_gradient_by_its_own_error_plus_c():
    err = torch.tensor([1.0, 100.0], requires_grad=True)
    loss = mf.adaptive_normalised_loss(err, c=10.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx((1 / 11 + 100 / 110) / 2)
    assert err.grad.tolist() == pytest.approx([0.5 / 11, 0.5 / 110])


def test_cfg_target_is_the_unconditional_plus_scaled_difference():
    v, v_u = torch.tensor([2.0]), torch.tensor([1.0])
    assert mf.guided_velocity(v, v_u, 3.0).item() == 4.0
    assert torch.equal(mf.guided_velocity(v, v_u, 1.0), v)


def test_condition_dropout_falls_on_r_equals_s_rows_first():
    r_is_s = torch.tensor([False, True, False, True, True, False, False, False])
    for seed in range(20):
        drop = mf._dropout_rows(r_is_s, 0.5, torch.Generator().manual_seed(seed))
        count = int(drop.sum())
        if count <= 3:
            assert bool(drop[~r_is_s].sum() == 0)
        else:
            assert bool(drop[r_is_s].all())


def _tiny_batch(batch=2, shape=(16, 3, 4, 4), text_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *shape, generator=g), torch.randn(batch, 8, text_dim, generator=g),
            torch.randn(1, 8, text_dim, generator=g))


def _params(**kw):
    base = dict(outer_grid=tuple(outer_grid(2)), inner_grid=tuple(inner_grid(2)), norm_c=16 * 3 * 4 * 4)
    return mf.TMMeanFlowParams(**{**base, **kw})


def test_loss_is_deterministic_given_the_iteration_generator_and_backpropagates_to_every_trained_part(
        fresh_tiny_transformer):
    student = _student(fresh_tiny_transformer, num_head_blocks=2, dtype=torch.float32)
    x, text, neg = _tiny_batch(batch=4)
    p = _params(r_equals_s_prob=0.0)  # every row needs the finite difference
    a, terms = mf.tm_meanflow_loss(student, x, text, neg, torch.Generator().manual_seed(3), p)
    b, _ = mf.tm_meanflow_loss(student, x, text, neg, torch.Generator().manual_seed(3), p)
    assert torch.equal(a, b) and terms["frac_r_eq_s"] == 0
    a.backward()
    tr = student.transformer
    for module in (tr.patch_embedding, tr.condition_embedder.text_embedder, tr.blocks[0], tr.blocks[-1],
                   tr.proj_out, student.extras.fusion):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), module


def test_loss_at_init_on_the_trained_toy_teacher_is_in_the_predicted_range():
    """METHOD.md 11.4: with r = s and no CFG the per-element error is about the teacher's velocity MSE on real
    data (O(0.1-1)), so with c = d the normalised loss is l / (l + d) < 0.5."""
    from tmdcli.registry import load_teacher
    from tmdcli.toy.grammar import caption, sample_scenes
    from tmdcli.toy.render import render_scenes

    teacher = load_teacher("toy", device="cpu", dtype="float32")
    scenes = sample_scenes(4, seed=0)
    with torch.no_grad():
        x = teacher.encode_video(render_scenes(scenes))
        text = teacher.encode_prompts([caption(sc) for sc in scenes])
        neg = teacher.negative_embedding(1)
    cfg = StudentConfig(num_head_blocks=5)
    student = TMDStudent.from_teacher(teacher.transformer, cfg)
    d = x[0].numel()
    p = mf.TMMeanFlowParams(outer_grid=tuple(cfg.outer_grid()), inner_grid=tuple(cfg.inner_grid()), norm_c=d,
                            cfg_scale=1.0, cond_dropout=0.0, r_equals_s_prob=1.0, u_param="paper")
    with torch.no_grad():
        loss, terms = mf.tm_meanflow_loss(student, x, text, neg, torch.Generator().manual_seed(0), p)
        # the consistent form on the same draws: u - u_tgt = (y - head) / s on r = s rows, weighted by s (D19):
        # the same head-space error as Eq. 14's, so the same loss
        loss_c, terms_c = mf.tm_meanflow_loss(student, x, text, neg, torch.Generator().manual_seed(0),
                                              dataclasses.replace(p, u_param="consistent"))
    assert 0.05 < float(terms["mse"]) < 2.0, terms
    assert 0.0 < float(loss) < 0.5
    assert float(loss) == pytest.approx(float(terms["mse"]) / (float(terms["mse"]) + 1), rel=0.2)
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-5)


def test_a_few_steps_on_one_fixed_batch_lower_the_loss(fresh_tiny_transformer):
    torch.manual_seed(0)
    student = _student(fresh_tiny_transformer, num_head_blocks=1, perturb=0.0, dtype=torch.float32)
    x, text, neg = _tiny_batch(batch=2)
    # a fixed target: no CFG (its unconditional part is the moving model itself) and r = s (on a random model the
    # finite difference at delta 5e-3 is mostly noise of the model itself, see the test above)
    p = _params(cfg_scale=1.0, r_equals_s_prob=1.0)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    losses, errors = [], []
    for _ in range(25):
        loss, terms = mf.tm_meanflow_loss(student, x, text, neg, torch.Generator().manual_seed(0), p)  # same noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        errors.append(float(terms["mse"]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert errors[-1] < 0.8 * errors[0], errors
