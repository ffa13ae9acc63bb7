"""``fastddim.StableDiffusionXLImg2ImgPipeline``: diffusers' SDXL image-to-image pipeline (SDXL's refiner) with its
DDIM loop captured as one CUDA graph (``fastddim.pipelines.loop``). The VAE encode, ``add_noise`` and the decode stay
outside the graph; the pooled text embeddings and the time ids (with the aesthetic scores of a refiner) are per-call
inputs of the captured loop."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch

from fastddim.pipelines.loop import ConditionalLoopMixin, call_signature
from fastddim.pipelines.prompts import PromptEncodingMixin
from fastddim.pipelines.stable_diffusion_xl import (
    denoising_fraction_valid,
    finish_stable_diffusion_xl,
    projection_dim_of,
    sdxl_prompt_embeddings,
    timesteps_before_denoising_end,
)
from fastddim.stepping import is_real

__all__ = ["StableDiffusionXLImg2ImgPipeline", "check_schedule_fractions"]


class StableDiffusionXLImg2ImgPipeline(
    PromptEncodingMixin, ConditionalLoopMixin, diffusers.StableDiffusionXLImg2ImgPipeline
):
    r"""SDXL image-to-image (and SDXL's refiner) whose DDIM denoising loop runs as one CUDA graph.

    A subclass of `diffusers.StableDiffusionXLImg2ImgPipeline`: same constructor, loaders, call arguments and outputs,
    plus ``cuda_graph``; see `fastddim.StableDiffusionPipeline` for what runs where. ``strength``, or
    ``denoising_start`` (which overrides it), selects the tail of the timesteps and ``denoising_end`` cuts it, so each
    such choice is its own captured loop; a new prompt, guidance scale, seed, size conditioning or aesthetic score
    replays it. A strength too small for one step (``strength * num_inference_steps < 1``) gives the image through
    the VAE, unnoised.

    The base + refiner hand-off runs as two captured loops::

        >>> latents = base(prompt, denoising_end=0.8, output_type="latent").images
        >>> image = refiner(prompt, image=latents, denoising_start=0.8).images[0]

    Unlike diffusers, a ``denoising_start`` that does not cut the schedule (not a float strictly inside (0, 1)) is an
    error: diffusers would then run ``strength``'s steps without noising the image.
    """

    def __call__(self, *args: Any, cuda_graph: bool | None = None, **kwargs: Any) -> Any:
        parent_call = diffusers.StableDiffusionXLImg2ImgPipeline.__call__
        return self._dispatch(parent_call, args, kwargs, cuda_graph, self._generate)

    __call__.__signature__ = call_signature(diffusers.StableDiffusionXLImg2ImgPipeline.__call__)

    def prepare_latents(self, image: torch.Tensor, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """diffusers' ``prepare_latents`` (same arguments), but an empty ``timestep`` noises nothing:
        strength * num_inference_steps < 1 leaves no step, and diffusers would noise the latents to an empty batch;
        x_0 is then the image's own latents, unnoised."""
        parent = super().prepare_latents
        bound = inspect.signature(parent).bind(image, timestep, *args, **kwargs)
        if timestep.numel() == 0:
            bound.arguments["add_noise"] = False
        return parent(*bound.args, **bound.kwargs)

    def _generate(self, a: dict, device: torch.device, use_graph: bool) -> Any:
        # diffusers 0.42.1 StableDiffusionXLImg2ImgPipeline.__call__, steps 1-9.1, then its loop and post-processing.
        check_schedule_fractions(a)
        self.check_inputs(
            a["prompt"],
            a["prompt_2"],
            a["strength"],
            a["num_inference_steps"],
            None,
            a["negative_prompt"],
            a["negative_prompt_2"],
            a["prompt_embeds"],
            a["negative_prompt_embeds"],
            None,
            None,
            a["callback_on_step_end_tensor_inputs"],
        )
        batch_size, num_images = self._begin_call(a)
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = (
            sdxl_prompt_embeddings(self, a, device)
        )
        image = self.image_processor.preprocess(a["image"])
        self._set_timesteps(a["num_inference_steps"], device, use_graph)
        denoising_start = a["denoising_start"]
        timesteps, _ = self.get_timesteps(a["num_inference_steps"], a["strength"], device, denoising_start)
        latents = a["latents"]
        if latents is None:
            latents = self.prepare_latents(
                image,
                timesteps[:1].repeat(num_images),
                batch_size,
                a["num_images_per_prompt"],
                prompt_embeds.dtype,
                device,
                a["generator"],
                add_noise=denoising_start is None,
            )
        elif latents.dim() != 4 or latents.shape[0] != num_images:
            raise ValueError(
                f"latents must have shape ({num_images}, channels, height, width): one per image, batch size times "
                f"num_images_per_prompt; got {tuple(latents.shape)}"
            )

        height, width = (size * self.vae_scale_factor for size in latents.shape[-2:])
        original_size = a["original_size"] or (height, width)
        target_size = a["target_size"] or (height, width)
        negative_original_size = a["negative_original_size"]
        negative_target_size = a["negative_target_size"]
        add_time_ids, negative_add_time_ids = self._get_add_time_ids(
            original_size,
            a["crops_coords_top_left"],
            target_size,
            a["aesthetic_score"],
            a["negative_aesthetic_score"],
            original_size if negative_original_size is None else negative_original_size,
            a["negative_crops_coords_top_left"],
            target_size if negative_target_size is None else negative_target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim_of(self, pooled_prompt_embeds),
        )
        add_time_ids = add_time_ids.repeat(num_images, 1)
        add_text_embeds = pooled_prompt_embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids.repeat(num_images, 1), add_time_ids], dim=0)
        added_cond = {"text_embeds": add_text_embeds.to(device), "time_ids": add_time_ids.to(device)}

        timesteps = timesteps_before_denoising_end(self, timesteps)
        prompt_embeds = prompt_embeds.to(device)
        latents = self._run_loop(a, latents, timesteps, prompt_embeds, added_cond, num_images, device, use_graph)
        return finish_stable_diffusion_xl(self, latents, a["output_type"], a["return_dict"], watermark_latents=True)


def check_schedule_fractions(a: dict) -> None:
    """Checks the call's ``strength``, ``denoising_start`` and ``denoising_end`` before any work, naming the one at
    fault: ``strength`` a real number in [0, 1] (NaN included in the refusal), ``denoising_start`` None or a float
    strictly inside (0, 1), and below a ``denoising_end`` that cuts the schedule."""
    strength = a["strength"]
    if not is_real(strength) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a real number in [0, 1], got {strength!r}")
    start, end = a["denoising_start"], a["denoising_end"]
    if start is None:
        return
    if not denoising_fraction_valid(start):
        raise ValueError(
            "denoising_start must be a float strictly between 0 and 1 (the fraction of the schedule already "
            f"denoised), got {start!r}"
        )
    if denoising_fraction_valid(end) and start >= end:
        raise ValueError(f"denoising_start ({start}) must be below denoising_end ({end})")
