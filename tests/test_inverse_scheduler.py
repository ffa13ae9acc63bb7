"""``fastddim.DDIMInverseScheduler`` against diffusers' ``DDIMInverseScheduler``, the oracle.

Both backends run (``triton`` in Triton's CPU interpreter without CUDA). fp32 is bit-identical to diffusers: the
inverse table holds the coefficients diffusers computes, by the same fp32 operations, and the forward kernel applies
them in diffusers' operation order (see tests/test_scheduler.py). fp16/bf16 follow the forward scheduler's rule.
"""

import warnings

import pytest
import torch
from diffusers import DDIMInverseScheduler as DiffusersDDIMInverseScheduler
from diffusers import DDIMScheduler as DiffusersDDIMScheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastddim
from fastddim import DDIMInverseScheduler, reference
from tests.helpers import BACKEND_DEVICES
from tests.test_scheduler import _deterministic_sample, assert_matches_diffusers, dummy_model

pytestmark = pytest.mark.interpreter


def make_pair(**config) -> tuple[DiffusersDDIMInverseScheduler, DDIMInverseScheduler]:
    return DiffusersDDIMInverseScheduler(**config), DDIMInverseScheduler(**config)


CONFIGS = st.fixed_dictionaries(
    {
        "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
        "clip_sample": st.booleans(),
        "set_alpha_to_one": st.booleans(),
        "steps_offset": st.sampled_from([0, 1]),
        "timestep_spacing": st.sampled_from(["leading", "trailing"]),
        "rescale_betas_zero_snr": st.booleans(),
        "clip_sample_range": st.sampled_from([0.5, 1.0, 2.0]),
        "num_train_timesteps": st.sampled_from([1000, 500]),
    }
)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    config=CONFIGS,
    num_inference_steps=st.sampled_from([1, 3, 7, 10, 61]),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(1, 3, 8, 8), (2, 4, 5, 7), (3, 6)]),
    channels_last=st.booleans(),
)
def test_inversion_loop_matches_diffusers(backend, config, num_inference_steps, dtype, shape, channels_last):
    if config["beta_schedule"] == "scaled_linear":
        config = {**config, "beta_start": 0.00085, "beta_end": 0.012}
    device = BACKEND_DEVICES[backend]
    reference_scheduler, scheduler = make_pair(**config)
    reference_scheduler.set_timesteps(num_inference_steps)
    scheduler.set_timesteps(num_inference_steps)
    expected_timesteps = reference_scheduler.timesteps[-num_inference_steps:]  # diffusers' trailing may add a -1
    assert torch.equal(scheduler.timesteps, expected_timesteps)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if channels_last and len(shape) == 4:
        start = start.to(memory_format=torch.channels_last)
    ours, theirs, theirs64 = start.to(device, dtype), start.to(device, dtype), start.to(device)
    for t in scheduler.timesteps:
        out = scheduler.step(dummy_model(ours, t), t, ours)
        ref = reference_scheduler.step(dummy_model(theirs, t), t, theirs)
        ref64 = reference_scheduler.step(dummy_model(theirs64, t), t, theirs64)
        assert_matches_diffusers(out.pred_original_sample, ref.pred_original_sample, ref64.pred_original_sample)
        assert_matches_diffusers(out.prev_sample, ref.prev_sample, ref64.prev_sample)
        ours = theirs = ref64.prev_sample.to(dtype)
        theirs64 = ref64.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_fp32_chained_inversion_is_bitwise_identical(backend, prediction_type):
    device = BACKEND_DEVICES[backend]
    # set_alpha_to_one=False: with alpha_s = 1 before the first training step, sample prediction's epsilon is 0 / 0
    # in diffusers and here alike (undefined: a clean sample carries no noise to recover).
    config = dict(prediction_type=prediction_type, timestep_spacing="leading", set_alpha_to_one=False)
    reference_scheduler, scheduler = make_pair(**config)
    reference_scheduler.set_timesteps(10)
    scheduler.set_timesteps(10)
    ours = theirs = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    for t in scheduler.timesteps:
        ours = scheduler.step(dummy_model(ours, t), t, ours).prev_sample
        theirs = reference_scheduler.step(dummy_model(theirs, t), t, theirs).prev_sample
    assert torch.isfinite(ours).all() and torch.equal(ours, theirs)


def test_zero_terminal_snr_inversion_is_finite_and_equal(backend):
    """Inverting to x_T with a zero terminal SNR: alpha_{T-1} = 0, x_T = epsilon_hat. Finite and equal to diffusers."""
    device = BACKEND_DEVICES[backend]
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    reference_scheduler, scheduler = make_pair(**config)
    for n in (2, 10, 61):
        reference_scheduler.set_timesteps(n)
        scheduler.set_timesteps(n)
        ours = theirs = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
        for t in scheduler.timesteps:
            ours = scheduler.step(dummy_model(ours, t), t, ours).prev_sample
            theirs = reference_scheduler.step(dummy_model(theirs, t), t, theirs).prev_sample
        assert scheduler.timesteps[-1] == 999 and torch.isfinite(ours).all()
        assert torch.equal(ours, theirs)


def _golden_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return sample * t / (t + 1)


@pytest.mark.parametrize(
    "config, expected_sum, expected_mean",
    [
        ({}, 671.6816, 0.8746),
        ({"prediction_type": "v_prediction"}, 1394.2185, 1.8154),
        ({"set_alpha_to_one": True, "beta_start": 0.01}, 539.9622, 0.7031),
        ({"set_alpha_to_one": False, "beta_start": 0.01}, 542.6722, 0.7066),
    ],
    ids=["default", "v_prediction", "set_alpha_to_one", "no_set_alpha_to_one"],
)
def test_diffusers_inverse_full_loop_reference_values(backend, config, expected_sum, expected_mean):
    """diffusers' own tests/schedulers/test_scheduler_ddim_inverse.py numbers."""
    device = BACKEND_DEVICES[backend]
    base = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, clip_sample=True)
    scheduler = DDIMInverseScheduler(**{**base, **config})
    scheduler.set_timesteps(10)
    sample = _deterministic_sample().to(device)
    for t in scheduler.timesteps:
        sample = scheduler.step(_golden_model(sample, t), t, sample).prev_sample
    assert abs(sample.abs().sum().item() - expected_sum) < 1e-2
    assert abs(sample.abs().mean().item() - expected_mean) < 1e-3


def test_inverse_table_columns():
    scheduler = DDIMInverseScheduler(set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    table = scheduler.coefficient_table("cpu")
    alphas = scheduler.alphas_cumprod
    assert table[550, 0] == alphas[450] ** 0.5 and table[550, 2] == alphas[550] ** 0.5
    assert table[550, 4] == (1 - alphas[550]) ** 0.5 and table[:, 3].eq(0).all()
    assert table[50, 0] == scheduler.initial_alpha_cumprod**0.5  # s = 50 - 100 < 0
    assert torch.equal(table, reference.build_inverse_coefficient_table(alphas, scheduler.initial_alpha_cumprod, 10))


# ----------------------------------------------------------------------------------------------- API and config


def test_is_a_diffusers_inverse_scheduler(tmp_path):
    scheduler = DDIMInverseScheduler(prediction_type="v_prediction", steps_offset=1)
    assert isinstance(scheduler, DiffusersDDIMInverseScheduler) and scheduler.order == 1 and len(scheduler) == 1000
    assert fastddim.DDIMInverseScheduler is DDIMInverseScheduler
    scheduler.save_config(tmp_path)
    loaded = DDIMInverseScheduler.from_pretrained(tmp_path)
    assert type(loaded) is DDIMInverseScheduler and loaded.config.prediction_type == "v_prediction"
    assert DiffusersDDIMInverseScheduler.from_pretrained(tmp_path).config.steps_offset == 1
    # Pipelines build it from the forward scheduler's config (thresholding keys are ignored, as by diffusers).
    from_forward = DDIMInverseScheduler.from_config(DiffusersDDIMScheduler(thresholding=True).config)
    assert type(from_forward) is DDIMInverseScheduler
    loaded.set_timesteps(5)
    assert loaded.timesteps.tolist() == [1, 201, 401, 601, 801]
    out = loaded.step(torch.ones(1, 2), 401, torch.ones(1, 2))
    assert (
        type(out).__name__ == "DDIMSchedulerOutput" and len(loaded.step(out[0], 601, out[0], return_dict=False)) == 2
    )


def test_set_alpha_to_zero_is_a_deprecated_alias_as_in_diffusers():
    with warnings.catch_warnings(record=True) as ours_warnings:
        warnings.simplefilter("always")
        ours = DDIMInverseScheduler(set_alpha_to_zero=False)
    with warnings.catch_warnings(record=True) as their_warnings:
        warnings.simplefilter("always")
        theirs = DiffusersDDIMInverseScheduler(set_alpha_to_zero=False)
    assert [str(w.message) for w in ours_warnings] == [str(w.message) for w in their_warnings]
    assert any("set_alpha_to_zero" in str(w.message) for w in ours_warnings)
    assert torch.equal(ours.initial_alpha_cumprod, theirs.initial_alpha_cumprod)
    assert ours.initial_alpha_cumprod == ours.alphas_cumprod[0]


def test_errors(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMInverseScheduler(timestep_spacing="linspace")  # accepted, as by diffusers, until used
    with pytest.raises(ValueError, match="timestep_spacing"):
        scheduler.set_timesteps(10)
    scheduler = DDIMInverseScheduler()
    sample = torch.randn(2, 3, 4).to(device)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 10, sample)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="same shape"):
        scheduler.step(sample[:1], 10, sample)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        scheduler.step(sample, 1000, sample)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMInverseScheduler(prediction_type="flow")


def test_inverse_then_forward_reconstructs_with_an_exact_model():
    """With the true epsilon of a one-point data set, inversion then DDIM sampling returns the data point."""
    x0 = torch.full((1, 2, 3), 0.3)
    inverse = DDIMInverseScheduler(clip_sample=False, timestep_spacing="trailing")
    forward = fastddim.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    inverse.set_timesteps(20)
    forward.set_timesteps(20)
    alphas = inverse.alphas_cumprod

    def true_epsilon(x: torch.Tensor, t: int) -> torch.Tensor:
        return (x - alphas[t] ** 0.5 * x0) / (1 - alphas[t]) ** 0.5

    x = x0.clone()
    sources = [max(int(t) - 50, -1) for t in inverse.timesteps]
    for t, s in zip(inverse.timesteps, sources, strict=True):
        # The model is evaluated at the source timestep (x0 itself before the first training step).
        eps = torch.zeros_like(x) if s < 0 else true_epsilon(x, s)
        x = inverse.step(eps, t, x).prev_sample
    for t in forward.timesteps:
        x = forward.step(true_epsilon(x, int(t)), t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_inversion_loop_captured_equals_eager():
    scheduler = DDIMInverseScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    scheduler.set_timesteps(10, device="cuda")
    start = torch.randn(2, 4, 16, 16, device="cuda")

    def loop(x: torch.Tensor) -> torch.Tensor:
        for t in scheduler.timesteps:
            x = scheduler.step(torch.sin(x), t, x).prev_sample
        return x

    eager = loop(start)
    static = start.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = loop(static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    reference_scheduler = DiffusersDDIMInverseScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    reference_scheduler.set_timesteps(10)
    theirs = start
    for t in reference_scheduler.timesteps:
        theirs = reference_scheduler.step(torch.sin(theirs), t, theirs).prev_sample
    assert torch.equal(captured, theirs)


def test_trailing_inversion_never_starts_at_minus_one():
    """diffusers' float arange gives N + 1 timesteps starting at -1 for 62 values of N (e.g. 61); its step(-1) then
    reads alphas_cumprod[-1] = alpha_{T-1} as the *target*, jumping to near pure noise first. fastddim keeps the N
    real timesteps."""
    reference_scheduler, scheduler = make_pair(timestep_spacing="trailing")
    reference_scheduler.set_timesteps(61)
    scheduler.set_timesteps(61)
    assert reference_scheduler.timesteps[0] == -1 and len(reference_scheduler.timesteps) == 62
    assert len(scheduler.timesteps) == 61 and scheduler.timesteps.min() >= 0
    assert torch.equal(scheduler.timesteps, reference_scheduler.timesteps[1:])
