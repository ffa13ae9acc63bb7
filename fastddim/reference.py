"""Pure-PyTorch twins of fastddim's kernels (``fastddim/kernels/``); imports no Triton code.

- ``build_coefficient_table``: the per-timestep scalars every step reads, kernel and twin alike (one source of truth).
- ``ddim_step_ref``: the fused DDIM step. It is the CPU backend of ``fastddim.DDIMScheduler`` and the oracle of the
  kernel tests.
- ``dynamic_threshold_scale_ref`` and ``quantile_rank``: dynamic thresholding's per-sample scale (the twin of
  ``fastddim/kernels/threshold.py``; the algorithm is described in ``fastddim/threshold.py``).

``ddim_step_ref`` reads one coefficient row and performs the same fp32 (or fp64) operations in the same
order as diffusers' eager ``DDIMScheduler.step``, so fp32/fp64 results are bit-identical to diffusers. It writes into
its own temporaries in place, so it makes fewer passes and allocations than diffusers' chain of out-of-place ops.
"""

import math
from typing import NamedTuple

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
NUM_COEFS = 8


def build_coefficient_table(
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    num_inference_steps: int,
    eta: float,
    prev_timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-timestep DDIM coefficients, one row per training timestep t, computed on the CPU in fp32.

    Row t holds the scalars diffusers' ``DDIMScheduler.step`` derives for timestep t, previous timestep
    t - num_train_timesteps // num_inference_steps and this ``eta``, each by the same fp32 torch operations in the
    same order (diffusers computes them on CPU 0-dim tensors), so a kernel reading the row reproduces diffusers bit
    for bit. One deliberate difference: the radicand 1 - alpha_prev - sigma^2 is clamped at 0. It is >= 0 in exact
    arithmetic for 0 <= eta <= 1, but rounds below 0 with a zero terminal SNR, where diffusers returns NaN.

    Columns (see ``fastddim/kernels/ddim_step.py``): sqrt(alpha_t), sqrt(1 - alpha_t), sqrt(alpha_prev), sigma_t,
    sqrt(1 - alpha_prev - sigma_t^2), the fp32 reciprocals 1 / sqrt(alpha_t) and 1 / sqrt(1 - alpha_t) (PyTorch
    divides a CUDA tensor by a CPU scalar by multiplying with the reciprocal), and a zero pad (rows of 32 bytes).

    Args:
        alphas_cumprod (`torch.Tensor`): fp32 [T] cumulative products of alphas.
        final_alpha_cumprod (`torch.Tensor`): fp32 0-dim alpha used where the previous timestep is negative.
        num_inference_steps (`int`): N, which fixes the stride T // N to the previous timestep.
        eta (`float`): the DDIM eta >= 0 of eq. (16).
        prev_timesteps (`torch.Tensor`, *optional*): int64 [T], row t's previous timestep (negative: the final
            alpha), e.g. taken from the schedule (``fastddim.schedules.previous_timesteps``); default
            t - T // num_inference_steps, diffusers' formula.

    Returns:
        `torch.Tensor`: fp32 [T, 8] CPU table.
    """
    alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
    final_alpha_cumprod = final_alpha_cumprod.detach().to("cpu", torch.float32)
    num_train_timesteps = alphas_cumprod.shape[0]
    if prev_timesteps is None:
        prev_timesteps = torch.arange(num_train_timesteps) - num_train_timesteps // num_inference_steps
    alpha_prod_t = alphas_cumprod
    alpha_prod_prev = torch.where(
        prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_prev = 1 - alpha_prod_prev
    # DDIM eq. (16) without eta, in diffusers' `_get_variance` operation order.
    variance = (beta_prod_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev_t = eta * variance**0.5
    table = torch.zeros(num_train_timesteps, NUM_COEFS, dtype=torch.float32)
    table[:, 0] = alpha_prod_t**0.5
    table[:, 1] = beta_prod_t**0.5
    table[:, 2] = alpha_prod_prev**0.5
    table[:, 3] = std_dev_t
    table[:, 4] = (beta_prod_prev - std_dev_t**2).clamp(min=0) ** 0.5
    table[:, 5] = 1.0 / table[:, 0]
    table[:, 6] = 1.0 / table[:, 1]
    return table


def build_inverse_coefficient_table(
    alphas_cumprod: torch.Tensor, initial_alpha_cumprod: torch.Tensor, num_inference_steps: int
) -> torch.Tensor:
    """The coefficient table of DDIM inversion, read by the forward step kernel (same columns, sigma = 0).

    diffusers' ``DDIMInverseScheduler.step`` moves x from the source timestep s = min(t' - T // N, T - 1) to the
    target t' (its ``timestep`` argument): x_{t'} = sqrt(alpha_{t'}) x0_hat + sqrt(1 - alpha_{t'}) eps_hat, with
    x0_hat and eps_hat predicted at s (alpha_s = ``initial_alpha_cumprod`` for s < 0). That is the forward update of
    DDIM eq. (12) with eta = 0 run with alpha_t <- alpha_s and alpha_prev <- alpha_{t'}, so row t' holds sqrt(alpha_s),
    sqrt(1 - alpha_s), sqrt(alpha_{t'}), 0, sqrt(1 - alpha_{t'}) and the reciprocals of the first two, each by the
    fp32 torch operations diffusers performs (bit-identical coefficients).

    Args:
        alphas_cumprod (`torch.Tensor`): fp32 [T].
        initial_alpha_cumprod (`torch.Tensor`): fp32 0-dim alpha used where s < 0.
        num_inference_steps (`int`): N.

    Returns:
        `torch.Tensor`: fp32 [T, 8] CPU table indexed by the target timestep t'.
    """
    alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
    initial_alpha_cumprod = initial_alpha_cumprod.detach().to("cpu", torch.float32)
    num_train_timesteps = alphas_cumprod.shape[0]
    targets = torch.arange(num_train_timesteps)
    sources = (targets - num_train_timesteps // num_inference_steps).clamp(max=num_train_timesteps - 1)
    alpha_prod_s = torch.where(sources >= 0, alphas_cumprod[sources.clamp(min=0)], initial_alpha_cumprod)
    alpha_prod_target = alphas_cumprod
    beta_prod_s = 1 - alpha_prod_s
    table = torch.zeros(num_train_timesteps, NUM_COEFS, dtype=torch.float32)
    table[:, 0] = alpha_prod_s**0.5
    table[:, 1] = beta_prod_s**0.5
    table[:, 2] = alpha_prod_target**0.5
    table[:, 4] = (1 - alpha_prod_target) ** 0.5
    table[:, 5] = 1.0 / table[:, 0]
    table[:, 6] = 1.0 / table[:, 1]
    return table


def quantile_rank(row_numel: int, ratio: float, dtype: torch.dtype = torch.float32) -> tuple[int, float]:
    """``torch.quantile``'s interpolation rank for a row of ``row_numel`` >= 1 elements, evaluated in ``dtype``.

    Args:
        row_numel (`int`): n, the number of elements per row.
        ratio (`float`): the quantile q in [0, 1].
        dtype (`torch.dtype`): the dtype of the row (fp32 or fp64), in which ``torch.quantile`` computes the rank.

    Returns:
        `tuple`: (lo, w) with lo = floor(r) clamped to n - 1 and w = r - floor(r), r = dtype(q) * dtype(n - 1).
    """
    real = np.float64 if dtype == torch.float64 else np.float32
    rank = real(ratio) * real(row_numel - 1)
    lo = math.floor(rank)
    if lo >= row_numel - 1:
        # r = n - 1 exactly (ratio 1), or r > n - 1 when fp32(n - 1) rounds up (n > 2^24 + 1), where torch would
        # index past the row: both take the last element.
        return row_numel - 1, 0.0
    return lo, float(rank - real(lo))


def dynamic_threshold_scale_ref(
    pred_original_sample: torch.Tensor, ratio: float, sample_max_value: float
) -> torch.Tensor:
    """Pure-PyTorch twin of ``dynamic_threshold_scale``, given x_0: diffusers' ``_threshold_sample`` scale s.

    Bit-identical to diffusers' ``torch.quantile`` (the tests check it against ``torch.quantile`` directly), but by
    selection instead of a sort: ``torch.quantile`` sorts every row to read two order statistics, while two
    ``kthvalue`` calls (quickselect, O(n)) find the same two values, 4-7x faster on the CPU; they are then
    interpolated by ``torch.lerp``, the op ``torch.quantile`` itself interpolates with. Unlike diffusers it accepts
    any rank >= 1 (diffusers' ``np.prod`` of the trailing dims breaks 2-D samples) and empty rows (NaN scale).

    Args:
        pred_original_sample (`torch.Tensor`): x_0, batch first; upcast to fp32 unless fp64.
        ratio (`float`): the quantile of |x_0| per sample, in (0, 1].
        sample_max_value (`float`): upper clamp of s.

    Returns:
        `torch.Tensor`: [B] s = clamp(quantile(|x_0[b]|, ratio), min=1, max=sample_max_value), fp32 (fp64 for fp64).
    """
    x = pred_original_sample
    if x.dtype not in (torch.float32, torch.float64):
        # diffusers upcasts for torch.quantile, which needs fp32/fp64 (diffusers #1349).
        x = x.float()
    abs_rows = x.reshape(x.shape[0], -1).abs()
    row_numel = abs_rows.shape[1]
    if row_numel == 0:
        return torch.full((abs_rows.shape[0],), float("nan"), dtype=abs_rows.dtype, device=abs_rows.device)
    rank_lo, rank_weight = quantile_rank(row_numel, ratio, abs_rows.dtype)
    below = abs_rows.kthvalue(rank_lo + 1, dim=1).values
    # torch.quantile takes the element at ceil(rank): the same one when the weight is 0.
    above = abs_rows.kthvalue(rank_lo + 2, dim=1).values if rank_weight > 0 else below
    scale = below.lerp(above, torch.full_like(below, rank_weight))
    # As torch.quantile: a row holding a NaN has a NaN quantile.
    scale = scale.masked_fill(abs_rows.isnan().any(dim=1), float("nan"))
    return torch.clamp(scale, min=1, max=sample_max_value)


def _broadcast_per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


class StepCoefficients(NamedTuple):
    """One step's coefficients as ``ddim_step_ref`` multiplies with them (columns of the coefficient table).

    For one timestep they are CPU 0-dim tensors, as in diffusers: PyTorch then applies its CPU-scalar rules on every
    device (on CUDA, dividing by one multiplies by its reciprocal), which the kernel reproduces. For per-sample
    timesteps they are [B, 1, ...] tensors on the samples' device, and ``divide_by_reciprocal`` says to multiply by
    the reciprocal explicitly where PyTorch would have (a non-CPU device), so a per-sample step equals, bit for bit,
    stepping each sample alone.
    """

    sqrt_alpha_prod_t: torch.Tensor
    sqrt_beta_prod_t: torch.Tensor
    sqrt_alpha_prod_prev: torch.Tensor
    std_dev_t: torch.Tensor
    direction_coef: torch.Tensor
    divide_by_reciprocal: bool

    def divide(self, numerator: torch.Tensor, coefficient: torch.Tensor, inplace: bool) -> torch.Tensor:
        """numerator / coefficient, rounded as PyTorch rounds ``tensor / cpu_scalar`` on the tensor's device."""
        if self.divide_by_reciprocal:
            reciprocal = 1 / coefficient  # in the compute dtype, as ATen's opmath reciprocal of a CPU scalar
            return numerator.mul_(reciprocal) if inplace else numerator * reciprocal
        return numerator.div_(coefficient) if inplace else numerator / coefficient


def step_coefficients(coef_row: torch.Tensor, sample: torch.Tensor, compute_dtype: torch.dtype) -> StepCoefficients:
    """The coefficients of a [8] table row (one timestep) or of [B, 8] rows (one timestep per batch entry)."""
    if coef_row.dim() == 1:
        row = coef_row.to(device="cpu", dtype=compute_dtype)
        return StepCoefficients(row[0], row[1], row[2], row[3], row[4], False)
    rows = coef_row.to(device=sample.device, dtype=compute_dtype)
    columns = [_broadcast_per_sample(rows[:, column], sample.dim()) for column in range(5)]
    return StepCoefficients(*columns, sample.device.type != "cpu")


def pred_original_sample_ref(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_row: torch.Tensor,
    prediction_type: str,
    inplace: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted x_0 and epsilon, DDIM eq. (12), in the dtype of the inputs (fp32 or fp64).

    Args:
        model_output (`torch.Tensor`): the denoiser output.
        sample (`torch.Tensor`): x_t.
        coef_row (`torch.Tensor`): one row of the coefficient table, or [B, 8] rows (one per batch entry).
        prediction_type (`str`): one of ``PREDICTION_TYPES``.
        inplace (`bool`): update fresh temporaries in place (fewer passes); ``False`` uses out-of-place ops only,
            which autograd can differentiate.

    Returns:
        `tuple`: (x_0, epsilon) before any clipping.
    """
    coefs = step_coefficients(coef_row, sample, model_output.dtype)
    return _pred_original_and_epsilon(model_output, sample, coefs, prediction_type, inplace)


def _pred_original_and_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, coefs: StepCoefficients, prediction_type: str, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    sqrt_alpha_prod_t, sqrt_beta_prod_t = coefs.sqrt_alpha_prod_t, coefs.sqrt_beta_prod_t
    if prediction_type == "epsilon":
        if inplace:
            # Laid out like the sample, as diffusers' `(sample - ...) / ...` is: a channels-last sample keeps x_0 and
            # the step's output channels-last, so the next UNet call runs the same CPU kernels as under diffusers.
            pred_original = torch.mul(model_output, sqrt_beta_prod_t, out=torch.empty_like(sample))
            torch.sub(sample, pred_original, out=pred_original)
        else:
            pred_original = sample - sqrt_beta_prod_t * model_output
        return coefs.divide(pred_original, sqrt_alpha_prod_t, inplace), model_output
    if prediction_type == "sample":
        # A copy: the output must not alias the input (clone is differentiable, its gradient the identity).
        return model_output.clone(), _epsilon_from_pred_original(sample, model_output, coefs, inplace)
    if prediction_type == "v_prediction":
        if inplace:
            pred_original = torch.mul(sample, sqrt_alpha_prod_t)
            pred_original.sub_(torch.mul(model_output, sqrt_beta_prod_t))
            pred_epsilon = torch.mul(model_output, sqrt_alpha_prod_t)
            pred_epsilon.add_(torch.mul(sample, sqrt_beta_prod_t))
            return pred_original, pred_epsilon
        pred_original = sqrt_alpha_prod_t * sample - sqrt_beta_prod_t * model_output
        return pred_original, sqrt_alpha_prod_t * model_output + sqrt_beta_prod_t * sample
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _epsilon_from_pred_original(
    sample: torch.Tensor, pred_original: torch.Tensor, coefs: StepCoefficients, inplace: bool
) -> torch.Tensor:
    if inplace:
        pred_epsilon = torch.mul(pred_original, coefs.sqrt_alpha_prod_t)
        torch.sub(sample, pred_epsilon, out=pred_epsilon)
    else:
        pred_epsilon = sample - coefs.sqrt_alpha_prod_t * pred_original
    return coefs.divide(pred_epsilon, coefs.sqrt_beta_prod_t, inplace)


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

    Differentiable: when autograd records (grad mode on and an input requiring grad) it uses out-of-place ops only,
    the operations diffusers' ``step`` performs, so gradients w.r.t. ``model_output`` and ``sample`` equal diffusers'
    autograd gradients; otherwise it updates its own temporaries in place (fewer passes, same values).

    Args:
        model_output (`torch.Tensor`): the denoiser output, same shape as ``sample``.
        sample (`torch.Tensor`): x_t.
        coef_row (`torch.Tensor`): fp32 [8] row of ``build_coefficient_table`` for this timestep and eta, or [B, 8]
            rows, one per batch entry (per-sample timesteps).
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
    inplace = not (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (model_output, sample, noise, threshold_scale))
    )
    model_output = model_output.to(compute_dtype)
    sample = sample.to(compute_dtype)
    coefs = step_coefficients(coef_row, sample, compute_dtype)

    pred_original, pred_epsilon = _pred_original_and_epsilon(model_output, sample, coefs, prediction_type, inplace)
    if dynamic_thresholding is not None:
        threshold_scale = dynamic_threshold_scale_ref(pred_original, *dynamic_thresholding)
    if threshold_scale is not None:
        scale = _broadcast_per_sample(threshold_scale.to(device=sample.device, dtype=compute_dtype), sample.dim())
        pred_original = torch.clamp(pred_original, -scale, scale)
        pred_original = pred_original.div_(scale) if inplace else pred_original / scale
    elif clip_sample:
        if inplace:
            pred_original.clamp_(-clip_sample_range, clip_sample_range)
        else:
            pred_original = pred_original.clamp(-clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
        pred_epsilon = _epsilon_from_pred_original(sample, pred_original, coefs, inplace)

    if inplace:
        prev_sample = torch.mul(pred_original, coefs.sqrt_alpha_prod_prev)
        prev_sample.add_(torch.mul(pred_epsilon, coefs.direction_coef))
        if noise is not None:
            prev_sample.add_(torch.mul(noise.to(device=sample.device, dtype=compute_dtype), coefs.std_dev_t))
        return prev_sample, pred_original
    # diffusers' operand order: sqrt(alpha_prev) * x_0 + direction * epsilon, then + sigma_t * z.
    prev_sample = coefs.sqrt_alpha_prod_prev * pred_original + coefs.direction_coef * pred_epsilon
    if noise is not None:
        prev_sample = prev_sample + coefs.std_dev_t * noise.to(device=sample.device, dtype=compute_dtype)
    return prev_sample, pred_original
