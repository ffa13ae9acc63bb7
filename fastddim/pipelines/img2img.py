"""``fastddim.StableDiffusionImg2ImgPipeline``: diffusers' image-to-image pipeline with its DDIM loop captured as one
CUDA graph (``fastddim.pipelines.loop``). The VAE encode and ``add_noise`` stay outside the graph."""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from fastddim.pipelines.loop import (
    ConditionalLoop,
    ConditionalLoopMixin,
    batch_size_of,
    call_signature,
    guidance_batch_embeddings,
    guidance_embedding,
)
from fastddim.pipelines.stable_diffusion import finish_stable_diffusion

__all__ = ["StableDiffusionImg2ImgPipeline"]


class StableDiffusionImg2ImgPipeline(ConditionalLoopMixin, diffusers.StableDiffusionImg2ImgPipeline):
    r"""Image-to-image Stable Diffusion whose DDIM denoising loop runs as one CUDA graph.

    A subclass of `diffusers.StableDiffusionImg2ImgPipeline`: same constructor, loaders, call arguments and outputs,
    plus ``cuda_graph``; see `fastddim.StableDiffusionPipeline` for what runs where. ``strength`` selects the tail of
    the timesteps, so each strength is its own captured loop.
    """

    def __call__(self, *args: Any, cuda_graph: bool | None = None, **kwargs: Any) -> Any:
        parent_call = diffusers.StableDiffusionImg2ImgPipeline.__call__
        return self._dispatch(parent_call, args, kwargs, cuda_graph, self._generate)

    __call__.__signature__ = call_signature(diffusers.StableDiffusionImg2ImgPipeline.__call__)

    def _generate(self, a: dict, device: torch.device, use_graph: bool) -> Any:
        # diffusers 0.42.1 StableDiffusionImg2ImgPipeline.__call__, steps 1-7.2, then its loop and post-processing.
        prompt, prompt_embeds, negative_prompt_embeds = a["prompt"], a["prompt_embeds"], a["negative_prompt_embeds"]
        self.check_inputs(
            prompt,
            a["strength"],
            None,
            a["negative_prompt"],
            prompt_embeds,
            negative_prompt_embeds,
            None,
            None,
            a["callback_on_step_end_tensor_inputs"],
        )
        self._guidance_scale = a["guidance_scale"]
        self._clip_skip = a["clip_skip"]
        self._cross_attention_kwargs = None
        self._interrupt = False
        batch_size = batch_size_of(prompt, prompt_embeds)
        num_images_per_prompt = a["num_images_per_prompt"]

        prompt_embeds = guidance_batch_embeddings(
            self, prompt, device, num_images_per_prompt, a["negative_prompt"], prompt_embeds, negative_prompt_embeds
        )

        image = self.image_processor.preprocess(a["image"])
        self._set_timesteps(a["num_inference_steps"], device, use_graph)
        timesteps, _ = self.get_timesteps(a["num_inference_steps"], a["strength"], device)
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)
        latents = self.prepare_latents(
            image,
            latent_timestep,
            batch_size,
            num_images_per_prompt,
            prompt_embeds.dtype,
            device,
            a["generator"],
        )
        timestep_cond = guidance_embedding(self, batch_size * num_images_per_prompt, device, latents.dtype)
        self._num_timesteps = len(timesteps)

        loop = ConditionalLoop(
            latents=latents,
            timesteps=timesteps,
            prompt_embeds=prompt_embeds,
            added_cond=None,
            timestep_cond=timestep_cond,
            guidance_scale=self.guidance_scale if self.do_classifier_free_guidance else None,
            guidance_rescale=0.0,
            eta=a["eta"],
            generator=a["generator"],
        )
        latents = self._denoise_latents(loop, device, use_graph)
        return finish_stable_diffusion(self, latents, a, device, prompt_embeds.dtype)
