"""``fastddim.StableDiffusionPipeline``: diffusers' text-to-image pipeline with its DDIM loop captured as one CUDA
graph (``fastddim.pipelines.loop``)."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

from fastddim.pipelines.loop import (
    ConditionalLoopMixin,
    TextToImageLatentsMixin,
    call_signature,
    check_stable_diffusion_inputs,
    guidance_batch_embeddings,
)
from fastddim.pipelines.prompts import PromptEncodingMixin

__all__ = ["StableDiffusionPipeline", "finish_stable_diffusion"]


class StableDiffusionPipeline(
    PromptEncodingMixin, TextToImageLatentsMixin, ConditionalLoopMixin, diffusers.StableDiffusionPipeline
):
    r"""Text-to-image Stable Diffusion whose DDIM denoising loop runs as one CUDA graph.

    A subclass of `diffusers.StableDiffusionPipeline` with the same constructor, loaders (``from_pretrained``,
    ``from_pipe``), call arguments and outputs, plus ``cuda_graph``. With a DDIM scheduler (diffusers' is converted
    to `fastddim.DDIMScheduler` through its config) the loop is fastddim's: on CUDA every UNet call on the guidance
    batch, the guidance combine and the fused step are captured once per configuration and replayed; the images are
    diffusers' (bit-identical in fp32 on the CPU). With any other scheduler, and for calls with per-step callbacks,
    IP-adapter images, ``cross_attention_kwargs`` or custom ``timesteps``/``sigmas``, diffusers' own loop runs.

    ``cuda_graph`` (`bool`, *optional*): `None` (default) captures when the UNet runs on CUDA; `True` off CUDA is an
    error; `False` runs the same loop eagerly. Without a ``generator``, eta > 0 draws the step noises in the fused
    kernel (reproducible under ``torch.manual_seed``); with one, the noises diffusers draws.

    Examples::

        >>> import fastddim, torch
        >>> pipe = fastddim.StableDiffusionPipeline.from_pretrained("path/to/sd", torch_dtype=torch.float16)
        >>> pipe.scheduler = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)
        >>> image = pipe.to("cuda")("an astronaut riding a horse", num_inference_steps=30).images[0]
    """

    applies_clip_skip_layer_norm = True

    def __call__(self, *args: Any, cuda_graph: bool | None = None, **kwargs: Any) -> Any:
        parent_call = diffusers.StableDiffusionPipeline.__call__
        return self._dispatch(parent_call, args, kwargs, cuda_graph, self._generate)

    __call__.__signature__ = call_signature(diffusers.StableDiffusionPipeline.__call__)

    def _generate(self, a: dict, device: torch.device, use_graph: bool) -> Any:
        # diffusers 0.42.1 StableDiffusionPipeline.__call__, steps 0-6.2, then its loop and post-processing.
        height, width = a["height"], a["width"]
        if not height or not width:
            sample_size = self.unet.config.sample_size
            height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size[:2]
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        check_stable_diffusion_inputs(self, a, height, width)
        _, num_images = self._begin_call(a)
        prompt_embeds = guidance_batch_embeddings(self, a, device)
        timesteps = self._set_timesteps(a["num_inference_steps"], device, use_graph)
        latents = self._initial_latents(a, num_images, height, width, prompt_embeds.dtype, device)
        latents = self._run_loop(a, latents, timesteps, prompt_embeds, None, num_images, device, use_graph)
        return finish_stable_diffusion(self, latents, a, device, prompt_embeds.dtype)


def finish_stable_diffusion(
    pipe: Any, latents: torch.Tensor, a: dict, device: torch.device, prompt_dtype: torch.dtype
) -> StableDiffusionPipelineOutput | tuple:
    """diffusers' post-processing of the SD1/SD2 pipelines: VAE decode, safety checker, image conversion."""
    output_type = a["output_type"]
    if output_type != "latent":
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=a["generator"])[
            0
        ]
        image, has_nsfw_concept = pipe.run_safety_checker(image, device, prompt_dtype)
    else:
        image = latents
        has_nsfw_concept = None
    if has_nsfw_concept is None:
        do_denormalize = [True] * image.shape[0]
    else:
        do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
    image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
    pipe.maybe_free_model_hooks()
    if not a["return_dict"]:
        return (image, has_nsfw_concept)
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
