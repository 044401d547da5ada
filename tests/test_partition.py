import math

import pytest
import torch

from dbcore.method.edm import SIGMA_MAX, SIGMA_MIN
from dbcore.method.partition import (
    SIGMA_DISTS,
    block_of_sigma,
    block_range,
    boundaries,
    cdf,
    euler_schedule,
    icdf,
    sample_sigma_for_block,
    steps_per_block,
)

TABLE = {
    2: [0.002, 0.3012, 80],
    3: [0.002, 0.1796, 0.5050, 80],
    4: [0.002, 0.1341, 0.3012, 0.6766, 80],
    6: [0.002, 0.0943, 0.1796, 0.3012, 0.5050, 0.9617, 80],
}


@pytest.mark.parametrize("num_blocks", sorted(TABLE))
def test_boundary_table(num_blocks):
    assert [round(e, 4) for e in boundaries(num_blocks)] == pytest.approx(TABLE[num_blocks])


def test_widened_table_b4():
    low_to_high = [(0.002, 0.1655), (0.1288, 0.3136), (0.2893, 0.7046), (0.5330, 80)]
    got = [block_range(b, 4, 0.05) for b in range(4)][::-1]  # block 0 owns the highest noise
    assert [(round(lo, 4), round(hi, 4)) for lo, hi in got] == low_to_high


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 6])
def test_equal_mass(num_blocks):
    total = cdf(SIGMA_MAX) - cdf(SIGMA_MIN)
    for b in range(num_blocks):
        lo, hi = block_range(b, num_blocks, gamma=0.0)
        assert (cdf(hi) - cdf(lo)) / total == pytest.approx(1 / num_blocks, abs=1e-9)


def test_icdf_inverts_cdf():
    for s in (0.002, 0.1, 0.5, 3.0, 80.0):
        assert icdf(cdf(s)) == pytest.approx(s, rel=1e-9)


def test_block_range_errors():
    with pytest.raises(ValueError):
        block_range(4, 4)
    with pytest.raises(ValueError):
        boundaries(0)


@pytest.mark.parametrize("dist", SIGMA_DISTS)
@pytest.mark.parametrize("num_blocks", [1, 3, 4])
def test_sampled_sigmas_in_range(dist, num_blocks):
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    for b in range(num_blocks):
        lo, hi = block_range(b, num_blocks, 0.05)
        s = sample_sigma_for_block(u, b, num_blocks, 0.05, dist)
        assert s.dtype == torch.float64
        assert float(s.min()) >= lo * (1 - 1e-12) and float(s.max()) <= hi * (1 + 1e-12)
        assert bool((s[1:] >= s[:-1]).all())  # monotone in u


def test_loguniform_is_uniform_in_log():
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    lo, hi = block_range(0, 4, 0.05)
    s = sample_sigma_for_block(u, 0, 4, 0.05, "loguniform")
    assert float(s[1]) == pytest.approx(math.sqrt(lo * hi))
    # the log-normal puts its median lower: block 0's range is in the log-normal's upper tail
    assert float(sample_sigma_for_block(u, 0, 4, 0.05, "lognormal")[1]) < float(s[1])


def test_unknown_dist():
    with pytest.raises(ValueError):
        sample_sigma_for_block(torch.rand(3), 0, 2, 0.05, "uniform")


def test_block_of_sigma():
    edges = boundaries(3)
    assert block_of_sigma(79.0, 3) == 0
    assert block_of_sigma(0.3, 3) == 1
    assert block_of_sigma(0.01, 3) == 2
    assert block_of_sigma(edges[1], 3) == 2  # a boundary goes to the lower-noise block


@pytest.mark.parametrize(
    ("num_blocks", "num_steps", "counts"),
    [(3, 50, [17, 16, 17]), (3, 3, [1, 1, 1]), (1, 1, [1]), (4, 8, [2, 2, 2, 2]), (2, 50, [25, 25])],
)
def test_schedule_allotment(num_blocks, num_steps, counts):
    steps = euler_schedule(num_blocks, num_steps)
    assert len(steps) == num_steps
    assert steps_per_block(num_blocks, num_steps) == counts
    blocks = [s.block for s in steps]
    assert blocks == sorted(blocks)  # blocks run in network order 0..B-1, contiguous
    assert steps[0].sigma == SIGMA_MAX and steps[-1].sigma_next == SIGMA_MIN
    for a, b in zip(steps[:-1], steps[1:], strict=True):
        assert a.sigma_next == b.sigma
    assert all(s.sigma > s.sigma_next for s in steps)


def test_schedule_equal_in_q_and_owned_by_boundaries():
    steps = euler_schedule(3, 50)
    dq = [cdf(s.sigma) - cdf(s.sigma_next) for s in steps]
    assert max(dq) == pytest.approx(min(dq), rel=1e-6)
    for s in steps:
        mid = icdf(0.5 * (cdf(s.sigma) + cdf(s.sigma_next)))
        assert block_of_sigma(mid, 3) == s.block


def test_one_step_per_block_starts_at_boundaries():
    edges = boundaries(4)[::-1]  # high to low
    steps = euler_schedule(4, 4)
    assert [s.block for s in steps] == [0, 1, 2, 3]
    assert [s.sigma for s in steps] == pytest.approx(edges[:-1])


def test_single_step_does_not_collapse():
    (step,) = euler_schedule(1, 1)
    assert (step.block, step.sigma, step.sigma_next) == (0, SIGMA_MAX, SIGMA_MIN)


def test_too_few_steps():
    with pytest.raises(ValueError):
        euler_schedule(3, 2)


def test_loguniform_first_policy_only_changes_block_zero():
    from dbcore.method.partition import block_sigma_law, sample_sigma_for_block

    assert [block_sigma_law("loguniform-first", b, 3)[2] for b in range(3)] == [
        "loguniform",
        "lognormal",
        "lognormal",
    ]
    u = torch.rand(1000, dtype=torch.float64)
    first = sample_sigma_for_block(u, 0, 4, 0.05, "loguniform-first")
    assert torch.equal(first, sample_sigma_for_block(u, 0, 4, 0.05, "loguniform"))
    later = sample_sigma_for_block(u, 2, 4, 0.05, "loguniform-first")
    assert torch.equal(later, sample_sigma_for_block(u, 2, 4, 0.05, "lognormal"))
    with pytest.raises(ValueError, match="sigma distribution"):
        block_sigma_law("uniform", 0, 3)


def test_top_policies_train_where_the_one_step_per_block_sampler_queries():
    from dbcore.method.partition import block_sigma_law, sample_sigma_for_block

    u = torch.rand(500, dtype=torch.float64)
    levels = [s.sigma for s in euler_schedule(4, 4)]  # block b's one step starts at levels[b]
    for b in range(4):
        s = sample_sigma_for_block(u, b, 4, 0.05, "top")
        assert torch.allclose(s, torch.full_like(s, levels[b]), rtol=1e-12), b
        lo, hi, dist = block_sigma_law("top-first", b, 4, 0.05)
        if b == 0:
            assert lo == hi == SIGMA_MAX
        else:
            assert (lo, hi, dist) == (*block_range(b, 4, 0.05), "lognormal")
