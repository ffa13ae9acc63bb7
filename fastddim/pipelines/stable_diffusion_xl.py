"""``fastddim.StableDiffusionXLPipeline``: diffusers' SDXL text-to-image pipeline with its DDIM loop (UNet with the
added ``text_embeds``/``time_ids`` conditioning, guidance, fused step) captured as one CUDA graph
(``fastddim.pipelines.loop``)."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from fastddim import compat
from fastddim.pipelines.loop import (
    ConditionalLoopMixin,
    TextToImageLatentsMixin,
    call_signature,
)
from fastddim.pipelines.prompts import PromptEncodingMixin

__all__ = [
    "StableDiffusionXLPipeline",
    "denoising_fraction_valid",
    "discrete_timestep_cutoff",
    "finish_stable_diffusion_xl",
    "projection_dim_of",
    "sdxl_prompt_embeddings",
    "timesteps_before_denoising_end",
]


class StableDiffusionXLPipeline(
    PromptEncodingMixin, TextToImageLatentsMixin, ConditionalLoopMixin, diffusers.StableDiffusionXLPipeline
):
    r"""SDXL text-to-image whose DDIM denoising loop runs as one CUDA graph.

    A subclass of `diffusers.StableDiffusionXLPipeline`: same constructor, loaders, call arguments and outputs, plus
    ``cuda_graph``; see `fastddim.StableDiffusionPipeline` for what runs where. The pooled text embeddings and time
    ids are per-call inputs of the captured loop; ``denoising_end`` shortens the timesteps (its own captured loop).
    """

    def __call__(self, *args: Any, cuda_graph: bool | None = None, **kwargs: Any) -> Any:
        parent_call = diffusers.StableDiffusionXLPipeline.__call__
        return self._dispatch(parent_call, args, kwargs, cuda_graph, self._generate)

    __call__.__signature__ = call_signature(diffusers.StableDiffusionXLPipeline.__call__)

    def _generate(self, a: dict, device: torch.device, use_graph: bool) -> Any:
        # diffusers 0.42.1 StableDiffusionXLPipeline.__call__, steps 0-9, then its loop and post-processing.
        height = a["height"] or self.default_sample_size * self.vae_scale_factor
        width = a["width"] or self.default_sample_size * self.vae_scale_factor
        original_size = a["original_size"] or (height, width)
        target_size = a["target_size"] or (height, width)
        prompt, prompt_embeds = a["prompt"], a["prompt_embeds"]
        self.check_inputs(
            prompt,
            a["prompt_2"],
            height,
            width,
            None,
            a["negative_prompt"],
            a["negative_prompt_2"],
            prompt_embeds,
            a["negative_prompt_embeds"],
            a["pooled_prompt_embeds"],
            a["negative_pooled_prompt_embeds"],
            None,
            None,
            a["callback_on_step_end_tensor_inputs"],
        )
        _, num_images = self._begin_call(a)
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = (
            sdxl_prompt_embeddings(self, a, device)
        )
        timesteps = self._set_timesteps(a["num_inference_steps"], device, use_graph)
        latents = self._initial_latents(a, num_images, height, width, prompt_embeds.dtype, device)

        add_text_embeds = pooled_prompt_embeds
        text_encoder_projection_dim = projection_dim_of(self, pooled_prompt_embeds)
        add_time_ids = self._get_add_time_ids(
            original_size,
            a["crops_coords_top_left"],
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )
        if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
            negative_add_time_ids = self._get_add_time_ids(
                a["negative_original_size"],
                a["negative_crops_coords_top_left"],
                a["negative_target_size"],
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=text_encoder_projection_dim,
            )
        else:
            negative_add_time_ids = add_time_ids
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)
        prompt_embeds = prompt_embeds.to(device)
        add_text_embeds = add_text_embeds.to(device)
        add_time_ids = add_time_ids.to(device).repeat(num_images, 1)

        timesteps = timesteps_before_denoising_end(self, timesteps)
        added_cond = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
        latents = self._run_loop(a, latents, timesteps, prompt_embeds, added_cond, num_images, device, use_graph)
        return finish_stable_diffusion_xl(self, latents, a["output_type"], a["return_dict"])


def sdxl_prompt_embeddings(
    pipe: Any, a: dict, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """diffusers' SDXL ``encode_prompt`` on the call's arguments ``a``: the prompt and negative embeddings and their
    pooled embeddings, each repeated per image."""
    return pipe.encode_prompt(
        prompt=a["prompt"],
        prompt_2=a["prompt_2"],
        device=device,
        num_images_per_prompt=a["num_images_per_prompt"],
        do_classifier_free_guidance=pipe.do_classifier_free_guidance,
        negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"],
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
        lora_scale=None,
        clip_skip=pipe.clip_skip,
    )


def projection_dim_of(pipe: Any, pooled_prompt_embeds: torch.Tensor) -> int:
    """The pooled text embeddings' width as ``_get_add_time_ids`` checks it against the UNet's added embedding."""
    if pipe.text_encoder_2 is None:
        return int(pooled_prompt_embeds.shape[-1])
    return pipe.text_encoder_2.config.projection_dim


def denoising_fraction_valid(value: object) -> bool:
    """diffusers' test of ``denoising_start``/``denoising_end``: only a float strictly inside (0, 1) cuts the
    schedule (an int 1, or 1.0, leaves it whole)."""
    return isinstance(value, float) and 0 < value < 1


def discrete_timestep_cutoff(pipe: Any, fraction: float) -> int:
    """The training timestep at which a ``denoising_start``/``denoising_end`` fraction of the schedule lies."""
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    return int(round(num_train_timesteps - (fraction * num_train_timesteps)))


def timesteps_before_denoising_end(pipe: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """``timesteps`` cut at the call's ``denoising_end``, as diffusers' SDXL pipelines cut them."""
    if not denoising_fraction_valid(pipe.denoising_end):
        return timesteps
    cutoff = discrete_timestep_cutoff(pipe, pipe.denoising_end)
    return timesteps[: len(list(filter(lambda ts: ts >= cutoff, timesteps)))]


def finish_stable_diffusion_xl(
    pipe: Any, latents: torch.Tensor, output_type: str, return_dict: bool, watermark_latents: bool = False
) -> StableDiffusionXLPipelineOutput | tuple:
    """diffusers' SDXL post-processing: VAE upcast where needed, latent denormalisation, decode, watermark.
    ``watermark_latents``: the watermarker also sees ``output_type="latent"`` outputs (SDXL img2img's order)."""
    if output_type != "latent":
        # make sure the VAE is in float32 mode, as it overflows in float16
        needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if needs_upcasting:
            pipe.upcast_vae()
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        elif latents.dtype != pipe.vae.dtype and torch.backends.mps.is_available():
            pipe.vae = pipe.vae.to(latents.dtype)
        has_latents_mean = getattr(pipe.vae.config, "latents_mean", None) is not None
        has_latents_std = getattr(pipe.vae.config, "latents_std", None) is not None
        if has_latents_mean and has_latents_std:
            latents_mean = (
                torch.tensor(pipe.vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            )
            latents_std = torch.tensor(pipe.vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * latents_std / pipe.vae.config.scaling_factor + latents_mean
        else:
            latents = latents / pipe.vae.config.scaling_factor
        vae_device = compat.module_execution_device(pipe.vae)
        if vae_device is not None:
            latents = latents.to(vae_device)
        image = pipe.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            pipe.vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    else:
        image = latents
        if watermark_latents and pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (image,)
    return StableDiffusionXLPipelineOutput(images=image)
