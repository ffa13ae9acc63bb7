"""Statistics of the in-kernel Philox noise (eta > 0 with neither ``generator`` nor ``variance_noise``).

With model_output = sample = 0 and epsilon prediction, x_0 = 0 and the direction term is 0, so the step returns
exactly sigma_t * z: dividing by sigma_t recovers the kernel's normal draws z. With n = 32768 draws, the standard error
of the mean is 1/sqrt(n) = 0.0055 and of the variance sqrt(2/n) = 0.0078; the bounds below are 5 standard errors, so
a correct generator fails them with probability < 1e-6 while a biased or correlated one fails.
"""

import math

import pytest
import torch

from fastddim import DDIMScheduler
from fastddim.utils import BoundedCache

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (2, 4, 64, 64)
NUM = math.prod(SHAPE)
FIVE_SIGMA_MEAN = 5 / math.sqrt(NUM)
FIVE_SIGMA_VAR = 5 * math.sqrt(2 / NUM)


@pytest.fixture
def draw(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    zeros = torch.zeros(SHAPE, device=DEVICE)
    timestep = 501
    sigma = scheduler.coefficient_table("cpu", 1.0)[timestep, 3].item()

    def draw_normals() -> torch.Tensor:
        return (scheduler.step(zeros, timestep, zeros, eta=1.0).prev_sample / sigma).double().cpu()

    return draw_normals


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_moments(draw):
    torch.manual_seed(0)
    z = draw()
    assert abs(z.mean().item()) < FIVE_SIGMA_MEAN
    assert abs(z.var().item() - 1) < FIVE_SIGMA_VAR
    # Tails of a standard normal: P(|z| > 1.96) = 0.05, binomial standard error sqrt(0.05 * 0.95 / n) = 0.0012.
    assert abs((z.abs() > 1.96).double().mean().item() - 0.05) < 5 * math.sqrt(0.05 * 0.95 / NUM)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / NUM)  # skewness; Var(z^3) = 15


def test_no_correlation_across_elements_steps_and_seeds(draw):
    torch.manual_seed(0)
    first = draw()
    second = draw()  # the next step: a fresh seed from the same generator
    torch.manual_seed(1)
    other_seed = draw()
    flat = first.flatten()
    assert abs(_correlation(flat[:-1], flat[1:])) < FIVE_SIGMA_MEAN  # neighbours
    assert abs(_correlation(flat[: NUM // 2], flat[NUM // 2 :])) < FIVE_SIGMA_MEAN  # batch entries
    assert abs(_correlation(first, second)) < FIVE_SIGMA_MEAN
    assert abs(_correlation(first, other_seed)) < FIVE_SIGMA_MEAN


def test_reproducible_under_manual_seed(draw):
    torch.manual_seed(42)
    first = draw()
    torch.manual_seed(42)
    assert torch.equal(draw(), first)


def test_noise_does_not_depend_on_block_size(draw, monkeypatch):
    """Philox counters are derived from the element index alone, so the launch configuration cannot change them."""
    from fastddim import ops

    torch.manual_seed(3)
    reference = draw()
    for block_size in (4096, 32768):
        monkeypatch.setattr(ops, "_launch_config", lambda numel, block_size=block_size: (block_size, 4))
        monkeypatch.setattr(ops, "STEP_PLANS", BoundedCache(256))  # launch plans cache the block size
        torch.manual_seed(3)
        assert torch.equal(draw(), reference)
