"""Triton kernel for the gradient of one DDIM update w.r.t. ``model_output`` and ``sample``.

The update (``fastddim/kernels/ddim_step.py``, DDIM eq. (12)) is affine in both inputs except for the clamp of x_0
(clipping or dynamic thresholding with a given per-sample scale s), so the backward pass is a few multiplications
per element. It follows, operation by operation, what autograd does through diffusers' ``step``:
``clamp(x, lo, hi)`` passes the gradient where lo <= x <= hi (torch's ``clamp_backward``), ``a * c`` gives g * c,
``a - b`` gives g and -g, ``a / c`` gives g / c (rounded as PyTorch divides by a CPU scalar on the device), so fp32
gradients are bit-identical to diffusers' wherever at most two terms meet in one gradient. Where three meet (the
gradient of x_0 with ``use_clipped_model_output``, or of ``model_output`` for sample prediction when both outputs
are used), autograd's accumulation order decides the last bit.

Notation as in ``ddim_step.py``; g_prev and g_x0 are the incoming gradients of x_{t-1} and of the returned x_0.
"""

import triton
import triton.language as tl

from fastddim.kernels.ddim_step import (
    COEF_DIRECTION,
    COEF_INV_SQRT_ALPHA_PROD_T,
    COEF_INV_SQRT_BETA_PROD_T,
    COEF_SQRT_ALPHA_PROD_PREV,
    COEF_SQRT_ALPHA_PROD_T,
    COEF_SQRT_BETA_PROD_T,
    EPSILON,
    SAMPLE,
    coefficient_row,
    divide_by_coefficient,
    load_coefficient,
    pred_original_sample,
)


@triton.jit(do_not_specialize=["timestep", "num_train_timesteps"])
def ddim_step_backward_kernel(
    # Pointers to contiguous tensors of one shape [B, ...]
    grad_prev_ptr,  # gradient of prev_sample (read when HAS_GRAD_PREV)
    grad_x0_ptr,  # gradient of pred_original_sample (read when HAS_GRAD_X0)
    model_output_ptr,
    sample_ptr,
    grad_model_output_ptr,  # output
    grad_sample_ptr,  # output
    coef_table_ptr,  # [num_train_timesteps, NUM_COEFS] fp32
    timestep_ptr,  # integer scalar when TIMESTEP_FROM_PTR, [B] for TIMESTEP_PER_SAMPLE
    threshold_scale_ptr,  # fp32 [B] when THRESHOLD (held constant: its own gradient is not part of this kernel)
    # Scalars
    timestep,
    num_train_timesteps,
    clip_sample_range,
    numel,
    row_numel,
    # Meta-parameters
    PREDICTION_TYPE: tl.constexpr,
    CLIP_SAMPLE: tl.constexpr,
    THRESHOLD: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    TIMESTEP_FROM_PTR: tl.constexpr,
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
    HAS_GRAD_PREV: tl.constexpr,
    HAS_GRAD_X0: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = idx < numel
    batch = tl.minimum(idx, numel - 1) // row_numel
    coef_row_ptr, row_valid = coefficient_row(
        coef_table_ptr, timestep_ptr, timestep, num_train_timesteps, batch, TIMESTEP_FROM_PTR
    )
    sqrt_alpha_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_ALPHA_PROD_T, row_valid)
    sqrt_beta_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_BETA_PROD_T, row_valid)
    inv_sqrt_alpha_prod_t = load_coefficient(coef_row_ptr, COEF_INV_SQRT_ALPHA_PROD_T, row_valid)
    inv_sqrt_beta_prod_t = load_coefficient(coef_row_ptr, COEF_INV_SQRT_BETA_PROD_T, row_valid)
    sqrt_alpha_prod_prev = load_coefficient(coef_row_ptr, COEF_SQRT_ALPHA_PROD_PREV, row_valid)
    direction_coef = load_coefficient(coef_row_ptr, COEF_DIRECTION, row_valid)

    model_output = tl.load(model_output_ptr + idx, mask=mask).to(tl.float32)
    sample = tl.load(sample_ptr + idx, mask=mask).to(tl.float32)
    if HAS_GRAD_PREV:
        grad_prev = tl.load(grad_prev_ptr + idx, mask=mask).to(tl.float32)
    else:
        grad_prev = tl.zeros([BLOCK_SIZE], tl.float32)

    # x_{t-1} = sqrt(alpha_prev) * x0c + direction * eps: gradients of the clamped x_0 and of epsilon.
    grad_clipped = grad_prev * sqrt_alpha_prod_prev
    if HAS_GRAD_X0:
        grad_clipped = grad_clipped + tl.load(grad_x0_ptr + idx, mask=mask).to(tl.float32)
    grad_epsilon = grad_prev * direction_coef
    grad_sample = tl.zeros([BLOCK_SIZE], tl.float32)
    if USE_CLIPPED_MODEL_OUTPUT:
        # eps = (x_t - sqrt(alpha_t) * x0c) / sqrt(1 - alpha_t)
        grad_numerator = divide_by_coefficient(
            grad_epsilon, sqrt_beta_prod_t, inv_sqrt_beta_prod_t, DIVIDE_BY_RECIPROCAL
        )
        grad_sample = grad_numerator
        grad_clipped = grad_clipped + (-grad_numerator) * sqrt_alpha_prod_t

    # The clamp of x_0 (and the division by s when thresholding), recomputing the unclamped x_0.
    if THRESHOLD or CLIP_SAMPLE:
        pred_original = pred_original_sample(
            model_output, sample, coef_row_ptr, row_valid, PREDICTION_TYPE, DIVIDE_BY_RECIPROCAL
        )
        if THRESHOLD:
            scale = tl.load(threshold_scale_ptr + batch, mask=mask, other=1.0)
            inside = (pred_original >= -scale) & (pred_original <= scale)
            grad_original = tl.where(inside, tl.math.div_rn(grad_clipped, scale), 0.0)
        else:
            inside = (pred_original >= -clip_sample_range) & (pred_original <= clip_sample_range)
            grad_original = tl.where(inside, grad_clipped, 0.0)
    else:
        grad_original = grad_clipped

    if PREDICTION_TYPE == EPSILON:
        # x_0 = (x_t - sqrt(1 - alpha_t) * m) / sqrt(alpha_t); eps = m
        grad_numerator = divide_by_coefficient(
            grad_original, sqrt_alpha_prod_t, inv_sqrt_alpha_prod_t, DIVIDE_BY_RECIPROCAL
        )
        if USE_CLIPPED_MODEL_OUTPUT:
            grad_sample = grad_sample + grad_numerator
            grad_model_output = (-grad_numerator) * sqrt_beta_prod_t
        else:
            grad_sample = grad_numerator
            grad_model_output = (-grad_numerator) * sqrt_beta_prod_t + grad_epsilon
    elif PREDICTION_TYPE == SAMPLE:
        # x_0 = m; eps = (x_t - sqrt(alpha_t) * x_0) / sqrt(1 - alpha_t) from the unclamped x_0
        if USE_CLIPPED_MODEL_OUTPUT:
            grad_model_output = grad_original
        else:
            grad_numerator = divide_by_coefficient(
                grad_epsilon, sqrt_beta_prod_t, inv_sqrt_beta_prod_t, DIVIDE_BY_RECIPROCAL
            )
            grad_sample = grad_numerator
            grad_model_output = grad_original + (-grad_numerator) * sqrt_alpha_prod_t
    else:
        # x_0 = sqrt(alpha_t) * x_t - sqrt(1 - alpha_t) * m; eps = sqrt(alpha_t) * m + sqrt(1 - alpha_t) * x_t
        if USE_CLIPPED_MODEL_OUTPUT:
            grad_sample = grad_sample + grad_original * sqrt_alpha_prod_t
            grad_model_output = (-grad_original) * sqrt_beta_prod_t
        else:
            grad_sample = grad_original * sqrt_alpha_prod_t + grad_epsilon * sqrt_beta_prod_t
            grad_model_output = (-grad_original) * sqrt_beta_prod_t + grad_epsilon * sqrt_alpha_prod_t

    tl.store(grad_model_output_ptr + idx, grad_model_output.to(grad_model_output_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_sample_ptr + idx, grad_sample.to(grad_sample_ptr.dtype.element_ty), mask=mask)
