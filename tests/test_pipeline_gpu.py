"""fastddim.DDIMPipeline on CUDA: the captured loop against the eager loop and diffusers' DDIMPipeline, the three noise
modes, the graph cache (LRU, invalidation), memory stability, sync-free replays and the capture fallback.

Every test here is self-checking: it compares the captured loop with an eager run or a reference on the same GPU.
"""

import gc
import warnings

import diffusers
import numpy as np
import pytest
import torch

import fastddim
from tests.helpers import host_syncs_forbidden, make_unet

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_float32_math")]

STEPS = 10


def make_cuda_unet(unet_class=diffusers.UNet2DModel, dtype=torch.float32):
    return make_unet(unet_class).to("cuda", dtype)


@pytest.fixture(scope="module")
def unet():
    return make_cuda_unet()


def make_pipe(unet, scheduler=None) -> fastddim.DDIMPipeline:
    pipe = fastddim.DDIMPipeline(unet=unet, scheduler=scheduler or fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds, device="cpu"):
    if isinstance(seeds, int):
        return torch.Generator(device).manual_seed(seeds)
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    ("eta", "generator_device", "clipped", "dtype", "atol"),
    [
        (0.0, "cpu", None, torch.float32, 1e-5),
        (0.0, "cpu", True, torch.float32, 1e-5),
        (1.0, "cpu", None, torch.float32, 1e-5),
        (1.0, "cpu", True, torch.float32, 1e-5),
        (0.7, "cuda", None, torch.float32, 1e-5),
        (0.0, "cpu", None, torch.float16, 1e-3),
        (1.0, "cpu", None, torch.bfloat16, 1e-2),
    ],
    ids=[
        "eta0",
        "eta0-clipped",
        "eta1-exact",
        "eta1-exact-clipped",
        "eta0.7-cuda-generator",
        "eta0-fp16",
        "eta1-bf16",
    ],
)
def test_graph_matches_eager(eta, generator_device, clipped, dtype, atol):
    pipe = make_pipe(make_cuda_unet(dtype=dtype))
    kwargs = dict(batch_size=2, eta=eta, num_inference_steps=STEPS, use_clipped_model_output=clipped, output_type="pt")

    graphed = pipe(generator=generators((0, 1), generator_device), **kwargs).images
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize, info.fallbacks) == (1, 1, 0), info
    eager = pipe(generator=generators((0, 1), generator_device), cuda_graph=False, **kwargs).images
    assert graphed.device.type == "cuda" and graphed.dtype == dtype
    assert max_diff(graphed, eager) <= atol, f"graph vs eager: {max_diff(graphed, eager):.3g}"

    replayed = pipe(generator=generators((0, 1), generator_device), **kwargs).images
    assert pipe.cuda_graph_cache_info().hits == 1
    assert torch.equal(replayed, graphed), "a replay must reproduce the capturing call exactly"


@pytest.mark.parametrize("sample_size", [8, 64], ids=["one-program-rows", "cooperative-rows"])
def test_thresholded_loop_is_captured_and_matches_eager(sample_size):
    """Dynamic thresholding inside the captured loop: its quantile kernel splits a large row over cooperating programs
    (a cooperative launch), which the graph must hold like any other launch, with no fallback to eager."""
    unet = make_unet(sample_size=sample_size).to("cuda")
    pipe = make_pipe(unet, fastddim.DDIMScheduler(thresholding=True, clip_sample=False))
    kwargs = dict(batch_size=2, num_inference_steps=STEPS, output_type="pt")
    graphed = pipe(generator=generators((0, 1)), **kwargs).images
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize, info.fallbacks) == (1, 1, 0), info
    eager = pipe(generator=generators((0, 1)), cuda_graph=False, **kwargs).images
    assert max_diff(graphed, eager) <= 1e-5, f"graph vs eager: {max_diff(graphed, eager):.3g}"
    assert torch.equal(pipe(generator=generators((0, 1)), **kwargs).images, graphed)


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1-exact"])
@pytest.mark.parametrize("seeds", [0, (0, 1, 2)], ids=["one-generator", "generator-list"])
def test_graph_matches_diffusers_pipeline(unet, eta, seeds):
    scheduler = fastddim.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    pipe = make_pipe(unet, scheduler)
    reference = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    # diffusers' constructor already rebuilds a stock scheduler; done explicitly so the comparison is visible.
    reference.scheduler = diffusers.DDIMScheduler.from_config(scheduler.config)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=3, eta=eta, num_inference_steps=STEPS, output_type="np")

    ours = pipe(generator=generators(seeds), **kwargs).images
    assert pipe.cuda_graph_cache_info().misses == 1, "the graph path was not taken"
    theirs = reference(generator=generators(seeds), **kwargs).images
    assert ours.shape == theirs.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_same_seed_same_images_different_seed_different_images(unet):
    pipe = make_pipe(unet)
    for eta in (0.0, 1.0):
        kwargs = dict(batch_size=2, eta=eta, num_inference_steps=STEPS, output_type="pt")
        first = pipe(generator=generators(1), **kwargs).images
        kept = first.clone()
        other = pipe(generator=generators(2), **kwargs).images
        again = pipe(generator=generators(1), **kwargs).images
        assert torch.equal(first, kept), "a later replay overwrote an earlier result"
        assert torch.equal(first, again)
        assert max_diff(first, other) > 1e-3
    assert pipe.cuda_graph_cache_info().misses == 2


def test_fast_mode_draws_fresh_noise_per_replay_and_follows_manual_seed(unet):
    pipe = make_pipe(unet)
    kwargs = dict(batch_size=2, eta=1.0, num_inference_steps=STEPS, output_type="pt")

    torch.manual_seed(0)
    first = pipe(**kwargs).images  # captures
    second = pipe(**kwargs).images  # replays
    torch.manual_seed(0)
    again = pipe(**kwargs).images
    assert pipe.cuda_graph_cache_info()[:2] == (2, 1)
    assert max_diff(first, second) > 1e-3
    assert torch.equal(first, again), "torch.manual_seed must make the captured loop reproducible"

    # If the step seeds were baked into the graph at capture (seed 0), a replay under seed 1 would not match eager.
    for seed in (0, 1):
        torch.manual_seed(seed)
        replayed = pipe(**kwargs).images
        torch.manual_seed(seed)
        eager = pipe(cuda_graph=False, **kwargs).images
        assert max_diff(replayed, eager) <= 1e-5, f"seed {seed}: graph vs eager {max_diff(replayed, eager):.3g}"


def test_graph_cache_is_a_bounded_lru(unet):
    pipe = make_pipe(unet)
    pipe.set_cuda_graph_cache_size(2)
    results = {}
    for steps in (3, 4, 5):
        results[steps] = pipe(generator=generators(0), num_inference_steps=steps, output_type="pt").images
    assert pipe.cuda_graph_cache_info()[1:4] == (3, 2, 2)
    assert torch.equal(pipe(generator=generators(0), num_inference_steps=5, output_type="pt").images, results[5])
    assert pipe.cuda_graph_cache_info().hits == 1
    # 3 steps was evicted: captured again, same images.
    assert torch.equal(pipe(generator=generators(0), num_inference_steps=3, output_type="pt").images, results[3])
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize) == (4, 2)
    pipe.clear_cuda_graph_cache()
    assert pipe.cuda_graph_cache_info().currsize == 0


def test_weight_config_and_dtype_changes_invalidate():
    unet = make_cuda_unet()
    pipe = make_pipe(unet)
    kwargs = dict(batch_size=2, num_inference_steps=STEPS, output_type="pt")

    def check_against_eager(expected_misses):
        graphed = pipe(generator=generators(0), **kwargs).images
        eager = pipe(generator=generators(0), cuda_graph=False, **kwargs).images
        assert pipe.cuda_graph_cache_info().misses == expected_misses
        tolerance = 1e-5 if graphed.dtype == torch.float32 else 1e-3
        assert max_diff(graphed, eager) <= tolerance, f"stale graph? graph vs eager {max_diff(graphed, eager):.3g}"
        return graphed

    before = check_against_eager(1)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(1e-3)
    after = check_against_eager(2)
    assert max_diff(before, after) > 1e-4
    assert pipe.cuda_graph_cache_info().currsize == 1, "the graph of the old weights must be dropped"

    pipe.scheduler.register_to_config(clip_sample=False)
    check_against_eager(3)
    pipe.scheduler = fastddim.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    check_against_eager(4)
    pipe.unet.to(torch.float16)
    assert check_against_eager(5).dtype == torch.float16


def test_no_memory_growth_over_many_calls(unet):
    pipe = make_pipe(unet)
    for eta in (0.0, 1.0):
        kwargs = dict(batch_size=4, eta=eta, num_inference_steps=STEPS, output_type="pt")
        for seed in range(2):
            pipe(generator=generators(seed), **kwargs)
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        for seed in range(50):
            images = pipe(generator=generators(seed), **kwargs).images
            del images
        torch.cuda.synchronize()
        gc.collect()
        after = torch.cuda.memory_allocated()
        assert after == before, f"eta={eta}: allocated {after - before} more bytes after 50 calls"
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize) == (2, 2)


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1-philox"])
def test_replay_never_syncs_with_the_host(unet, eta):
    pipe = make_pipe(unet)
    kwargs = dict(batch_size=2, eta=eta, num_inference_steps=STEPS, output_type="pt")
    pipe(**kwargs)  # captures
    torch.cuda.synchronize()
    with host_syncs_forbidden():
        images = pipe(**kwargs).images
    assert pipe.cuda_graph_cache_info().hits == 1
    assert torch.isfinite(images).all()


def test_replay_with_cpu_generator_noises_never_syncs(unet):
    # The step noises of a CPU generator reach the static buffer through pinned memory; a pageable copy would wait
    # for the stream (and make back-to-back calls wait on each other).
    pipe = make_pipe(unet)
    latents = torch.randn((2, 3, 8, 8), generator=generators(7)).cuda()
    kwargs = dict(latents=latents, batch_size=2, eta=1.0, num_inference_steps=STEPS, output_type="pt")
    pipe(generator=generators(0), **kwargs)  # captures
    torch.cuda.synchronize()
    with host_syncs_forbidden():
        images = pipe(generator=generators(1), **kwargs).images
    eager = pipe(generator=generators(1), cuda_graph=False, **kwargs).images
    assert pipe.cuda_graph_cache_info().hits == 1
    assert max_diff(images, eager) <= 1e-5


def keep_busy(stream: torch.cuda.Stream) -> None:
    """Queues tens of milliseconds of matmuls on ``stream``, so that what is queued after them is still pending."""
    with torch.cuda.stream(stream):
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            busy = busy @ busy


def device_latents(seed: int) -> torch.Tensor:
    # Made on the device beforehand: a call from device latents, without a generator, queues its work and returns.
    return torch.randn((2, 3, 8, 8), generator=generators(seed)).cuda()


def test_replays_on_two_streams_are_ordered(unet):
    pipe = make_pipe(unet)
    kwargs = dict(batch_size=2, num_inference_steps=STEPS, output_type="pt")
    latents = [device_latents(1), device_latents(2)]
    expected = [pipe(latents=x, cuda_graph=False, **kwargs).images for x in latents]
    pipe(latents=latents[0], **kwargs)  # captures
    torch.cuda.synchronize()
    first_stream, second_stream = torch.cuda.Stream(), torch.cuda.Stream()
    keep_busy(first_stream)
    with torch.cuda.stream(first_stream):
        first = pipe(latents=latents[0], **kwargs).images
    # Without ordering, this call's copy into the static sample would land before the first replay has read it.
    with torch.cuda.stream(second_stream):
        second = pipe(latents=latents[1], **kwargs).images
    torch.cuda.synchronize()
    assert pipe.cuda_graph_cache_info().hits == 2
    assert max_diff(expected[0], expected[1]) > 1e-2
    assert max_diff(first, expected[0]) <= 1e-5 and max_diff(second, expected[1]) <= 1e-5


def test_a_dropped_loop_keeps_its_buffers_until_a_user_streams_replay_is_done(unet):
    pipe = make_pipe(unet)
    kwargs = dict(batch_size=2, num_inference_steps=STEPS, output_type="pt")
    pipe(latents=device_latents(1), **kwargs)  # captured on the default stream
    static = list(next(iter(pipe._captured_loops()._loops.values())).buffers.inputs.values())
    shapes = [(t.shape, t.dtype) for t in static]
    pointers = {t.data_ptr() for t in static}
    del static
    torch.cuda.synchronize()
    user_stream = torch.cuda.Stream()
    keep_busy(user_stream)
    with torch.cuda.stream(user_stream):
        pipe(latents=device_latents(2), **kwargs)
    pipe.clear_cuda_graph_cache()
    gc.collect()
    # Allocated on the buffers' own stream while the replay is still queued: the allocator must not hand them out.
    fresh = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in shapes]
    assert not pointers & {t.data_ptr() for t in fresh}
    torch.cuda.synchronize()


def test_output_types_through_the_graph(unet):
    pipe = make_pipe(unet)
    as_pil = pipe(batch_size=2, generator=generators(0), num_inference_steps=STEPS).images
    as_np = pipe(batch_size=2, generator=generators(0), num_inference_steps=STEPS, output_type="np").images
    assert len(as_pil) == 2 and as_pil[0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(as_pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    assert pipe.cuda_graph_cache_info()[:2] == (1, 1)


def graph_pool_ids() -> set:
    """The private (graph) memory pools that still hold device memory once everything freeable is freed."""
    gc.collect()
    torch.cuda.empty_cache()
    return {tuple(segment["segment_pool_id"]) for segment in torch.cuda.memory_snapshot()} - {(0, 0)}


class SyncingUNet(diffusers.UNet2DModel):
    """A UNet that reads a value back to the host in every forward: fine eagerly, impossible to capture."""

    def forward(self, sample, timestep, *args, **kwargs):
        if not np.isfinite(sample.float().abs().sum().item()):
            raise FloatingPointError("non-finite sample")
        return super().forward(sample, timestep, *args, **kwargs)


@pytest.mark.parametrize("mode", ["eta0", "eta1-exact", "eta1-philox"])
def test_capture_failure_falls_back_to_eager_with_one_warning(unet, mode):
    syncing = make_cuda_unet(SyncingUNet)
    syncing.load_state_dict(unet.state_dict())
    pipe = make_pipe(syncing)
    eta = 0.0 if mode == "eta0" else 1.0

    def call(**extra):
        generator = None if mode == "eta1-philox" else generators((0, 1))
        if mode == "eta1-philox":
            torch.manual_seed(0)
        return pipe(batch_size=2, generator=generator, eta=eta, num_inference_steps=STEPS, output_type="pt", **extra)

    pools_before = graph_pool_ids()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fallback = call().images
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "capture" in messages[0], messages
    assert graph_pool_ids() <= pools_before, "the failed capture kept its private memory pool"
    eager = call(cuda_graph=False).images
    assert max_diff(fallback, eager) <= 1e-6

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = call().images  # same configuration: eager at once, no second warning
    assert max_diff(again, eager) <= 1e-6
    info = pipe.cuda_graph_cache_info()
    assert (info.fallbacks, info.currsize) == (2, 0)

    # The failed capture left CUDA (streams, allocator, RNG) usable: a capturable UNet still captures and matches.
    healthy = make_pipe(unet)
    kwargs = dict(batch_size=2, eta=eta, num_inference_steps=STEPS, output_type="pt")
    torch.manual_seed(0)
    graphed = healthy(generator=generators(3), **kwargs).images
    torch.manual_seed(0)
    reference = healthy(generator=generators(3), cuda_graph=False, **kwargs).images
    assert healthy.cuda_graph_cache_info()[1:] == (1, healthy.cuda_graph_cache_info().maxsize, 1, 0)
    assert max_diff(graphed, reference) <= 1e-5


def test_compiled_unet_inside_the_captured_loop(unet):
    """Inductor's UNet kernels (torch.compile, default mode) captured with the fused steps in one graph: the replay
    reproduces the same compiled loop run eagerly (same kernels, so 1e-5 covers only TF32-free fp32 noise)."""
    import torch._dynamo

    torch._dynamo.reset()
    pipe = make_pipe(torch.compile(make_cuda_unet()))
    kwargs = dict(batch_size=2, eta=0.0, num_inference_steps=STEPS, output_type="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an eager fallback warns
        graphed = pipe(generator=generators(0), **kwargs).images
        replayed = pipe(generator=generators(0), **kwargs).images
    eager = pipe(generator=generators(0), cuda_graph=False, **kwargs).images
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.hits, info.fallbacks) == (1, 1, 0), info
    assert torch.equal(replayed, graphed)
    assert max_diff(graphed, eager) <= 1e-5
