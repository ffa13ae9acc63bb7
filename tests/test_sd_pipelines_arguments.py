"""fastddim's Stable Diffusion pipelines against diffusers' argument by argument, on the CPU in fp32: prompt
embeddings, clip_skip, batching and generators, output types, guidance edge values, SDXL's size conditioning and
hand-off, the properties a call sets, inputs left untouched, scheduler swaps, and the valid inputs diffusers fails on.

As in ``test_sd_pipelines.py``, outputs must equal diffusers' bit for bit (same operations in the same order).
"""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import fastddim

# The pipelines' text encoders and tokenizers come from transformers (not a fastddim dependency).
transformers = pytest.importorskip("transformers")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents  # noqa: E402

from tests.sd_parity import PROMPT, STEPS, generators, init_image, pair  # noqa: E402

SD = (fastddim.StableDiffusionPipeline, diffusers.StableDiffusionPipeline)
IMG2IMG = (fastddim.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline)
SDXL = (fastddim.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline)

# What diffusers' pipelines expose about the call they ran (or run).
CALL_PROPERTIES = ("guidance_scale", "clip_skip", "do_classifier_free_guidance", "num_timesteps", "interrupt")


def assert_same_images(mine, reference) -> None:
    """Equal outputs of any ``output_type`` (tensors, arrays, lists of PIL images), including their type."""
    assert type(mine) is type(reference)
    if isinstance(reference, torch.Tensor):
        assert mine.dtype == reference.dtype and torch.equal(mine, reference)
    elif isinstance(reference, np.ndarray):
        np.testing.assert_array_equal(mine, reference)
    else:
        assert len(mine) == len(reference) and all(isinstance(image, PIL.Image.Image) for image in mine)
        for mine_image, reference_image in zip(mine, reference, strict=True):
            np.testing.assert_array_equal(np.asarray(mine_image), np.asarray(reference_image))


def run_both(ours, theirs, path, seeds=0, **kwargs):
    """Both pipelines' raw outputs (``return_dict`` as given) for the same arguments and seeds."""
    mine = ours(generator=generators(seeds), cuda_graph=path == "graph", **kwargs)
    reference = theirs(generator=generators(seeds), **kwargs)
    assert type(mine) is type(reference), "output container (return_dict)"
    if path == "graph":
        assert ours.cuda_graph_cache_info().misses >= 1, "the graph path was not taken"
    for name in CALL_PROPERTIES + ("guidance_rescale", "cross_attention_kwargs", "denoising_end"):
        if hasattr(type(theirs), name):
            assert getattr(ours, name) == getattr(theirs, name), name
    return mine, reference


def images(output):
    return output[0] if isinstance(output, tuple) else output.images


def prompt_embeddings(pipe, prompt):
    return pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]


# ---------------------------------------------------------------------------------------------- parity matrices


class Embeddings(str):
    """A case's stand-in for the prompt embeddings of this text, made by the pipeline's own text encoder."""


TEXT2IMG_CASES = {
    "prompt-embeds-only": dict(prompt=None, prompt_embeds=Embeddings(PROMPT), eta=1.0),
    "prompt-and-negative-embeds": dict(
        prompt=None, prompt_embeds=Embeddings(PROMPT), negative_prompt_embeds=Embeddings("blurry")
    ),
    "prompt-list-negative-list-two-per-prompt": dict(
        prompt=[PROMPT, "a dog"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2, seeds=(1, 2, 3, 4)
    ),
    "one-generator-two-per-prompt": dict(num_images_per_prompt=2, eta=1.0),
    "guidance1-with-rescale": dict(guidance_scale=1.0, guidance_rescale=0.7, eta=1.0),
    "guidance-below-1": dict(guidance_scale=0.5),
    "integer-guidance": dict(guidance_scale=7),
    "numpy-guidance": dict(guidance_scale=np.float64(7.5), eta=np.float32(0.5)),
    "tensor-guidance": dict(
        guidance_scale=torch.tensor(7.5), guidance_rescale=torch.tensor(0.5), eta=torch.tensor(0.5)
    ),
    "output-latent": dict(output_type="latent", eta=1.0),
    "output-pt-tuple": dict(output_type="pt", return_dict=False),
    "output-pil": dict(output_type="pil"),
    "non-square": dict(height=24, width=16),
}


IMG2IMG_CASES = {
    "strength1": dict(strength=1.0, eta=1.0),
    "guidance1": dict(guidance_scale=1.0, eta=1.0),
    "two-per-prompt-generator-list": dict(num_images_per_prompt=2, seeds=(1, 2), eta=1.0),
    "output-latent": dict(output_type="latent"),
    "output-pil-tuple": dict(output_type="pil", return_dict=False),
}


SDXL_CASES = {
    "size-conditioning": dict(
        original_size=(32, 32),
        target_size=(24, 24),
        crops_coords_top_left=(2, 3),
        negative_original_size=(8, 8),
        negative_target_size=(16, 16),
        negative_crops_coords_top_left=(1, 1),
    ),
    # Without negative_target_size diffusers ignores negative_original_size: the negative time ids are the positive.
    "negative-original-size-alone": dict(negative_original_size=(8, 8)),
    "second-prompts": dict(prompt_2="a dog", negative_prompt="blurry", negative_prompt_2="dark"),
    "guidance1-with-rescale": dict(guidance_scale=1.0, guidance_rescale=0.5, eta=1.0),
    "denoising-end-latent-hand-off": dict(denoising_end=0.6, output_type="latent", eta=1.0),
    # Only floats in (0, 1) cut the schedule.
    "integer-denoising-end": dict(denoising_end=1),
    "clip-skip": dict(clip_skip=1),
    "two-per-prompt-generator-list": dict(num_images_per_prompt=2, seeds=(1, 2), eta=1.0),
    "output-pt-tuple": dict(output_type="pt", return_dict=False),
}


# Each pipeline's call besides a case's arguments.
CALL_DEFAULTS = {
    SD: dict(num_inference_steps=STEPS),
    IMG2IMG: dict(image=init_image(), num_inference_steps=10),
    SDXL: dict(num_inference_steps=5),
}
ARGUMENT_CASES = [
    pytest.param(pipelines, case, id=f"{kind}-{name}")
    for pipelines, kind, cases in (
        (SD, "text2img", TEXT2IMG_CASES),
        (IMG2IMG, "img2img", IMG2IMG_CASES),
        (SDXL, "sdxl", SDXL_CASES),
    )
    for name, case in cases.items()
]


@pytest.mark.parametrize("pipelines, case", ARGUMENT_CASES)
def test_arguments_match_diffusers(sd, sdxl, path, pipelines, case):
    ours, theirs = pair(*pipelines, sdxl if pipelines is SDXL else sd)
    case = dict(case)
    seeds = case.pop("seeds", 0)
    for name, value in case.items():
        if isinstance(value, Embeddings):
            case[name] = prompt_embeddings(theirs, str(value))
    kwargs = dict(prompt=PROMPT, output_type="np") | CALL_DEFAULTS[pipelines] | case
    mine, reference = run_both(ours, theirs, path, seeds, **kwargs)
    assert_same_images(images(mine), images(reference))


def test_sdxl_prompt_embeds_only_match_diffusers(sdxl, path):
    ours, theirs = pair(*SDXL, sdxl)
    embeds = theirs.encode_prompt(PROMPT, negative_prompt="blurry")
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    kwargs = dict(zip(names, embeds, strict=True), num_inference_steps=5, output_type="np")
    mine, reference = run_both(ours, theirs, path, **kwargs)
    assert_same_images(images(mine), images(reference))


# Without a generator diffusers draws from torch's global RNG; on the CPU so does fastddim's loop. (On CUDA the
# captured loop draws eta's noise inside the fused kernel instead, a documented difference, so only eager here.)
@pytest.mark.parametrize(
    "pipelines, kwargs",
    [
        (SD, dict(num_inference_steps=STEPS)),
        (IMG2IMG, dict(image=init_image(), num_inference_steps=10)),
        (SDXL, dict(num_inference_steps=5)),
    ],
    ids=["text2img", "img2img", "sdxl"],
)
def test_eta_without_generator_follows_torch_manual_seed(sd, sdxl, pipelines, kwargs):
    components = sdxl if pipelines is SDXL else sd
    ours, theirs = pair(*pipelines, components)
    outputs = []
    for pipe, extra in ((ours, dict(cuda_graph=False)), (theirs, {})):
        torch.manual_seed(0)
        outputs.append(pipe(PROMPT, eta=1.0, output_type="np", **kwargs, **extra).images)
    np.testing.assert_array_equal(*outputs)


# ---------------------------------------------------------------------------------------------- where diffusers fails


def clip_skipped_embeddings(pipe, prompt: str, clip_skip: int) -> torch.Tensor:
    """diffusers' clip_skip recipe: the hidden state clip_skip layers before the last, through the final LayerNorm."""
    tokens = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    hidden = pipe.text_encoder(tokens.input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)


@pytest.mark.parametrize("clip_skip", [1, 2], ids=lambda c: f"clip-skip-{c}")
@pytest.mark.parametrize("pipelines", [SD, IMG2IMG], ids=["text2img", "img2img"])
def test_clip_skip_gives_diffusers_recipe(sd, path, pipelines, clip_skip):
    """transformers 5.24's CLIPTextModel has no ``text_model`` through which diffusers applies the final LayerNorm,
    so diffusers' own clip_skip fails there; fastddim's gives the embeddings that recipe means, with diffusers' plain
    negative embeddings. The reference is diffusers run on those embeddings."""
    ours, theirs = pair(*pipelines, sd)
    kwargs = dict(num_inference_steps=STEPS, output_type="np", eta=1.0)
    if pipelines is IMG2IMG:
        kwargs["image"] = init_image()
    mine = ours(PROMPT, clip_skip=clip_skip, generator=generators(0), cuda_graph=path == "graph", **kwargs)
    with torch.no_grad():
        embeds = clip_skipped_embeddings(theirs, PROMPT, clip_skip)
    reference = theirs(prompt_embeds=embeds, generator=generators(0), **kwargs)
    np.testing.assert_array_equal(mine.images, reference.images)
    assert ours.clip_skip == clip_skip


def test_clip_skip_warns_of_a_truncated_prompt_as_diffusers_does(sd, caplog):
    ours, theirs = pair(*SD, sd)
    long_prompt = " ".join(["a red fox"] * 60)
    kwargs = dict(num_inference_steps=1, output_type="latent", guidance_scale=1.0)

    def truncation_warnings(pipe, **extra) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING"):
            pipe(long_prompt, **kwargs, **extra)
        return [record.getMessage() for record in caplog.records if "was truncated" in record.getMessage()]

    # The CLI's tests may have run in this process, and `fastddim sample` mutes diffusers' warnings.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()
    try:
        expected = truncation_warnings(theirs)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    assert len(expected) == 1
    assert truncation_warnings(ours, clip_skip=1) == expected


@pytest.mark.skipif(
    not hasattr(transformers.CLIPTextModel(transformers.CLIPTextConfig()), "text_model"),
    reason=f"transformers {transformers.__version__}: CLIPTextModel has no text_model, so diffusers' clip_skip fails",
)
def test_clip_skip_matches_diffusers_where_diffusers_runs(sd, path):
    ours, theirs = pair(*SD, sd)
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, output_type="np", clip_skip=1)
    mine, reference = run_both(ours, theirs, path, **kwargs)
    np.testing.assert_array_equal(mine.images, reference.images)


@pytest.mark.parametrize("pipelines", [SD, SDXL], ids=["text2img", "sdxl"])
def test_lora_scale_without_lora_layers_changes_nothing(sd, sdxl, pipelines):
    """``cross_attention_kwargs={"scale": s}`` scales LoRA layers; with none loaded the images are the unscaled
    ones. (diffusers without the PEFT backend fails here on transformers 5.24, reaching for ``text_model``.)"""
    ours, theirs = pair(*pipelines, sdxl if pipelines is SDXL else sd)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, output_type="np")
    scaled = ours(cross_attention_kwargs={"scale": 0.5}, generator=generators(0), **kwargs)
    assert ours.cross_attention_kwargs == {"scale": 0.5}
    np.testing.assert_array_equal(scaled.images, theirs(generator=generators(0), **kwargs).images)


def unnoised_reference(pipe, image, seeds) -> np.ndarray:
    """diffusers' img2img with no denoising step: the VAE's latents of the image (sampled with the generator(s)),
    scaled and unscaled, decoded and post-processed."""
    pixels = pipe.image_processor.preprocess(image)
    scaling = pipe.vae.config.scaling_factor
    with torch.no_grad():
        if isinstance(seeds, int):
            latents = retrieve_latents(pipe.vae.encode(pixels), generator=generators(seeds))
        else:
            latents = torch.cat([retrieve_latents(pipe.vae.encode(pixels), generator=g) for g in generators(seeds)])
        decoded = pipe.vae.decode(scaling * latents / scaling, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="np")


@pytest.mark.parametrize("strength", [0.0, 0.05])
@pytest.mark.parametrize("seeds", [0, (1, 2)], ids=["one-generator", "generator-list"])
def test_img2img_without_steps_returns_the_image(sd, path, strength, seeds):
    """strength * num_inference_steps < 1 leaves no step, where diffusers fails (add_noise on an empty batch): the
    output is the image through the VAE, unnoised; the same with a callback (diffusers' own loop)."""
    ours, theirs = pair(*IMG2IMG, sd)
    kwargs = dict(prompt=PROMPT, image=init_image(), strength=strength, num_inference_steps=10, output_type="np")
    kwargs["num_images_per_prompt"] = 1 if isinstance(seeds, int) else len(seeds)
    mine = ours(generator=generators(seeds), cuda_graph=path == "graph", **kwargs).images
    np.testing.assert_array_equal(mine, unnoised_reference(theirs, init_image(), seeds))
    assert ours.num_timesteps == 0
    steps = []
    with_callback = ours(
        generator=generators(seeds), callback_on_step_end=lambda *a: steps.append(a[1]) or a[3], **kwargs
    ).images
    np.testing.assert_array_equal(with_callback, mine)
    assert steps == []


# ---------------------------------------------------------------------------------------------- bad input


BAD_ARGUMENTS = {
    "negative-eta": dict(eta=-1.0),
    "eta-none": dict(eta=None),
    "eta-nan": dict(eta=float("nan")),
    "eta-inf": dict(eta=float("inf")),
    "guidance-none": dict(guidance_scale=None),
    "guidance-nan": dict(guidance_scale=float("nan")),
    "guidance-rescale-nan": dict(guidance_rescale=float("nan")),
}


@pytest.mark.parametrize("bad", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_guidance_arguments_raise_naming_them(sd, path, bad, recwarn):
    """Checked before any work, so the captured path raises as the eager one does (no failed capture, no fallback)."""
    ours, _ = pair(*SD, sd)
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        ours(PROMPT, num_inference_steps=2, output_type="np", cuda_graph=path == "graph", **bad)
    assert ours.cuda_graph_cache_info().fallbacks == 0
    assert not [w for w in recwarn if "capture" in str(w.message)]


@pytest.mark.parametrize("pipelines", [SD, SDXL], ids=["text2img", "sdxl"])
@pytest.mark.parametrize("num_latents", [1, 3])
def test_latents_of_another_batch_raise_naming_latents(sd, sdxl, path, pipelines, num_latents):
    """diffusers fails inside the UNet with a shape error; fastddim names the argument."""
    ours, _ = pair(*pipelines, sdxl if pipelines is SDXL else sd)
    latents = torch.randn(num_latents, 4, 8, 8)
    with pytest.raises(ValueError, match="latents must have shape \\(2,"):
        ours(PROMPT, latents=latents, num_images_per_prompt=2, num_inference_steps=2, cuda_graph=path == "graph")


# ---------------------------------------------------------------------------------------------- state and inputs


def test_inputs_are_left_untouched(sd, path):
    ours, _ = pair(*SD, sd)
    img2img = fastddim.StableDiffusionImg2ImgPipeline.from_pipe(ours)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = prompt_embeddings(ours, PROMPT)
    negative = prompt_embeddings(ours, "blurry")
    image = init_image()
    given = dict(latents=latents, embeds=embeds, negative=negative, image=image)
    copies = {name: tensor.clone() for name, tensor in given.items()}
    versions = {name: tensor._version for name, tensor in given.items()}
    common = dict(num_inference_steps=STEPS, eta=1.0, output_type="np", cuda_graph=path == "graph")
    ours(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents, generator=generators(0), **common)
    img2img(prompt_embeds=embeds, image=image, generator=generators(0), **common)
    for name, tensor in given.items():
        assert torch.equal(tensor, copies[name]) and tensor._version == versions[name], f"{name} was modified"


def test_interrupt_from_a_callback_matches_diffusers(sd):
    """``pipe._interrupt`` set by a step-end callback skips the remaining steps, as in diffusers."""

    def interrupt_after_two(pipe, i, t, callback_kwargs):
        pipe._interrupt = i == 1
        return {"latents": callback_kwargs["latents"], "prompt_embeds": callback_kwargs["prompt_embeds"]}

    ours, theirs = pair(*SD, sd)
    kwargs = dict(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        eta=1.0,
        output_type="np",
        callback_on_step_end=interrupt_after_two,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    mine, reference = run_both(ours, theirs, "eager", **kwargs)
    np.testing.assert_array_equal(mine.images, reference.images)
    assert ours.interrupt and theirs.interrupt
    # The next call starts uninterrupted.
    ours(PROMPT, num_inference_steps=2, output_type="np")
    assert not ours.interrupt


def test_scheduler_swaps_match_diffusers(sd, path):
    """DDIM -> Euler -> DDIM: each scheduler's images; the new DDIM scheduler gets its own captured loop."""
    ours, theirs = pair(*SD, sd)
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, eta=1.0, output_type="np")
    stages = [(None, path), (diffusers.EulerDiscreteScheduler, "eager"), (diffusers.DDIMScheduler, path)]
    for scheduler_class, stage_path in stages:
        if scheduler_class is not None:
            ours.scheduler = scheduler_class.from_config(ours.scheduler.config)
            theirs.scheduler = scheduler_class.from_config(theirs.scheduler.config)
        mine, reference = run_both(ours, theirs, stage_path, **kwargs)
        np.testing.assert_array_equal(mine.images, reference.images, err_msg=type(ours.scheduler).__name__)
    assert type(ours.scheduler) is fastddim.DDIMScheduler
    assert ours.cuda_graph_cache_info().misses == (2 if path == "graph" else 0)


@pytest.mark.parametrize("pipelines", [SD, IMG2IMG], ids=["text2img", "img2img"])
def test_diffusers_from_pipe_of_fastddim_gives_diffusers_images(sd, pipelines):
    """diffusers' class built ``from_pipe`` of fastddim's keeps fastddim's scheduler and runs diffusers' loop: the
    images of diffusers' own scheduler."""
    ours, theirs = pair(*SD, sd)
    back = pipelines[1].from_pipe(ours)
    reference = pipelines[1].from_pipe(theirs)
    for pipe in (back, reference):
        pipe.set_progress_bar_config(disable=True)
    assert type(back.scheduler) is fastddim.DDIMScheduler and type(reference.scheduler) is diffusers.DDIMScheduler
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, eta=1.0, output_type="np")
    if pipelines is IMG2IMG:
        kwargs["image"] = init_image()
    mine = back(generator=generators(0), **kwargs).images
    np.testing.assert_array_equal(mine, reference(generator=generators(0), **kwargs).images)
