"""Launchers for fastddim's Triton kernels: validation-free, allocation, layout, grid, ``torch.library`` registration.

The scheduler (``fastddim/scheduler.py``) validates user input; the functions here assume consistent arguments and
only decide how to launch. Each op has a pure-PyTorch twin in ``fastddim/reference.py``.

An eager step at small batch is bound by host time, not by the GPU, so ``launch_ddim_step`` keeps per-signature
launch plans (layout analysis, grid, kernel choice); ``fastddim.compat.launch`` launches them.
"""

import math
import os
from typing import NamedTuple

import torch
import triton

from fastddim import compat
from fastddim.kernels.ddim_step import ddim_step_flat_kernel, ddim_step_kernel
from fastddim.utils import BoundedCache

NOISE_NONE = 0
NOISE_TENSOR = 1
NOISE_PHILOX = 2
# Per-sample Philox keys (see fastddim/kernels/ddim_step.py): rows of a multiple of 4 elements, or any rows.
NOISE_PHILOX_PER_SAMPLE = 3
NOISE_PHILOX_PER_SAMPLE_RAGGED = 4
PER_SAMPLE_NOISE_MODES = (NOISE_PHILOX_PER_SAMPLE, NOISE_PHILOX_PER_SAMPLE_RAGGED)

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
    # Compiled kernels' launchers by ``compat.launcher_key``, filled by their first launch (see compat.launch).
    launchers: dict


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
    # Per-sample noise is keyed by each element's logical (row-major) index within its sample, which the flat kernel
    # sees only when the shared layout is row-major: other layouts (channels-last) take the strided kernel, so a
    # sample's noise never depends on the memory format.
    row_major = (
        sizes[1] == sizes[2] == 1
        and (sizes[3] == 1 or stride_out[3] == 1)
        and (batch == 1 or stride_out[0] == sizes[3])
    )
    if (
        stride_mo == stride_s == stride_n == stride_out
        and dense_out
        and (batch == 1 or stride_out[0] * batch == numel)
        and (row_major or meta["NOISE_MODE"] not in PER_SAMPLE_NOISE_MODES)
    ):
        kernel, layout_args = ddim_step_flat_kernel, (numel, numel // batch)
    else:
        kernel = ddim_step_kernel
        layout_args = (numel, sizes[1], sizes[2], sizes[3], *stride_mo, *stride_s, *stride_n, *stride_out)
    return _StepPlan(kernel, grid, layout_args, meta, make_contiguous, compat.constexpr_values(kernel, meta), {})


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
    noise_seeds: torch.Tensor | None = None,
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
        noise_seeds: int64 [B] Philox keys, one per batch entry, on the device; with ``add_noise`` (and no
            ``seed``), element j of sample b gets the normal ``keyed_normals4(noise_seeds[b], t_b, j // 4)[j % 4]``
            (``fastddim/kernels/ddim_step.py``): it depends on the sample's key, its timestep and j only.
    """
    prev_sample = torch.empty_like(sample, dtype=out_dtype)
    pred_original = torch.empty_like(sample, dtype=out_dtype)
    shape = sample.shape
    numel = sample.numel()
    if numel == 0:
        return prev_sample, pred_original

    if add_noise and seed is not None:
        noise_mode = NOISE_PHILOX
    elif add_noise and noise_seeds is not None:
        row_numel = numel // shape[0] if len(shape) else numel
        noise_mode = NOISE_PHILOX_PER_SAMPLE if row_numel % 4 == 0 else NOISE_PHILOX_PER_SAMPLE_RAGGED
        seed = noise_seeds
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
        seed if noise_mode == NOISE_PHILOX or noise_mode in PER_SAMPLE_NOISE_MODES else placeholder,
        threshold_scale if threshold_scale is not None else placeholder,
    )
    scalars = (timestep, coef_table.shape[0], clip_sample_range, *plan.layout_args)
    compat.launch(
        plan.kernel, plan.grid, tensors, scalars, plan.meta, plan.constexpr_values, plan.launchers, traceable
    )
    return prev_sample, pred_original


# The registered op lets torch.compile(fullgraph=True) trace through the launch; eager callers use the plain launcher
# (same function) and skip the custom-op dispatcher, which costs tens of microseconds per call on the host.
ddim_step = torch.library.triton_op("fastddim::ddim_step", mutates_args={})(launch_ddim_step)
