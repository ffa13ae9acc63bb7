"""The fused step kernel (``fastddim.ops.ddim_step``) against its PyTorch twin (``fastddim.reference``).

On the CPU these run the kernel in Triton's interpreter; with CUDA the same tests compile it for the GPU.
Tolerances: fp32 must match the fp32 reference bit for bit (same operations, same order, no FMA, ``div_rn``).
fp16/bf16: kernel and reference both compute in fp32 from the same inputs and round once at the store, so they must
agree to within one rounding of the output dtype (1 ULP, which ``rtol = eps`` covers).
"""

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler

from fastddim import ops, reference
from fastddim.reference import ddim_step_ref
from fastddim.utils import BoundedCache

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP_RTOL = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _table(eta: float, num_inference_steps: int = 50, **config) -> torch.Tensor:
    scheduler = DiffusersDDIMScheduler(**config)
    return reference.build_coefficient_table(
        scheduler.alphas_cumprod, scheduler.final_alpha_cumprod, num_inference_steps, eta
    ).to(DEVICE)


def _run_both(model_output, sample, table, timestep, *, noise=None, threshold_scale=None, **flags):
    prediction_type = flags.pop("prediction_type", "epsilon")
    clip_sample = flags.pop("clip_sample", True)
    use_clipped = flags.pop("use_clipped_model_output", False)
    kernel = ops.ddim_step(
        model_output,
        sample,
        table,
        None,
        timestep,
        noise,
        None,
        threshold_scale,
        noise is not None,
        reference.PREDICTION_TYPES.index(prediction_type),
        clip_sample,
        1.0,
        use_clipped,
        sample.dtype,
    )
    expected = ddim_step_ref(
        model_output,
        sample,
        table[timestep],
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=1.0,
        threshold_scale=threshold_scale,
        use_clipped_model_output=use_clipped,
        noise=noise,
    )
    return kernel, tuple(r.to(sample.dtype) for r in expected)


def _assert_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol = ULP_RTOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0.0 if rtol == 0 else 1e-6, equal_nan=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", reference.PREDICTION_TYPES)
@pytest.mark.parametrize("clip_sample", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("use_clipped_model_output", [False, True], ids=["eps", "clipped-eps"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_kernel_matches_reference(
    dtype, prediction_type, clip_sample, use_clipped_model_output, eta, nan_poisoned_empty
):
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 7, 9)
    model_output = (torch.randn(shape, generator=generator) * 1.5).to(DEVICE, dtype)
    sample = (torch.randn(shape, generator=generator) * 2).to(DEVICE, dtype)
    noise = torch.randn(shape, generator=generator).to(DEVICE, dtype) if eta > 0 else None
    table = _table(eta)
    for timestep in (981, 500, 1):
        (prev, x0), (prev_ref, x0_ref) = _run_both(
            model_output,
            sample,
            table,
            timestep,
            noise=noise,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            use_clipped_model_output=use_clipped_model_output,
        )
        _assert_match(x0, x0_ref)
        _assert_match(prev, prev_ref)


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "sliced": lambda t: torch.cat([t, t], dim=-1)[..., ::2],
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
}


@pytest.mark.parametrize("sample_layout", list(LAYOUTS))
@pytest.mark.parametrize("model_output_layout", ["contiguous", "channels_last", "sliced"])
def test_strided_and_mixed_layouts(sample_layout, model_output_layout, nan_poisoned_empty):
    generator = torch.Generator().manual_seed(1)
    shape = (2, 4, 5, 6)
    model_output = LAYOUTS[model_output_layout](torch.randn(shape, generator=generator).to(DEVICE))
    sample = LAYOUTS[sample_layout](torch.randn(shape, generator=generator).to(DEVICE))
    noise = torch.randn(1, 4, 1, 6, generator=generator).to(DEVICE).expand(shape)  # stride-0 broadcast dims
    table = _table(1.0)
    (prev, x0), (prev_ref, x0_ref) = _run_both(model_output, sample, table, 600, noise=noise)
    assert torch.equal(prev, prev_ref) and torch.equal(x0, x0_ref)
    if sample_layout in ("contiguous", "channels_last"):
        # Outputs keep the input memory format, as diffusers' elementwise ops do.
        assert prev.stride() == sample.stride() and x0.stride() == sample.stride()


@pytest.mark.parametrize(
    "shape",
    [(5,), (3, 17), (2, 3, 8, 8), (1, 1, 1, 1), (2, 3, 2, 4, 4), (1, 2, 3, 2, 3, 2), (0, 3, 4, 4)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_any_rank(shape, nan_poisoned_empty):
    generator = torch.Generator().manual_seed(2)
    model_output = torch.randn(shape, generator=generator).to(DEVICE)
    sample = torch.randn(shape, generator=generator).to(DEVICE)
    if len(shape) == 6:
        # Six non-mergeable dims: the launcher's explicit copy fallback.
        model_output = model_output.permute(0, 2, 1, 4, 3, 5)
        sample = sample.permute(0, 2, 1, 4, 3, 5)
    (prev, x0), (prev_ref, x0_ref) = _run_both(model_output, sample, _table(0.0), 420)
    assert prev.shape == sample.shape
    assert torch.equal(prev, prev_ref) and torch.equal(x0, x0_ref)


def test_device_timestep_and_out_of_range_gives_nan(nan_poisoned_empty):
    sample = torch.randn(2, 3, 4, 4).to(DEVICE)
    model_output = torch.randn(2, 3, 4, 4).to(DEVICE)
    table = _table(0.0)
    args = (None, None, None, False, 0, True, 1.0, False, torch.float32)
    by_int = ops.ddim_step(model_output, sample, table, None, 700, *args)
    by_tensor = ops.ddim_step(model_output, sample, table, torch.tensor(700, device=DEVICE), 0, *args)
    assert torch.equal(by_int[0], by_tensor[0]) and torch.equal(by_int[1], by_tensor[1])
    for bad in (1000, -1):
        prev, x0 = ops.ddim_step(model_output, sample, table, torch.tensor(bad, device=DEVICE), 0, *args)
        assert prev.isnan().all() and x0.isnan().all()


def test_threshold_scale_is_applied_per_sample(nan_poisoned_empty):
    generator = torch.Generator().manual_seed(3)
    model_output = (torch.randn(3, 2, 4, 4, generator=generator) * 3).to(DEVICE)
    sample = (torch.randn(3, 2, 4, 4, generator=generator) * 3).to(DEVICE)
    scale = torch.tensor([1.0, 1.7, 2.5], device=DEVICE)
    (prev, x0), (prev_ref, x0_ref) = _run_both(model_output, sample, _table(0.0), 300, threshold_scale=scale)
    assert torch.equal(prev, prev_ref) and torch.equal(x0, x0_ref)
    assert x0.abs().max() <= 1.0


def test_inputs_are_not_modified():
    model_output = torch.randn(2, 3, 4, 4).to(DEVICE)
    sample = torch.randn(2, 3, 4, 4).to(DEVICE)
    noise = torch.randn(2, 3, 4, 4).to(DEVICE)
    copies = [t.clone() for t in (model_output, sample, noise)]
    _run_both(model_output, sample, _table(1.0), 500, noise=noise)
    for original, copy in zip((model_output, sample, noise), copies, strict=True):
        assert torch.equal(original, copy)


def test_coefficient_table_matches_diffusers_scalars():
    """Every table entry equals the 0-dim tensor diffusers computes for that timestep (bitwise)."""
    scheduler = DiffusersDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(7)
    eta = 0.7
    table = reference.build_coefficient_table(scheduler.alphas_cumprod, scheduler.final_alpha_cumprod, 7, eta)
    stride = 1000 // 7
    for t in range(0, 1000, 37):
        prev = t - stride
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        std_dev_t = eta * scheduler._get_variance(t, prev) ** 0.5
        expected = [
            alpha_prod_t**0.5,
            (1 - alpha_prod_t) ** 0.5,
            alpha_prod_prev**0.5,
            std_dev_t,
            (1 - alpha_prod_prev - std_dev_t**2) ** 0.5,
        ]
        for column, value in enumerate(expected):
            assert torch.equal(table[t, column], value), (t, column)


@pytest.mark.parametrize(
    ("model_output_layout", "sample_layout", "flat"),
    [
        ("contiguous", "contiguous", True),
        ("channels_last", "channels_last", True),
        ("contiguous", "channels_last", False),
        ("sliced", "sliced", False),
    ],
)
def test_launch_plans_are_cached_per_signature(model_output_layout, sample_layout, flat, monkeypatch):
    """One plan per (shape, strides, flags); the slim flat kernel only when every tensor shares one dense layout.

    The second call hits the cached plan with new data and must still match the reference exactly.
    """
    monkeypatch.setattr(ops, "STEP_PLANS", BoundedCache(256))
    generator = torch.Generator().manual_seed(4)
    table = _table(0.0)
    flags = (None, None, None, False, 0, True, 1.0, False, torch.float32)
    for call in range(2):
        model_output = LAYOUTS[model_output_layout](torch.randn(2, 4, 5, 6, generator=generator).to(DEVICE))
        sample = LAYOUTS[sample_layout](torch.randn(2, 4, 5, 6, generator=generator).to(DEVICE))
        # The eager launcher, as the scheduler calls it (traced launches plan anew every time).
        prev, x0 = ops.launch_ddim_step(model_output, sample, table, None, 600 + call, *flags, traceable=False)
        prev_ref, x0_ref = ddim_step_ref(
            model_output, sample, table[600 + call], prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0
        )
        assert torch.equal(prev, prev_ref) and torch.equal(x0, x0_ref)
    (plan,) = ops.STEP_PLANS.values()
    assert (plan.kernel is ops.ddim_step_flat_kernel) == flat


@pytest.mark.parametrize("prediction_type", reference.PREDICTION_TYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_per_sample_timesteps_kernel_matches_twin_rows(prediction_type, layout, nan_poisoned_empty):
    """TIMESTEP_PER_SAMPLE: each element reads its batch entry's row; the twin takes the [B, 8] rows."""
    table = _table(0.6)
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(3, 4, 5, 6, generator=generator).to(DEVICE)
    model_output = torch.randn(3, 4, 5, 6, generator=generator).to(DEVICE)
    noise = torch.randn(3, 4, 5, 6, generator=generator).to(DEVICE)
    if layout == "strided":
        sample = sample.transpose(1, 3)
        model_output = model_output.transpose(1, 3).contiguous()
        noise = noise.transpose(1, 3)
    timesteps = torch.tensor([981, 0, 500], device=DEVICE)
    index = reference.PREDICTION_TYPES.index(prediction_type)
    prev, x0 = ops.launch_ddim_step(
        model_output, sample, table, timesteps, 0, noise, None, None, True, index, True, 1.0, True, torch.float32
    )
    expected = ddim_step_ref(
        model_output,
        sample,
        table[timesteps],
        prediction_type=prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
        use_clipped_model_output=True,
        noise=noise,
    )
    assert torch.equal(prev, expected[0]) and torch.equal(x0, expected[1])


@pytest.mark.parametrize("prediction_type", reference.PREDICTION_TYPES)
@pytest.mark.parametrize("clip_sample, use_clipped", [(False, False), (True, False), (True, True)])
def test_backward_launcher_matches_twin_autograd(prediction_type, clip_sample, use_clipped):
    """The fused backward (``fastddim.autograd``) on strided inputs against autograd through the twin."""
    from fastddim.autograd import launch_ddim_step_backward

    table = _table(0.0)
    generator = torch.Generator().manual_seed(6)
    sample, model_output, grad_prev = (
        (torch.randn(2, 5, 3, 4, generator=generator) * 1.5).to(DEVICE).transpose(1, 2) for _ in range(3)
    )
    timesteps = torch.tensor([901, 41], device=DEVICE)
    index = reference.PREDICTION_TYPES.index(prediction_type)
    ours = launch_ddim_step_backward(
        grad_prev, None, model_output, sample, table, timesteps, 0, None, index, clip_sample, 1.0, use_clipped, False
    )
    leaves = [t.detach().clone().requires_grad_() for t in (model_output, sample)]
    prev, _ = ddim_step_ref(
        *leaves,
        table[timesteps],
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=1.0,
        use_clipped_model_output=use_clipped,
    )
    expected = torch.autograd.grad(prev, leaves, grad_prev)
    for a, e in zip(ours, expected, strict=True):
        assert torch.equal(a, e)
