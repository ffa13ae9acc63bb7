"""``fastddim.StableDiffusionXLImg2ImgPipeline`` (SDXL image-to-image and SDXL's refiner) on the CPU in fp32: parity
with diffusers bit for bit (eager and through the CPU stand-in for capture), the base + refiner hand-off, strength
and denoising_start/denoising_end schedules, loaders, schedulers, the graph cache, and bad input.

The CUDA side is in ``test_sd_pipelines_gpu.py``.
"""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import fastddim

# The pipelines' text encoders and tokenizers come from transformers (not a fastddim dependency).
pytest.importorskip("transformers")
from tests.sd_components import ddim_scheduler, sdxl_refiner_components  # noqa: E402
from tests.sd_parity import PROMPT, call_both, generators, init_image, pair  # noqa: E402

SDXL = (fastddim.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline)
SDXL_IMG2IMG = (fastddim.StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline)
STEPS = 10


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return sdxl_refiner_components(tmp_path_factory.mktemp("sdxl-refiner"))


def base_latents(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=lambda e: f"eta{e}")
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=lambda g: f"guidance{g}")
def test_refiner_matches_diffusers_bit_for_bit(refiner, path, strength, eta, guidance_scale):
    ours, theirs = pair(*SDXL_IMG2IMG, refiner)
    kwargs = dict(strength=strength, eta=eta, guidance_scale=guidance_scale)
    mine, reference = call_both(
        ours, theirs, path, prompt=PROMPT, image=init_image(), num_inference_steps=STEPS, **kwargs
    )
    assert mine.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(mine, reference)


REFINER_CASES = {
    "guidance-rescale-negative-prompt": dict(guidance_rescale=0.7, negative_prompt="blurry, low quality", eta=1.0),
    "two-per-prompt-generator-list": dict(num_images_per_prompt=2, seeds=(1, 2), eta=1.0),
    "two-prompts-one-generator": dict(prompt=[PROMPT, "a dog"], eta=1.0),
    "aesthetic-scores": dict(aesthetic_score=8.0, negative_aesthetic_score=1.5),
    "size-conditioning": dict(
        original_size=(32, 32),
        target_size=(24, 24),
        crops_coords_top_left=(2, 3),
        negative_original_size=(8, 8),
        negative_crops_coords_top_left=(1, 1),
    ),
    "denoising-end": dict(strength=0.9, denoising_end=0.5, eta=1.0),
    "denoising-start-on-pixels": dict(denoising_start=0.6, eta=1.0),
    "given-latents": dict(latents=base_latents(5), eta=1.0),
    "strength1": dict(strength=1.0, eta=1.0),
}


@pytest.mark.parametrize("case", REFINER_CASES.values(), ids=REFINER_CASES.keys())
def test_refiner_arguments_match_diffusers(refiner, path, case):
    ours, theirs = pair(*SDXL_IMG2IMG, refiner)
    case = dict(case)
    prompt, seeds = case.pop("prompt", PROMPT), case.pop("seeds", 0)
    mine, reference = call_both(
        ours, theirs, path, seeds, prompt=prompt, image=init_image(), num_inference_steps=STEPS, **case
    )
    np.testing.assert_array_equal(mine, reference)
    for name in (
        "denoising_start",
        "denoising_end",
        "num_timesteps",
        "guidance_rescale",
        "do_classifier_free_guidance",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=lambda e: f"eta{e}")
def test_img2img_without_aesthetic_score_matches_diffusers(sdxl, path, eta):
    """SDXL's base components in the image-to-image pipeline: time ids of sizes, not aesthetic scores."""
    ours, theirs = pair(*SDXL_IMG2IMG, sdxl)
    assert not ours.config.requires_aesthetics_score
    kwargs = dict(strength=0.6, eta=eta, negative_prompt="blurry", num_inference_steps=STEPS)
    mine, reference = call_both(ours, theirs, path, prompt=PROMPT, image=init_image(), **kwargs)
    np.testing.assert_array_equal(mine, reference)


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=lambda e: f"eta{e}")
def test_base_to_refiner_hand_off_matches_diffusers(sdxl, refiner, path, eta):
    """The base stops at 80% of the schedule with latents, the refiner takes them from there: two loops, each
    captured on the graph path, equal to diffusers' base -> refiner chain."""
    base, base_reference = pair(*SDXL, sdxl)
    ours, theirs = pair(*SDXL_IMG2IMG, refiner)
    common = dict(prompt=PROMPT, num_inference_steps=STEPS, eta=eta)
    cuda_graph = path == "graph"
    latents = base(generator=generators(0), denoising_end=0.8, output_type="latent", cuda_graph=cuda_graph, **common)
    reference_latents = base_reference(generator=generators(0), denoising_end=0.8, output_type="latent", **common)
    assert torch.equal(latents.images, reference_latents.images)
    mine, reference = call_both(ours, theirs, path, seeds=1, image=latents.images, denoising_start=0.8, **common)
    np.testing.assert_array_equal(mine, reference)
    assert ours.num_timesteps == theirs.num_timesteps == 2
    if cuda_graph:
        assert base.cuda_graph_cache_info()[:2] == (0, 1) and ours.cuda_graph_cache_info()[:2] == (0, 1)


def test_too_small_strength_returns_the_image_unnoised(refiner, path):
    """strength * num_inference_steps < 1 leaves no step, where diffusers fails (add_noise on an empty batch): the
    image through the VAE, as diffusers' ``prepare_latents`` encodes it without noise."""
    ours, theirs = pair(*SDXL_IMG2IMG, refiner)
    kwargs = dict(prompt=PROMPT, image=init_image(), strength=0.05, num_inference_steps=STEPS, output_type="np")
    mine = ours(generator=generators(0), cuda_graph=path == "graph", **kwargs).images
    assert ours.num_timesteps == 0
    with torch.no_grad():
        pixels = theirs.image_processor.preprocess(init_image())
        latents = theirs.prepare_latents(
            pixels, torch.tensor([]), 1, 1, torch.float32, torch.device("cpu"), generators(0), add_noise=False
        )
        decoded = theirs.vae.decode(latents / theirs.vae.config.scaling_factor, return_dict=False)[0]
    np.testing.assert_array_equal(mine, theirs.image_processor.postprocess(decoded, output_type="np"))


@pytest.mark.parametrize("output_type", ["latent", "pt", "pil"])
@pytest.mark.parametrize("return_dict", [True, False], ids=["dict", "tuple"])
def test_outputs_match_diffusers(refiner, output_type, return_dict):
    ours, theirs = pair(*SDXL_IMG2IMG, refiner)
    kwargs = dict(image=init_image(), num_inference_steps=STEPS, output_type=output_type, return_dict=return_dict)
    mine = ours(PROMPT, generator=generators(0), **kwargs)
    reference = theirs(PROMPT, generator=generators(0), **kwargs)
    assert type(mine) is type(reference)
    mine, reference = (output[0] if isinstance(output, tuple) else output.images for output in (mine, reference))
    assert type(mine) is type(reference)
    if isinstance(reference, torch.Tensor):
        assert torch.equal(mine, reference)
    else:
        assert all(isinstance(image, PIL.Image.Image) for image in mine)
        np.testing.assert_array_equal(np.asarray(mine[0]), np.asarray(reference[0]))


# ---------------------------------------------------------------------------------------------- loaders, schedulers


@pytest.mark.parametrize("source", ["fastddim", "diffusers"])
def test_from_pipe_of_the_text_to_image_pipeline_shares_modules(sdxl, source):
    text2img = (fastddim if source == "fastddim" else diffusers).StableDiffusionXLPipeline(**sdxl)
    ours = fastddim.StableDiffusionXLImg2ImgPipeline.from_pipe(text2img)
    ours.set_progress_bar_config(disable=True)
    assert isinstance(ours, diffusers.StableDiffusionXLImg2ImgPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert getattr(ours, name) is getattr(text2img, name), f"{name} was copied"
    assert type(ours.scheduler) is fastddim.DDIMScheduler
    if source == "diffusers":
        assert type(text2img.scheduler) is diffusers.DDIMScheduler, "from_pipe changed the source pipeline"
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline(**{**sdxl, "scheduler": ddim_scheduler()})
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, image=init_image(), num_inference_steps=STEPS, eta=1.0, output_type="np")
    mine = ours(generator=generators(0), **kwargs).images
    np.testing.assert_array_equal(mine, theirs(generator=generators(0), **kwargs).images)


def test_from_pretrained_loads_a_refiner_folder(refiner, tmp_path):
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline(**refiner)
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(tmp_path)
    loaded = fastddim.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is fastddim.StableDiffusionXLImg2ImgPipeline
    assert type(loaded.scheduler) is fastddim.DDIMScheduler and loaded.config.requires_aesthetics_score
    assert loaded.text_encoder is None
    kwargs = dict(prompt=PROMPT, image=init_image(), num_inference_steps=STEPS, output_type="np")
    # Loaded weights sit in differently aligned memory, so CPU kernels may round differently.
    np.testing.assert_allclose(
        loaded(generator=generators(0), **kwargs).images,
        theirs(generator=generators(0), **kwargs).images,
        atol=1e-5,
        rtol=0,
    )


def test_euler_runs_the_parent_loop_unchanged(refiner, stand_in_graphs):
    scheduler = diffusers.EulerDiscreteScheduler.from_config(ddim_scheduler().config)
    ours = fastddim.StableDiffusionXLImg2ImgPipeline(**{**refiner, "scheduler": scheduler})
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline(
        **{**refiner, "scheduler": diffusers.EulerDiscreteScheduler.from_config(scheduler.config)}
    )
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert ours.scheduler is scheduler
    kwargs = dict(prompt=PROMPT, image=init_image(), num_inference_steps=STEPS, output_type="np")
    mine = ours(generator=generators(0), **kwargs).images
    np.testing.assert_array_equal(mine, theirs(generator=generators(0), **kwargs).images)
    assert stand_in_graphs == [] and ours.cuda_graph_cache_info().misses == 0


# ---------------------------------------------------------------------------------------------- graph path


def test_new_prompt_guidance_seed_and_aesthetic_score_replay_the_same_graph(refiner, stand_in_graphs):
    ours, theirs = pair(*SDXL_IMG2IMG, refiner)
    # (seed, arguments): each differs from the first in one per-call input of the captured loop.
    calls = [
        (0, dict(prompt=PROMPT)),
        (0, dict(prompt="a red car")),
        (5, dict(prompt=PROMPT)),
        (0, dict(prompt=PROMPT, guidance_scale=3.0)),
        (0, dict(prompt=PROMPT, aesthetic_score=9.0, negative_aesthetic_score=1.0)),
    ]
    common = dict(image=init_image(), num_inference_steps=STEPS, eta=1.0)
    results = []
    for seed, call in calls:
        mine, reference = call_both(ours, theirs, "graph", seed, **common, **call)
        np.testing.assert_array_equal(mine, reference, err_msg=str(call))
        results.append(mine)
    assert len(stand_in_graphs) == 1
    assert ours.cuda_graph_cache_info()[:2] == (len(calls) - 1, 1)
    for i in range(1, len(calls)):
        assert np.abs(results[i] - results[0]).max() > 1e-4, f"call {i} replayed stale inputs"


def test_step_callback_runs_diffusers_loop_with_the_captured_results(refiner, stand_in_graphs):
    ours, _ = pair(*SDXL_IMG2IMG, refiner)
    kwargs = dict(prompt=PROMPT, image=init_image(), num_inference_steps=STEPS, eta=1.0, output_type="np")
    captured = ours(generator=generators(0), **kwargs).images
    steps = []
    with_callback = ours(
        generator=generators(0), callback_on_step_end=lambda *a: steps.append(int(a[2])) or a[3], **kwargs
    ).images
    np.testing.assert_array_equal(with_callback, captured)
    assert len(steps) == ours.num_timesteps == 3
    assert ours.cuda_graph_cache_info()[:2] == (0, 1)


# ---------------------------------------------------------------------------------------------- bad input, inputs


BAD_ARGUMENTS = {
    "strength-negative": dict(strength=-0.1),
    "strength-above-1": dict(strength=1.5),
    "strength-nan": dict(strength=float("nan")),
    "strength-none": dict(strength=None),
    "denoising-start-0": dict(denoising_start=0.0),
    "denoising-start-1": dict(denoising_start=1.0),
    "denoising-start-int": dict(denoising_start=1),
    "denoising-start-negative": dict(denoising_start=-0.2),
    "denoising-start-after-end": dict(denoising_start=0.8, denoising_end=0.5),
    "eta-negative": dict(eta=-1.0),
    "guidance-rescale-nan": dict(guidance_rescale=float("nan")),
}


@pytest.mark.parametrize("bad", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_naming_them(refiner, path, bad):
    ours, _ = pair(*SDXL_IMG2IMG, refiner)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        ours(PROMPT, image=init_image(), num_inference_steps=STEPS, cuda_graph=path == "graph", **bad)
    assert ours.cuda_graph_cache_info().misses == 0


def test_latents_of_another_batch_raise_naming_latents(refiner):
    ours, _ = pair(*SDXL_IMG2IMG, refiner)
    with pytest.raises(ValueError, match="latents must have shape \\(2,"):
        ours(PROMPT, image=init_image(), latents=base_latents(), num_images_per_prompt=2, num_inference_steps=STEPS)


def test_inputs_are_left_untouched(refiner, path):
    ours, _ = pair(*SDXL_IMG2IMG, refiner)
    embeds, _, pooled, _ = ours.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)
    given = dict(image=init_image(), latent_image=base_latents(), embeds=embeds, pooled=pooled)
    copies = {name: tensor.clone() for name, tensor in given.items()}
    versions = {name: tensor._version for name, tensor in given.items()}
    common = dict(num_inference_steps=STEPS, eta=1.0, output_type="np", cuda_graph=path == "graph")
    embeddings = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0)
    ours(image=given["image"], generator=generators(0), **embeddings, **common)
    ours(image=given["latent_image"], denoising_start=0.8, generator=generators(0), **embeddings, **common)
    ours(PROMPT, image=init_image(), latents=given["latent_image"], generator=generators(0), **common)
    for name, tensor in given.items():
        assert torch.equal(tensor, copies[name]) and tensor._version == versions[name], f"{name} was modified"
