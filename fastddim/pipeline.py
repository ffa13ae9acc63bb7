"""``fastddim.DDIMPipeline``: diffusers' ``DDIMPipeline`` that keeps fastddim's scheduler and replays the whole
sampling loop as one CUDA graph.

Same call signature, outputs, initial noise and post-processing as ``diffusers.DDIMPipeline`` (diffusers 0.42.1),
plus ``cuda_graph``. Differences:

- The scheduler it is given is kept (diffusers rebuilds it as a stock ``DDIMScheduler``); a diffusers scheduler is
  converted to ``fastddim.DDIMScheduler`` through its config. ``save_pretrained``/``from_pretrained`` round-trip it.
- On CUDA the loop (every UNet call and every fused step) is captured once per configuration and replayed. Timesteps
  reach the UNet and the step as device tensors, so nothing in the loop is created from Python numbers.
- Step noise for eta > 0: with a ``generator`` the per-step noises are drawn up front in diffusers' order (same images
  as diffusers); without one the fused kernel draws them in-kernel from torch's default CUDA generator, so each
  replay gets fresh noise and ``torch.manual_seed`` makes runs reproducible.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from fastddim.scheduler import DDIMScheduler, selected_backend
from fastddim.seeds import seed_generators

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_CUDA_GRAPH_CACHE_SIZE = 4

_NOISE_NONE = "none"
_NOISE_EXACT = "exact"
_NOISE_PHILOX = "philox"

# Per-step slots of the static timestep and noise buffers start on this byte boundary. Triton specialises kernels on
# 16-byte pointer alignment, so unaligned slots would compile new variants in the middle of a capture.
_SLOT_ALIGN_BYTES = 64
# Eager steps run on a side stream before capture: Triton JIT, cuDNN/cuBLAS handles and algorithm choice. With
# aligned slots, step 0 (static input) and step 1 (pool-allocated input) cover every kernel variant of the loop.
_WARMUP_STEPS = 2
# Keys whose capture failed run eagerly without retrying; the set is bounded so long-lived pipelines do not grow.
_MAX_FAILED_KEYS = 64


class CudaGraphCacheInfo(NamedTuple):
    """Counters of a pipeline's CUDA-graph cache, in the spirit of ``functools.lru_cache``'s ``cache_info``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int
    fallbacks: int


@dataclass
class _CapturedLoop:
    """One captured sampling loop and the static buffers its kernels read and write."""

    graph: Any  # torch.cuda.CUDAGraph
    sample: torch.Tensor  # x_T, copied in before every replay
    output: torch.Tensor  # x_0, in the graph's private pool; overwritten by the next replay
    noise: torch.Tensor | None  # [N, slot] per-step noises (exact mode)
    fingerprint: tuple
    # The graph holds raw pointers to these: keeping them referenced keeps that memory from being reused.
    keep_alive: tuple


class DDIMPipeline(DiffusionPipeline):
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
        self._cuda_graphs: OrderedDict[tuple, _CapturedLoop] = OrderedDict()
        self._cuda_graph_cache_size = DEFAULT_CUDA_GRAPH_CACHE_SIZE
        self._failed_graph_keys: OrderedDict[tuple, None] = OrderedDict()
        self._graph_hits = 0
        self._graph_misses = 0
        self._graph_fallbacks = 0

    # ------------------------------------------------------------------------------------------------ graph cache

    def set_cuda_graph_cache_size(self, size: int) -> None:
        """Sets how many captured loops are kept (least recently used ones are dropped first).

        Each captured loop holds its static buffers and a private memory pool of about one step's activations.

        Args:
            size (`int`): the number of graphs to keep, >= 1.
        """
        if not isinstance(size, numbers.Integral) or isinstance(size, bool):
            raise TypeError(f"size must be an int, got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._cuda_graph_cache_size = int(size)
        while len(self._cuda_graphs) > self._cuda_graph_cache_size:
            self._cuda_graphs.popitem(last=False)

    def clear_cuda_graph_cache(self) -> None:
        """Drops every captured loop (freeing their memory) and forgets which configurations failed to capture.

        Call it after changing the UNet in ways the cache cannot see: replacing submodules or attention processors,
        or writing weights through ``.data`` (which bypasses the version counters the cache checks).
        """
        self._cuda_graphs.clear()
        self._failed_graph_keys.clear()

    def cuda_graph_cache_info(self) -> CudaGraphCacheInfo:
        """Returns hit/miss/fallback counters and the current and maximum number of cached graphs."""
        return CudaGraphCacheInfo(
            hits=self._graph_hits,
            misses=self._graph_misses,
            maxsize=self._cuda_graph_cache_size,
            currsize=len(self._cuda_graphs),
            fallbacks=self._graph_fallbacks,
        )

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
            seeds (`list[int]`, *optional*): one image per seed, each drawn from its own CPU generator seeded with it
                (initial and step noise), so an image depends on its seed only, not on the batch it is drawn in (up
                to the UNet's batch-size rounding). Sets the batch size (``batch_size`` must be 1 or
                ``len(seeds)``); not with ``generator``. See `fastddim.seeds`.

        Returns:
            `ImagePipelineOutput` or `tuple`: the images, or a 1-tuple holding them.
        """
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if seeds is not None:
            if generator is not None:
                raise ValueError("pass either generator or seeds, not both")
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
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be None or a bool, got {type(cuda_graph).__name__}")
        if use_clipped_model_output is not None and not isinstance(use_clipped_model_output, bool):
            raise TypeError(f"use_clipped_model_output must be None or a bool, got {use_clipped_model_output!r}")
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

        device = _normalize_device(self._execution_device)
        if cuda_graph and not _graphs_supported(device):
            raise ValueError(f"cuda_graph=True needs the UNet on a CUDA device, but it runs on {device}")
        use_graph = _graphs_supported(device) if cuda_graph is None else cuda_graph

        sample_size = self.unet.config.sample_size
        spatial = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        shape = (batch_size, self.unet.config.in_channels, *spatial)
        dtype = self.unet.dtype
        image = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        eta = float(eta)
        clipped = bool(use_clipped_model_output)
        if use_graph:
            # Host timesteps: a captured graph keeps its own device copy, so a replay needs no host-to-device copy.
            self.scheduler.set_timesteps(num_inference_steps)
            image = self._sample_graphed(image, generator, eta, clipped, device)
        else:
            # Device timesteps: the UNet and the fused step read them there, with no host sync.
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = list(self.scheduler.timesteps)
            image = self._denoise(image, timesteps, eta, clipped, generator=generator, noises=None, progress=True)

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
    ) -> torch.Tensor:
        """The sampling loop shared by eager runs, warm-up and capture: x_T -> x_0 over ``timesteps``."""
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
            ).prev_sample
        return sample

    def _sample_graphed(
        self,
        image: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        eta: float,
        use_clipped_model_output: bool,
        device: torch.device,
    ) -> torch.Tensor:
        """Runs the loop through the graph cache: replay, capture on a miss, or eager where capture failed."""
        timesteps = self.scheduler.timesteps
        num_steps = timesteps.shape[0]
        if eta == 0:
            noise_mode = _NOISE_NONE
        elif generator is not None:
            noise_mode = _NOISE_EXACT
        else:
            noise_mode = _NOISE_PHILOX

        key = self._graph_key(image, num_steps, eta, use_clipped_model_output, noise_mode, device)

        def run_eagerly() -> torch.Tensor:
            # Built only when needed: the timestep upload would cost every replay a host sync.
            step_timesteps = list(timesteps.to(device))
            return self._denoise(
                image, step_timesteps, eta, use_clipped_model_output, generator=generator, noises=None, progress=True
            )

        if key in self._failed_graph_keys:
            self._failed_graph_keys.move_to_end(key)
            self._graph_fallbacks += 1
            return run_eagerly()
        if not isinstance(self.scheduler, DDIMScheduler):
            scheduler_name = f"{type(self.scheduler).__module__}.{type(self.scheduler).__name__}"
            return self._fall_back(
                key,
                f"CUDA graphs need a fastddim.DDIMScheduler (its step never syncs with the host), got {scheduler_name}",
                run_eagerly,
            )

        fingerprint = _weights_fingerprint(self.unet)
        entry = self._cuda_graphs.get(key)
        if entry is not None and entry.fingerprint != fingerprint:
            entry = None
        if entry is None:
            self._graph_misses += 1
            self._drop_stale_graphs(fingerprint)
            try:
                entry = self._capture(image, timesteps, eta, use_clipped_model_output, noise_mode, device, fingerprint)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager loop
                _repair_default_generator(device)
                reason = f"CUDA graph capture of the sampling loop failed ({type(exc).__name__}: {_first_line(exc)})"
                return self._fall_back(key, reason, run_eagerly)
            self._cuda_graphs[key] = entry
            while len(self._cuda_graphs) > self._cuda_graph_cache_size:
                self._cuda_graphs.popitem(last=False)
        else:
            self._graph_hits += 1
            self._cuda_graphs.move_to_end(key)

        with torch.cuda.device(device):
            entry.sample.copy_(image)
            if entry.noise is not None:
                self._draw_step_noises(entry.noise, generator, image, num_steps)
            with self.progress_bar(total=num_steps) as bar:
                entry.graph.replay()
                bar.update(num_steps)
            # The static output is overwritten by the next replay: hand out a copy.
            return entry.output.clone()

    def _graph_key(
        self,
        image: torch.Tensor,
        num_steps: int,
        eta: float,
        use_clipped_model_output: bool,
        noise_mode: str,
        device: torch.device,
    ) -> tuple:
        scheduler = self.scheduler
        config = tuple(sorted((name, repr(value)) for name, value in scheduler.config.items()))
        return (
            id(self.unet),
            self.unet.training,
            id(scheduler),
            config,
            tuple(image.shape),
            image.dtype,
            device,
            num_steps,
            eta,
            use_clipped_model_output,
            noise_mode,
            selected_backend(),
        )

    def _fall_back(self, key: tuple, reason: str, run_eagerly: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Warns once for ``key``, remembers it, and runs the loop eagerly."""
        self._failed_graph_keys[key] = None
        while len(self._failed_graph_keys) > _MAX_FAILED_KEYS:
            self._failed_graph_keys.popitem(last=False)
        self._graph_fallbacks += 1
        # stacklevel: _fall_back, _sample_graphed, __call__, torch.no_grad's wrapper, then the caller.
        warnings.warn(
            f"{reason}; this configuration now runs eagerly. Pass cuda_graph=False to silence this warning.",
            RuntimeWarning,
            stacklevel=5,
        )
        return run_eagerly()

    def _drop_stale_graphs(self, fingerprint: tuple) -> None:
        # Graphs of this UNet captured before its weights changed read freed or outdated memory: never valid again.
        unet_id = id(self.unet)
        for key in [k for k, e in self._cuda_graphs.items() if k[0] == unet_id and e.fingerprint != fingerprint]:
            del self._cuda_graphs[key]

    @staticmethod
    def _draw_step_noises(
        buffer: torch.Tensor,
        generator: torch.Generator | list[torch.Generator],
        image: torch.Tensor,
        num_steps: int,
    ) -> None:
        """Fills the [N, slot] buffer with the noises diffusers' step would draw, step by step, from ``generator``."""
        shape, numel = tuple(image.shape), image.numel()
        generators = generator if isinstance(generator, list) else [generator]
        if all(g.device.type == "cpu" for g in generators):
            # randn_tensor draws CPU-generator noise on the CPU anyway: draw all steps there, then copy once.
            drawn = [
                randn_tensor(shape, generator=generator, device="cpu", dtype=image.dtype) for _ in range(num_steps)
            ]
            buffer[:, :numel].copy_(torch.stack(drawn).reshape(num_steps, numel))
        else:
            for i in range(num_steps):
                noise = randn_tensor(shape, generator=generator, device=image.device, dtype=image.dtype)
                buffer[i, :numel].copy_(noise.reshape(numel))

    def _capture(
        self,
        image: torch.Tensor,
        timesteps: torch.Tensor,
        eta: float,
        use_clipped_model_output: bool,
        noise_mode: str,
        device: torch.device,
        fingerprint: tuple,
    ) -> _CapturedLoop:
        """Allocates the static buffers and captures the whole loop over them into one CUDA graph."""
        num_steps = timesteps.shape[0]
        with torch.cuda.device(device):
            timestep_buffer = _slotted_buffer(num_steps, 1, torch.int64, device)
            timestep_buffer[:, 0].copy_(timesteps)
            step_timesteps = [timestep_buffer[i, 0] for i in range(num_steps)]

            numel = image.numel()
            noise_buffer = None
            step_noises = None
            if noise_mode == _NOISE_EXACT:
                noise_buffer = _slotted_buffer(num_steps, numel, image.dtype, device)
                noise_buffer.zero_()
                step_noises = [noise_buffer[i, :numel].view(image.shape) for i in range(num_steps)]

            static_sample = image.clone(memory_format=torch.contiguous_format)
            # Built now so the capture never copies it from the host.
            table = self.scheduler.coefficient_table(device, eta)

            def run(steps: int) -> torch.Tensor:
                return self._denoise(
                    static_sample,
                    step_timesteps[:steps],
                    eta,
                    use_clipped_model_output,
                    generator=None,
                    noises=None if step_noises is None else step_noises[:steps],
                    progress=False,
                )

            graph, static_output = _capture_graph(run, num_steps, device, uses_rng=noise_mode == _NOISE_PHILOX)

        return _CapturedLoop(
            graph=graph,
            sample=static_sample,
            output=static_output,
            noise=noise_buffer,
            fingerprint=fingerprint,
            keep_alive=(self.unet, self.scheduler, table, timestep_buffer),
        )


def _capture_graph(
    run: Callable[[int], torch.Tensor], num_steps: int, device: torch.device, uses_rng: bool
) -> tuple[Any, torch.Tensor]:
    """Warms ``run`` up on a side stream, then captures ``run(num_steps)``. Returns (graph, static output)."""
    side_stream = torch.cuda.Stream(device)
    side_stream.wait_stream(torch.cuda.current_stream(device))
    # Warm-up steps draw from the default CUDA generator in Philox mode; restoring it keeps a capturing call on the
    # same random stream as a replaying one (and as the eager loop).
    rng_state = torch.cuda.get_rng_state(device) if uses_rng else None
    try:
        with torch.cuda.stream(side_stream):
            run(min(num_steps, _WARMUP_STEPS))
    finally:
        if rng_state is not None:
            torch.cuda.set_rng_state(rng_state, device)
    torch.cuda.current_stream(device).wait_stream(side_stream)
    torch.cuda.synchronize(device)

    graph = torch.cuda.CUDAGraph()
    # Captured by hand rather than with torch.cuda.graph, which leaves its capture stream current when capture_end
    # raises. This stream serves this capture only, so a failed capture leaves no state behind on other streams.
    with torch.cuda.stream(side_stream):
        # thread_local: a forbidden call (sync, pageable copy) in this thread aborts the capture, while other threads
        # of the process keep working.
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            static_output = run(num_steps)
        except BaseException:
            # End the invalidated capture, but report what broke it rather than capture_end's complaint.
            with contextlib.suppress(Exception):
                graph.capture_end()
            raise
        graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(side_stream)
    return graph, static_output


def _repair_default_generator(device: torch.device) -> None:
    """Makes the default CUDA generator usable again after a failed capture.

    PyTorch versions that mark a generator as capturing in ``capture_begin`` and unmark it only at the end of a
    successful ``capture_end`` leave it "capturing" when a capture fails, and every later random op on the device then
    raises. A probe detects that; a fresh copy of the state (same seed and offset) replaces the stuck one. Healthy
    generators are left as they were: the probe's draw is undone.
    """
    if device.type != "cuda":
        return
    # Best effort on a path that already failed: never let the repair itself raise.
    try:
        generator = torch.cuda.default_generators[device.index]
        state = generator.get_state()
    except Exception:  # noqa: BLE001
        return
    try:
        torch.empty(1, device=device).normal_()
    except RuntimeError:
        with contextlib.suppress(Exception):
            generator.graphsafe_set_state(generator.clone_state())
    with contextlib.suppress(Exception):
        generator.set_state(state)


def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _slotted_buffer(num_slots: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An [num_slots, padded numel] buffer whose rows each start on a ``_SLOT_ALIGN_BYTES`` boundary."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_slot = max(1, _SLOT_ALIGN_BYTES // itemsize)
    padded = math.ceil(numel / per_slot) * per_slot
    return torch.empty((num_slots, padded), dtype=dtype, device=device)


def _weights_fingerprint(module: torch.nn.Module) -> tuple:
    """Addresses and version counters of every parameter and buffer: changes on reallocation (``.to()``, loading
    into new tensors) and on in-place updates (``copy_``, ``add_``, ``load_state_dict``), read without a sync."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(module.parameters(), module.buffers()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


__all__ = ["DDIMPipeline", "CudaGraphCacheInfo", "DEFAULT_CUDA_GRAPH_CACHE_SIZE", "OUTPUT_TYPES"]
