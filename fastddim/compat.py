"""Every private or version-specific API of Triton, torch, diffusers and transformers that fastddim uses, in one
place.

Two kinds live here:

- **Fast paths** (``FAST_PATHS``): private APIs that only save host time and have a public equivalent. Each names the
  versions it has been verified on *on a GPU* in its current form. It is used only there; elsewhere fastddim takes
  the public path. ``FASTDDIM_SAFE_LAUNCH`` (read at import; ``refresh()`` re-reads it) overrides that:

  ========================  ====================================================================================
  unset                      each fast path where it is verified (today none is: the public path everywhere)
  ``1``                      the public path always
  ``0``                      every fast path whose API exists, verified or not (to measure and verify one on a GPU)
  ========================  ====================================================================================

- **Needed private APIs** without a public equivalent (the tensor version counter behind the CUDA-graph cache's
  weight fingerprint, the benchmark harness's Inductor and Dynamo knobs), each with the versions it was used on.

Version floors (``pyproject.toml``) cover the public, version-specific APIs the kernels need (``tl.histogram``'s
mask, cooperative launches): those are requirements, not switches.
"""

import collections
import contextlib
import dataclasses
import os
from typing import Any, NamedTuple

import torch
import triton
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

__all__ = [
    "FAST_PATHS",
    "SAFE_LAUNCH_ENV",
    "clip_text_transformer",
    "constexpr_values",
    "cudagraph_skip_count",
    "current_raw_stream",
    "ddim_scheduler_output",
    "device_guard",
    "dtype_keyword",
    "fast_path_enabled",
    "inductor_triton_launcher",
    "launch",
    "launcher_key",
    "module_execution_device",
    "raise_dynamo_limits",
    "refresh",
    "release_unended_capture_pool",
    "repair_default_generator",
    "reset_dynamo",
    "tensor_version",
]

SAFE_LAUNCH_ENV = "FASTDDIM_SAFE_LAUNCH"


def _minor_version(text: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in part if ch.isdigit()) or 0) for part in text.split("+")[0].split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


TORCH_VERSION = _minor_version(torch.__version__)
TRITON_VERSION = _minor_version(triton.__version__)


class FastPath(NamedTuple):
    """A private API used to save host time, and what replaces it."""

    private_api: str
    public_path: str
    # Where it was verified in its current form: on a GPU for launch paths, by the CPU test suite for pure-Python ones.
    verified_on: str
    # Whether the installed versions are among those.
    verified: bool
    # Whether the installed versions have the private API in the form the fast path calls.
    available: bool


# Triton versions whose CompiledKernel runner calls ``run(*grid, stream, function, packed_metadata, launch_metadata,
# enter_hook, exit_hook, *args)`` (read in the sources of 3.6 and 3.9).
_RUNNER_CONVENTION_VERSIONS = ((3, 6), (3, 9))
# diffusers versions on which tests/test_scheduler.py compares the hand-built step output with the constructor's.
_STEP_OUTPUT_VERIFIED_DIFFUSERS = ((0, 42),)


def _step_output_layout_known() -> bool:
    fields = tuple(field.name for field in dataclasses.fields(DDIMSchedulerOutput))
    return fields == ("prev_sample", "pred_original_sample")


def _diffusers_version() -> tuple[int, int]:
    import diffusers

    return _minor_version(diffusers.__version__)


FAST_PATHS: dict[str, FastPath] = {
    # Measured on a 2-core dev CPU with a recording stand-in for the CUDA driver: 1.9 -> 0.9 us per launch. The form
    # that passed the GPU suite on an H100 (torch 2.11, Triton 3.6) called Triton's runner; the current one also
    # skips the empty launch-hook chains and passes pointers as ints, and has not run on a GPU.
    "direct_launch": FastPath(
        "a compiled Triton kernel's launcher, called directly after the kernel's first launch",
        "kernel[grid](...), Triton's dispatch",
        "nowhere yet",
        False,
        _RUNNER_CONVENTION_VERSIONS[0] <= TRITON_VERSION <= _RUNNER_CONVENTION_VERSIONS[1],
    ),
    # torch.cuda.device(index) costs ~2.5 us of argument parsing on the dev CPU, the guard ~0.3 us.
    "device_guard": FastPath(
        "torch.cuda._DeviceGuard (what Inductor's generated code uses)",
        "torch.cuda.device",
        "nowhere yet",
        False,
        hasattr(torch.cuda, "_DeviceGuard"),
    ),
    # Building a torch.cuda.Stream object costs ~8 us on an H100 host.
    "raw_stream": FastPath(
        "torch._C._cuda_getCurrentRawStream (what Inductor's generated code uses)",
        "torch.cuda.current_stream(index).cuda_stream",
        "nowhere yet",
        False,
        hasattr(torch._C, "_cuda_getCurrentRawStream"),
    ),
    # diffusers' BaseOutput.__post_init__ walks dataclasses.fields: ~3.4 us per step on the dev CPU, the direct
    # build ~0.4 us. Device-independent, so the CPU suite verifies it.
    "step_output": FastPath(
        "DDIMSchedulerOutput built directly (its OrderedDict items and attributes)",
        "the DDIMSchedulerOutput constructor",
        "diffusers " + ", ".join(f"{major}.{minor}" for major, minor in _STEP_OUTPUT_VERIFIED_DIFFUSERS),
        _diffusers_version() in _STEP_OUTPUT_VERIFIED_DIFFUSERS,
        _step_output_layout_known(),
    ),
}

_enabled: dict[str, bool] = {}


def _mode() -> str:
    value = os.environ.get(SAFE_LAUNCH_ENV, "").strip()
    if value in ("", "1", "0"):
        return {"": "verified", "1": "public", "0": "all"}[value]
    raise ValueError(f"{SAFE_LAUNCH_ENV} must be unset, 1 (public paths only) or 0 (every fast path), got {value!r}")


def refresh() -> dict[str, bool]:
    """Re-reads ``FASTDDIM_SAFE_LAUNCH`` and decides again which fast paths are on; returns that decision."""
    mode = _mode()
    for name, path in FAST_PATHS.items():
        _enabled[name] = path.available and (mode == "all" or (mode == "verified" and path.verified))
    return dict(_enabled)


def fast_path_enabled(name: str) -> bool:
    """Whether the fast path ``name`` (a key of ``FAST_PATHS``) is in use."""
    return _enabled[name]


refresh()


# ------------------------------------------------------------------------------------------------ device and stream


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``tensor``'s CUDA device current for a launch (and restores the previous one); a no-op off CUDA."""
    if not tensor.is_cuda:
        return contextlib.nullcontext()
    if _enabled["device_guard"]:
        return torch.cuda._DeviceGuard(tensor.device.index)
    return torch.cuda.device(tensor.device.index)


def current_raw_stream(device_index: int) -> int:
    """The handle of the current stream on a CUDA device."""
    if _enabled["raw_stream"]:
        return torch._C._cuda_getCurrentRawStream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


# ------------------------------------------------------------------------------------------------ kernel launches


class _CompiledLaunch(NamedTuple):
    """One compiled kernel, ready to launch on one grid: what ``CompiledKernel.__getitem__``'s runner would use."""

    runner: Any  # compiled[grid]: Triton's own per-launch path, used while launch hooks are registered
    run: Any  # the driver's launcher, or None to always use the runner
    grid: tuple[int, int, int]
    function: Any
    packed_metadata: Any
    get_stream: Any  # the active driver's get_current_stream(device_index)


def constexpr_values(kernel: object, meta: dict) -> tuple | None:
    """The kernel's constexpr arguments in signature order, which a compiled kernel's launcher takes after the others;
    None where compiled kernels cannot be launched directly (Triton's interpreter)."""
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        return None
    names = [param.name for param in kernel.params if param.is_constexpr]
    if any(name not in meta for name in names):
        return None
    return tuple(meta[name] for name in names)


def launcher_key(device_index: int, tensors: tuple[torch.Tensor, ...], pointers: list[int] | None = None) -> tuple:
    """What Triton specializes a compiled kernel on among the arguments that change between calls with one plan.

    Triton specializes a tensor argument on its dtype and on whether its address is a multiple of 16 bytes, and an
    integer on being 1 or a multiple of 16; the kernels' per-call integers (timestep, num_train_timesteps) are
    ``do_not_specialize`` and everything else is fixed by the launch plan. Two launches with the same key therefore
    run the same compiled kernel (tests/direct_launch_probe.py checks this against Triton's own dispatch).
    """
    if pointers is None:
        pointers = [tensor.data_ptr() for tensor in tensors]
    return (device_index, *[tensor.dtype for tensor in tensors], *[pointer % 16 == 0 for pointer in pointers])


def _compiled_launch(compiled: Any, grid: tuple[int, ...]) -> _CompiledLaunch:
    from triton.runtime.driver import driver

    grid = (*grid, 1, 1)[:3]
    runner = compiled[grid]  # also loads the module (_init_handles)
    run, function, packed_metadata = (getattr(compiled, name, None) for name in ("run", "function", "packed_metadata"))
    get_stream = getattr(driver.active, "get_current_stream", None)
    if run is None or function is None or packed_metadata is None or get_stream is None:
        return _CompiledLaunch(runner, None, grid, None, None, None)
    return _CompiledLaunch(runner, run, grid, function, packed_metadata, get_stream)


def _launch_hooks_idle() -> bool:
    """Whether no Triton launch hook is registered (``knobs.runtime``'s hook chains are empty, as they are unless a
    profiler such as proton adds one), so a launch may pass no launch metadata and no hooks."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return False
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        # A HookChain with no calls, or None; a bare callable has no `calls` and counts as registered.
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _launch_compiled(
    kernel: Any,
    grid: tuple[int, ...],
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple,
    meta: dict,
    constexprs: tuple,
    launchers: dict,
    device_index: int,
) -> None:
    """Launches ``kernel(*tensors, *scalars, **meta)``, straight to the compiled kernel after its first launch.

    Triton's dispatch (binding and specializing ~30 arguments, the cache lookup) costs more host time than the rest
    of an eager step. After the first launch of a specialization, the compiled kernel's launcher is called directly
    with the arguments that dispatch would pass it: ours, then the constexprs in signature order. The caller
    guarantees what makes that sound: the kernel takes its tensors first, every integer that varies between calls
    with one launch plan is ``do_not_specialize``, and ``launchers`` belongs to one launch plan (grid, scalars' types
    and specializations, meta-parameters).

    While Triton's launch-hook chains are empty (unless a profiler registers a hook) it passes no launch metadata
    and no hooks, as the runner does when there are no hooks at all; otherwise it uses the runner. The caller holds
    the device current (``device_guard``), so the device's current stream is the runner's stream. It passes data
    pointers as integers: for a tensor, the launcher would call ``data_ptr()`` and ask the CUDA driver whether the
    pointer is device-accessible, once per tensor argument, a check the scheduler's validation (same CUDA device for
    every tensor) already makes.
    """
    pointers = [tensor.data_ptr() for tensor in tensors]
    key = launcher_key(device_index, tensors, pointers)
    compiled_launch = launchers.get(key)
    if compiled_launch is None:
        compiled = kernel[grid](*tensors, *scalars, **meta)
        if compiled is not None:
            launchers[key] = _compiled_launch(compiled, grid)
    elif compiled_launch.run is not None and _launch_hooks_idle():
        compiled_launch.run(
            *compiled_launch.grid,
            compiled_launch.get_stream(device_index),
            compiled_launch.function,
            compiled_launch.packed_metadata,
            None,
            None,
            None,
            *pointers,
            *scalars,
            *constexprs,
        )
    else:
        compiled_launch.runner(*tensors, *scalars, *constexprs)


def _direct_launch_device(tensor: torch.Tensor) -> int | None:
    """The CUDA device index to launch compiled kernels on directly, or None to go through Triton's dispatch."""
    return tensor.device.index if tensor.is_cuda else None


# torch versions whose ``torch.library.wrap_triton`` rejects the ``InterpretedFunction`` kernels of Triton's CPU
# interpreter (torch 2.13 passes them through). Such a kernel is launched through Triton's dispatch instead: in an
# eager call of the registered op that is what ``wrap_triton`` would do, and torch.compile never traces an
# interpreted kernel into a GPU graph.
_WRAP_TRITON_REJECTS_INTERPRETED = TORCH_VERSION < (2, 13)


def _wrap_triton_takes(kernel: Any) -> bool:
    """Whether ``torch.library.wrap_triton`` accepts ``kernel`` on this torch."""
    if not _WRAP_TRITON_REJECTS_INTERPRETED:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(kernel, InterpretedFunction)


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple,
    meta: dict,
    constexprs: tuple | None,
    launchers: dict,
    traceable: bool,
) -> None:
    """Launches ``kernel[grid](*tensors, *scalars, **meta)`` on the tensors' device (one device: callers check it).

    One of three ways: through ``torch.library.wrap_triton`` when ``traceable`` (torch.compile traces it; an
    interpreted kernel on torch < 2.13 takes Triton's dispatch, see ``_WRAP_TRITON_REJECTS_INTERPRETED``); directly
    through the compiled kernel's launcher when the ``direct_launch`` fast path is on and ``constexprs`` is known
    (``_launch_compiled``); else through Triton's dispatch, the public path.
    """
    device_index = None
    if traceable and not _wrap_triton_takes(kernel):
        traceable = False
    if not traceable and constexprs is not None and _enabled["direct_launch"]:
        device_index = _direct_launch_device(tensors[0])
    with device_guard(tensors[0]):
        if traceable:
            torch.library.wrap_triton(kernel)[grid](*tensors, *scalars, **meta)
        elif device_index is None:
            kernel[grid](*tensors, *scalars, **meta)
        else:
            _launch_compiled(kernel, grid, tensors, scalars, meta, constexprs, launchers, device_index)


# ------------------------------------------------------------------------------------------------ diffusers


_ordered_dict_new = collections.OrderedDict.__new__
_ordered_dict_setitem = collections.OrderedDict.__setitem__


def ddim_scheduler_output(prev_sample: torch.Tensor, pred_original_sample: torch.Tensor) -> Any:
    """``DDIMSchedulerOutput(prev_sample=..., pred_original_sample=...)``.

    With the ``step_output`` fast path, the same state is set directly: both fields as items in field order and as
    attributes (tests/test_scheduler.py compares the two).
    """
    if not _enabled["step_output"]:
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
    output = _ordered_dict_new(DDIMSchedulerOutput)
    _ordered_dict_setitem(output, "prev_sample", prev_sample)
    _ordered_dict_setitem(output, "pred_original_sample", pred_original_sample)
    attributes = output.__dict__
    attributes["prev_sample"] = prev_sample
    attributes["pred_original_sample"] = pred_original_sample
    return output


# ------------------------------------------------------------------------------------------------ needed private APIs


def tensor_version(tensor: object) -> int | None:
    """The tensor's in-place version counter (``Tensor._version``, torch >= 1.0; no public equivalent): it changes on
    every in-place write through autograd-visible ops (``copy_``, ``add_``, ``load_state_dict``), also of a view.

    None for non-tensors and for inference tensors, which have no counter (and, should torch ever drop the attribute,
    in-place changes would go unnoticed rather than break anything).
    """
    # Called on every step: one getattr (non-tensors have no such attribute).
    try:
        return getattr(tensor, "_version", None)
    except RuntimeError:
        # Reading an inference tensor's counter raises; outside inference mode it cannot be written in place anyway.
        return None


def release_unended_capture_pool(device: torch.device, pool: tuple[int, int]) -> None:
    """Gives the caching allocator back the private pool of a CUDA-graph capture whose ``capture_end`` failed.

    ``CUDAGraph.capture_end`` stops routing allocations to the graph's pool only once ``cudaStreamEndCapture``
    succeeded, and the graph releases its pool only after such an end (``aten/src/ATen/cuda/CUDAGraph.cpp`` on
    torch's main branch). After an invalidated capture the allocator would otherwise keep that pool, with what the
    capture allocated, for the life of the process, and count a capture as underway: it then never processes the
    events of cross-stream frees, so those blocks are never reused. ``torch._C._cuda_endAllocateToPool`` and
    ``_cuda_releasePool`` (no public equivalent; what ``torch.cuda.use_mem_pool`` calls on exit in torch 2.13)
    finish the two steps; a step that does not apply (a pool never begun, or already ended) fails and is skipped.
    """
    if device.type != "cuda":
        return
    # Best effort on a path that already failed: never let the clean-up itself raise.
    with contextlib.suppress(Exception):
        index = device.index if device.index is not None else torch.cuda.current_device()
        for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
            with contextlib.suppress(Exception):
                getattr(torch._C, name)(index, pool)


def repair_default_generator(device: torch.device) -> None:
    """Makes the default CUDA generator usable again after a failed CUDA-graph capture.

    PyTorch versions that mark a generator as capturing in ``capture_begin`` and unmark it only at the end of a
    successful ``capture_end`` leave it "capturing" when a capture fails, and every later random op on the device then
    raises. A probe detects that; a fresh copy of the state (same seed and offset, ``Generator.graphsafe_set_state`` /
    ``clone_state``, public since torch 2.4) replaces the stuck one. Healthy generators are left as they were.
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


# The benchmark harness's torch.compile cases (used on torch 2.11 and 2.13).


def reset_dynamo() -> None:
    """Forgets every compiled frame (``torch._dynamo.reset``), so each benchmark case compiles from scratch."""
    import torch._dynamo

    torch._dynamo.reset()


def raise_dynamo_limits(limit: int = 256) -> None:
    """Raises Dynamo's recompile limits (``torch._dynamo.config``; the names changed across versions), so a benchmark
    that compiles many cases in one process is not silently sent back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def inductor_triton_launcher() -> contextlib.AbstractContextManager:
    """Compiles with Triton's launcher instead of Inductor's static CUDA launcher (``torch._inductor.config``).

    The static launcher failed every launch of a compiled diffusers step ("CUDA driver error: invalid argument") on
    an H100 with torch 2.11 / Triton 3.6, while Triton's launcher is Inductor's documented fallback
    (pytorch/pytorch#152639). Kernels get their launcher when compiled: wrap the first call.
    """
    import torch._inductor.config

    if not hasattr(torch._inductor.config, "use_static_cuda_launcher"):
        return contextlib.nullcontext()
    return torch._inductor.config.patch(use_static_cuda_launcher=False)


def cudagraph_skip_count() -> int:
    """How many times CUDAGraph Trees fell back to eager in this process (``torch._dynamo.utils.counters``)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def module_execution_device(module: torch.nn.Module) -> torch.device | None:
    """Where diffusers runs ``module`` (``diffusers.utils.torch_utils.get_module_execution_device``: the offload
    hook's device, else the parameters'); None on diffusers versions without it (0.32 has none), whose SDXL pipeline
    decodes without moving the latents first."""
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:
        return None
    return get_module_execution_device(module)


def clip_text_transformer(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The module of a transformers ``CLIPTextModel`` that owns ``final_layer_norm``: its ``text_model`` up to
    transformers 5.x, where diffusers' SD pipelines reach it; the model itself in transformers 5.24, whose
    ``CLIPTextModel`` holds ``embeddings``/``encoder``/``final_layer_norm`` directly (``CLIPTextModelWithProjection``
    keeps ``text_model``)."""
    return getattr(text_encoder, "text_model", text_encoder)


# diffusers versions whose from_pretrained (pipelines and models) take the load dtype as ``dtype`` and deprecate
# ``torch_dtype``: 0.42 is where this was read; 0.35 knows only ``torch_dtype``. Versions between keep
# ``torch_dtype``, which they all accept.
_DTYPE_KEYWORD_DIFFUSERS = (0, 42)


def dtype_keyword() -> str:
    """The keyword of diffusers' ``from_pretrained`` (pipelines and models) for the load dtype: ``dtype`` from
    diffusers 0.42 (where ``torch_dtype`` raises a FutureWarning), ``torch_dtype`` before."""
    return "dtype" if _diffusers_version() >= _DTYPE_KEYWORD_DIFFUSERS else "torch_dtype"
