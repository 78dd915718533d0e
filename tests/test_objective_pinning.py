"""Both stage losses replayed against independent references written from METHOD.md's pseudocode (4.2, 5.3), with
CFG != 1, r < s rows and condition-dropped rows present, plus the wiring of the student's new modules (issue 14,
part 2). Each reference works one row at a time with plain arithmetic and draws the noise in the documented order
(METHOD.md 4.2 / objectives.dmd._draw), so a change in what the assembled objective computes shows up as a
different loss value.

Regressions these tests were checked against (each fails at least one test here): the sign of the (s - r) du/ds
term; the finite-difference direction v instead of v_g; the unconditional branch using the prompt, or evaluated at
(s, r) instead of (s, s); dropped rows receiving the guided target; the fusion reading other modulation rows; the
(s - r) embedder fed r; the teacher's negative pass using the prompt; the GAN's real clips not noised at t.
"""

import copy

import pytest
import torch

from tmdcli.models import wan
from tmdcli.models.discriminator import discriminator_for
from tmdcli.models.student import StudentConfig, TMDStudent
from tmdcli.objectives import dmd
from tmdcli.objectives import meanflow as mf
from tmdcli.objectives.grids import shift

LATENT = (16, 3, 4, 4)
B = 8


def _perturbed_student(transformer, u_param: str, *, m: int = 2, n: int = 2, h: int = 2, scale: float = 0.2,
                       ) -> TMDStudent:
    """A float64 student whose new modules are moved off their inert init, so the fusion, the gate and the
    (s - r) embedder all change the head's output. Its time paths are made smooth (first time-embedding layers
    scaled by 1e-2): a random network's time derivative is otherwise O(1000) (METHOD.md 11.2), its (s - r) du/ds
    term swamps the rest of the residual, and the loss could not tell the term's sign or direction."""
    config = StudentConfig(num_outer_steps=m, num_inner_steps=n, num_head_blocks=h, u_param=u_param)
    student = TMDStudent.from_teacher(transformer, config, seed=0).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in student.extras.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for embedder in (student.transformer.condition_embedder.time_embedder, student.extras.r_embedder.time_embedder):
            embedder.linear_1.weight.mul_(1e-2)
        if hasattr(student.extras.fusion, "gate_lin"):  # open the gate wide: the head then depends on y_s strongly
            student.extras.fusion.gate_lin.bias.fill_(1.0)
            student.extras.fusion.beta.fill_(2.0)
    return student


def _data(seed: int = 0):
    """Latents, prompt and negative-prompt embeddings. The embeddings are scaled up so that the tiny network's
    cross-attention makes the prompt matter: the negative-vs-prompt regressions must move the loss."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *LATENT, generator=g), 5 * torch.randn(B, 8, 32, generator=g),
            5 * torch.randn(1, 8, 32, generator=g))


# --- Stage 1 ---------------------------------------------------------------------------------------------------------

def reference_tm_meanflow(student, x, text, negative, seed, p: mf.TMMeanFlowParams):
    """METHOD.md 4.2, one row at a time. The derivative is a central difference of the head along (v_g, 1), turned
    into du/ds by each form's chain rule written out here (paper: -dhead/ds; consistent: (v_g - dhead/ds - u) / s;
    tests/test_analytic_world.py checks that rule against torch.func.jvp and the MeanFlow identity)."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    x1 = torch.randn(x.shape, generator=g)
    y1 = torch.randn(x.shape, generator=g)
    t = torch.tensor(p.outer_grid, dtype=torch.float64)[torch.randint(1, len(p.outer_grid), (B,), generator=g)]
    s = shift(0.001 + 0.998 * torch.rand(B, generator=g, dtype=torch.float64), p.s_gamma).clamp(0.001, 0.999)
    keep_s = torch.rand(B, generator=g, dtype=torch.float64) < p.r_equals_s_prob
    num_drop = int((torch.rand(B, generator=g) < p.cond_dropout).sum())
    losses, kinds = [], []
    r_is_s_order = [b for b in range(B) if keep_s[b]] + [b for b in range(B) if not keep_s[b]]
    dropped = set(r_is_s_order[:num_drop])  # MeanFlow's ordering: r = s rows take the dropout first
    for b in range(B):
        sb = float(s[b])
        grid_below = [v for v in sorted(p.inner_grid) if v <= sb]
        rb = sb if keep_s[b] else grid_below[-1]
        tb = float(t[b])
        xt = ((1 - tb) * x[b] + tb * x1[b]).double()[None]
        y = (x1[b] - x[b]).double()
        ys = (1 - sb) * y + sb * y1[b].double()
        v = y1[b].double() - y

        def head_at(y_in, s_in, r_in, cond):
            feats = student.backbone(xt, torch.tensor([tb]), cond)
            return student.head(y_in[None].float(), torch.tensor([s_in], dtype=torch.float64),
                                torch.tensor([r_in], dtype=torch.float64), feats)[0].double()

        def u_at(y_in, s_in, r_in, cond):
            head = head_at(y_in, s_in, r_in, cond)
            return y1[b].double() - head if p.u_param == "paper" else (y_in - head) / s_in

        cond = negative if b in dropped else text[b:b + 1]
        if b in dropped or p.cfg_scale == 1.0:
            v_g = v
        else:
            v_u = u_at(ys, sb, sb, negative)  # the student's own unconditional velocity at (s, s)
            v_g = v_u + p.cfg_scale * (v - v_u)
        with torch.no_grad():
            u = u_at(ys, sb, rb, cond)
            target = v_g
            if rb < sb:
                h = p.fd_delta
                s_p = sb + h if sb + h <= 0.999 else sb  # one-sided at the ends, never crossing r (App. A.2)
                s_m = sb - h if (sb - h >= 0.001 and sb - h > rb) else sb
                dhead = (head_at(ys + (s_p - sb) * v_g, s_p, rb, cond)
                         - head_at(ys + (s_m - sb) * v_g, s_m, rb, cond)) / (s_p - s_m)
                du = -dhead if p.u_param == "paper" else (v_g - dhead - u) / sb
                target = v_g - (sb - rb) * du
        weight = sb if p.u_param == "consistent" else 1.0  # D19: the consistent form's head-space error
        err = float((weight * (u - target)).detach().pow(2).sum())
        losses.append(err / (err + p.norm_c))
        kinds.append(("dropped" if b in dropped else "cond") + ("/r=s" if rb == sb else "/r<s"))
    return sum(losses) / B, kinds


@pytest.mark.parametrize("u_param", ["paper", "consistent"])
def test_tm_meanflow_loss_replays_the_reference_with_cfg_r_below_s_and_dropped_rows(fresh_tiny_transformer,
                                                                                      u_param):
    student = _perturbed_student(fresh_tiny_transformer, u_param)
    x, text, negative = _data()
    config = student.config
    p = mf.TMMeanFlowParams(outer_grid=tuple(config.outer_grid()), inner_grid=tuple(config.inner_grid()),
                            norm_c=float(x[0].numel()), cfg_scale=3.0, cond_dropout=0.3, r_equals_s_prob=0.4,
                            fd_delta=1e-3, u_param=u_param)
    seed = 5
    with torch.no_grad():
        loss, _ = mf.tm_meanflow_loss(student, x, text, negative, torch.Generator().manual_seed(seed), p)
    expected, kinds = reference_tm_meanflow(student, x, text, negative, seed, p)
    # the replay exercises every kind of row (else it could miss a regression confined to one kind)
    assert {"cond/r<s", "dropped/r=s", "cond/r=s"} <= set(kinds), kinds
    assert float(loss) == pytest.approx(expected, rel=1e-5), (float(loss), expected)


def test_tm_meanflow_target_is_pinned_at_the_papers_step(fresh_tiny_transformer):
    """The same replay at the paper's finite-difference step 5e-3, with every row r < s (the MeanFlow part)."""
    student = _perturbed_student(fresh_tiny_transformer, "consistent")
    x, text, negative = _data(1)
    config = student.config
    p = mf.TMMeanFlowParams(outer_grid=tuple(config.outer_grid()), inner_grid=tuple(config.inner_grid()),
                            norm_c=float(x[0].numel()), cfg_scale=3.0, cond_dropout=0.2, r_equals_s_prob=0.0,
                            u_param="consistent")
    with torch.no_grad():
        loss, _ = mf.tm_meanflow_loss(student, x, text, negative, torch.Generator().manual_seed(2), p)
    expected, kinds = reference_tm_meanflow(student, x, text, negative, 2, p)
    assert "cond/r<s" in kinds
    assert float(loss) == pytest.approx(expected, rel=1e-5)


# --- the student's new modules ----------------------------------------------------------------------------------------

def test_fusion_modulates_with_the_ffn_shift_and_scale_rows_of_timestep_proj_only(fresh_tiny_transformer):
    """D1: AdaLN_s takes shift and scale from rows 3 and 4 of the teacher's timestep_proj(s) (its FFN modulation)."""
    student = _perturbed_student(fresh_tiny_transformer, "consistent")
    fusion = student.extras.fusion
    g = torch.Generator().manual_seed(3)
    dim = fusion.norm.normalized_shape[0]
    m, e = torch.randn(2, 5, dim, generator=g, dtype=torch.float64), torch.randn(2, 5, dim, generator=g,
                                                                                 dtype=torch.float64)
    temb, tproj = torch.randn(2, dim, generator=g, dtype=torch.float64), torch.randn(2, 6, dim, generator=g,
                                                                                   dtype=torch.float64)
    with torch.no_grad():
        out = fusion(m, e, temb, tproj)
        shift_, scale = fusion.scale_shift_table[0, 0] + tproj[:, 3], fusion.scale_shift_table[0, 1] + tproj[:, 4]
        normed = torch.nn.functional.layer_norm(e, (dim,), eps=fusion.norm.eps)
        mod = normed * (1 + scale[:, None]) + shift_[:, None]
        mlp = fusion.mlp_out(torch.nn.functional.gelu(fusion.mlp_in(mod), approximate="tanh"))
        gate = fusion.gate_lin(torch.nn.functional.silu(temb))[:, None]
        expected = m + torch.sigmoid(fusion.beta) * gate * mlp
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # the fusion normalises in fp32 (as Wan)
    other_rows = tproj.clone()
    other_rows[:, [0, 1, 2, 5]] += 1.0
    with torch.no_grad():
        assert torch.equal(fusion(m, e, temb, other_rows), out)


def test_difference_embedder_is_fed_s_minus_r(fresh_tiny_transformer, monkeypatch):
    student = _perturbed_student(fresh_tiny_transformer, "consistent")
    seen = []
    real = student.extras.r_embedder.forward

    def spy(d1000, like):
        seen.append(d1000.detach().double().clone())
        return real(d1000, like)

    monkeypatch.setattr(student.extras.r_embedder, "forward", spy)
    x, text, _ = _data()
    s = torch.tensor([0.9, 0.5] * 4, dtype=torch.float64)
    r = torch.tensor([0.3, 0.1] * 4, dtype=torch.float64)
    with torch.no_grad():
        feats = student.backbone(x.double(), torch.full((B,), 0.7, dtype=torch.float64), text)
        out = student.head(x.double(), s, r, feats)
        same_gap = student.head(x.double(), s + 0.05, r + 0.05, feats)
    torch.testing.assert_close(seen[0], 1000 * (s - r), rtol=1e-6, atol=1e-4)
    assert not torch.allclose(out, same_gap)  # s itself still matters (temb(s) and the fusion)


# --- Stage 2 ---------------------------------------------------------------------------------------------------------

@pytest.fixture()
def stage2_networks(fresh_tiny_transformer):
    teacher = copy.deepcopy(fresh_tiny_transformer).requires_grad_(False).eval()  # fp32, as on a CPU run
    fake = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    student = _perturbed_student(copy.deepcopy(fresh_tiny_transformer), "consistent").float()
    disc = discriminator_for(teacher.config, (1, 2), seed=0).eval()
    return student, teacher, fake, disc


def _stage2_draws(x, seed, grid):
    g = torch.Generator().manual_seed(seed)
    eps_s = torch.randn(x.shape, generator=g)
    t_i = torch.tensor(grid, dtype=torch.float64)[torch.randint(1, len(grid), (B,), generator=g)]
    y1 = torch.randn(x.shape, generator=g)
    t = shift(0.001 + 0.998 * torch.rand(B, generator=g, dtype=torch.float64), 5.0).clamp(0.001, 0.999)
    eps = torch.randn(x.shape, generator=g)
    return eps_s, t_i, y1, t, eps


def _col(v, like):
    return v.reshape(-1, 1, 1, 1, 1).to(like.dtype)


def _reference_fake(student, x, text, seed):
    """The student's sample from real data noised at a grid time (no backward simulation), x_hat = x_t - t_i y_hat,
    and x_hat noised at t_dmd: (x_hat, x_hat_t, t, eps) in float64."""
    eps_s, t_i, y1, t, eps = _stage2_draws(x, seed, student.config.outer_grid())
    x_in = (1 - _col(t_i, x)) * x + _col(t_i, x) * eps_s
    with torch.no_grad():
        y_hat = student.predict_y(x_in, t_i, text, y1).double()
    x_hat = x_in.double() - _col(t_i, y_hat) * y_hat
    return x_hat, (1 - _col(t, x_hat)) * x_hat + _col(t, x_hat) * eps.double(), t, eps


def reference_student_step(student, teacher, fake, disc, x, text, negative, seed, guidance, gan_weight, layers):
    """METHOD.md 5.3, student step."""
    x_hat, x_hat_t, t, _ = _reference_fake(student, x, text, seed)
    with torch.no_grad():
        net_in = x_hat_t.float()  # the networks run in fp32; the arithmetic around them in fp64
        x0_fake = x_hat_t - _col(t, x_hat) * wan.velocity(fake, net_in, t, text).double()
        x0_c = x_hat_t - _col(t, x_hat) * wan.velocity(teacher, net_in, t, text).double()
        x0_n = x_hat_t - _col(t, x_hat) * wan.velocity(teacher, net_in, t, negative.expand(B, -1, -1)).double()
        x0_teacher = x0_n + guidance * (x0_c - x0_n)
        w = 1 / ((x_hat - x0_teacher).abs().flatten(1).mean(1) + 1e-6)
        vsd = 0.5 * (_col(w, x_hat) * (x0_fake - x0_teacher)).pow(2).mean()
        feats = wan.block_features(teacher, net_in, 1000 * t, text, layers)
        gan = torch.nn.functional.softplus(-disc(feats).double()).mean()
    return float(vsd + gan_weight * gan)


def reference_critic_step(student, teacher, fake, disc, x, text, seed, layers):
    """METHOD.md 5.3, fake-score + discriminator step; the real clip is noised at the same t and noise."""
    x_hat, x_hat_t, t, eps = _reference_fake(student, x, text, seed)
    with torch.no_grad():
        x0_fake = x_hat_t - _col(t, x_hat) * wan.velocity(fake, x_hat_t.float(), t, text).double()
        dsm = (x0_fake - x_hat).pow(2).mean()
        x_real_t = (1 - _col(t, x_hat)) * x.double() + _col(t, x_hat) * eps.double()
        f_fake = wan.block_features(teacher, x_hat_t.float(), 1000 * t, text, layers)
        f_real = wan.block_features(teacher, x_real_t.float(), 1000 * t, text, layers)
        d = (torch.nn.functional.softplus(disc(f_fake).double()).mean()
             + torch.nn.functional.softplus(-disc(f_real).double()).mean())
    return float(dsm + d)


def test_student_step_loss_replays_the_reference_with_cfg_5(stage2_networks):
    student, teacher, fake, disc = stage2_networks
    x, text, negative = _data(2)
    p = dmd.DMDParams(outer_grid=tuple(student.config.outer_grid()), disc_layers=(1, 2), guidance_scale=5.0)
    batch = {"latents": x, "text": text, "negative": negative}
    with torch.no_grad():
        loss, _ = dmd.student_step_loss(student, teacher, fake, disc, batch, torch.Generator().manual_seed(9), p)
    expected = reference_student_step(student, teacher, fake, disc, x, text, negative, 9, 5.0, 0.03, (1, 2))
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_critic_step_loss_replays_the_reference_with_real_clips_noised_at_t(stage2_networks):
    student, teacher, fake, disc = stage2_networks
    x, text, negative = _data(3)
    p = dmd.DMDParams(outer_grid=tuple(student.config.outer_grid()), disc_layers=(1, 2), guidance_scale=5.0)
    batch = {"latents": x, "text": text, "negative": negative}
    with torch.no_grad():
        loss, _ = dmd.critic_step_loss(student, teacher, fake, disc, batch, torch.Generator().manual_seed(4), p)
    expected = reference_critic_step(student, teacher, fake, disc, x, text, 4, (1, 2))
    assert float(loss) == pytest.approx(expected, rel=1e-4)
