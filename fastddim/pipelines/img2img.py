"""``fastddim.StableDiffusionImg2ImgPipeline``: diffusers' image-to-image pipeline with its DDIM loop captured as one
CUDA graph (``fastddim.pipelines.loop``). The VAE encode and ``add_noise`` stay outside the graph."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

from fastddim.pipelines.loop import (
    ConditionalLoopMixin,
    call_signature,
    check_stable_diffusion_inputs,
    guidance_batch_embeddings,
)
from fastddim.pipelines.prompts import PromptEncodingMixin
from fastddim.pipelines.stable_diffusion import finish_stable_diffusion

__all__ = ["StableDiffusionImg2ImgPipeline", "unnoised_image_latents"]


class StableDiffusionImg2ImgPipeline(
    PromptEncodingMixin, ConditionalLoopMixin, diffusers.StableDiffusionImg2ImgPipeline
):
    r"""Image-to-image Stable Diffusion whose DDIM denoising loop runs as one CUDA graph.

    A subclass of `diffusers.StableDiffusionImg2ImgPipeline`: same constructor, loaders, call arguments and outputs,
    plus ``cuda_graph``; see `fastddim.StableDiffusionPipeline` for what runs where. ``strength`` selects the tail of
    the timesteps, so each strength is its own captured loop. A strength too small for one step
    (``strength * num_inference_steps < 1``, 0 included), where diffusers fails, gives the image through the VAE.
    """

    applies_clip_skip_layer_norm = True

    def __call__(self, *args: Any, cuda_graph: bool | None = None, **kwargs: Any) -> Any:
        parent_call = diffusers.StableDiffusionImg2ImgPipeline.__call__
        return self._dispatch(parent_call, args, kwargs, cuda_graph, self._generate)

    __call__.__signature__ = call_signature(diffusers.StableDiffusionImg2ImgPipeline.__call__)

    def prepare_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        batch_size: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        if timestep.numel() == 0:
            # strength * num_inference_steps < 1 leaves no step (diffusers then asks add_noise for an empty batch
            # and fails): x_0 is the image's own latents, unnoised.
            return unnoised_image_latents(self, image, batch_size * num_images_per_prompt, dtype, device, generator)
        return super().prepare_latents(image, timestep, batch_size, num_images_per_prompt, dtype, device, generator)

    def _generate(self, a: dict, device: torch.device, use_graph: bool) -> Any:
        # diffusers 0.42.1 StableDiffusionImg2ImgPipeline.__call__, steps 1-7.2, then its loop and post-processing.
        check_stable_diffusion_inputs(self, a, a["strength"])
        batch_size, num_images = self._begin_call(a)
        prompt_embeds = guidance_batch_embeddings(self, a, device)
        image = self.image_processor.preprocess(a["image"])
        self._set_timesteps(a["num_inference_steps"], device, use_graph)
        timesteps, _ = self.get_timesteps(a["num_inference_steps"], a["strength"], device)
        latent_timestep = timesteps[:1].repeat(num_images)
        latents = self.prepare_latents(
            image,
            latent_timestep,
            batch_size,
            a["num_images_per_prompt"],
            prompt_embeds.dtype,
            device,
            a["generator"],
        )
        latents = self._run_loop(a, latents, timesteps, prompt_embeds, None, num_images, device, use_graph)
        return finish_stable_diffusion(self, latents, a, device, prompt_embeds.dtype)


def unnoised_image_latents(
    pipe: Any,
    image: torch.Tensor,
    num_images: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """The latents diffusers' img2img ``prepare_latents`` noises: ``image`` itself when it has 4 channels (latents),
    else the VAE's latents of it, sampled with the call's generator (one per image for a list) and scaled by the
    VAE's ``scaling_factor``; repeated to ``num_images``."""
    image = image.to(device=device, dtype=dtype)
    if image.shape[1] == 4:
        latents = image
    else:
        if isinstance(generator, list):
            if len(generator) != num_images:
                raise ValueError(
                    f"generator is a list of {len(generator)} generators, but the call makes {num_images} images: "
                    "pass one per image"
                )
            if num_images % image.shape[0] != 0:
                raise ValueError(f"image has a batch of {image.shape[0]}, which does not divide {num_images} images")
            image = torch.cat([image] * (num_images // image.shape[0]))
            latents = torch.cat(
                [
                    retrieve_latents(pipe.vae.encode(image[i : i + 1]), generator=generator[i])
                    for i in range(num_images)
                ]
            )
        else:
            latents = retrieve_latents(pipe.vae.encode(image), generator=generator)
        latents = pipe.vae.config.scaling_factor * latents
    if num_images % latents.shape[0] != 0:
        raise ValueError(f"image has a batch of {latents.shape[0]}, which does not divide {num_images} images")
    return torch.cat([latents] * (num_images // latents.shape[0]))
