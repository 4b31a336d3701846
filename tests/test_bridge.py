"""The KDE bridge: exact count forward, density backward."""

import math

import pytest
import torch

from fcpts.bridge import ScoreDistribution, bridged_sparsity, silverman_bandwidth


def _grad_at(scores: torch.Tensor, t: float, **kw) -> tuple[float, float]:
    dist = ScoreDistribution(scores, generator=torch.Generator().manual_seed(0), **kw)
    tt = torch.tensor(t, requires_grad=True)
    s = bridged_sparsity(tt, dist)
    s.backward()
    return s.item(), float(tt.grad)


CASES = [
    # name, sampler, analytic density, thresholds
    (
        "half-normal",
        lambda g: torch.randn(200_000, generator=g).abs(),
        lambda t: 2 * math.exp(-t * t / 2) / math.sqrt(2 * math.pi),
        [0.3, 0.8, 1.5],
    ),
    (
        "exponential",
        lambda g: torch.empty(200_000).exponential_(1.0, generator=g),
        lambda t: math.exp(-t),
        [0.2, 1.0, 2.0],
    ),
    ("uniform", lambda g: torch.rand(200_000, generator=g) * 2.0, lambda t: 0.5, [0.4, 1.0, 1.6]),
]


@pytest.mark.parametrize("name,sampler,density,thresholds", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_analytic_density(name, sampler, density, thresholds):
    scores = sampler(torch.Generator().manual_seed(1))
    for t in thresholds:
        forward, grad = _grad_at(scores, t)
        assert forward == pytest.approx(float((scores <= t).float().mean()), abs=1e-6)
        # a 4096-point KDE: within 12% of the true density away from edges
        assert grad == pytest.approx(density(t), rel=0.12), (name, t, grad, density(t))


def test_reflection_keeps_density_near_zero():
    scores = torch.rand(100_000, generator=torch.Generator().manual_seed(2))
    _, with_reflection = _grad_at(scores, 0.0)
    _, without = _grad_at(scores, 0.0, reflect=False)
    assert with_reflection == pytest.approx(1.0, rel=0.15)
    assert without == pytest.approx(0.5, rel=0.15)  # the boundary bias reflection removes


def test_histogram_bridge_agrees_with_kde():
    scores = torch.randn(50_000, generator=torch.Generator().manual_seed(3)).abs()
    _, kde = _grad_at(scores, 1.0)
    _, hist = _grad_at(scores, 1.0, method="hist")
    assert hist == pytest.approx(kde, rel=0.1)


def test_forward_is_exact_count_with_ties():
    scores = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 2.0])
    dist = ScoreDistribution(scores)
    assert float(bridged_sparsity(torch.tensor(0.0), dist)) == pytest.approx(2 / 6)
    assert float(bridged_sparsity(torch.tensor(1.0), dist)) == pytest.approx(5 / 6)
    assert float(bridged_sparsity(torch.tensor(0.5), dist)) == pytest.approx(2 / 6)


def test_silverman_bandwidth_of_standard_normal():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    assert silverman_bandwidth(x) == pytest.approx(0.9 * 10_000**-0.2, rel=0.05)
