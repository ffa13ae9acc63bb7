"""``fastddim.DDIMScheduler`` against the real ``diffusers.DDIMScheduler``, the oracle, over the config matrix.

Both backends run: ``torch`` on the CPU, ``triton`` on CUDA when present and otherwise in Triton's CPU interpreter.

Tolerances:
- fp32/fp64: bit-identical to diffusers. Both evaluate the same IEEE operations in the same order from the same fp32
  coefficients (the kernel uses correctly rounded division and no FMA contraction).
- fp16/bf16: diffusers rounds to the low-precision dtype after every operation, fastddim computes in fp32 and rounds
  once, so fastddim is the more accurate of the two. Both are compared with a float64 run of diffusers, and
  fastddim's error must stay within twice diffusers' own error plus one rounding of the output (quack's rule).
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler
from diffusers import DDPMScheduler, PNDMScheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastddim
from fastddim import DDIMScheduler
from tests.helpers import BACKEND_DEVICES

pytestmark = pytest.mark.interpreter

LOW_PRECISION = (torch.float16, torch.bfloat16)


def dummy_model(sample: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in denoiser, smooth and bounded, that depends on the timestep."""
    t = float(t)
    return torch.sin(3.0 * sample.float() + t / 97.0).to(sample.dtype) * (0.5 + t / 2000.0)


def assert_matches_diffusers(actual: torch.Tensor, expected: torch.Tensor, expected64: torch.Tensor | None) -> None:
    """fp32/fp64: equal where diffusers is finite; fp16/bf16: quack's rule against a float64 run."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype not in LOW_PRECISION:
        finite = torch.isfinite(expected)
        assert torch.equal(actual[finite], expected[finite]), (actual - expected).abs()[finite].max()
        return
    # Compared where the float64 run is finite and so is diffusers' own fp16/bf16 result. diffusers can also be NaN
    # or inf where float64 is finite (fp16 overflow inside its op chain); fastddim computes in fp32 and is left
    # unconstrained there. Where even float64 is non-finite nothing is compared, as in the fp32 branch: epsilon
    # prediction at a zero-SNR timestep (a true division by 0), or eta > 0 with a zero terminal SNR (diffusers' NaN
    # that fastddim fixes; test_zero_terminal_snr_with_eta_is_finite checks fastddim's value there).
    compared = torch.isfinite(expected64) & torch.isfinite(expected)
    if not compared.any():
        return
    error = _max_error(actual, expected64, compared)
    diffusers_error = _max_error(expected, expected64, compared)
    floor = torch.finfo(actual.dtype).eps * expected64[compared].abs().max()
    assert error <= 2 * diffusers_error + floor, (error, diffusers_error, floor)


def _max_error(actual: torch.Tensor, expected64: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Largest |actual - expected64| over ``where``, a NaN difference counting as an infinite error."""
    error = (actual.double() - expected64)[where].abs()
    return torch.where(error.isnan(), torch.inf, error).max()


def make_pair(**config) -> tuple[DiffusersDDIMScheduler, DDIMScheduler]:
    return DiffusersDDIMScheduler(**config), DDIMScheduler(**config)


# ----------------------------------------------------------------------------------------------- config matrix

CONFIGS = st.fixed_dictionaries(
    {
        "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
        "clip_sample": st.booleans(),
        "set_alpha_to_one": st.booleans(),
        "steps_offset": st.sampled_from([0, 1]),
        "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace"]),
        "rescale_betas_zero_snr": st.booleans(),
        "thresholding": st.booleans(),
        "dynamic_thresholding_ratio": st.sampled_from([0.9, 0.995, 1.0]),
        "sample_max_value": st.sampled_from([0.5, 1.0, 3.0]),
        "clip_sample_range": st.sampled_from([0.5, 1.0, 2.0]),
        "num_train_timesteps": st.sampled_from([1000, 500]),
    }
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    config=CONFIGS,
    num_inference_steps=st.sampled_from([1, 3, 7, 10]),
    eta=st.sampled_from([0.0, 0.5, 1.0]),
    use_clipped_model_output=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(1, 3, 8, 8), (2, 4, 5, 7), (3, 6), (2, 2, 3, 4, 4)]),
    channels_last=st.booleans(),
)
def test_full_loop_matches_diffusers(
    backend, config, num_inference_steps, eta, use_clipped_model_output, dtype, shape, channels_last
):
    if config["beta_schedule"] == "scaled_linear":
        config = {**config, "beta_start": 0.00085, "beta_end": 0.012}
    if config["thresholding"] and len(shape) == 2:
        shape = (3, 2, 3)  # diffusers crashes on 2-D thresholding; that case has its own test
    device = BACKEND_DEVICES[backend]
    reference, scheduler = make_pair(**config)
    reference.set_timesteps(num_inference_steps)
    scheduler.set_timesteps(num_inference_steps)
    assert torch.equal(reference.timesteps, scheduler.timesteps[: len(reference.timesteps)])

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=generator, dtype=torch.float64)
    noises = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in scheduler.timesteps]
    if channels_last and len(shape) == 4:
        start = start.to(memory_format=torch.channels_last)

    ours, theirs, theirs64 = (start.to(device, dtype), start.to(device, dtype), start.to(device))
    for t, noise in zip(scheduler.timesteps, noises, strict=True):
        kwargs = dict(eta=eta, use_clipped_model_output=use_clipped_model_output)
        out = scheduler.step(dummy_model(ours, t), t, ours, variance_noise=noise.to(device, dtype), **kwargs)
        ref = reference.step(dummy_model(theirs, t), t, theirs, variance_noise=noise.to(device, dtype), **kwargs)
        ref64 = reference.step(dummy_model(theirs64, t), t, theirs64, variance_noise=noise.to(device), **kwargs)
        # Compare each step from the same input, so rounding differences in fp16 do not compound.
        assert_matches_diffusers(out.pred_original_sample, ref.pred_original_sample, ref64.pred_original_sample)
        assert_matches_diffusers(out.prev_sample, ref.prev_sample, ref64.prev_sample)
        ours = theirs = ref64.prev_sample.to(dtype)
        theirs64 = ref64.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_fp32_full_loop_is_bitwise_identical(backend, prediction_type, eta):
    """Ten chained steps, each from our own previous output: fp32 stays bit-identical to diffusers throughout."""
    device = BACKEND_DEVICES[backend]
    reference, scheduler = make_pair(prediction_type=prediction_type, timestep_spacing="trailing")
    reference.set_timesteps(10)
    scheduler.set_timesteps(10)
    ours = theirs = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    gen_ours, gen_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        ours = scheduler.step(dummy_model(ours, t), t, ours, eta=eta, generator=gen_ours).prev_sample
        theirs = reference.step(dummy_model(theirs, t), t, theirs, eta=eta, generator=gen_theirs).prev_sample
    assert torch.equal(ours, theirs)
    # The same random numbers were drawn: the generators end in the same state.
    assert torch.equal(gen_ours.get_state(), gen_theirs.get_state())


def test_generator_lists_match_diffusers(backend):
    device = BACKEND_DEVICES[backend]
    reference, scheduler = make_pair()
    reference.set_timesteps(5)
    scheduler.set_timesteps(5)
    sample = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2)).to(device)
    t = scheduler.timesteps[1]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12)]  # noqa: E731
    ours = scheduler.step(dummy_model(sample, t), t, sample, eta=0.6, generator=gens())
    theirs = reference.step(dummy_model(sample, t), t, sample, eta=0.6, generator=gens())
    assert torch.equal(ours.prev_sample, theirs.prev_sample)


# ----------------------------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_set_timesteps_matches_diffusers_for_every_n(spacing, steps_offset):
    reference, scheduler = make_pair(timestep_spacing=spacing, steps_offset=steps_offset)
    fixed = []
    for n in range(1, 1001):
        reference.set_timesteps(n)
        scheduler.set_timesteps(n)
        assert scheduler.timesteps.dtype == torch.int64
        assert len(scheduler.timesteps) == n
        assert torch.equal(scheduler.timesteps, reference.timesteps[:n])
        if len(reference.timesteps) != n:
            fixed.append(n)
    if spacing == "trailing":
        # diffusers' float arange gives N + 1 timesteps ending in -1 for these N; fastddim keeps the first N.
        assert fixed[:4] == [61, 103, 121, 122] and len(fixed) == 62
    else:
        assert fixed == []


def test_set_timesteps_device_and_values():
    scheduler = DDIMScheduler(steps_offset=1)
    scheduler.set_timesteps(5)
    assert torch.equal(scheduler.timesteps, torch.LongTensor([801, 601, 401, 201, 1]))
    assert scheduler.num_inference_steps == 5
    scheduler.set_timesteps(np.int64(3))
    assert scheduler.timesteps.tolist() == [667, 334, 1]


# ----------------------------------------------------------------------------------------------- diffusers' goldens


def _deterministic_sample() -> torch.Tensor:
    # diffusers' `dummy_sample_deter`: element [b, c, h, w] = (256c + 32h + 4w + b) / 768, non-contiguous.
    return (torch.arange(768, dtype=torch.float32).reshape(3, 8, 8, 4) / 768).permute(3, 0, 1, 2)


def _deterministic_noise() -> torch.Tensor:
    return (torch.arange(767, -1, -1, dtype=torch.float32).reshape(3, 8, 8, 4) / 768).permute(3, 0, 1, 2)


def _golden_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return sample * t / (t + 1)


@pytest.mark.parametrize(
    "config, expected_sum, expected_mean",
    [
        ({}, 172.0067, 0.223967),
        ({"prediction_type": "v_prediction"}, 52.5302, 0.0684),
        ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
        ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
    ],
    ids=["no_noise", "v_prediction", "set_alpha_to_one", "no_set_alpha_to_one"],
)
def test_diffusers_full_loop_reference_values(backend, config, expected_sum, expected_mean):
    """diffusers' own `test_full_loop_*` reference numbers, reproduced by fastddim."""
    device = BACKEND_DEVICES[backend]
    base = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, clip_sample=True)
    scheduler = DDIMScheduler(**{**base, **config})
    scheduler.set_timesteps(10)
    sample = _deterministic_sample().to(device)
    for t in scheduler.timesteps:
        sample = scheduler.step(_golden_model(sample, t), t, sample, 0.0).prev_sample
    assert abs(sample.abs().sum().item() - expected_sum) < 1e-2
    assert abs(sample.abs().mean().item() - expected_mean) < 1e-3


def test_diffusers_full_loop_with_noise_reference_values(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler(clip_sample=True)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[8:]
    sample = scheduler.add_noise(_deterministic_sample(), _deterministic_noise(), timesteps[:1]).to(device)
    for t in timesteps:
        sample = scheduler.step(_golden_model(sample, t), t, sample, 0.0).prev_sample
    assert abs(sample.abs().sum().item() - 354.5418) < 1e-2
    assert abs(sample.abs().mean().item() - 0.4616) < 1e-3


@pytest.mark.parametrize(
    "timestep, prev_timestep, expected",
    [(0, 0, 0.0), (420, 400, 0.14771), (980, 960, 0.32460), (487, 486, 0.00979), (999, 998, 0.02)],
)
def test_variance_values(timestep, prev_timestep, expected):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    assert abs(scheduler._get_variance(timestep, prev_timestep).item() - expected) < 1e-5


# ----------------------------------------------------------------------------------------------- better than diffusers


def test_zero_terminal_snr_with_eta_is_finite(backend):
    """diffusers returns NaN here: at t = T - 1 the zero terminal SNR makes sigma_t^2 = 1 - alpha_prev exactly, so the
    radicand 1 - alpha_prev - sigma_t^2 of the direction term is 0, and rounding of sqrt(var)^2 often makes it < 0."""
    device = BACKEND_DEVICES[backend]
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    reference, scheduler = make_pair(**config)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    model_output = dummy_model(sample, 999)
    nan_cases = 0
    for n in range(2, 120):
        reference.set_timesteps(n)
        scheduler.set_timesteps(n)
        theirs = reference.step(model_output, 999, sample, eta=1.0, variance_noise=noise).prev_sample
        ours = scheduler.step(model_output, 999, sample, eta=1.0, variance_noise=noise).prev_sample
        assert torch.isfinite(ours).all()
        if torch.isnan(theirs).any():
            nan_cases += 1
            # The mathematically right answer: the direction coefficient at its limit 0 (alpha_999 = 0 here, so
            # x_0 = -model_output and x_{t-1} = sqrt(alpha_prev) x_0 + sigma_t z).
            row = scheduler.coefficient_table("cpu", 1.0)[999].double()
            assert row[4] == 0
            expected = row[2] * (-model_output.double().cpu()) + row[3] * noise.double().cpu()
            torch.testing.assert_close(ours.double().cpu(), expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(ours, theirs)
    if nan_cases == 0:
        # Whether sqrt(var)^2 rounds above var depends on the CPU pow/sqrt kernels of the installed torch (torch 2.13,
        # the CI version, does so for dozens of these N; 2.11 for none): nothing to demonstrate on this version.
        pytest.skip(f"torch {torch.__version__} never rounds diffusers' radicand below zero for these N")


def test_thresholding_2d_samples(backend):
    """diffusers crashes on 2-D samples (`np.prod([])` is a float); fastddim thresholds each row."""
    device = BACKEND_DEVICES[backend]
    reference, scheduler = make_pair(thresholding=True, sample_max_value=2.0, clip_sample=False)
    reference.set_timesteps(10)
    scheduler.set_timesteps(10)
    sample = (torch.randn(3, 40, generator=torch.Generator().manual_seed(3)) * 3).to(device)
    model_output = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)).to(device)
    with pytest.raises(TypeError):
        reference.step(model_output, 500, sample)
    ours = scheduler.step(model_output, 500, sample)
    # The same rows as a 3-D (B, 1, n) sample, which diffusers handles.
    theirs = reference.step(model_output[:, None], 500, sample[:, None])
    assert torch.equal(ours.prev_sample, theirs.prev_sample[:, 0])
    assert torch.equal(ours.pred_original_sample, theirs.pred_original_sample[:, 0])


def test_trailing_schedule_never_steps_to_minus_one():
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(61)
    assert scheduler.timesteps.min() >= 0 and len(scheduler.timesteps) == 61


# ----------------------------------------------------------------------------------------------- API and config


def test_is_a_diffusers_ddim_scheduler():
    scheduler = DDIMScheduler()
    assert isinstance(scheduler, DiffusersDDIMScheduler)
    assert scheduler.order == 1 and scheduler.init_noise_sigma == 1.0 and len(scheduler) == 1000
    sample = torch.randn(1, 3, 4, 4)
    assert scheduler.scale_model_input(sample, 10) is sample
    assert "DDIMScheduler" in [c.__name__ for c in scheduler.compatibles]


def test_config_round_trip(tmp_path):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1)
    scheduler.save_config(tmp_path)
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    assert type(loaded) is DDIMScheduler

    def saved_fields(config):
        return {k: v for k, v in config.items() if k != "_use_default_values"}

    assert saved_fields(loaded.config) == saved_fields(scheduler.config)
    # diffusers' own class reads the same file.
    assert DiffusersDDIMScheduler.from_pretrained(tmp_path).config.prediction_type == "v_prediction"
    assert isinstance(fastddim.DDIMScheduler.from_config(loaded.config, clip_sample=False), DDIMScheduler)


def test_from_config_of_other_schedulers():
    for other in (PNDMScheduler(skip_prk_steps=True), DDPMScheduler(beta_schedule="squaredcos_cap_v2")):
        scheduler = DDIMScheduler.from_config(other.config)
        assert scheduler.config.beta_schedule == other.config.beta_schedule
        scheduler.set_timesteps(5)


@pytest.mark.parametrize("mutate", ["attribute", "internal_dict"])
def test_config_is_read_at_call_time(backend, mutate):
    """Pipelines rewrite the config after construction (SD replaces `_internal_dict`, others set attributes)."""
    from diffusers.configuration_utils import FrozenDict

    device = BACKEND_DEVICES[backend]
    reference, scheduler = make_pair(clip_sample=True)
    if mutate == "attribute":
        scheduler.config.clip_sample = False
        reference.config.clip_sample = False
    else:
        new_config = FrozenDict({**scheduler.config, "clip_sample": False, "prediction_type": "v_prediction"})
        scheduler._internal_dict = new_config
        reference._internal_dict = FrozenDict(
            {**reference.config, "clip_sample": False, "prediction_type": "v_prediction"}
        )
    reference.set_timesteps(10)
    scheduler.set_timesteps(10)
    sample = (torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 4).to(device)
    ours = scheduler.step(sample * 0.3, 901, sample).pred_original_sample
    theirs = reference.step(sample * 0.3, 901, sample).pred_original_sample
    assert ours.abs().max() > 1  # not clipped
    assert torch.equal(ours, theirs)


def test_step_outputs_and_tuple(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    sample = torch.randn(2, 3, 4, 4).to(device)
    out = scheduler.step(sample * 0.1, 980, sample)
    prev, x0 = scheduler.step(sample * 0.1, 980, sample, return_dict=False)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out["pred_original_sample"], x0)
    assert out.to_tuple()[0] is out.prev_sample and out[1] is out.pred_original_sample


@pytest.mark.parametrize(
    "timestep",
    [980, np.int64(980), torch.tensor(980), torch.tensor([980]), torch.tensor(980, dtype=torch.int32)],
    ids=["int", "numpy", "0-dim", "1-element", "int32"],
)
def test_timestep_types(backend, timestep):
    device = BACKEND_DEVICES[backend]
    reference, scheduler = make_pair()
    reference.set_timesteps(50)
    scheduler.set_timesteps(50)
    sample = torch.randn(2, 3, 4, 4).to(device, torch.float16)
    ours = scheduler.step(sample * 0.1, timestep, sample).prev_sample
    # A 1-D timestep makes diffusers' coefficients 1-D, which promotes fp16 outputs to fp32; fastddim follows.
    one_dim = isinstance(timestep, torch.Tensor) and timestep.dim() == 1
    assert ours.dtype == (torch.float32 if one_dim else torch.float16)
    if device == "cpu":  # diffusers cannot mix a 1-D CPU timestep with CUDA samples
        assert ours.dtype == reference.step(sample * 0.1, timestep, sample).prev_sample.dtype


def test_inputs_are_never_modified(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler(thresholding=True, clip_sample=False)
    scheduler.set_timesteps(10)
    sample, model_output, noise = (torch.randn(2, 3, 8, 8).to(device) * 3 for _ in range(3))
    copies = [t.clone() for t in (sample, model_output, noise)]
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        scheduler.register_to_config(prediction_type=prediction_type)
        out = scheduler.step(model_output, 901, sample, eta=0.5, variance_noise=noise)
        assert out.pred_original_sample is not model_output
    for original, copy in zip((sample, model_output, noise), copies, strict=True):
        assert torch.equal(original, copy)


def test_eta_zero_ignores_generator_and_noise(backend):
    """As in diffusers: at eta 0 no noise is drawn and passing both generator and variance_noise is no error."""
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(1, 3, 4, 4).to(device)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    scheduler.step(sample, 901, sample, generator=generator, variance_noise=sample)
    assert torch.equal(generator.get_state(), state)


def test_cpu_in_kernel_noise_follows_global_seed(backend):
    """Noise without generator: reproducible with torch.manual_seed, different otherwise."""
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.zeros(2, 3, 8, 8).to(device)
    torch.manual_seed(123)
    first = scheduler.step(sample, 901, sample, eta=1.0).prev_sample
    torch.manual_seed(123)
    again = scheduler.step(sample, 901, sample, eta=1.0).prev_sample
    other = scheduler.step(sample, 901, sample, eta=1.0).prev_sample
    assert torch.equal(first, again) and not torch.equal(first, other)


# ----------------------------------------------------------------------------------------------- bad input


def test_constructor_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="cosine")
    with pytest.raises(NotImplementedError):  # what diffusers raises, for code written against it
        DDIMScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDIMScheduler(num_train_timesteps=0)
    with pytest.raises(ValueError, match="beta_start"):
        DDIMScheduler(beta_start=0.02, beta_end=0.0001)
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
            DDIMScheduler(dynamic_thresholding_ratio=ratio)
    with pytest.raises(TypeError):
        DDIMScheduler(not_an_argument=1)


def test_set_timesteps_errors():
    scheduler = DDIMScheduler()
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    with pytest.raises(ValueError, match="cannot be larger"):
        scheduler.set_timesteps(1001)


def test_step_errors(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    sample = torch.randn(2, 3, 4, 4).to(device)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 10, sample)
    scheduler.set_timesteps(10)
    cases = [
        ((sample[:1], 10, sample), {}, ValueError, "same shape"),
        ((sample.half(), 10, sample), {}, ValueError, "same dtype"),
        ((sample.numpy() if device == "cpu" else sample.tolist(), 10, sample), {}, TypeError, "model_output"),
        ((sample.long(), 10, sample.long()), {}, TypeError, "floating-point"),
        ((sample, 1000, sample), {}, ValueError, "timestep"),
        ((sample, -1, sample), {}, ValueError, "timestep"),
        ((sample, 10.0, sample), {}, TypeError, "timestep"),
        ((sample, torch.tensor([10, 20, 30]), sample), {}, ValueError, "single timestep"),
        ((sample, 10, sample), {"eta": -0.5}, ValueError, "eta"),
        (
            (sample, 10, sample),
            {"eta": 0.5, "variance_noise": torch.randn(3, 3, 4, 4).to(device)},
            ValueError,
            "variance_noise",
        ),
        (
            (sample, 10, sample),
            {"eta": 0.5, "variance_noise": sample, "generator": torch.Generator()},
            ValueError,
            "both generator",
        ),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            scheduler.step(*args, **kwargs)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler.step(sample, 10, sample)


def test_backend_selection(monkeypatch):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(1, 3, 4, 4)
    monkeypatch.setenv("FASTDDIM_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTDDIM_BACKEND"):
        scheduler.step(sample, 10, sample)
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    # As if fastddim had been imported without the interpreter (the kernels are decorated then).
    monkeypatch.setattr(fastddim.ops, "KERNELS_INTERPRETED", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before importing fastddim"):
        scheduler.step(sample, 10, sample)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after fastddim was imported"):
        scheduler.step(sample, 10, sample)
    monkeypatch.undo()
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    with pytest.raises(ValueError, match="dtype"):
        scheduler.step(sample.double(), 10, sample.double())
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    assert scheduler.step(sample.double(), 10, sample.double()).prev_sample.dtype == torch.float64
