"""CUDA-only checks of the fused step: parity on the GPU, CUDA-graph capture, no host sync, torch.compile.

Skipped cleanly without CUDA (the `gpu` marker). Tolerances as in test_scheduler.py: fp32 bit-identical to diffusers
running on the same GPU; fp16/bf16 within twice diffusers' own error against a float64 run, plus one rounding.
"""

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler

from fastddim import DDIMScheduler
from tests.helpers import host_syncs_forbidden
from tests.test_scheduler import assert_matches_diffusers, dummy_model

pytestmark = pytest.mark.gpu

CONFIGS = {
    "default": {},
    "sd": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ),
    "v-zero-snr-trailing": dict(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False
    ),
    "sample-linspace": dict(prediction_type="sample", timestep_spacing="linspace"),
    "thresholding": dict(thresholding=True, clip_sample=False, sample_max_value=2.0),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 3, 33, 17)], ids=["sd-latent", "odd"])
def test_cuda_parity(config_name, dtype, eta, shape):
    config = CONFIGS[config_name]
    reference, scheduler = DiffusersDDIMScheduler(**config), DDIMScheduler(**config)
    reference.set_timesteps(10, device="cuda")
    scheduler.set_timesteps(10, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    sample64 = torch.randn(shape, generator=generator, device="cuda", dtype=torch.float64) * 1.5
    for t in scheduler.timesteps:
        noise64 = torch.randn(shape, generator=generator, device="cuda", dtype=torch.float64)
        sample = sample64.to(dtype)
        kwargs = dict(eta=eta, use_clipped_model_output=True)
        ours = scheduler.step(dummy_model(sample, t), t, sample, variance_noise=noise64.to(dtype), **kwargs)
        theirs = reference.step(dummy_model(sample, t), t, sample, variance_noise=noise64.to(dtype), **kwargs)
        theirs64 = reference.step(dummy_model(sample64, t), t, sample64, variance_noise=noise64, **kwargs)
        assert_matches_diffusers(ours.pred_original_sample, theirs.pred_original_sample, theirs64.pred_original_sample)
        assert_matches_diffusers(ours.prev_sample, theirs.prev_sample, theirs64.prev_sample)
        sample64 = theirs64.prev_sample


def _captured_loop(scheduler: DDIMScheduler, static_sample: torch.Tensor, timesteps: torch.Tensor, eta: float):
    def loop() -> torch.Tensor:
        x = static_sample
        for i in range(len(timesteps)):
            x = scheduler.step(dummy_model_graphable(x, timesteps[i]), timesteps[i], x, eta=eta).prev_sample
        return x

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop()  # warm-up: Triton JIT and the device coefficient table, before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # The warm-up's stream: the thresholding kernels' per-stream scratch buffers then exist before capture.
    with torch.cuda.graph(graph, stream=stream):
        static_out = loop()
    return graph, static_out, loop


def dummy_model_graphable(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dummy_model with a device timestep: no Python float from a tensor inside the captured region."""
    tf = t.to(torch.float32)
    return torch.sin(3.0 * sample.float() + tf / 97.0).to(sample.dtype) * (0.5 + tf / 2000.0)


@pytest.mark.parametrize("config_name", ["default", "thresholding", "v-zero-snr-trailing"])
def test_captured_loop_replays_like_eager(config_name):
    scheduler = DDIMScheduler(**CONFIGS[config_name])
    scheduler.set_timesteps(10, device="cuda")
    static_sample = torch.empty(2, 4, 32, 32, device="cuda")
    static_sample.copy_(torch.randn_like(static_sample))
    graph, static_out, loop = _captured_loop(scheduler, static_sample, scheduler.timesteps, eta=0.0)
    for seed in (1, 2):
        static_sample.copy_(
            torch.randn(static_sample.shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")
        )
        graph.replay()
        assert torch.equal(static_out, loop())


def test_captured_in_kernel_noise_is_fresh_per_replay_and_reproducible():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(5, device="cuda")
    static_sample = torch.zeros(1, 4, 16, 16, device="cuda")
    graph, static_out, _ = _captured_loop(scheduler, static_sample, scheduler.timesteps, eta=1.0)
    torch.manual_seed(7)
    graph.replay()
    first = static_out.clone()
    graph.replay()
    second = static_out.clone()
    torch.manual_seed(7)
    graph.replay()
    assert not torch.equal(first, second)
    assert torch.equal(first, static_out)


@pytest.mark.parametrize("config_name", ["default", "sd", "thresholding"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_never_synchronizes(config_name, eta):
    scheduler = DDIMScheduler(**CONFIGS[config_name])
    scheduler.set_timesteps(10, device="cuda")
    sample = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    scheduler.step(sample, scheduler.timesteps[0], sample, eta=eta)  # warm-up: JIT and tables
    torch.cuda.synchronize()
    with host_syncs_forbidden():
        for t in scheduler.timesteps:
            sample = scheduler.step(sample * 0.5, t, sample, eta=eta).prev_sample
    assert torch.isfinite(sample).all()


def test_torch_compile_fullgraph_loop():
    import torch._dynamo

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10, device="cuda")
    timesteps = scheduler.timesteps

    def loop(x: torch.Tensor) -> torch.Tensor:
        for i in range(timesteps.shape[0]):
            x = scheduler.step(x * 0.5, timesteps[i], x, return_dict=False)[0]
        return x

    x = torch.randn(1, 4, 64, 64, device="cuda")
    eager = loop(x)
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(x)
        second = compiled(x + 1)
    # Inductor launches the user kernel with its own compile options, which may contract mul+add into FMA:
    # allow a few fp32 ulps instead of bitwise equality.
    torch.testing.assert_close(first, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second, loop(x + 1), rtol=1e-6, atol=1e-6)


def test_out_of_range_device_timestep_gives_nan_not_a_crash():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10, device="cuda")
    sample = torch.randn(1, 4, 8, 8, device="cuda")
    out = scheduler.step(sample, torch.tensor(5000, device="cuda"), sample)
    assert out.prev_sample.isnan().all()


@pytest.mark.parametrize("numel_log2", [31])
def test_int64_offsets_past_2_31_elements(numel_log2):
    """A tensor with more than 2^31 elements (fp16: 4 GiB each): offsets must not wrap."""
    numel = 2**numel_log2 + 1024
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * numel * 2:
        pytest.skip("not enough GPU memory for a 2^31-element test")
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10, device="cuda")
    sample = torch.full((2, numel // 2), 0.5, device="cuda", dtype=torch.float16)
    sample[-1, -16:] = 0.25
    out = scheduler.step(sample, 1, sample, return_dict=False)[0]
    expected = scheduler.step(sample[:, -32:].contiguous(), 1, sample[:, -32:].contiguous(), return_dict=False)[0]
    assert torch.equal(out[:, -32:], expected)
    del out, sample


def test_launch_hooks_see_every_eager_launch():
    """Direct launches leave Triton's launch hooks out only while none is registered: a profiler's hook (here a
    counter) sees every launch, the first through Triton's dispatch and the later ones straight to the kernel."""
    import triton

    runtime_knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime_knobs is None:
        pytest.skip("this Triton has no knobs.runtime launch hooks")
    enter_hook = runtime_knobs.launch_enter_hook
    scheduler = DDIMScheduler(**CONFIGS["thresholding"])
    scheduler.set_timesteps(10, device="cuda")
    sample = torch.randn(2, 3, 16, 16, device="cuda")
    expected = scheduler.step(sample * 0.5, scheduler.timesteps[0], sample).prev_sample
    launched = []
    enter_hook.add(launched.append)
    try:
        for _ in range(3):
            with_hook = scheduler.step(sample * 0.5, scheduler.timesteps[0], sample).prev_sample
    finally:
        enter_hook.remove(launched.append)
    assert len(launched) == 3 * 2, "two launches per thresholded step"
    assert torch.equal(with_hook, expected)
    assert torch.equal(scheduler.step(sample * 0.5, scheduler.timesteps[0], sample).prev_sample, expected)


def test_step_on_a_device_that_is_not_current():
    """Launches go to the samples' device whatever device is current, and leave the current device as it was."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    results = []
    for device in ("cuda:0", "cuda:1"):
        scheduler = DDIMScheduler(**CONFIGS["thresholding"])
        scheduler.set_timesteps(10, device=device)
        sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.cuda.device(0):
            for _ in range(2):  # dispatched, then direct
                prev_sample = scheduler.step(sample * 0.5, scheduler.timesteps[0], sample).prev_sample
            assert torch.cuda.current_device() == 0
        results.append(prev_sample.cpu())
    assert torch.equal(results[0], results[1])
