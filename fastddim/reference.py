"""Pure-PyTorch twin of the fused DDIM step kernel (``fastddim/kernels/ddim_step.py``).

It is the CPU backend of ``fastddim.DDIMScheduler`` and the oracle of the kernel tests. It reads the same per-timestep
coefficient row (``fastddim.ops.build_coefficient_table``) and performs the same fp32 (or fp64) operations in the same
order as diffusers' eager ``DDIMScheduler.step``, so fp32/fp64 results are bit-identical to diffusers. It writes into
its own temporaries in place, so it makes fewer passes and allocations than diffusers' chain of out-of-place ops.
"""

import torch

from fastddim.ops import PREDICTION_TYPES
from fastddim.threshold import dynamic_threshold_scale_ref


def _broadcast_per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def pred_original_sample_ref(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_row: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted x_0 and epsilon, DDIM eq. (12), in the dtype of the inputs (fp32 or fp64).

    Args:
        model_output (`torch.Tensor`): the denoiser output.
        sample (`torch.Tensor`): x_t.
        coef_row (`torch.Tensor`): one row of the coefficient table, in the inputs' dtype.
        prediction_type (`str`): one of ``PREDICTION_TYPES``.

    Returns:
        `tuple`: (x_0, epsilon) before any clipping.
    """
    sqrt_alpha_prod_t, sqrt_beta_prod_t = coef_row[0], coef_row[1]
    if prediction_type == "epsilon":
        pred_original = torch.mul(model_output, sqrt_beta_prod_t)
        torch.sub(sample, pred_original, out=pred_original)
        return pred_original.div_(sqrt_alpha_prod_t), model_output
    if prediction_type == "sample":
        return model_output.clone(), _epsilon_from_pred_original(
            sample, model_output, sqrt_alpha_prod_t, sqrt_beta_prod_t
        )
    if prediction_type == "v_prediction":
        pred_original = torch.mul(sample, sqrt_alpha_prod_t)
        pred_original.sub_(torch.mul(model_output, sqrt_beta_prod_t))
        pred_epsilon = torch.mul(model_output, sqrt_alpha_prod_t)
        pred_epsilon.add_(torch.mul(sample, sqrt_beta_prod_t))
        return pred_original, pred_epsilon
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _epsilon_from_pred_original(
    sample: torch.Tensor, pred_original: torch.Tensor, sqrt_alpha_prod_t: torch.Tensor, sqrt_beta_prod_t: torch.Tensor
) -> torch.Tensor:
    pred_epsilon = torch.mul(pred_original, sqrt_alpha_prod_t)
    torch.sub(sample, pred_epsilon, out=pred_epsilon)
    return pred_epsilon.div_(sqrt_beta_prod_t)


def ddim_step_ref(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_row: torch.Tensor,
    *,
    prediction_type: str,
    clip_sample: bool,
    clip_sample_range: float,
    threshold_scale: torch.Tensor | None = None,
    dynamic_thresholding: tuple[float, float] | None = None,
    use_clipped_model_output: bool = False,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update, DDIM eqs. (12) and (16), computed in fp32 (fp64 for fp64 inputs).

    Args:
        model_output (`torch.Tensor`): the denoiser output, same shape as ``sample``.
        sample (`torch.Tensor`): x_t.
        coef_row (`torch.Tensor`): fp32 [8] row of ``build_coefficient_table`` for this timestep and eta.
        prediction_type (`str`): ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        clip_sample (`bool`): clamp x_0 to +-``clip_sample_range`` (ignored when ``threshold_scale`` is given).
        clip_sample_range (`float`): the clamp bound.
        threshold_scale (`torch.Tensor`, *optional*): fp32 [B] dynamic-thresholding s per sample.
        dynamic_thresholding (`tuple`, *optional*): (ratio, sample_max_value): compute ``threshold_scale`` from this
            step's own unclipped x_0 (``dynamic_threshold_scale_ref``) instead of taking it as an argument.
        use_clipped_model_output (`bool`): re-derive epsilon from the clipped x_0.
        noise (`torch.Tensor`, *optional*): z of eq. (12); added as sigma_t * z when given.

    Returns:
        `tuple`: (x_{t-1}, x_0) in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    compute_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    model_output = model_output.to(compute_dtype)
    sample = sample.to(compute_dtype)
    # Coefficients stay CPU 0-dim tensors, as in diffusers: PyTorch then applies its CPU-scalar rules on every
    # device (on CUDA, dividing by one multiplies by its reciprocal), which the kernel reproduces.
    coef_row = coef_row.to(device="cpu", dtype=compute_dtype)
    sqrt_alpha_prod_t, sqrt_beta_prod_t = coef_row[0], coef_row[1]
    sqrt_alpha_prod_prev, std_dev_t, direction_coef = coef_row[2], coef_row[3], coef_row[4]

    pred_original, pred_epsilon = pred_original_sample_ref(model_output, sample, coef_row, prediction_type)
    if dynamic_thresholding is not None:
        threshold_scale = dynamic_threshold_scale_ref(pred_original, *dynamic_thresholding)
    if threshold_scale is not None:
        scale = _broadcast_per_sample(threshold_scale.to(device=sample.device, dtype=compute_dtype), sample.dim())
        pred_original = torch.clamp(pred_original, -scale, scale).div_(scale)
    elif clip_sample:
        pred_original.clamp_(-clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
        pred_epsilon = _epsilon_from_pred_original(sample, pred_original, sqrt_alpha_prod_t, sqrt_beta_prod_t)

    prev_sample = torch.mul(pred_original, sqrt_alpha_prod_prev)
    prev_sample.add_(torch.mul(pred_epsilon, direction_coef))
    if noise is not None:
        prev_sample.add_(torch.mul(noise.to(device=sample.device, dtype=compute_dtype), std_dev_t))
    return prev_sample, pred_original
