"""The captured-loop engine: a whole sampling loop captured once per configuration as one CUDA graph, then replayed.

A pipeline hands the engine a key (what its loop bakes in), the modules the loop runs (their identity and weights
join the key), the host timesteps, the per-call inputs and a loop body ``body(buffers, num_steps) -> output``. On a
miss the engine allocates static buffers like the inputs, warms the body up on a side stream, captures
``body(buffers, N)`` and keeps the graph in a bounded LRU cache; every call copies its inputs into the static buffers,
replays, and hands out a copy of the static output. A capture that fails warns once, and that configuration runs
eagerly from then on.

- Per-call inputs (``inputs``): tensors are copied into static buffers of the same shape, dtype and strides (so a
  channels-last sample stays channels-last inside the graph); Python numbers fill 0-dim fp32 buffers, so a new
  guidance scale reuses the graph.
- Per-step inputs drawn anew each call (``StepInput``, DDIM's step noises drawn from a user generator) live in a
  buffer with one slot per step, drawn only when the graph is replayed (never on the eager fallback, which draws
  them itself).
- The timesteps are part of the key: their device copy is written once, at capture, and each step reads its slot.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import numbers
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastddim import compat
from fastddim.utils import first_line

__all__ = [
    "DEFAULT_CUDA_GRAPH_CACHE_SIZE",
    "CapturedLoop",
    "CapturedLoopCache",
    "CudaGraphCacheInfo",
    "CudaGraphCacheMixin",
    "LoopBuffers",
    "StepInput",
    "capture_graph",
    "draw_step_noises",
    "graphs_supported",
    "resolve_cuda_graph",
    "weights_fingerprint",
]

DEFAULT_CUDA_GRAPH_CACHE_SIZE = 4

# Per-step slots of the static timestep and noise buffers start on this byte boundary. Triton specialises kernels on
# 16-byte pointer alignment, so unaligned slots would compile new variants in the middle of a capture.
SLOT_ALIGN_BYTES = 64
# Eager steps run on a side stream before capture: Triton JIT, cuDNN/cuBLAS handles and algorithm choice. With
# aligned slots, step 0 (static input) and step 1 (pool-allocated input) cover every kernel variant of the loop.
WARMUP_STEPS = 2
# Keys whose capture failed run eagerly without retrying; the set is bounded so long-lived pipelines do not grow.
MAX_FAILED_KEYS = 64


class CudaGraphCacheInfo(NamedTuple):
    """Counters of a pipeline's CUDA-graph cache, in the spirit of ``functools.lru_cache``'s ``cache_info``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int
    fallbacks: int


@dataclass(frozen=True)
class StepInput:
    """A per-step input drawn anew for every call, stored in one slot per step.

    Args:
        shape (`tuple`): the shape of one step's tensor.
        dtype (`torch.dtype`): its dtype.
        draw (`Callable[[int], torch.Tensor]`): ``draw(num_steps)`` returns the [num_steps, *shape] values of this
            call (on any device); called once per replay, never when the loop runs eagerly.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    draw: Callable[[int], torch.Tensor]


@dataclass
class LoopBuffers:
    """The static tensors a loop body reads; the captured graph keeps their addresses.

    Attributes:
        inputs (`dict`): per-call inputs by name (numbers as 0-dim fp32 tensors).
        steps (`dict`): per-step inputs by name, one tensor of ``StepInput.shape`` per step.
        timesteps (`list`): one 0-dim int64 device tensor per step.
    """

    inputs: dict[str, torch.Tensor]
    steps: dict[str, list[torch.Tensor]]
    timesteps: list[torch.Tensor]


@dataclass
class CapturedLoop:
    """One captured loop: its graph, its static buffers and what it was captured from."""

    graph: Any  # torch.cuda.CUDAGraph
    device: torch.device
    buffers: LoopBuffers
    step_slots: dict[str, torch.Tensor]  # [N, padded numel] storage behind ``buffers.steps``
    output: torch.Tensor  # in the graph's private pool; overwritten by the next replay
    module_ids: tuple[int, ...]
    fingerprint: tuple
    # The graph holds raw pointers into these: keeping them referenced keeps that memory from being reused.
    keep_alive: tuple = field(default=())
    # The streams this loop has been replayed on, the last one included (CUDA only).
    replay_streams: set = field(default_factory=set)
    last_stream: Any = None

    def replay(self, inputs: Mapping[str, torch.Tensor | float], step_inputs: Mapping[str, StepInput]) -> torch.Tensor:
        """Copies this call's inputs into the static buffers, replays, and returns a copy of the output.

        Args:
            inputs (`Mapping`): the per-call inputs, same names, shapes and dtypes as at capture.
            step_inputs (`Mapping`): the per-step inputs, drawn now.

        Returns:
            `torch.Tensor`: the loop's output (a fresh tensor: the next replay does not overwrite it).
        """
        num_steps = len(self.buffers.timesteps)
        with torch.cuda.device(self.device):
            if self.device.type == "cuda":
                self._enter_stream(torch.cuda.current_stream(self.device))
            for name, value in inputs.items():
                buffer = self.buffers.inputs[name]
                if isinstance(value, torch.Tensor):
                    buffer.copy_(value)
                else:
                    # fill_ takes the number as a kernel argument: no host-to-device copy, no sync.
                    buffer.fill_(value)
            for name, spec in step_inputs.items():
                slots = self.step_slots[name]
                numel = math.prod(spec.shape)
                values = spec.draw(num_steps).reshape(num_steps, numel)
                if values.device.type == "cpu" and self.device.type == "cuda":
                    # Noises from CPU generators: from pinned memory the copy does not wait for the stream's earlier
                    # work (a pageable copy would, making back-to-back calls wait on each other).
                    values = values.pin_memory()
                slots[:, :numel].copy_(values, non_blocking=True)
            self.graph.replay()
            return self.output.clone()

    def _enter_stream(self, stream: Any) -> None:
        """Orders this replay after the previous one and tells the allocator where the graph's memory is used, when
        the caller's stream (``with torch.cuda.stream(s): pipe(...)``) is not the previous replay's.

        - The previous replay, on another stream, may still read the static inputs this one overwrites, or write the
          output it copies: this stream waits for that one (on the device: no host sync).
        - Once this loop is dropped (evicted, cleared, made stale), the allocator hands the memory the graph reads out
          again on the stream it was allocated on, in that stream's order only: ``record_stream`` makes it wait for
          this stream's work too. Recorded once per stream (the allocator checks at free time).
        """
        if self.last_stream is not None and stream != self.last_stream:
            stream.wait_stream(self.last_stream)
        self.last_stream = stream
        if stream in self.replay_streams:
            return
        self.replay_streams.add(stream)
        for tensor in self._graph_tensors():
            tensor.record_stream(stream)

    def _graph_tensors(self) -> list[torch.Tensor]:
        """The regular-allocator tensors on this device that the graph reads: the static inputs and step slots, and
        from ``keep_alive`` the timestep slots, coefficient tables and module weights. (The graph's activations and
        output live in its private pool, which is freed only after a device synchronization.)"""
        tensors = [*self.buffers.inputs.values(), *self.step_slots.values()]
        for kept in self.keep_alive:
            if isinstance(kept, torch.Tensor):
                tensors.append(kept)
            elif isinstance(kept, torch.nn.Module):
                tensors.extend(itertools.chain(kept.parameters(), kept.buffers()))
        return [tensor for tensor in tensors if tensor.device == self.device]


class CapturedLoopCache:
    """A bounded LRU cache of captured loops, with hit/miss/fallback counters and a remembered eager fallback.

    Args:
        maxsize (`int`): how many captured loops to keep.
    """

    def __init__(self, maxsize: int = DEFAULT_CUDA_GRAPH_CACHE_SIZE):
        self._loops: OrderedDict[tuple, CapturedLoop] = OrderedDict()
        self._failed_keys: OrderedDict[tuple, None] = OrderedDict()
        self.maxsize = _check_size(maxsize)
        self.hits = self.misses = self.fallbacks = 0

    def set_size(self, size: int) -> None:
        """Sets how many captured loops are kept; the least recently used ones are dropped first."""
        self.maxsize = _check_size(size)
        self._evict()

    def clear(self) -> None:
        """Drops every captured loop (freeing their memory) and forgets which configurations failed to capture."""
        self._loops.clear()
        self._failed_keys.clear()

    def info(self) -> CudaGraphCacheInfo:
        """Returns hit/miss/fallback counters and the current and maximum number of cached loops."""
        return CudaGraphCacheInfo(self.hits, self.misses, self.maxsize, len(self._loops), self.fallbacks)

    def lookup(
        self,
        key: Hashable,
        *,
        device: torch.device,
        modules: Sequence[torch.nn.Module],
        timesteps: torch.Tensor,
        inputs: Mapping[str, torch.Tensor | float],
        step_inputs: Mapping[str, StepInput],
        body: Callable[[LoopBuffers, int], torch.Tensor],
        uses_rng: bool,
        keep_alive: tuple = (),
        unsupported: str | None = None,
    ) -> CapturedLoop | None:
        """The captured loop for this configuration: cached, captured now, or None when the loop must run eagerly.

        Args:
            key (`Hashable`): whatever the body bakes in besides what is listed below (scheduler config, eta...).
            device (`torch.device`): the CUDA device, with its index.
            modules (`Sequence`): the modules the body runs; their identity, training flag and weights (addresses
                and version counters) join the key, and a weight change replaces their stale graphs.
            timesteps (`torch.Tensor`): the 1-D host int64 timesteps, one per step.
            inputs (`Mapping`): this call's per-call inputs (their shapes, dtypes and strides join the key).
            step_inputs (`Mapping`): the per-step inputs (their shapes and dtypes join the key); not drawn here.
            body (`Callable`): ``body(buffers, num_steps)`` runs the first ``num_steps`` steps over the static
                buffers and returns the output; it must not synchronise with the host.
            uses_rng (`bool`): the body draws from the default CUDA generator (restored after the warm-up).
            keep_alive (`tuple`): objects whose device memory the graph reads (coefficient tables...).
            unsupported (`str`, *optional*): why this configuration cannot be captured: it then runs eagerly, with
                one warning per key.

        Returns:
            `CapturedLoop` or `None`: replay the former; on None run the same loop eagerly.
        """
        host_timesteps = tuple(int(t) for t in timesteps.tolist())
        full_key = (
            key,
            device,
            host_timesteps,
            tuple(_input_signature(name, value) for name, value in inputs.items()),
            tuple((name, tuple(spec.shape), spec.dtype) for name, spec in step_inputs.items()),
            uses_rng,
            tuple((id(module), module.training) for module in modules),
        )
        if full_key in self._failed_keys:
            self._failed_keys.move_to_end(full_key)
            self.fallbacks += 1
            return None
        if unsupported is not None:
            self._fall_back(full_key, unsupported)
            return None

        fingerprint = weights_fingerprint(modules)
        loop = self._loops.get(full_key)
        if loop is not None and loop.fingerprint == fingerprint:
            self.hits += 1
            self._loops.move_to_end(full_key)
            return loop

        self.misses += 1
        module_ids = tuple(id(module) for module in modules)
        # Graphs of these modules captured before their weights changed read freed or outdated memory.
        for stale in [
            k for k, e in self._loops.items() if e.module_ids == module_ids and e.fingerprint != fingerprint
        ]:
            del self._loops[stale]
        try:
            # The modules stay referenced too: their weights are read by the graph, and their ids are in the key.
            loop = _capture_loop(
                device,
                host_timesteps,
                inputs,
                step_inputs,
                body,
                uses_rng,
                module_ids,
                fingerprint,
                (*modules, *keep_alive),
            )
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager loop
            compat.repair_default_generator(device)
            self._fall_back(
                full_key, f"CUDA graph capture of the sampling loop failed ({type(exc).__name__}: {first_line(exc)})"
            )
            return None
        self._loops[full_key] = loop
        self._evict()
        return loop

    def _evict(self) -> None:
        while len(self._loops) > self.maxsize:
            self._loops.popitem(last=False)

    def _fall_back(self, key: tuple, reason: str) -> None:
        self._failed_keys[key] = None
        while len(self._failed_keys) > MAX_FAILED_KEYS:
            self._failed_keys.popitem(last=False)
        self.fallbacks += 1
        warnings.warn(
            f"{reason}; this configuration now runs eagerly. Pass cuda_graph=False to silence this warning.",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )


class CudaGraphCacheMixin:
    """The public cache controls of a pipeline that replays captured loops (the cache is created on first use)."""

    def _captured_loops(self) -> CapturedLoopCache:
        cache = self.__dict__.get("_captured_loop_cache")
        if cache is None:
            cache = self.__dict__["_captured_loop_cache"] = CapturedLoopCache()
        return cache

    def set_cuda_graph_cache_size(self, size: int) -> None:
        """Sets how many captured loops are kept (least recently used ones are dropped first).

        Each captured loop holds its static buffers and a private memory pool of about one step's activations.

        Args:
            size (`int`): the number of graphs to keep, >= 1.
        """
        self._captured_loops().set_size(size)

    def clear_cuda_graph_cache(self) -> None:
        """Drops every captured loop (freeing their memory) and forgets which configurations failed to capture.

        Call it after changing the UNet in ways the cache cannot see: replacing submodules or attention processors,
        settings its forward reads from Python attributes (FreeU's factors, say: the graph holds the values it was
        captured with), or writing weights through ``.data`` (which bypasses the version counters the cache checks).
        """
        self._captured_loops().clear()

    def cuda_graph_cache_info(self) -> CudaGraphCacheInfo:
        """Returns hit/miss/fallback counters and the current and maximum number of cached graphs."""
        return self._captured_loops().info()


def resolve_cuda_graph(cuda_graph: bool | None, device: torch.device) -> bool:
    """Whether a call runs its loop through the graph cache: ``cuda_graph``, or by default where graphs are supported.

    Raises:
        TypeError: ``cuda_graph`` is not None or a bool.
        ValueError: ``cuda_graph=True`` on a device without CUDA graphs.
    """
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be None or a bool, got {type(cuda_graph).__name__}")
    supported = graphs_supported(device)
    if cuda_graph and not supported:
        raise ValueError(f"cuda_graph=True needs the UNet on a CUDA device, but it runs on {device}")
    return supported if cuda_graph is None else cuda_graph


def graphs_supported(device: torch.device) -> bool:
    """Whether loops on ``device`` can be captured (CUDA devices)."""
    return device.type == "cuda"


def capture_graph(
    run: Callable[[int], torch.Tensor], num_steps: int, device: torch.device, uses_rng: bool
) -> tuple[Any, torch.Tensor]:
    """Warms ``run`` up on a side stream, then captures ``run(num_steps)``.

    Args:
        run (`Callable[[int], torch.Tensor]`): runs the first n steps of the loop over static buffers.
        num_steps (`int`): the number of steps to capture.
        device (`torch.device`): the CUDA device.
        uses_rng (`bool`): the loop draws from the default CUDA generator, whose state the warm-up must not advance.

    Returns:
        `tuple`: (``torch.cuda.CUDAGraph``, the static output tensor).
    """
    side_stream = _capture_stream(device)
    side_stream.wait_stream(torch.cuda.current_stream(device))
    # Warm-up steps draw from the default CUDA generator in Philox mode; restoring it keeps a capturing call on the
    # same random stream as a replaying one (and as the eager loop).
    rng_state = torch.cuda.get_rng_state(device) if uses_rng else None
    try:
        with torch.cuda.stream(side_stream):
            run(min(num_steps, WARMUP_STEPS))
    finally:
        if rng_state is not None:
            torch.cuda.set_rng_state(rng_state, device)
    torch.cuda.current_stream(device).wait_stream(side_stream)
    torch.cuda.synchronize(device)

    graph = torch.cuda.CUDAGraph()
    # A pool of our own (what capture_begin would create) whose id is known here, so that a capture that never ends
    # can give it back to the caching allocator.
    pool = torch.cuda.graph_pool_handle()
    # Captured by hand rather than with torch.cuda.graph, which leaves its capture stream current when capture_end
    # raises. This stream serves captures only, so a failed capture leaves no state behind on other streams.
    with torch.cuda.stream(side_stream):
        try:
            # thread_local: a forbidden call (sync, pageable copy) in this thread aborts the capture, while other
            # threads of the process keep working.
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                static_output = run(num_steps)
            except BaseException:
                # End the invalidated capture, but report what broke it rather than capture_end's complaint.
                with contextlib.suppress(Exception):
                    graph.capture_end()
                raise
            graph.capture_end()
        except BaseException:
            if not _capture_ended(graph):
                compat.release_unended_capture_pool(device, pool)
            # Should the stream still be capturing (capture_end refused to end it), no later capture may inherit it.
            _capture_streams.pop(device, None)
            raise
    torch.cuda.current_stream(device).wait_stream(side_stream)
    return graph, static_output


def draw_step_noises(
    generator: torch.Generator | list[torch.Generator],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    num_steps: int,
) -> torch.Tensor:
    """The [num_steps, *shape] noises diffusers' DDIM step draws from ``generator``, step by step, in its order.

    Args:
        generator (`torch.Generator` or `list[torch.Generator]`): one generator, or one per sample.
        shape (`tuple`): the sample shape.
        dtype (`torch.dtype`): the sample dtype.
        device (`torch.device`): the sample device.
        num_steps (`int`): the number of steps.

    Returns:
        `torch.Tensor`: the stacked noises; on the CPU when every generator is (``randn_tensor`` draws there anyway,
        so the device receives them in one copy).
    """
    generators = generator if isinstance(generator, list) else [generator]
    draw_device = torch.device("cpu") if all(g.device.type == "cpu" for g in generators) else device
    return torch.stack(
        [randn_tensor(shape, generator=generator, device=draw_device, dtype=dtype) for _ in range(num_steps)]
    )


def weights_fingerprint(modules: Sequence[torch.nn.Module]) -> tuple:
    """Addresses and version counters of every parameter and buffer: changes on reallocation (``.to()``, loading
    into new tensors) and on in-place updates (``copy_``, ``add_``, ``load_state_dict``), read without a sync."""
    return tuple(
        (t.data_ptr(), compat.tensor_version(t))
        for module in modules
        for t in itertools.chain(module.parameters(), module.buffers())
    )


# ------------------------------------------------------------------------------------------------ helpers


def _capture_loop(
    device: torch.device,
    host_timesteps: tuple[int, ...],
    inputs: Mapping[str, torch.Tensor | float],
    step_inputs: Mapping[str, StepInput],
    body: Callable[[LoopBuffers, int], torch.Tensor],
    uses_rng: bool,
    module_ids: tuple[int, ...],
    fingerprint: tuple,
    keep_alive: tuple,
) -> CapturedLoop:
    """Allocates the static buffers (filled with this call's tensor inputs) and captures the body over them."""
    num_steps = len(host_timesteps)
    with torch.cuda.device(device):
        # Static buffers are written in place by every later replay, which may run outside inference mode, where an
        # inference tensor cannot be written: they are normal tensors even when this call runs under inference_mode.
        with torch.inference_mode(False):
            timestep_slots = _slotted_buffer(num_steps, 1, torch.int64, device)
            timestep_slots[:, 0].copy_(torch.tensor(host_timesteps, dtype=torch.int64))
            static_inputs = {}
            for name, value in inputs.items():
                if isinstance(value, torch.Tensor):
                    static_inputs[name] = torch.empty_like(value, device=device).copy_(value)
                else:
                    static_inputs[name] = torch.full((), float(value), dtype=torch.float32, device=device)
            step_slots, step_views = {}, {}
            for name, spec in step_inputs.items():
                numel = math.prod(spec.shape)
                slots = step_slots[name] = _slotted_buffer(num_steps, numel, spec.dtype, device).zero_()
                step_views[name] = [slots[i, :numel].view(spec.shape) for i in range(num_steps)]
            buffers = LoopBuffers(
                inputs=static_inputs, steps=step_views, timesteps=[timestep_slots[i, 0] for i in range(num_steps)]
            )
        graph, output = capture_graph(lambda steps: body(buffers, steps), num_steps, device, uses_rng)
    return CapturedLoop(
        graph=graph,
        device=device,
        buffers=buffers,
        step_slots=step_slots,
        output=output,
        module_ids=module_ids,
        fingerprint=fingerprint,
        keep_alive=(timestep_slots, *keep_alive),
    )


# One warm-up and capture stream per device, as torch.cuda.graph keeps one: the caching allocator keeps freed blocks
# per stream, so a new pooled stream per capture would strand a warm-up's worth of activations on each of them.
_capture_streams: dict[torch.device, Any] = {}


def _capture_stream(device: torch.device) -> Any:
    stream = _capture_streams.get(device)
    if stream is None:
        stream = _capture_streams[device] = torch.cuda.Stream(device)
    return stream


def _capture_ended(graph: Any) -> bool:
    """Whether ``capture_end`` got as far as handing the graph its pool (``pool()`` refuses until then): the graph
    then releases the pool itself when it is destroyed."""
    try:
        graph.pool()
    except RuntimeError:
        return False
    return True


def _input_signature(name: str, value: torch.Tensor | float) -> tuple:
    if isinstance(value, torch.Tensor):
        return (name, tuple(value.shape), value.dtype, value.stride())
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"input {name!r} must be a tensor or a real number, got {type(value).__name__}")
    return (name, "number")


def _slotted_buffer(num_slots: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An [num_slots, padded numel] buffer whose rows each start on a ``SLOT_ALIGN_BYTES`` boundary."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_slot = max(1, SLOT_ALIGN_BYTES // itemsize)
    padded = math.ceil(max(numel, 1) / per_slot) * per_slot
    return torch.empty((num_slots, padded), dtype=dtype, device=device)


def _check_size(size: int) -> int:
    if not isinstance(size, numbers.Integral) or isinstance(size, bool):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return int(size)


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, seen from the function calling this one, of the first frame outside fastddim
    and torch (whose ``no_grad`` decorator wraps the pipelines' ``__call__``): the user's call."""
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level
