"""fastddim's Stable Diffusion pipelines on CUDA: the captured loop against the eager loop and diffusers, graph reuse
across prompts, guidance values and seeds, sync-free replays, memory stability and the capture fallback.

Every test compares runs on the same GPU. fp32 runs with TF32 off, where graph and eager run the same kernels
(1e-5); fp16 allows 2e-3 on [0, 1] images (a few fp16 ulps: cuDNN may pick other algorithms at capture).
"""

import gc
import warnings

import diffusers
import numpy as np
import pytest
import torch

import fastddim
from tests.helpers import host_syncs_forbidden

# The pipelines' text encoders and tokenizers come from transformers (not a fastddim dependency).
pytest.importorskip("transformers")
from tests.sd_components import ddim_scheduler, sd_components, sdxl_components, sdxl_refiner_components  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_float32_math")]

STEPS = 10
PROMPT = "a photo of a cat"


def on_cuda(pipe, dtype=torch.float32):
    pipe.to("cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make(fast_class, components, dtype=torch.float32, unet=None):
    components = {**components, "scheduler": ddim_scheduler()}
    if unet is not None:
        components["unet"] = unet
    return on_cuda(fast_class(**components), dtype)


def generators(seeds, device="cpu"):
    if isinstance(seeds, int):
        return torch.Generator(device).manual_seed(seeds)
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def max_diff(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


def assert_one_graph_serves(pipe, calls: list[dict], kwargs: dict) -> None:
    """Each call (its ``seed`` and arguments, plus ``kwargs``) replays the first call's graph, matches the eager loop
    and differs from the first call's images (no stale per-call input)."""
    graphed = []
    for call in calls:
        call = dict(call)
        seed = call.pop("seed")
        images = pipe(generator=generators(seed), **call, **kwargs).images
        eager = pipe(generator=generators(seed), cuda_graph=False, **call, **kwargs).images
        assert max_diff(images, eager) <= 1e-5, call
        graphed.append(images)
    info = pipe.cuda_graph_cache_info()
    assert (info.hits, info.misses, info.currsize) == (len(calls) - 1, 1, 1), info
    for i in range(1, len(calls)):
        assert max_diff(graphed[i], graphed[0]) > 1e-4, f"call {i} replayed stale inputs"


# Built per test (tiny, fast): pipelines move their modules to CUDA and cast them in place.
@pytest.fixture
def sd(tmp_path):
    return sd_components(tmp_path)


@pytest.fixture
def sdxl(tmp_path):
    return sdxl_components(tmp_path)


@pytest.fixture
def refiner(tmp_path):
    return sdxl_refiner_components(tmp_path)


@pytest.mark.parametrize(
    ("dtype", "eta", "generator_device", "atol"),
    [
        (torch.float32, 0.0, "cpu", 1e-5),
        (torch.float32, 1.0, "cpu", 1e-5),
        (torch.float32, 1.0, "cuda", 1e-5),
        (torch.float16, 0.0, "cpu", 2e-3),
        (torch.float16, 1.0, "cpu", 2e-3),
    ],
    ids=["fp32-eta0", "fp32-eta1", "fp32-eta1-cuda-generator", "fp16-eta0", "fp16-eta1"],
)
def test_text2img_graph_matches_eager_and_diffusers(sd, dtype, eta, generator_device, atol):
    pipe = make(fastddim.StableDiffusionPipeline, sd, dtype)
    reference = on_cuda(diffusers.StableDiffusionPipeline(**{**sd, "scheduler": ddim_scheduler()}), dtype)
    kwargs = dict(prompt=[PROMPT, "a dog"], num_inference_steps=STEPS, eta=eta, output_type="pt")

    graphed = pipe(generator=generators((0, 1), generator_device), **kwargs).images
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize, info.fallbacks) == (1, 1, 0), info
    eager = pipe(generator=generators((0, 1), generator_device), cuda_graph=False, **kwargs).images
    theirs = reference(generator=generators((0, 1), generator_device), **kwargs).images
    assert graphed.dtype == eager.dtype and graphed.shape == (2, 3, 16, 16)
    assert max_diff(graphed, eager) <= atol, f"graph vs eager: {max_diff(graphed, eager):.3g}"
    if dtype == torch.float32:
        # The fused CUDA step may contract multiply-adds that diffusers rounds separately.
        assert max_diff(eager, theirs) <= 1e-4, f"eager vs diffusers: {max_diff(eager, theirs):.3g}"
    replayed = pipe(generator=generators((0, 1), generator_device), **kwargs).images
    assert pipe.cuda_graph_cache_info().hits == 1
    assert torch.equal(replayed, graphed), "a replay must reproduce the capturing call exactly"


@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_img2img_graph_matches_eager(sd, strength):
    pipe = make(fastddim.StableDiffusionImg2ImgPipeline, sd)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    kwargs = dict(prompt=PROMPT, image=image, strength=strength, eta=1.0, num_inference_steps=STEPS, output_type="pt")
    graphed = pipe(generator=generators(0), **kwargs).images
    eager = pipe(generator=generators(0), cuda_graph=False, **kwargs).images
    assert pipe.cuda_graph_cache_info()[:2] == (0, 1)
    assert max_diff(graphed, eager) <= 1e-5


def test_sdxl_graph_matches_eager_with_denoising_end(sdxl):
    pipe = make(fastddim.StableDiffusionXLPipeline, sdxl)
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, denoising_end=0.6, guidance_rescale=0.5, output_type="pt")
    for prompt in (PROMPT, "a dog"):
        graphed = pipe(generator=generators(0), **{**kwargs, "prompt": prompt}).images
        eager = pipe(generator=generators(0), cuda_graph=False, **{**kwargs, "prompt": prompt}).images
        assert max_diff(graphed, eager) <= 1e-5, prompt
    assert pipe.cuda_graph_cache_info()[:2] == (1, 1)


@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_sdxl_img2img_graph_matches_eager(refiner, strength):
    pipe = make(fastddim.StableDiffusionXLImg2ImgPipeline, refiner)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    kwargs = dict(
        prompt=PROMPT, image=image, strength=strength, eta=1.0, guidance_rescale=0.5, num_inference_steps=STEPS
    )
    graphed = pipe(generator=generators(0), output_type="pt", **kwargs).images
    eager = pipe(generator=generators(0), cuda_graph=False, output_type="pt", **kwargs).images
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize, info.fallbacks) == (1, 1, 0), info
    assert max_diff(graphed, eager) <= 1e-5


def test_sdxl_refiner_new_prompt_guidance_seed_and_aesthetic_score_reuse_the_graph(refiner):
    pipe = make(fastddim.StableDiffusionXLImg2ImgPipeline, refiner)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    kwargs = dict(image=image, strength=0.6, eta=1.0, num_inference_steps=STEPS, output_type="pt")
    calls = [
        dict(prompt=PROMPT, seed=0),
        dict(prompt="a red car", seed=0),
        dict(prompt=PROMPT, seed=1),
        dict(prompt=PROMPT, seed=0, guidance_scale=3.0),
        dict(prompt=PROMPT, seed=0, aesthetic_score=9.0, negative_aesthetic_score=1.0),
    ]
    assert_one_graph_serves(pipe, calls, kwargs)


def test_sdxl_base_to_refiner_hand_off_both_captured(sdxl, refiner):
    base = make(fastddim.StableDiffusionXLPipeline, sdxl)
    pipe = make(fastddim.StableDiffusionXLImg2ImgPipeline, refiner)
    common = dict(prompt=PROMPT, num_inference_steps=STEPS, eta=1.0)

    def hand_off(cuda_graph):
        latents = base(
            generator=generators(0), denoising_end=0.8, output_type="latent", cuda_graph=cuda_graph, **common
        )
        assert latents.images.is_cuda and latents.images.shape == (1, 4, 8, 8)
        refined = pipe(
            generator=generators(1),
            image=latents.images,
            denoising_start=0.8,
            output_type="pt",
            cuda_graph=cuda_graph,
            **common,
        )
        return latents.images, refined.images

    graphed_latents, graphed = hand_off(None)
    for stage in (base, pipe):
        info = stage.cuda_graph_cache_info()
        assert (info.misses, info.currsize, info.fallbacks) == (1, 1, 0), info
    eager_latents, eager = hand_off(False)
    assert max_diff(graphed_latents, eager_latents) <= 1e-5
    assert max_diff(graphed, eager) <= 1e-5
    assert pipe.num_timesteps == 2


def test_new_prompt_guidance_and_seed_reuse_the_graph(sd):
    pipe = make(fastddim.StableDiffusionPipeline, sd)
    kwargs = dict(num_inference_steps=STEPS, eta=1.0, output_type="pt")
    calls = [
        dict(prompt=PROMPT, seed=0, guidance_scale=7.5),
        dict(prompt="a red car", seed=0, guidance_scale=7.5),
        dict(prompt=PROMPT, seed=1, guidance_scale=7.5),
        dict(prompt=PROMPT, seed=0, guidance_scale=3.0),
        dict(prompt=PROMPT, seed=0, guidance_scale=7.5, negative_prompt="blurry"),
    ]
    assert_one_graph_serves(pipe, calls, kwargs)


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1-in-kernel-noise"])
def test_call_never_syncs_with_the_host(sd, eta):
    """With device prompt embeddings, no generator and latent output, a replaying call is free of host syncs from
    end to end (prompt encoding from text, CPU generators and decoding to NumPy copy to or from the host)."""
    pipe = make(fastddim.StableDiffusionPipeline, sd)
    prompt_embeds = torch.randn(2, 16, 32, device="cuda")
    kwargs = dict(
        prompt_embeds=prompt_embeds[:1],
        negative_prompt_embeds=prompt_embeds[1:],
        num_inference_steps=STEPS,
        eta=eta,
        output_type="latent",
    )
    pipe(**kwargs)  # captures
    torch.cuda.synchronize()
    with host_syncs_forbidden():
        latents = pipe(**kwargs).images
    assert pipe.cuda_graph_cache_info().hits == 1
    assert torch.isfinite(latents).all()


def test_no_memory_growth_over_many_calls(sd):
    pipe = make(fastddim.StableDiffusionPipeline, sd)
    for eta in (0.0, 1.0):
        kwargs = dict(num_inference_steps=STEPS, eta=eta, output_type="pt")
        for seed in range(2):
            pipe(PROMPT, generator=generators(seed), **kwargs)
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        for seed in range(50):
            images = pipe(PROMPT if seed % 2 else "a dog", generator=generators(seed), **kwargs).images
            del images
        torch.cuda.synchronize()
        gc.collect()
        after = torch.cuda.memory_allocated()
        assert after == before, f"eta={eta}: allocated {after - before} more bytes after 50 calls"
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize) == (2, 2)


class SyncingUNet(diffusers.UNet2DConditionModel):
    """Reads a value back to the host in every forward: fine eagerly, impossible to capture."""

    def forward(self, sample, timestep, *args, **kwargs):
        if not np.isfinite(sample.float().abs().sum().item()):
            raise FloatingPointError("non-finite sample")
        return super().forward(sample, timestep, *args, **kwargs)


def test_capture_failure_falls_back_with_one_warning(sd):
    syncing = SyncingUNet.from_config(sd["unet"].config)
    syncing.load_state_dict(sd["unet"].state_dict())
    pipe = make(fastddim.StableDiffusionPipeline, sd, unet=syncing.eval())
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, eta=1.0, output_type="pt")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fallback = pipe(generator=generators(0), **kwargs).images
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "capture" in messages[0], messages
    eager = pipe(generator=generators(0), cuda_graph=False, **kwargs).images
    assert max_diff(fallback, eager) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(generator=generators(0), **kwargs)
    info = pipe.cuda_graph_cache_info()
    assert (info.fallbacks, info.currsize) == (2, 0)

    # CUDA (streams, allocator, RNG) stays usable: a capturable UNet still captures and matches.
    healthy = make(fastddim.StableDiffusionPipeline, sd)
    torch.manual_seed(0)
    graphed = healthy(**kwargs).images
    torch.manual_seed(0)
    reference = healthy(cuda_graph=False, **kwargs).images
    assert healthy.cuda_graph_cache_info().misses == 1
    assert max_diff(graphed, reference) <= 1e-5
