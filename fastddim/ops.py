"""Launchers for fastddim's Triton kernels: validation-free, allocation, layout, grid, ``torch.library`` registration.

The scheduler (``fastddim/scheduler.py``) validates user input; the functions here assume consistent arguments and
only decide how to launch. Each op has a pure-PyTorch twin in ``fastddim/reference.py``.

An eager step at small batch is bound by host time, not by the GPU, so ``launch_ddim_step`` keeps per-signature
launch plans (layout analysis, grid, kernel choice) and, on CUDA, calls each compiled kernel's launcher directly after
its first launch through Triton's dispatch (``tests/test_direct_launch.py`` checks this against the dispatch).
"""

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
from triton.runtime.driver import driver as triton_driver

from fastddim.kernels.ddim_step import ddim_step_flat_kernel, ddim_step_kernel
from fastddim.utils import BoundedCache

NOISE_NONE = 0
NOISE_TENSOR = 1
NOISE_PHILOX = 2

# TIMESTEP_FROM_PTR values (see fastddim/kernels/ddim_step.py).
TIMESTEP_SCALAR = 0
TIMESTEP_POINTER = 1
TIMESTEP_PER_SAMPLE = 2

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Whether the kernels were defined under Triton's interpreter: Triton reads TRITON_INTERPRET when ``@triton.jit``
# decorates a function, so setting it after import changes nothing but the answer of ``interpreting()``.
KERNELS_INTERPRETED = not isinstance(ddim_step_flat_kernel, triton.runtime.jit.JITFunction)


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def coalesce_layout(
    shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[list[int], list[list[int]]] | None:
    """Express tensors of one logical shape as a [B, D1, D2, D3] strided view shared by all of them.

    Dimension 0 (batch) is kept; size-1 dims are dropped; adjacent inner dims are merged where every tensor is
    contiguous across them. Returns (sizes [B, D1, D2, D3], per-tensor strides) or None if more than three inner
    dims remain.
    """
    inner = [d for d in range(1, len(shape)) if shape[d] != 1]
    sizes = [shape[d] for d in inner]
    per_tensor = [[s[d] for d in inner] for s in strides]
    merged_sizes: list[int] = []
    merged_strides: list[list[int]] = [[] for _ in strides]
    for i, size in enumerate(sizes):
        if merged_sizes and all(merged_strides[k][-1] == per_tensor[k][i] * size for k in range(len(strides))):
            merged_sizes[-1] *= size
            for k in range(len(strides)):
                merged_strides[k][-1] = per_tensor[k][i]
        else:
            merged_sizes.append(size)
            for k in range(len(strides)):
                merged_strides[k].append(per_tensor[k][i])
    if len(merged_sizes) > 3:
        return None
    pad = 3 - len(merged_sizes)
    batch = shape[0] if len(shape) > 0 else 1
    out_sizes = [batch] + [1] * pad + merged_sizes
    out_strides = [[s[0]] + [0] * pad + m for s, m in zip(strides, merged_strides, strict=True)]
    return out_sizes, out_strides


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of this shape (what ``.contiguous()`` copies into)."""
    return tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))


def timestep_mode(timestep_tensor: torch.Tensor | None) -> int:
    """The kernels' TIMESTEP_FROM_PTR for a device timestep: none, one timestep, or one per batch entry."""
    if timestep_tensor is None:
        return TIMESTEP_SCALAR
    return TIMESTEP_PER_SAMPLE if timestep_tensor.numel() > 1 else TIMESTEP_POINTER


def _launch_config(numel: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps): a small heuristic, no autotune (the step is cheap to rerun but capture forbids it)."""
    if interpreting():
        # The interpreter runs programs one after another at a roughly fixed cost each: use few, large programs.
        return min(max(triton.next_power_of_2(numel), 4), 1 << 16), 4
    if numel >= 1 << 20:
        return 4096, 8
    return 1024, 4


def elementwise_launch_config(numel: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) of the step kernels' heuristic, for other elementwise kernels (the step's backward)."""
    return _launch_config(numel)


def _is_dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a tensor's elements fill exactly ``numel`` consecutive storage slots (any dim order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(shape, strides, strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _StepPlan(NamedTuple):
    """How to launch one step for a given signature: everything ``launch_ddim_step`` derives from shapes/strides."""

    kernel: triton.JITFunction
    grid: tuple[int]
    layout_args: tuple[int, ...]  # the kernel's arguments after clip_sample_range
    meta: dict  # constexpr meta-parameters and launch options
    make_contiguous: bool  # the layout is not expressible as [B, D1, D2, D3]: copy the inputs once first
    # The kernel's constexpr arguments in signature order, which a compiled kernel's launcher takes after the others;
    # None where kernels cannot be launched directly (Triton's interpreter).
    constexpr_values: tuple | None
    # Compiled kernels' launchers by ``_launcher_key``, filled by the first launch of each (see launch_ddim_step).
    launchers: dict


def constexpr_values(kernel: object, meta: dict) -> tuple | None:
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        return None
    names = [param.name for param in kernel.params if param.is_constexpr]
    if any(name not in meta for name in names):
        return None
    return tuple(meta[name] for name in names)


def _launcher_key(device_index: int, tensors: tuple[torch.Tensor, ...], pointers: list[int] | None = None) -> tuple:
    """What Triton specializes a compiled kernel on among the arguments that change between calls with one plan.

    Triton specializes a tensor argument on its dtype and on whether its address is a multiple of 16 bytes, and an
    integer on being 1 or a multiple of 16; the kernels' per-call integers (timestep, num_train_timesteps) are
    ``do_not_specialize`` and everything else is fixed by the launch plan. Two launches with the same key therefore
    run the same compiled kernel (tests/direct_launch_probe.py checks this against Triton's own dispatch).
    ``pointers`` are the tensors' data pointers, when the caller has them already.
    """
    if pointers is None:
        pointers = [tensor.data_ptr() for tensor in tensors]
    return (device_index, *[tensor.dtype for tensor in tensors], *[pointer % 16 == 0 for pointer in pointers])


def _direct_launch_device(sample: torch.Tensor) -> int | None:
    """The CUDA device index to launch compiled kernels on directly, or None to go through Triton's dispatch."""
    return sample.device.index if sample.is_cuda else None


# Triton versions whose CompiledKernel runner is known to call ``run(*grid, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *args)`` (read in 3.6 and 3.9): others always go through the runner.
_RUNNER_CONVENTION_VERSIONS = ((3, 6), (3, 9))
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


class _CompiledLaunch(NamedTuple):
    """One compiled kernel, ready to launch on one grid: what ``CompiledKernel.__getitem__``'s runner would use."""

    runner: object  # compiled[grid]: Triton's own per-launch path, used while launch hooks are registered
    run: object  # the driver's launcher, or None to always use the runner (another Triton version)
    grid: tuple[int, int, int]
    function: object
    packed_metadata: object
    get_stream: object  # the active driver's get_current_stream(device_index)


def _compiled_launch(compiled: object, grid: tuple[int, ...]) -> _CompiledLaunch:
    grid = (*grid, 1, 1)[:3]
    runner = compiled[grid]  # also loads the module (_init_handles)
    run, function, packed_metadata = (getattr(compiled, name, None) for name in ("run", "function", "packed_metadata"))
    get_stream = getattr(triton_driver.active, "get_current_stream", None)
    known = _RUNNER_CONVENTION_VERSIONS[0] <= _TRITON_VERSION <= _RUNNER_CONVENTION_VERSIONS[1]
    if not known or run is None or function is None or packed_metadata is None or get_stream is None:
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
    kernel: triton.JITFunction,
    grid: tuple[int, ...],
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple,
    meta: dict,
    constexpr_values: tuple,
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

    The launch also skips what Triton's runner does per call for launch hooks: it builds launch metadata and has
    the driver call the enter and exit hook chains, which are empty unless a profiler registers a hook. While they
    are empty it passes none (what the runner passes when there are no hooks at all); otherwise it uses the runner.
    The caller holds the device current (``_device_guard``), so the device's current stream is the runner's stream.
    It passes the tensors' data pointers as integers: for a tensor, the launcher calls ``data_ptr()`` and asks the
    CUDA driver whether the pointer is device-accessible (``cuPointerGetAttribute``), once per tensor argument and
    launch, a check the scheduler's validation (same CUDA device for every tensor) already makes.
    """
    pointers = [tensor.data_ptr() for tensor in tensors]
    launcher_key = _launcher_key(device_index, tensors, pointers)
    launch = launchers.get(launcher_key)
    if launch is None:
        compiled = kernel[grid](*tensors, *scalars, **meta)
        if compiled is not None:
            launchers[launcher_key] = _compiled_launch(compiled, grid)
    elif launch.run is not None and _launch_hooks_idle():
        launch.run(
            *launch.grid,
            launch.get_stream(device_index),
            launch.function,
            launch.packed_metadata,
            None,
            None,
            None,
            *pointers,
            *scalars,
            *constexpr_values,
        )
    else:
        launch.runner(*tensors, *scalars, *constexpr_values)


# torch.cuda.device(device) spends ~2 us of Python normalizing its argument (dev CPU); the guard Inductor's generated
# code uses takes the index directly and does the same device exchange on entry and exit.
_CudaDeviceGuard = getattr(torch.cuda, "_DeviceGuard", None) or torch.cuda.device


def _device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``tensor``'s CUDA device current for a launch (and restores the previous one); a no-op off CUDA."""
    return _CudaDeviceGuard(tensor.device.index) if tensor.is_cuda else contextlib.nullcontext()


def launch(
    kernel: triton.JITFunction,
    grid: tuple[int, ...],
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple,
    meta: dict,
    constexpr_values: tuple | None,
    launchers: dict,
    traceable: bool,
) -> None:
    """Launches ``kernel[grid](*tensors, *scalars, **meta)`` on the tensors' device (one device: callers check it),
    one of three ways: through ``torch.library.wrap_triton`` when ``traceable`` (torch.compile), through Triton's
    dispatch where compiled kernels cannot be launched directly (the interpreter), else ``_launch_compiled``."""
    device_index = None if traceable or constexpr_values is None else _direct_launch_device(tensors[0])
    with _device_guard(tensors[0]):
        if traceable:
            torch.library.wrap_triton(kernel)[grid](*tensors, *scalars, **meta)
        elif device_index is None:
            kernel[grid](*tensors, *scalars, **meta)
        else:
            _launch_compiled(kernel, grid, tensors, scalars, meta, constexpr_values, launchers, device_index)


_STEP_FLAG_NAMES = (
    "PREDICTION_TYPE",
    "CLIP_SAMPLE",
    "THRESHOLD",
    "USE_CLIPPED_MODEL_OUTPUT",
    "NOISE_MODE",
    "TIMESTEP_FROM_PTR",
    "DIVIDE_BY_RECIPROCAL",
)

# Launch plans by signature. An eager step's host time is what bounds a small-batch step (the GPU work is a few
# microseconds), so the layout analysis runs once per signature instead of on every call.
STEP_PLANS: BoundedCache[tuple, _StepPlan] = BoundedCache(256)


def _plan_step(
    shape: tuple[int, ...],
    strides: list[tuple[int, ...]],
    numel: int,
    meta: dict,
) -> _StepPlan:
    """Builds the launch plan for tensors (model_output, sample, noise, prev_sample) of these strides."""
    make_contiguous = False
    layout = coalesce_layout(shape, strides)
    if layout is None:
        # More than four non-mergeable dims: copy to the output's layout once (rare; e.g. a permuted 6-D video).
        make_contiguous = True
        layout = coalesce_layout(shape, [contiguous_strides(shape)] * len(strides))
    sizes, (stride_mo, stride_s, stride_n, stride_out) = layout
    batch = sizes[0]
    block_size, num_warps = _launch_config(numel)
    grid = (triton.cdiv(numel, block_size),)
    meta = dict(meta, BLOCK_SIZE=block_size, num_warps=num_warps, enable_fp_fusion=False)
    dense_out = make_contiguous or _is_dense(shape, strides[3])
    if (
        stride_mo == stride_s == stride_n == stride_out
        and dense_out
        and (batch == 1 or stride_out[0] * batch == numel)
    ):
        kernel, layout_args = ddim_step_flat_kernel, (numel, numel // batch)
    else:
        kernel = ddim_step_kernel
        layout_args = (numel, sizes[1], sizes[2], sizes[3], *stride_mo, *stride_s, *stride_n, *stride_out)
    return _StepPlan(kernel, grid, layout_args, meta, make_contiguous, constexpr_values(kernel, meta), {})


def launch_ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_table: torch.Tensor,
    timestep_tensor: torch.Tensor | None,
    timestep: int,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    threshold_scale: torch.Tensor | None,
    add_noise: bool,
    prediction_type: int,
    clip_sample: bool,
    clip_sample_range: float,
    use_clipped_model_output: bool,
    out_dtype: torch.dtype,
    traceable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused DDIM update on a CUDA (or, under ``TRITON_INTERPRET=1``, CPU) tensor. Returns (prev, x_0).

    Args:
        model_output, sample: the denoiser output and x_t, same shape and dtype (fp16/bf16/fp32), rank >= 1.
        coef_table: fp32 [T, 8] table from ``build_coefficient_table`` (for this eta) on the tensors' device.
        timestep_tensor: one-element integer timestep on the device (graph-friendly), or a [B] integer tensor of one
            timestep per batch entry; if None, ``timestep`` is used.
        noise: z of eq. (12), broadcast to ``sample``'s shape; used when ``add_noise`` and ``seed`` is None.
        seed: int64 [1] Philox seed on the device; with ``add_noise``, noise is generated in the kernel from it.
        threshold_scale: fp32 [B] dynamic-thresholding s per sample; replaces clipping when given.
        add_noise: add sigma_t * z (diffusers does so only when eta > 0).
        prediction_type: index into ``PREDICTION_TYPES``.
        clip_sample, clip_sample_range: clamp x_0 to +-range (ignored with ``threshold_scale``).
        use_clipped_model_output: re-derive epsilon from the clipped x_0.
        out_dtype: dtype of both outputs.
        traceable: launch through ``torch.library.wrap_triton`` so torch.compile can trace the launch (what the
            registered op does). ``False`` launches eagerly, through the cached launch plan and, on CUDA, the
            compiled kernel's launcher: the wrapper's higher-order-op dispatch costs hundreds of microseconds of
            host time per call (measured on an H100 host, torch 2.11).
    """
    prev_sample = torch.empty_like(sample, dtype=out_dtype)
    pred_original = torch.empty_like(sample, dtype=out_dtype)
    shape = sample.shape
    numel = sample.numel()
    if numel == 0:
        return prev_sample, pred_original

    if add_noise and seed is not None:
        noise_mode = NOISE_PHILOX
    elif add_noise and noise is not None:
        noise_mode = NOISE_TENSOR
        noise = noise.expand_as(sample)
    else:
        noise_mode = NOISE_NONE
    strides = (
        model_output.stride(),
        sample.stride(),
        noise.stride() if noise_mode == NOISE_TENSOR else (),
        prev_sample.stride(),
    )
    # The constexpr meta-parameters, in the order of _STEP_FLAG_NAMES.
    flags = (
        prediction_type,
        clip_sample,
        threshold_scale is not None,
        use_clipped_model_output,
        noise_mode,
        timestep_mode(timestep_tensor),
        sample.is_cuda,
    )
    # Whether kernels are interpreted is fixed when they are decorated (at import), so it needs no place in the key.
    key = None if traceable else (shape, strides, flags)
    plan = None if key is None else STEP_PLANS.get(key)
    if plan is None:
        # Traced launches (torch.compile) plan every time: tracing runs once per graph, and symbolic sizes there are
        # not hashable.
        layouts = [stride if len(stride) else (1,) for stride in strides]
        if noise_mode != NOISE_TENSOR:
            layouts[2] = layouts[1]  # the noise pointer is a placeholder: let it follow the sample's layout
        meta = dict(zip(_STEP_FLAG_NAMES, flags, strict=True))
        plan = _plan_step(tuple(shape) if len(shape) else (1,), layouts, numel, meta)
        if key is not None:
            STEP_PLANS.put(key, plan)
    if plan.make_contiguous:
        model_output, sample = model_output.contiguous(), sample.contiguous()
        noise = noise.contiguous() if noise_mode == NOISE_TENSOR else None
        prev_sample, pred_original = prev_sample.contiguous(), pred_original.contiguous()

    placeholder = coef_table
    tensors = (
        model_output,
        sample,
        noise if noise_mode == NOISE_TENSOR else placeholder,
        prev_sample,
        pred_original,
        coef_table,
        timestep_tensor if timestep_tensor is not None else placeholder,
        seed if noise_mode == NOISE_PHILOX else placeholder,
        threshold_scale if threshold_scale is not None else placeholder,
    )
    scalars = (timestep, coef_table.shape[0], clip_sample_range, *plan.layout_args)
    launch(plan.kernel, plan.grid, tensors, scalars, plan.meta, plan.constexpr_values, plan.launchers, traceable)
    return prev_sample, pred_original


# The registered op lets torch.compile(fullgraph=True) trace through the launch; eager callers use the plain launcher
# (same function) and skip the custom-op dispatcher, which costs tens of microseconds per call on the host.
ddim_step = torch.library.triton_op("fastddim::ddim_step", mutates_args={})(launch_ddim_step)
