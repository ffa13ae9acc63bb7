"""``fastddim.DDIMPipeline``: diffusers' ``DDIMPipeline`` that keeps fastddim's scheduler and replays the whole
sampling loop as one CUDA graph (``fastddim.graphs``).

Same call signature, outputs, initial noise and post-processing as ``diffusers.DDIMPipeline`` (diffusers 0.42.1),
plus ``cuda_graph``. Differences:

- The scheduler it is given is kept (diffusers rebuilds it as a stock ``DDIMScheduler``); a diffusers scheduler is
  converted to ``fastddim.DDIMScheduler`` through its config. ``save_pretrained``/``from_pretrained`` round-trip it.
- On CUDA the loop (every UNet call and every fused step) is captured once per configuration and replayed. Timesteps
  reach the UNet and the step as device tensors, so nothing in the loop is created from Python numbers.
- Step noise for eta > 0: with a ``generator`` the per-step noises are drawn up front in diffusers' order (same images
  as diffusers); with ``seeds`` on the Triton backend (CUDA) the fused kernel draws each image's noise from Philox
  keyed by its seed, with the step's timestep in the counter (``DDIMScheduler.step``'s ``noise_seeds``); without
  either the fused kernel draws them in-kernel from torch's default CUDA generator, so each replay gets fresh noise
  and ``torch.manual_seed`` makes runs reproducible.

No ``from __future__ import annotations``: diffusers 0.33-0.36 loaders read ``__init__``'s annotations as objects.
"""

import inspect
import numbers

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from fastddim import graphs
from fastddim.graphs import DEFAULT_CUDA_GRAPH_CACHE_SIZE, CudaGraphCacheInfo, CudaGraphCacheMixin, StepInput
from fastddim.scheduler import DDIMScheduler, selected_backend
from fastddim.seeds import check_seeds, seed_generators
from fastddim.stepping import backend_for
from fastddim.utils import normalize_device

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")


class DDIMPipeline(CudaGraphCacheMixin, DiffusionPipeline):
    r"""Unconditional DDIM image generation with a fused, CUDA-graph-captured sampling loop.

    A drop-in for `diffusers.DDIMPipeline` (same call arguments and outputs) that keeps the scheduler it is given and,
    on CUDA, captures the whole denoising loop in a CUDA graph that later calls replay. See the superclass for the
    generic methods (``save_pretrained``, ``from_pretrained``, ``to``, progress bar, offloading).

    Args:
        unet (`UNet2DModel`): the denoiser.
        scheduler (`SchedulerMixin`): a `fastddim.DDIMScheduler`, kept as is; any other scheduler is converted with
            ``fastddim.DDIMScheduler.from_config(scheduler.config)``.

    Examples::

        >>> import fastddim, torch
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel.from_pretrained("path/to/unet")
        >>> pipe = fastddim.DDIMPipeline(unet, fastddim.DDIMScheduler())
        >>> images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

    # ------------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cuda_graph: bool | None = None,
        latents: torch.Tensor | None = None,
        seeds: list[int] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generates images.

        Args:
            batch_size (`int`, *optional*, defaults to 1): the number of images to generate.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes generation deterministic; a
                list holds one generator per image. With eta > 0 it also draws the step noises, in diffusers' order.
            eta (`float`, *optional*, defaults to 0.0): η of the DDIM paper, >= 0: 0 is DDIM, 1 is DDPM-like.
            num_inference_steps (`int`, *optional*, defaults to 50): the number of denoising steps.
            use_clipped_model_output (`bool`, *optional*): see `DDIMScheduler.step`; `None` means `False`.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"` (`PIL.Image` list), `"np"` (NHWC
                `np.ndarray`) or `"pt"` (NCHW `torch.Tensor`).
            return_dict (`bool`, *optional*, defaults to `True`): return an `ImagePipelineOutput` instead of a tuple.
            cuda_graph (`bool`, *optional*): capture the loop in a CUDA graph and replay it. `None` (default) means
                on when the UNet runs on CUDA; `True` off CUDA is an error; `False` runs the same loop eagerly.
            latents (`torch.Tensor`, *optional*): the initial noise x_T, (B, C, H, W) as the UNet takes it (e.g. from
                `invert`), instead of drawing it; B sets the batch size (``batch_size`` must then be 1 or B). A
                ``generator`` then draws only the step noises (eta > 0). The tensor is not modified.
            seeds (`list[int]`, *optional*): one image per seed, so an image depends on its seed only, not on the
                batch it is drawn in (up to the UNet's batch-size rounding). Its initial noise comes from a CPU
                generator seeded with it. For eta > 0 its step noise is keyed by (seed, step): on the Triton backend
                (CUDA) drawn inside the fused kernel from Philox keyed by the seed, with no host work per step and
                one captured graph for any seeds; on the torch backend (CPU) the same generator's next draws. The
                two backends draw different (each self-consistent) step noise. Sets the batch size (``batch_size``
                must be 1 or ``len(seeds)``); not with ``generator``. See `fastddim.seeds`.

        Returns:
            `ImagePipelineOutput` or `tuple`: the images, or a 1-tuple holding them.
        """
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if seeds is not None:
            if generator is not None:
                raise ValueError("pass either generator or seeds, not both")
            seeds = check_seeds(seeds)
            generator = seed_generators(seeds)
            if batch_size not in (1, len(generator)):
                raise ValueError(f"batch_size must be 1 or len(seeds) = {len(generator)} with seeds, got {batch_size}")
            batch_size = len(generator)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not eta >= 0:
            raise ValueError(f"eta must be a real number >= 0, got {eta!r}")
        if eta > 1:
            logger.warning(
                f"`eta` should be between 0 and 1 (inclusive), but received {eta}. "
                "A value of 0 corresponds to DDIM and 1 corresponds to DDPM. "
                "Unexpected results may occur for values outside this range."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if use_clipped_model_output is not None and not isinstance(use_clipped_model_output, bool):
            raise TypeError(f"use_clipped_model_output must be None or a bool, got {use_clipped_model_output!r}")
        if latents is not None and isinstance(latents, torch.Tensor) and latents.dim() == 4 and batch_size == 1:
            batch_size = latents.shape[0]
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(
                    f"You have passed a list of generators of length {len(generator)}, but requested an effective"
                    f" batch size of {batch_size}. Make sure the batch size matches the length of the generators."
                )
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator must be a torch.Generator or a list of them")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")

        device = normalize_device(self._execution_device)
        use_graph = graphs.resolve_cuda_graph(cuda_graph, device)

        dtype = self.unet.dtype
        if latents is None:
            shape = (batch_size, *self._sample_shape())
            image = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            image = self._check_latents(latents, batch_size).to(device=device, dtype=dtype)

        eta = float(eta)
        clipped = bool(use_clipped_model_output)
        noise_seeds = None
        if seeds is not None and eta > 0 and self._draws_keyed_noise(image):
            # The generators drew x_T; each step's noise is keyed by (seed, timestep) inside the fused kernel.
            noise_seeds = torch.tensor(seeds, dtype=torch.int64)
            if device.type == "cuda":
                # From pinned memory the copy is asynchronous: a call from device latents never waits on the host.
                noise_seeds = noise_seeds.pin_memory()
            noise_seeds = noise_seeds.to(device, non_blocking=True)
            generator = None
        if use_graph:
            # Host timesteps: a captured graph keeps its own device copy, so a replay needs no host-to-device copy.
            self.scheduler.set_timesteps(num_inference_steps)
            image = self._sample_graphed(image, generator, eta, clipped, device, noise_seeds)
        else:
            # Device timesteps: the UNet and the fused step read them there, with no host sync.
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = list(self.scheduler.timesteps)
            image = self._denoise(
                image,
                timesteps,
                eta,
                clipped,
                generator=generator,
                noises=None,
                progress=True,
                noise_seeds=noise_seeds,
            )

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1)
            # NumPy has no bfloat16 (diffusers' pipeline fails there); fp16/fp32 keep their dtype as in diffusers.
            if image.dtype == torch.bfloat16:
                image = image.float()
            image = image.numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ------------------------------------------------------------------------------------------------ inversion

    @torch.no_grad()
    def invert(
        self,
        image: PipelineImageInput,
        num_inference_steps: int = 50,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        r"""DDIM inversion (the paper's encoding x_0 -> x_T, section 5.4): the latents from which this pipeline's
        deterministic sampler (eta = 0, same ``num_inference_steps``) reconstructs ``image``.

        Runs `fastddim.DDIMInverseScheduler` (built from this pipeline's scheduler config) over the ascending
        timesteps, the UNet evaluated at each target timestep, as diffusers' inversion pipelines do. On CUDA the loop
        is captured in a CUDA graph like the sampling loop (``cuda_graph`` as in ``__call__``).

        Args:
            image (`PIL.Image.Image`, a list of them, `np.ndarray` or `torch.Tensor`): images as this pipeline
                outputs them, values in [0, 1]: PIL images (mode ``L`` or ``RGB``), an NHWC array (``output_type
                "np"``) or an NCHW tensor (``output_type "pt"``); a single HWC array or CHW tensor is one image.
                Values are checked, except in a CUDA tensor (that would synchronize with the device).
            num_inference_steps (`int`, *optional*, defaults to 50): the number of inversion steps.
            cuda_graph (`bool`, *optional*): capture the loop (`None`: on CUDA); `False` runs it eagerly.

        Returns:
            `torch.Tensor`: x_T, (B, C, H, W) in the UNet's dtype on its device, ready for ``pipe(latents=...)``.

        Examples::

            >>> images = pipe(batch_size=4, num_inference_steps=50, output_type="pt").images
            >>> latents = pipe.invert(images, num_inference_steps=50)
            >>> again = pipe(latents=latents, num_inference_steps=50, output_type="pt").images
        """
        from fastddim.inverse import DDIMInverseScheduler

        device = normalize_device(self._execution_device)
        use_graph = graphs.resolve_cuda_graph(cuda_graph, device)
        sample = (_images_to_tensor(image, self._sample_shape()) * 2 - 1).to(device=device, dtype=self.unet.dtype)
        inverse = self._inverse_scheduler(DDIMInverseScheduler)
        if not use_graph:
            inverse.set_timesteps(num_inference_steps, device=device)
            return self._invert_loop(sample, list(inverse.timesteps), inverse, progress=True)

        inverse.set_timesteps(num_inference_steps)
        timesteps = inverse.timesteps

        def body(buffers: graphs.LoopBuffers, steps: int) -> torch.Tensor:
            return self._invert_loop(buffers.inputs["sample"], buffers.timesteps[:steps], inverse, progress=False)

        config = tuple(sorted((name, repr(value)) for name, value in inverse.config.items()))
        loop = self._captured_loops().lookup(
            ("invert", id(inverse), config, selected_backend()),
            device=device,
            modules=(self.unet,),
            timesteps=timesteps,
            inputs={"sample": sample},
            step_inputs={},
            body=body,
            uses_rng=False,
            keep_alive=(inverse, inverse.coefficient_table(device, 0.0)),
        )
        if loop is None:
            return self._invert_loop(sample, list(timesteps.to(device)), inverse, progress=True)
        with self.progress_bar(total=len(timesteps)) as bar:
            latents = loop.replay({"sample": sample}, {})
            bar.update(len(timesteps))
        return latents

    def _invert_loop(
        self, sample: torch.Tensor, timesteps: list[torch.Tensor], inverse: SchedulerMixin, progress: bool
    ) -> torch.Tensor:
        """x_0 -> x_T over the ascending ``timesteps``: the UNet at each target timestep, then the inverse step."""
        for t in self.progress_bar(timesteps) if progress else timesteps:
            sample = inverse.step(self.unet(sample, t).sample, t, sample).prev_sample
        return sample

    def _inverse_scheduler(self, inverse_class: type) -> SchedulerMixin:
        """The inverse scheduler for the current scheduler config, rebuilt when that config changes."""
        accepted = set(inspect.signature(inverse_class.__init__).parameters) - {"self", "kwargs"}
        config = {name: value for name, value in self.scheduler.config.items() if name in accepted}
        key = tuple(sorted((name, repr(value)) for name, value in config.items()))
        cached = getattr(self, "_cached_inverse_scheduler", None)
        if cached is None or cached[0] != key:
            cached = self._cached_inverse_scheduler = (key, inverse_class.from_config(config))
        return cached[1]

    def _draws_keyed_noise(self, sample: torch.Tensor) -> bool:
        """Whether ``seeds`` key the step noise in the fused kernel: a fastddim scheduler on the Triton backend."""
        return isinstance(self.scheduler, DDIMScheduler) and backend_for(sample) == "triton"

    def _sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one sample, from the UNet's config."""
        sample_size = self.unet.config.sample_size
        spatial = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        return (self.unet.config.in_channels, *spatial)

    def _check_latents(self, latents: object, batch_size: int) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a floating-point torch.Tensor, got {type(latents).__name__}")
        expected = (batch_size, *self._sample_shape())
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"latents must have shape {expected} (batch, channels, height, width), got {tuple(latents.shape)}"
            )
        return latents

    # ------------------------------------------------------------------------------------------------ the loop

    def _denoise(
        self,
        sample: torch.Tensor,
        timesteps: list[torch.Tensor],
        eta: float,
        use_clipped_model_output: bool,
        generator: torch.Generator | list[torch.Generator] | None,
        noises: list[torch.Tensor] | None,
        progress: bool,
        noise_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sampling loop shared by eager runs, warm-up and capture: x_T -> x_0 over ``timesteps``."""
        # Passed only when set: a scheduler swapped in after construction may not take it.
        keyed = {} if noise_seeds is None else {"noise_seeds": noise_seeds}
        steps = range(len(timesteps))
        for i in self.progress_bar(steps) if progress else steps:
            t = timesteps[i]
            model_output = self.unet(sample, t).sample
            sample = self.scheduler.step(
                model_output,
                t,
                sample,
                eta=eta,
                use_clipped_model_output=use_clipped_model_output,
                generator=generator if noises is None else None,
                variance_noise=None if noises is None else noises[i],
                **keyed,
            ).prev_sample
        return sample

    def _sample_graphed(
        self,
        image: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        eta: float,
        use_clipped_model_output: bool,
        device: torch.device,
        noise_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the loop through the graph cache: replay, capture on a miss, or eager where capture failed."""
        scheduler = self.scheduler
        timesteps = scheduler.timesteps
        num_steps = timesteps.shape[0]
        exact_noise = eta > 0 and generator is not None
        keyed_noise = noise_seeds is not None
        inputs = {"sample": image}
        if keyed_noise:
            # A per-call input: new seeds are copied into the graph's static buffer and replay the same graph.
            inputs["noise_seeds"] = noise_seeds
        step_inputs = {}
        if exact_noise:
            shape, dtype = tuple(image.shape), image.dtype
            step_inputs["noise"] = StepInput(
                shape, dtype, lambda n: graphs.draw_step_noises(generator, shape, dtype, device, n)
            )
        unsupported = None
        keep_alive = ()
        if isinstance(scheduler, DDIMScheduler):
            # Built now so the capture never copies it from the host.
            keep_alive = (scheduler, scheduler.coefficient_table(device, eta))
        else:
            scheduler_name = f"{type(scheduler).__module__}.{type(scheduler).__name__}"
            unsupported = (
                f"CUDA graphs need a fastddim.DDIMScheduler (its step never syncs with the host), got {scheduler_name}"
            )

        def body(buffers: graphs.LoopBuffers, steps: int) -> torch.Tensor:
            noises = buffers.steps.get("noise")
            return self._denoise(
                buffers.inputs["sample"],
                buffers.timesteps[:steps],
                eta,
                use_clipped_model_output,
                generator=None,
                noises=None if noises is None else noises[:steps],
                progress=False,
                noise_seeds=buffers.inputs.get("noise_seeds"),
            )

        config = tuple(sorted((name, repr(value)) for name, value in scheduler.config.items()))
        loop = self._captured_loops().lookup(
            (id(scheduler), config, num_steps, eta, use_clipped_model_output, exact_noise, selected_backend()),
            device=device,
            modules=(self.unet,),
            timesteps=timesteps,
            inputs=inputs,
            step_inputs=step_inputs,
            body=body,
            uses_rng=eta > 0 and not exact_noise and not keyed_noise,
            keep_alive=keep_alive,
            unsupported=unsupported,
        )
        if loop is None:
            # Device timesteps only here: the upload would cost every replay a host sync.
            step_timesteps = list(timesteps.to(device))
            return self._denoise(
                image,
                step_timesteps,
                eta,
                use_clipped_model_output,
                generator=generator,
                noises=None,
                progress=True,
                noise_seeds=noise_seeds,
            )
        with self.progress_bar(total=num_steps) as bar:
            images = loop.replay(inputs, step_inputs)
            bar.update(num_steps)
        return images


def _images_to_tensor(image: object, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """Images as the pipeline outputs them (PIL, NHWC numpy or NCHW torch, in [0, 1]) as an fp32 NCHW CPU/device
    tensor, checked against the UNet's (C, H, W)."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, list):
        if not image or not all(isinstance(im, PIL.Image.Image) for im in image):
            raise TypeError("image must be a PIL image, a non-empty list of them, an np.ndarray or a torch.Tensor")
        mode = "L" if sample_shape[0] == 1 else "RGB"
        image = np.stack([np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in image])
        if image.ndim == 3:
            image = image[..., None]
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise ValueError(f"image as an np.ndarray must be NHWC (or HWC), got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        tensor = image[None] if image.dim() == 3 else image
        if tensor.dim() != 4:
            raise ValueError(f"image as a torch.Tensor must be NCHW (or CHW), got shape {tuple(image.shape)}")
        tensor = tensor.float()
    else:
        raise TypeError(
            f"image must be a PIL image, a list of them, an np.ndarray or a torch.Tensor, got {type(image).__name__}"
        )
    if tuple(tensor.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"image must hold images of (C, H, W) = {tuple(sample_shape)}, got {tuple(tensor.shape[1:])}")
    # A CUDA tensor is taken as it is: checking its values would synchronize with the device.
    if not tensor.is_cuda and not bool(((tensor >= 0) & (tensor <= 1)).all()):
        raise ValueError("image values must lie in [0, 1], as the pipeline outputs them")
    return tensor


__all__ = ["DDIMPipeline", "CudaGraphCacheInfo", "DEFAULT_CUDA_GRAPH_CACHE_SIZE", "OUTPUT_TYPES"]
