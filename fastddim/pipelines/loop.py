"""The text-conditioned denoising loop shared by fastddim's Stable Diffusion pipelines, eager or as one CUDA graph.

Each pipeline prepares the loop's inputs with its diffusers parent's own methods (prompt encoding, initial latents,
img2img's VAE encode + ``add_noise``, SDXL's added time ids), runs ``ConditionalLoopMixin._denoise_latents`` and
decodes with the parent's methods again. The loop is diffusers' loop for a DDIM scheduler, operation for operation:
the UNet on the classifier-free-guidance batch, ``uncond + (text - uncond) * guidance_scale``, diffusers'
``rescale_noise_cfg`` and the fused step. On CUDA the whole loop is one graph (``fastddim.graphs``); the prompt
embeddings, SDXL's added conditioning, the guidance scale and the pre-drawn step noises are copied into its static
buffers per call, so a new prompt, guidance or seed replays the same graph.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import logging

from fastddim import graphs
from fastddim.graphs import CudaGraphCacheMixin, StepInput
from fastddim.scheduler import DDIMScheduler, selected_backend
from fastddim.stepping import is_real
from fastddim.utils import normalize_device

logger = logging.get_logger(__name__)

__all__ = [
    "ConditionalLoop",
    "ConditionalLoopMixin",
    "TextToImageLatentsMixin",
    "batch_size_of",
    "call_signature",
    "check_guidance_arguments",
    "check_stable_diffusion_inputs",
    "guidance_batch_embeddings",
    "guidance_embedding",
]

# Call arguments whose effect cannot live inside a captured loop: a call with any of them set runs the parent's own
# (eager) __call__ with fastddim's scheduler, which gives the same images.
EAGER_ONLY_ARGUMENTS = (
    "callback_on_step_end",
    "callback",
    "callback_steps",
    "ip_adapter_image",
    "ip_adapter_image_embeds",
    "cross_attention_kwargs",
    "timesteps",
    "sigmas",
)


@dataclass
class ConditionalLoop:
    """Everything the denoising loop reads, prepared by a pipeline's preprocessing.

    Attributes:
        latents (`torch.Tensor`): x_T (text2img) or the noised image latents (img2img).
        timesteps (`torch.Tensor`): the 1-D timesteps of the loop (on the host for the graph path).
        prompt_embeds (`torch.Tensor`): the UNet's ``encoder_hidden_states`` (negative and positive concatenated
            under classifier-free guidance).
        added_cond (`dict`, *optional*): SDXL's ``text_embeds`` and ``time_ids``.
        timestep_cond (`torch.Tensor`, *optional*): the guidance embedding of UNets with ``time_cond_proj_dim``.
        guidance_scale (`float`, *optional*): the guidance weight; None without classifier-free guidance.
        guidance_rescale (`float`): diffusers' ``guidance_rescale`` (0 for none).
        eta (`float`): DDIM's eta.
        generator: the call's generator(s), which draw the step noises for eta > 0.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    added_cond: dict[str, torch.Tensor] | None
    timestep_cond: torch.Tensor | None
    guidance_scale: float | None
    guidance_rescale: float
    eta: float
    generator: torch.Generator | list[torch.Generator] | None


def call_signature(parent_call: Callable) -> inspect.Signature:
    """The parent's ``__call__`` signature plus the keyword-only ``cuda_graph`` (for ``inspect`` and docs)."""
    signature = inspect.signature(parent_call)
    parameters = list(signature.parameters.values())
    cuda_graph = inspect.Parameter(
        "cuda_graph", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="bool | None"
    )
    var_keyword = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    others = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=[*others, cuda_graph, *var_keyword])


class ConditionalLoopMixin(CudaGraphCacheMixin):
    """Scheduler conversion, call dispatch and the denoising loop of fastddim's Stable Diffusion pipelines.

    A diffusers ``DDIMScheduler`` given to the pipeline (at construction, by ``from_pretrained``/``from_pipe`` or by
    assignment) becomes a ``fastddim.DDIMScheduler`` with the same config; any other scheduler is kept and the
    parent's own ``__call__`` runs unchanged.
    """

    def register_modules(self, **kwargs: Any) -> None:
        if "scheduler" in kwargs:
            kwargs["scheduler"] = _converted(kwargs["scheduler"])
        super().register_modules(**kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scheduler":
            value = _converted(value)
        super().__setattr__(name, value)

    def _dispatch(
        self,
        parent_call: Callable,
        args: tuple,
        kwargs: dict,
        cuda_graph: bool | None,
        run: Callable[[dict, torch.device, bool], Any],
    ) -> Any:
        """Runs ``run(arguments, device, use_graph)``, or the parent's ``__call__`` where fastddim's loop does not
        apply (another scheduler, arguments that need the eager loop)."""
        device = normalize_device(self._execution_device)
        use_graph = graphs.resolve_cuda_graph(cuda_graph, device)
        if not isinstance(self.scheduler, DDIMScheduler):
            if cuda_graph:
                raise ValueError(
                    "cuda_graph=True needs a DDIM scheduler (diffusers' or fastddim's), got "
                    f"{type(self.scheduler).__name__}"
                )
            return parent_call(self, *args, **kwargs)
        bound = _signature(parent_call).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}))
        check_guidance_arguments(arguments)
        eager_only = [name for name in EAGER_ONLY_ARGUMENTS if arguments.get(name) is not None]
        if eager_only:
            logger.info(
                f"{', '.join(eager_only)} cannot run inside a captured loop: this call runs diffusers' own loop "
                "eagerly, with fastddim's scheduler"
            )
            return parent_call(self, *args, **kwargs)
        with torch.no_grad():
            return run(arguments, device, use_graph)

    def _set_timesteps(self, num_inference_steps: int, device: torch.device, use_graph: bool) -> torch.Tensor:
        """``retrieve_timesteps`` without custom lists; host timesteps for the graph path (its key reads them)."""
        self.scheduler.set_timesteps(num_inference_steps, device=None if use_graph else device)
        return self.scheduler.timesteps

    def _begin_call(self, a: dict) -> tuple[int, int]:
        """Sets the call state diffusers' ``__call__`` sets (read by its properties: ``guidance_scale``,
        ``do_classifier_free_guidance``, ``clip_skip``, ``interrupt``... and ``guidance_rescale``,
        ``denoising_start``/``denoising_end`` where the pipeline takes them). Returns the batch size (the number of
        prompts or prompt embeddings) and the number of images, that times ``num_images_per_prompt``."""
        self._guidance_scale = a["guidance_scale"]
        if "guidance_rescale" in a:
            self._guidance_rescale = a["guidance_rescale"]
        for name in ("denoising_start", "denoising_end"):
            if name in a:
                setattr(self, f"_{name}", a[name])
        self._clip_skip = a["clip_skip"]
        # Calls with cross_attention_kwargs run diffusers' own __call__ (EAGER_ONLY_ARGUMENTS).
        self._cross_attention_kwargs = None
        self._interrupt = False
        batch_size = batch_size_of(a["prompt"], a["prompt_embeds"])
        return batch_size, batch_size * a["num_images_per_prompt"]

    def _run_loop(
        self,
        a: dict,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
        num_images: int,
        device: torch.device,
        use_graph: bool,
    ) -> torch.Tensor:
        """diffusers' guidance embedding (for ``num_images``) and ``num_timesteps``, then the denoising loop from
        ``latents``."""
        self._num_timesteps = len(timesteps)
        loop = ConditionalLoop(
            latents=latents,
            timesteps=timesteps,
            prompt_embeds=prompt_embeds,
            added_cond=added_cond,
            timestep_cond=guidance_embedding(self, num_images, device, latents.dtype),
            guidance_scale=self.guidance_scale if self.do_classifier_free_guidance else None,
            guidance_rescale=a.get("guidance_rescale", 0.0),
            eta=a["eta"],
            generator=a["generator"],
        )
        return self._denoise_latents(loop, device, use_graph)

    # ------------------------------------------------------------------------------------------------ the loop

    def _denoise_latents(self, loop: ConditionalLoop, device: torch.device, use_graph: bool) -> torch.Tensor:
        """Runs the denoising loop: eagerly, or through the graph cache (replay, capture, or eager on a failure)."""
        num_steps = loop.timesteps.shape[0]
        if num_steps == 0:
            # img2img with strength * num_inference_steps < 1: no step, so x_0 is the unnoised image latents.
            return loop.latents
        if use_graph:
            latents = self._denoise_graphed(loop, device)
            if latents is not None:
                return latents
            timesteps = list(loop.timesteps.to(device))
        else:
            timesteps = list(loop.timesteps)
        with self.progress_bar(total=num_steps) as bar:
            return self._denoise(
                loop.latents,
                timesteps,
                loop.prompt_embeds,
                loop.added_cond,
                loop.timestep_cond,
                loop.guidance_scale,
                loop.guidance_rescale,
                loop.eta,
                loop.generator,
                noises=None,
                progress=bar.update,
            )

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: Sequence[torch.Tensor],
        prompt_embeds: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
        timestep_cond: torch.Tensor | None,
        guidance_scale: float | torch.Tensor | None,
        guidance_rescale: float,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None,
        noises: Sequence[torch.Tensor] | None,
        progress: Callable[[], Any] | None,
    ) -> torch.Tensor:
        """diffusers' denoising loop for a DDIM scheduler (whose ``scale_model_input`` is the identity)."""
        unet, scheduler = self.unet, self.scheduler
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guidance_scale is not None else latents
            noise_pred = unet(
                model_input,
                t,
                encoder_hidden_states=prompt_embeds,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=None,
                added_cond_kwargs=added_cond,
                return_dict=False,
            )[0]
            if guidance_scale is not None:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                # (text - uncond) * g: diffusers' `g * (text - uncond)` with a Python float is this same mul, whose
                # scalar operand may here be a 0-dim fp32 tensor of the graph's static buffers (bit-identical in fp32;
                # with fp16/bf16 latents CUDA rounds that g to the latents' dtype first, exact for 7.5, 5.0, 3.0...).
                noise_pred = noise_pred_uncond + (noise_pred_text - noise_pred_uncond) * guidance_scale
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
            latents = scheduler.step(
                noise_pred,
                t,
                latents,
                eta=eta,
                generator=generator if noises is None else None,
                variance_noise=None if noises is None else noises[i],
                return_dict=False,
            )[0]
            if progress is not None:
                progress()
        return latents

    def _denoise_graphed(self, loop: ConditionalLoop, device: torch.device) -> torch.Tensor | None:
        """The loop through the graph cache; None where it must run eagerly (its capture failed)."""
        scheduler = self.scheduler
        num_steps = loop.timesteps.shape[0]
        latents = loop.latents
        exact_noise = loop.eta > 0 and loop.generator is not None
        step_inputs = {}
        if exact_noise:
            shape, dtype, generator = tuple(latents.shape), latents.dtype, loop.generator
            step_inputs["noise"] = StepInput(
                shape, dtype, lambda n: graphs.draw_step_noises(generator, shape, dtype, device, n)
            )
        inputs: dict[str, torch.Tensor | float] = {"latents": latents, "prompt_embeds": loop.prompt_embeds}
        if loop.guidance_scale is not None:
            inputs["guidance_scale"] = float(loop.guidance_scale)
        if loop.timestep_cond is not None:
            inputs["timestep_cond"] = loop.timestep_cond
        added_names = tuple(sorted(loop.added_cond)) if loop.added_cond is not None else None
        for name in added_names or ():
            inputs[f"added_cond.{name}"] = loop.added_cond[name]
        cfg = loop.guidance_scale is not None
        eta, guidance_rescale = loop.eta, float(loop.guidance_rescale)

        def body(buffers: graphs.LoopBuffers, steps: int) -> torch.Tensor:
            static = buffers.inputs
            noises = buffers.steps.get("noise")
            return self._denoise(
                static["latents"],
                buffers.timesteps[:steps],
                static["prompt_embeds"],
                None if added_names is None else {name: static[f"added_cond.{name}"] for name in added_names},
                static.get("timestep_cond"),
                static["guidance_scale"] if cfg else None,
                guidance_rescale,
                eta,
                generator=None,
                noises=None if noises is None else noises[:steps],
                progress=None,
            )

        config = tuple(sorted((name, repr(value)) for name, value in scheduler.config.items()))
        key = (
            id(scheduler),
            config,
            scheduler.num_inference_steps,
            eta,
            cfg,
            guidance_rescale,
            added_names,
            exact_noise,
            selected_backend(),
        )
        captured = self._captured_loops().lookup(
            key,
            device=device,
            modules=(self.unet,),
            timesteps=loop.timesteps,
            inputs=inputs,
            step_inputs=step_inputs,
            body=body,
            uses_rng=eta > 0 and not exact_noise,
            # Built now so the capture never copies it from the host.
            keep_alive=(scheduler, scheduler.coefficient_table(device, eta)),
        )
        if captured is None:
            return None
        with self.progress_bar(total=num_steps) as bar:
            latents = captured.replay(inputs, step_inputs)
            bar.update(num_steps)
        return latents


class TextToImageLatentsMixin:
    """x_T of the text-to-image pipelines: the call's ``latents`` or fresh noise, by diffusers' ``prepare_latents``,
    which here names ``latents`` when their batch cannot match the call's (diffusers fails inside the UNet with a
    shape error there)."""

    def _initial_latents(
        self, a: dict, num_images: int, height: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        channels = self.unet.config.in_channels
        return self.prepare_latents(num_images, channels, height, width, dtype, device, a["generator"], a["latents"])

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latents is not None and (latents.dim() != 4 or latents.shape[0] != batch_size):
            raise ValueError(
                f"latents must have shape ({batch_size}, channels, height, width): one per image, batch size times "
                f"num_images_per_prompt; got {tuple(latents.shape)}"
            )
        return super().prepare_latents(
            batch_size, num_channels_latents, height, width, dtype, device, generator, latents
        )


def check_guidance_arguments(arguments: dict[str, Any]) -> None:
    """Checks the call's ``eta``, ``guidance_scale`` and ``guidance_rescale`` (where the pipeline has it) before any
    work: a value the DDIM loop cannot take raises here, naming it, on the captured and the eager path alike."""
    eta = _as_number(arguments["eta"])
    if eta is None or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite real number >= 0, got {arguments['eta']!r}")
    arguments["eta"] = eta
    for name in ("guidance_scale", "guidance_rescale"):
        if name not in arguments:
            continue
        value = _as_number(arguments[name])
        if value is None or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {arguments[name]!r}")
        arguments[name] = value


def _as_number(value: object) -> float | int | None:
    """A real number as the loop takes it: a one-element real tensor (which diffusers' arithmetic accepts too) as its
    Python value, read once per call; None for anything else."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return value.item()
    return value if is_real(value) else None


def guidance_embedding(pipe: Any, num_images: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """diffusers' ``timestep_cond`` for UNets with ``time_cond_proj_dim`` (guidance-distilled models), else None."""
    if pipe.unet.config.time_cond_proj_dim is None:
        return None
    guidance_scale_tensor = torch.tensor(pipe.guidance_scale - 1).repeat(num_images)
    return pipe.get_guidance_scale_embedding(
        guidance_scale_tensor, embedding_dim=pipe.unet.config.time_cond_proj_dim
    ).to(device=device, dtype=dtype)


def check_stable_diffusion_inputs(pipe: Any, a: dict, *image_arguments: Any) -> None:
    """diffusers' SD1/SD2 ``check_inputs`` on the call's arguments ``a``: the prompt, ``image_arguments``
    (text-to-image's height and width, img2img's strength), then the prompts' and the step-end callback's arguments.
    The legacy ``callback_steps`` and IP-adapter images are None: calls with them run diffusers' own ``__call__``."""
    pipe.check_inputs(
        a["prompt"],
        *image_arguments,
        None,
        a["negative_prompt"],
        a["prompt_embeds"],
        a["negative_prompt_embeds"],
        None,
        None,
        a["callback_on_step_end_tensor_inputs"],
    )


def guidance_batch_embeddings(pipe: Any, a: dict, device: torch.device) -> torch.Tensor:
    """The text embeddings the UNet takes, as diffusers' SD and img2img pipelines build them from the call's
    arguments ``a``: the prompt encoded by the pipeline's own ``encode_prompt``, with the negative embeddings first
    under classifier-free guidance."""
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        a["prompt"],
        device,
        a["num_images_per_prompt"],
        pipe.do_classifier_free_guidance,
        a["negative_prompt"],
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        lora_scale=None,
        clip_skip=pipe.clip_skip,
    )
    if pipe.do_classifier_free_guidance:
        return torch.cat([negative_prompt_embeds, prompt_embeds])
    return prompt_embeds


def batch_size_of(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    """diffusers' batch size of a call: the number of prompts, or of prompt embeddings."""
    if prompt is not None and isinstance(prompt, str):
        return 1
    if prompt is not None and isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


@functools.cache
def _signature(function: Callable) -> inspect.Signature:
    # inspect.signature walks the decorators' __wrapped__ chain and the annotations: once per parent class.
    return inspect.signature(function)


def _converted(scheduler: Any) -> Any:
    # Exactly diffusers' class: a subclass may change the step, and is kept (its pipeline then runs diffusers' loop).
    if type(scheduler) is DiffusersDDIMScheduler:
        return DDIMScheduler.from_config(scheduler.config)
    return scheduler
