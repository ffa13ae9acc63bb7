"""Per-sample timesteps: ``step(model_output, timestep, sample)`` with ``timestep`` of shape (B,).

One call steps each sample from its own timestep (the DDIM paper's code does this; diffusers cannot, #1784). The
result must equal, bit for bit, stepping each sample alone with its own int timestep, on both backends and in every
dtype: the kernel gathers each element's coefficient row from the same table the single-timestep step reads, and
the PyTorch twin gathers [B, 8] rows and applies the same fp32 operations per element (so no tolerance anywhere).
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastddim
from fastddim import DDIMInverseScheduler, DDIMScheduler
from tests.helpers import BACKEND_DEVICES

pytestmark = pytest.mark.interpreter


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    sample = (torch.randn(shape, generator=generator) * 2).to(device, dtype)
    model_output = torch.randn(shape, generator=generator).to(device, dtype)
    noise = torch.randn(shape, generator=generator).to(device, dtype)
    return sample, model_output, noise


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _step_each_alone(scheduler, model_output, timesteps, sample, **kwargs):
    outs = [
        scheduler.step(model_output[b : b + 1], int(t), sample[b : b + 1], **kwargs) for b, t in enumerate(timesteps)
    ]
    return torch.cat([o.prev_sample for o in outs]), torch.cat([o.pred_original_sample for o in outs])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"prediction_type": "v_prediction", "clip_sample": False, "timestep_spacing": "trailing"},
        {"prediction_type": "sample", "thresholding": True, "sample_max_value": 2.0},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "rescale_betas_zero_snr": True},
    ],
    ids=["default", "v-trailing", "sample-threshold", "epsilon-threshold-zero-snr"],
)
@pytest.mark.parametrize("eta, use_clipped", [(0.0, False), (0.7, True)])
def test_per_sample_step_equals_each_sample_alone(backend, dtype, config, eta, use_clipped, nan_poisoned_empty):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    sample, model_output, noise = _inputs((4, 3, 5, 6), dtype, device)
    timesteps = torch.tensor([999, 0, 500, 123])
    kwargs = dict(eta=eta, use_clipped_model_output=use_clipped)
    if eta:
        kwargs["variance_noise"] = noise
    batched = scheduler.step(model_output, timesteps.to(device), sample, **kwargs)
    alone_kwargs = dict(kwargs)
    prev, x0 = [], []
    for b, t in enumerate(timesteps.tolist()):
        if eta:
            alone_kwargs["variance_noise"] = noise[b : b + 1]
        out = scheduler.step(model_output[b : b + 1], t, sample[b : b + 1], **alone_kwargs)
        prev.append(out.prev_sample)
        x0.append(out.pred_original_sample)
    assert batched.prev_sample.dtype == dtype  # a (B,) timestep keeps the sample's dtype
    # Exact, NaN where stepping alone gives NaN (epsilon prediction at a zero-SNR timestep divides by 0).
    assert_identical(batched.prev_sample, torch.cat(prev))
    assert_identical(batched.pred_original_sample, torch.cat(x0))


def test_per_sample_step_matches_diffusers_per_sample_loop(backend):
    """fp32: bit-identical to diffusers stepping each sample with its own timestep."""
    device = BACKEND_DEVICES[backend]
    config = dict(prediction_type="v_prediction", timestep_spacing="trailing")
    reference, scheduler = DiffusersDDIMScheduler(**config), DDIMScheduler(**config)
    reference.set_timesteps(20)
    scheduler.set_timesteps(20)
    sample, model_output, _ = _inputs((3, 4, 4, 4), torch.float32, device, seed=3)
    timesteps = scheduler.timesteps[torch.tensor([0, 7, 19])]
    ours = scheduler.step(model_output, timesteps, sample)
    theirs = _step_each_alone(reference, model_output, timesteps, sample)
    assert torch.equal(ours.prev_sample, theirs[0]) and torch.equal(ours.pred_original_sample, theirs[1])


def test_strided_inputs_and_int32_timesteps(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    sample, model_output, _ = _inputs((3, 4, 6, 5), torch.float32, device)
    sample = sample.transpose(2, 3)  # non-contiguous: the strided kernel
    model_output = model_output.to(memory_format=torch.channels_last).transpose(2, 3)
    timesteps = torch.tensor([981, 21, 501], dtype=torch.int32)
    ours = scheduler.step(model_output, timesteps, sample)
    theirs = _step_each_alone(scheduler, model_output, timesteps, sample)
    assert torch.equal(ours.prev_sample, theirs[0])


def test_numpy_per_sample_timesteps(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample, model_output, _ = _inputs((2, 3, 4), torch.float32, device)
    ours = scheduler.step(model_output, np.array([900, 100]), sample).prev_sample
    assert torch.equal(ours, scheduler.step(model_output, torch.tensor([900, 100]), sample).prev_sample)


def test_one_element_timestep_keeps_diffusers_promotion(backend):
    """A (1,) timestep promotes fp16 to fp32 as diffusers does, whatever the batch; (B,) with B > 1 does not."""
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample, model_output, _ = _inputs((2, 3, 4), torch.float16, device)
    assert scheduler.step(model_output, torch.tensor([901]), sample).prev_sample.dtype == torch.float32
    assert scheduler.step(model_output, torch.tensor([901, 901]), sample).prev_sample.dtype == torch.float16


def test_bad_per_sample_timesteps(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample, model_output, _ = _inputs((2, 3, 4), torch.float32, device)
    with pytest.raises(ValueError, match=r"one per sample \(shape \(2,\)\)"):
        scheduler.step(model_output, torch.tensor([1, 2, 3]), sample)
    with pytest.raises(ValueError, match="one per sample"):
        scheduler.step(model_output, torch.tensor([[1, 2]]), sample)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        scheduler.step(model_output, torch.tensor([1, 1000]), sample)
    with pytest.raises(TypeError, match="integer tensor"):
        scheduler.step(model_output, torch.tensor([1.0, 2.0]), sample)


def test_add_noise_per_sample_matches_diffusers():
    """``add_noise`` is batched in diffusers already: same values, and per-sample noising then stepping works."""
    reference, scheduler = DiffusersDDIMScheduler(), DDIMScheduler()
    x0, noise, _ = _inputs((3, 3, 4, 4), torch.float32, "cpu")
    timesteps = torch.tensor([10, 500, 999])
    assert torch.equal(scheduler.add_noise(x0, noise, timesteps), reference.add_noise(x0, noise, timesteps))


def test_inverse_per_sample_equals_each_sample_alone(backend, nan_poisoned_empty):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMInverseScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    sample, model_output, _ = _inputs((3, 2, 4, 4), torch.float32, device)
    timesteps = torch.tensor([0, 500, 900])
    ours = scheduler.step(model_output, timesteps.to(device), sample)
    theirs = _step_each_alone(scheduler, model_output, timesteps, sample)
    assert torch.equal(ours.prev_sample, theirs[0]) and torch.equal(ours.pred_original_sample, theirs[1])


def test_kernel_per_sample_out_of_range_device_timestep_is_nan_for_that_sample_only(nan_poisoned_empty):
    """A device timestep cannot raise without a host sync: the kernel gives NaN for its sample, the rest is right."""
    from fastddim import ops, reference

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    table = scheduler.coefficient_table("cpu", 0.0)
    sample, model_output, _ = _inputs((3, 2, 3), torch.float32, "cpu")
    timesteps = torch.tensor([901, 1000, -1])
    prev, _ = ops.launch_ddim_step(
        model_output, sample, table, timesteps, 0, None, None, None, False, 0, True, 1.0, False, torch.float32
    )
    assert prev[1:].isnan().all()
    expected, _ = reference.ddim_step_ref(
        model_output[:1], sample[:1], table[901], prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0
    )
    assert torch.equal(prev[:1], expected)


def test_public_export():
    assert fastddim.DDIMInverseScheduler is DDIMInverseScheduler


@pytest.mark.gpu
def test_per_sample_step_under_cuda_graph_capture():
    scheduler = DDIMScheduler(thresholding=True)
    scheduler.set_timesteps(10, device="cuda")
    sample, model_output, _ = _inputs((3, 4, 16, 16), torch.float32, "cuda")
    timesteps = torch.tensor([901, 501, 1], device="cuda")
    eager = scheduler.step(model_output, timesteps, sample).prev_sample
    static_t = timesteps.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        scheduler.step(model_output, static_t, sample)  # warm-up: compile and plan outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = scheduler.step(model_output, static_t, sample).prev_sample
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    static_t.copy_(torch.tensor([1, 901, 501], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], scheduler.step(model_output[:1], 1, sample[:1]).prev_sample[0])


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    prediction_type=st.sampled_from(["epsilon", "sample", "v_prediction"]),
    clip_sample=st.booleans(),
    thresholding=st.booleans(),
    spacing=st.sampled_from(["leading", "trailing", "linspace", "quad"]),
    prev_from_schedule=st.booleans(),
    eta=st.sampled_from([0.0, 1.0]),
    batch=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_per_sample_property_sweep(
    backend, prediction_type, clip_sample, thresholding, spacing, prev_from_schedule, eta, batch, seed
):
    """Random configs, schedules and per-sample timesteps drawn from the schedule: one call equals B calls."""
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler(
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        thresholding=thresholding,
        timestep_spacing=spacing,
        prev_timestep_from_schedule=prev_from_schedule,
    )
    scheduler.set_timesteps(12)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(scheduler.timesteps), (batch,), generator=generator)
    timesteps = scheduler.timesteps[picks]
    sample, model_output, noise = _inputs((batch, 2, 3, 4), torch.float32, device, seed)
    kwargs = dict(eta=eta, variance_noise=noise) if eta else {}
    batched = scheduler.step(model_output, timesteps.to(device), sample, **kwargs)
    for b, t in enumerate(timesteps.tolist()):
        alone_kwargs = dict(eta=eta, variance_noise=noise[b : b + 1]) if eta else {}
        alone = scheduler.step(model_output[b : b + 1], t, sample[b : b + 1], **alone_kwargs)
        assert_identical(batched.prev_sample[b : b + 1], alone.prev_sample)
        assert_identical(batched.pred_original_sample[b : b + 1], alone.pred_original_sample)
