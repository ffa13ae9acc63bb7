"""Gradients through the fused DDIM step: the autograd formula of the registered op ``fastddim::ddim_step``.

diffusers' ``step`` is differentiable, and gradient-based guidance (classifier guidance through the update, DOODL-like
optimisation of latents) relies on it. The fused step returns fresh outputs from a kernel, which autograd cannot see
into, so this module registers the op's backward (``torch.library.register_autograd``): a fused Triton kernel
(``fastddim/kernels/ddim_step_backward.py``) for the gradients w.r.t. ``model_output`` and ``sample``, and
sigma_t * g for ``variance_noise``.

A given ``threshold_scale`` is held constant by the kernel. The scheduler never relies on that: a thresholded step
that autograd records runs the PyTorch twin (``fastddim.reference.ddim_step_ref``) under autograd instead, whose
scale follows ``torch.quantile``'s gradient (``fastddim.stepping.run_step``).
"""

import torch
import triton

from fastddim import compat, ops
from fastddim.kernels.ddim_step_backward import ddim_step_backward_kernel
from fastddim.utils import BoundedCache

# Compiled kernels' launchers by launch signature (the flat backward kernel needs no layout plan).
BACKWARD_LAUNCHERS: BoundedCache[tuple, dict] = BoundedCache(64)


def launch_ddim_step_backward(
    grad_prev_sample: torch.Tensor | None,
    grad_pred_original: torch.Tensor | None,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_table: torch.Tensor,
    timestep_tensor: torch.Tensor | None,
    timestep: int,
    threshold_scale: torch.Tensor | None,
    prediction_type: int,
    clip_sample: bool,
    clip_sample_range: float,
    use_clipped_model_output: bool,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one fused step w.r.t. (model_output, sample), in their dtype, from the outputs' gradients.

    Args:
        grad_prev_sample, grad_pred_original: gradients of the step's two outputs (None: zero).
        model_output, sample, coef_table, timestep_tensor, timestep, threshold_scale, prediction_type, clip_sample,
            clip_sample_range, use_clipped_model_output: the forward step's arguments (see
            ``fastddim.ops.launch_ddim_step``).
        traceable: launch through ``torch.library.wrap_triton`` (torch.compile).

    Returns:
        `tuple`: (grad_model_output, grad_sample), contiguous.
    """
    grad_model_output = torch.empty(sample.shape, dtype=model_output.dtype, device=sample.device)
    grad_sample = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    numel = sample.numel()
    if numel == 0:
        return grad_model_output, grad_sample
    # Backward passes are not the host-bound hot path: contiguous copies keep one flat kernel for every layout.
    model_output, sample = model_output.contiguous(), sample.contiguous()
    placeholder = coef_table
    has_grad_prev, has_grad_x0 = grad_prev_sample is not None, grad_pred_original is not None
    tensors = (
        grad_prev_sample.contiguous() if has_grad_prev else placeholder,
        grad_pred_original.contiguous() if has_grad_x0 else placeholder,
        model_output,
        sample,
        grad_model_output,
        grad_sample,
        coef_table,
        timestep_tensor if timestep_tensor is not None else placeholder,
        threshold_scale if threshold_scale is not None else placeholder,
    )
    block_size, num_warps = ops.elementwise_launch_config(numel)
    meta = {
        "PREDICTION_TYPE": prediction_type,
        "CLIP_SAMPLE": clip_sample,
        "THRESHOLD": threshold_scale is not None,
        "USE_CLIPPED_MODEL_OUTPUT": use_clipped_model_output,
        "TIMESTEP_FROM_PTR": ops.timestep_mode(timestep_tensor),
        "DIVIDE_BY_RECIPROCAL": sample.is_cuda,
        "HAS_GRAD_PREV": has_grad_prev,
        "HAS_GRAD_X0": has_grad_x0,
        "BLOCK_SIZE": block_size,
        "num_warps": num_warps,
        "enable_fp_fusion": False,
    }
    row_numel = numel // sample.shape[0] if sample.dim() > 0 else numel
    scalars = (timestep, coef_table.shape[0], clip_sample_range, numel, row_numel)
    grid = (triton.cdiv(numel, block_size),)
    key = tuple(meta.values())
    launchers = BACKWARD_LAUNCHERS.get(key)
    if launchers is None:
        launchers = {}
        BACKWARD_LAUNCHERS.put(key, launchers)
    constexprs = compat.constexpr_values(ddim_step_backward_kernel, meta)
    compat.launch(ddim_step_backward_kernel, grid, tensors, scalars, meta, constexprs, launchers, traceable)
    return grad_model_output, grad_sample


# The op's arguments, in order (fastddim.ops.launch_ddim_step).
_ARGUMENTS = (
    "model_output",
    "sample",
    "coef_table",
    "timestep_tensor",
    "timestep",
    "noise",
    "seed",
    "threshold_scale",
    "add_noise",
    "prediction_type",
    "clip_sample",
    "clip_sample_range",
    "use_clipped_model_output",
    "out_dtype",
    "traceable",
    "noise_seeds",
)


def _setup_context(ctx: object, inputs: tuple, output: tuple) -> None:
    args = dict(zip(_ARGUMENTS, inputs, strict=False))
    ctx.save_for_backward(
        args["model_output"], args["sample"], args["coef_table"], args["timestep_tensor"], args["threshold_scale"]
    )
    noise = args["noise"]
    ctx.noise_shape = None if noise is None else noise.shape
    ctx.noise_dtype = None if noise is None else noise.dtype
    ctx.add_noise = bool(args["add_noise"]) and noise is not None and args["seed"] is None
    ctx.scalars = (
        args["timestep"],
        args["prediction_type"],
        args["clip_sample"],
        args["clip_sample_range"],
        args["use_clipped_model_output"],
        bool(args["traceable"]) if len(inputs) > 14 else True,
    )


def _backward(ctx: object, grad_prev_sample: torch.Tensor | None, grad_pred_original: torch.Tensor | None) -> tuple:
    model_output, sample, coef_table, timestep_tensor, threshold_scale = ctx.saved_tensors
    timestep, prediction_type, clip_sample, clip_sample_range, use_clipped, traceable = ctx.scalars
    grad_model_output = grad_sample = grad_noise = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_model_output, grad_sample = launch_ddim_step_backward(
            grad_prev_sample,
            grad_pred_original,
            model_output,
            sample,
            coef_table,
            timestep_tensor,
            timestep,
            threshold_scale,
            prediction_type,
            clip_sample,
            clip_sample_range,
            use_clipped,
            traceable=traceable and torch.compiler.is_compiling(),
        )
    if ctx.add_noise and ctx.needs_input_grad[5] and grad_prev_sample is not None:
        # x_{t-1} += sigma_t * z: the gradient of z is sigma_t * g, summed over the dims z was broadcast along.
        std_dev_t = _per_sample_column(coef_table, timestep_tensor, timestep, sample, 3)
        grad_noise = (grad_prev_sample.float() * std_dev_t).sum_to_size(ctx.noise_shape).to(ctx.noise_dtype)
    return (grad_model_output, grad_sample, None, None, None, grad_noise) + (None,) * (len(_ARGUMENTS) - 6)


def _per_sample_column(
    coef_table: torch.Tensor, timestep_tensor: torch.Tensor | None, timestep: int, sample: torch.Tensor, column: int
) -> torch.Tensor:
    """A table column for this step, shaped to broadcast over ``sample`` (gathered on the device: no host sync)."""
    if timestep_tensor is None:
        return coef_table[timestep, column]
    rows = timestep_tensor.reshape(-1).long().expand(sample.shape[0])
    return coef_table[rows, column].reshape(-1, *([1] * (sample.dim() - 1)))


torch.library.register_autograd("fastddim::ddim_step", _backward, setup_context=_setup_context)
