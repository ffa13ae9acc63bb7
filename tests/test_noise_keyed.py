"""Per-sample step noise keyed by (seed, timestep) inside the fused kernel (``DDIMScheduler.step(noise_seeds=...)``).

With model_output = sample = 0 and epsilon prediction, x_0 = 0 and the direction term is 0, so the step returns
exactly sigma_t * z: the kernel's normal draws z scaled by one per-timestep constant. Comparing those outputs bit for
bit compares the draws. Statistics: a sample of n = 4 * 16 * 16 = 1024 draws has a mean with standard error
1/sqrt(n) = 0.031 and a variance with standard error sqrt(2/n) = 0.044; pooled over 16 seeds (n = 16384) the bounds
tighten 4x. Bounds are 5 standard errors: a correct generator fails them with probability < 1e-6.
"""

import math

import pytest
import torch

from fastddim import DDIMScheduler, ops
from fastddim.utils import BoundedCache

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TIMESTEP = 501
SEED = 12345
# Elements per sample: a multiple of 4 (one Philox call per four elements) and not (one per element).
SAMPLE_SHAPES = {"row-256": (4, 8, 8), "row-105": (3, 5, 7)}


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> DDIMScheduler:
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    return scheduler


def keyed_noise(scheduler: DDIMScheduler, seeds: list[int], sample_shape: tuple, timestep=TIMESTEP, **kwargs):
    """sigma_t * z for each seed (one sample each), as the step returns it on zero inputs."""
    zeros = torch.zeros((len(seeds), *sample_shape), device=DEVICE)
    noise_seeds = torch.tensor(seeds, dtype=torch.int64, device=DEVICE)
    return scheduler.step(zeros, timestep, zeros, eta=1.0, noise_seeds=noise_seeds, **kwargs).prev_sample.cpu()


def use_block_size(monkeypatch: pytest.MonkeyPatch, block_size: int) -> None:
    monkeypatch.setattr(ops, "_launch_config", lambda numel: (block_size, 4))
    monkeypatch.setattr(ops, "STEP_PLANS", BoundedCache(256))  # launch plans cache the block size


@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES.values(), ids=SAMPLE_SHAPES.keys())
@pytest.mark.parametrize("block_size", [None, 16, 64], ids=["default-block", "block-16", "block-64"])
def test_a_seeds_noise_does_not_depend_on_batch_position_or_block(scheduler, monkeypatch, sample_shape, block_size):
    """Alone, at position 3 of 7, among other seeds, under any BLOCK_SIZE: the same bits. Small blocks make samples
    straddle blocks, and with 105-element rows start in the middle of a Philox group."""
    alone = keyed_noise(scheduler, [SEED], sample_shape)[0]
    if block_size is not None:
        use_block_size(monkeypatch, block_size)
    batch = [1, 2, 3, SEED, 5, 6, 7]
    in_batch = keyed_noise(scheduler, batch, sample_shape)
    assert torch.equal(in_batch[3], alone)
    others = keyed_noise(scheduler, [99, SEED, 98], sample_shape)
    assert torch.equal(others[1], alone)
    # Seed 5 keeps its noise when it moves from position 4 (batch of 7) to 0 (batch of 2).
    assert torch.equal(keyed_noise(scheduler, [5, SEED], sample_shape)[0], in_batch[4])
    assert not torch.equal(in_batch[0], in_batch[1])


def test_element_noise_does_not_depend_on_the_sample_size(scheduler):
    """Element j takes component j % 4 of Philox counter j // 4 on both kernel paths: a 105-element sample (one Philox
    call per element) draws the first 105 values of a 108-element one (one call per four elements)."""
    ragged = keyed_noise(scheduler, [SEED, 7], (105,))
    grouped = keyed_noise(scheduler, [SEED, 7], (108,))
    assert torch.equal(ragged, grouped[:, :105])


def test_noise_does_not_depend_on_memory_format(scheduler):
    """Keyed by the logical index: channels-last samples (the strided kernel) get the contiguous ones' noise."""
    zeros = torch.zeros(3, 4, 6, 6, device=DEVICE)
    seeds = torch.tensor([SEED, 1, 2], dtype=torch.int64, device=DEVICE)
    contiguous = scheduler.step(zeros, TIMESTEP, zeros, eta=1.0, noise_seeds=seeds).prev_sample
    channels_last = zeros.to(memory_format=torch.channels_last)
    other = scheduler.step(channels_last, TIMESTEP, channels_last, eta=1.0, noise_seeds=seeds).prev_sample
    assert torch.equal(other.contiguous(), contiguous)


def test_per_sample_timesteps_key_each_sample_by_its_own_timestep(scheduler):
    shape = SAMPLE_SHAPES["row-256"]
    timesteps = torch.tensor([901, 501, 101], device=DEVICE)
    zeros = torch.zeros((3, *shape), device=DEVICE)
    seeds = [SEED, 8, 9]
    noise_seeds = torch.tensor(seeds, dtype=torch.int64, device=DEVICE)
    together = scheduler.step(zeros, timesteps, zeros, eta=1.0, noise_seeds=noise_seeds).prev_sample.cpu()
    for b, seed in enumerate(seeds):
        alone = keyed_noise(scheduler, [seed], shape, timestep=int(timesteps[b]))
        assert torch.equal(together[b], alone[0])


def test_device_timestep_draws_the_python_int_timesteps_noise(scheduler):
    shape = SAMPLE_SHAPES["row-105"]
    by_int = keyed_noise(scheduler, [SEED, 3], shape)
    by_tensor = keyed_noise(scheduler, [SEED, 3], shape, timestep=torch.tensor(TIMESTEP, device=DEVICE))
    assert torch.equal(by_int, by_tensor)


def _normals(scheduler: DDIMScheduler, seeds: list[int], timestep: int) -> torch.Tensor:
    sigma = scheduler.coefficient_table("cpu", 1.0)[timestep, 3].item()
    return keyed_noise(scheduler, seeds, (4, 16, 16), timestep=timestep).double().flatten(1) / sigma


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_moments_and_no_correlation_between_seeds_steps_and_neighbours(scheduler):
    seeds = list(range(16))
    z = _normals(scheduler, seeds, TIMESTEP)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z.abs() > 1.96).double().mean().item() - 0.05) < 5 * math.sqrt(0.05 * 0.95 / n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)  # skewness; Var(z^3) = 15
    per_sample = z.shape[1]
    bound = 5 / math.sqrt(per_sample)
    # Consecutive seeds, the same seed at the next step, and neighbouring elements (within and across Philox groups).
    for b in range(len(seeds) - 1):
        assert abs(_correlation(z[b], z[b + 1])) < bound
    next_step = _normals(scheduler, seeds, TIMESTEP - 100)
    assert abs(_correlation(z, next_step)) < 5 / math.sqrt(n)
    assert not torch.equal(z, next_step)
    assert abs(_correlation(z[:, :-1], z[:, 1:])) < 5 / math.sqrt(n)
    assert abs(_correlation(z[:, :-4], z[:, 4:])) < 5 / math.sqrt(n)


def test_eta_zero_ignores_the_seeds(scheduler):
    generator = torch.Generator().manual_seed(0)
    model_output, sample = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    model_output, sample = model_output.to(DEVICE), sample.to(DEVICE)
    seeds = torch.tensor([1, 2], dtype=torch.int64, device=DEVICE)
    keyed = scheduler.step(model_output, TIMESTEP, sample, noise_seeds=seeds).prev_sample
    assert torch.equal(keyed, scheduler.step(model_output, TIMESTEP, sample).prev_sample)


def test_keyed_noise_adds_sigma_times_z_to_the_deterministic_update(scheduler):
    """The noise term is added to the eta-weighted update as for any other noise: prev(seeds) - prev(z = 0) is the
    same sigma_t * z the zero-input step returns (to fp32 rounding of the sum)."""
    generator = torch.Generator().manual_seed(1)
    model_output, sample = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    model_output, sample = model_output.to(DEVICE), sample.to(DEVICE)
    seeds = torch.tensor([SEED, 4], dtype=torch.int64, device=DEVICE)
    keyed = scheduler.step(model_output, TIMESTEP, sample, eta=1.0, noise_seeds=seeds).prev_sample
    no_noise = scheduler.step(
        model_output, TIMESTEP, sample, eta=1.0, variance_noise=torch.zeros_like(sample)
    ).prev_sample
    expected = keyed_noise(scheduler, [SEED, 4], (3, 4, 4))
    torch.testing.assert_close((keyed - no_noise).cpu(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(generator=torch.Generator()), ValueError, "noise_seeds and generator"),
        (dict(variance_noise=torch.zeros(2, 3, 4, 4)), ValueError, "noise_seeds and variance_noise"),
        (dict(noise_seeds=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "int64"),
        (dict(noise_seeds=[1, 2]), TypeError, "noise_seeds must be an int64 torch.Tensor"),
        (dict(noise_seeds=torch.tensor([1, 2, 3])), ValueError, r"shape \(2,\)"),
        (dict(noise_seeds=torch.tensor([[1, 2]])), ValueError, r"shape \(2,\)"),
    ],
    ids=["generator", "variance-noise", "int32", "list", "too-many", "2-d"],
)
def test_bad_noise_seeds_are_refused(scheduler, kwargs, error, match):
    kwargs = {"noise_seeds": torch.tensor([1, 2]), **kwargs}
    zeros = torch.zeros(2, 3, 4, 4, device=DEVICE)
    if isinstance(kwargs["noise_seeds"], torch.Tensor):
        kwargs["noise_seeds"] = kwargs["noise_seeds"].to(DEVICE)
    with pytest.raises(error, match=match):
        scheduler.step(zeros, TIMESTEP, zeros, eta=1.0, **kwargs)


def test_torch_backend_refuses_noise_seeds_naming_the_alternative(monkeypatch):
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    zeros = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="noise_seeds.*torch backend.*generator="):
        scheduler.step(zeros, TIMESTEP, zeros, eta=1.0, noise_seeds=torch.tensor([1, 2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_samples_keep_their_noise_across_batches(scheduler, dtype):
    """The normals are drawn in fp32 and rounded once, into the output dtype: still a function of (seed, step)."""
    shape = SAMPLE_SHAPES["row-105"]

    def draw(seeds):
        zeros = torch.zeros((len(seeds), *shape), device=DEVICE, dtype=dtype)
        noise_seeds = torch.tensor(seeds, dtype=torch.int64, device=DEVICE)
        return scheduler.step(zeros, TIMESTEP, zeros, eta=1.0, noise_seeds=noise_seeds).prev_sample.cpu()

    together = draw([4, SEED, 6])
    assert together.dtype == dtype
    assert torch.equal(draw([SEED])[0], together[1])
    torch.testing.assert_close(together.float(), keyed_noise(scheduler, [4, SEED, 6], shape), atol=0.01, rtol=0.01)


def test_thresholded_steps_keep_the_keyed_noise(monkeypatch):
    """Dynamic thresholding reads per-sample rows too; on zero inputs x_0 stays 0, so the step is sigma_t * z."""
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    thresholded = DDIMScheduler(thresholding=True)
    thresholded.set_timesteps(10)
    plain = DDIMScheduler()
    plain.set_timesteps(10)
    shape = SAMPLE_SHAPES["row-105"]
    assert torch.equal(keyed_noise(thresholded, [SEED, 2], shape), keyed_noise(plain, [SEED, 2], shape))


def test_thresholded_steps_under_autograd_refuse_noise_seeds(monkeypatch):
    """Those steps run the PyTorch twin, which has no keyed noise: an error, never other noise."""
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    scheduler = DDIMScheduler(thresholding=True)
    scheduler.set_timesteps(10)
    sample = torch.zeros(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    seeds = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="noise_seeds needs the fused kernel"):
        scheduler.step(torch.zeros_like(sample), TIMESTEP, sample, eta=1.0, noise_seeds=seeds)
