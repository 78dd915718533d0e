"""Grids, shift and effective NFE: the values printed in METHOD.md sections 2.5 and 3."""

import pytest
import torch

from tmdcli.objectives.grids import (effective_nfe, inner_grid, interpolate, outer_grid, sample_shifted_uniform,
                                     shift)


def test_inner_grid_n2_matches_method_table():
    assert [round(s, 3) for s in inner_grid(2)] == [0.0, 0.909, 0.999]


def test_inner_grid_n4_matches_method_table():
    assert [round(s, 3) for s in inner_grid(4)] == [0.0, 0.769, 0.909, 0.968, 0.999]


def test_outer_grid_m2_gamma10_is_0999_0909_0():
    assert [round(t, 3) for t in outer_grid(2, 10.0)] == [0.0, 0.909, 0.999]


def test_outer_grid_m1_is_noise_to_data():
    assert outer_grid(1) == [0.0, 0.999]


@pytest.mark.parametrize("m,n,h,L,expected", [
    (2, 2, 5, 30, 2.33), (1, 2, 5, 30, 1.17), (2, 4, 5, 30, 3.00), (1, 4, 5, 30, 1.50),
    (1, 2, 3, 30, 1.10), (2, 2, 8, 30, 2.53), (1, 4, 2, 30, 1.20), (1, 4, 5, 40, 1.375), (2, 4, 5, 40, 2.75),
])
def test_effective_nfe_matches_paper_table(m, n, h, L, expected):
    assert round(effective_nfe(m, n, h, L), 3) == pytest.approx(expected, abs=5e-3)


def test_effective_nfe_rejects_head_as_large_as_model():
    with pytest.raises(ValueError):
        effective_nfe(2, 2, 30, 30)


def test_shift_is_identity_at_gamma_one_and_pushes_towards_noise():
    assert shift(0.5, 1.0) == 0.5
    assert shift(0.5, 10.0) == pytest.approx(10 / 11)
    with pytest.raises(ValueError):
        shift(0.5, 0.5)


def test_interpolate_endpoints():
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    out = interpolate(x0, x1, torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], x1[1])


def test_shifted_uniform_stays_in_bounds_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    t = sample_shifted_uniform(10_000, 5.0, generator=g)
    assert t.dtype == torch.float64 and t.min() >= 0.001 and t.max() <= 0.999
    assert t.median() > 0.7  # gamma 5 pushes the mass towards noise
    assert torch.equal(t, sample_shifted_uniform(10_000, 5.0, generator=torch.Generator().manual_seed(0)))
