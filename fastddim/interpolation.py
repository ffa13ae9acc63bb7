"""Spherical interpolation of Gaussian latents, as the DDIM paper interpolates x_T (Song et al., 2021, section 5.3).

DDIM's deterministic sampler (eta = 0) maps x_T to an image, so images "between" two seeds come from latents between
their x_T. A straight line between two standard-normal vectors passes close to the origin, where a Gaussian almost
never lies (its norm concentrates near sqrt(d)); the great-circle arc keeps the norm, so every point on it is a
typical x_T (Shoemake 1985; White 2016, "Sampling generative networks").
"""

import numbers

import torch

__all__ = ["slerp"]


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation between ``x0`` (at ``alpha`` = 0) and ``x1`` (at ``alpha`` = 1), per sample.

    With theta the angle between the two flattened samples, the result is
    ``sin((1 - alpha) theta) / sin(theta) * x0 + sin(alpha theta) / sin(theta) * x1``. Where the two are parallel
    (sin(theta) below 1e-6, where the formula is 0/0) it is the linear interpolation, which the arc tends to there.
    Computed in fp32 (fp64 for fp64 inputs) and returned in the inputs' dtype; the inputs are not modified.

    Args:
        x0 (`torch.Tensor`): start latents, batch first (B, ...); a 1-D tensor is one sample.
        x1 (`torch.Tensor`): end latents, same shape, dtype and device as ``x0``.
        alpha (`float` or `torch.Tensor`): the position along the arc: a number, or a tensor of shape (B,) with one
            position per sample. Values outside [0, 1] continue along the same great circle.

    Returns:
        `torch.Tensor`: the interpolated latents, shaped like ``x0``.

    Examples::

        >>> a, b = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
        >>> frames = torch.cat([slerp(a, b, t) for t in torch.linspace(0, 1, 9).tolist()])
    """
    for name, value in (("x0", x0), ("x1", x1)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(value).__name__}")
        if value.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    if x0.shape != x1.shape or x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(
            "x0 and x1 must have the same shape, dtype and device, got "
            f"{tuple(x0.shape)} {x0.dtype} {x0.device} and {tuple(x1.shape)} {x1.dtype} {x1.device}"
        )
    single = x0.dim() == 1
    batch = 1 if single else x0.shape[0]
    compute_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.shape[0] != batch) or not alpha.is_floating_point():
            raise ValueError(
                f"alpha must be a number or a floating-point tensor of shape ({batch},), got "
                f"{alpha.dtype} of shape {tuple(alpha.shape)}"
            )
        weights = alpha.to(device=x0.device, dtype=compute_dtype).reshape(-1, 1)
    elif isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        weights = torch.full((1, 1), float(alpha), device=x0.device, dtype=compute_dtype)
    else:
        raise TypeError(f"alpha must be a real number or a tensor, got {type(alpha).__name__}")
    if not torch.isfinite(weights).all():
        raise ValueError("alpha must be finite")

    start = x0.reshape(batch, -1).to(compute_dtype)
    end = x1.reshape(batch, -1).to(compute_dtype)
    norms = start.norm(dim=1, keepdim=True) * end.norm(dim=1, keepdim=True)
    cosine = ((start * end).sum(dim=1, keepdim=True) / norms).clamp(-1, 1)
    theta = torch.arccos(cosine)
    sin_theta = torch.sin(theta)
    parallel = sin_theta < 1e-6
    safe_sin = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
    start_weight = torch.where(parallel, 1 - weights, torch.sin((1 - weights) * theta) / safe_sin)
    end_weight = torch.where(parallel, weights, torch.sin(weights * theta) / safe_sin)
    result = start_weight * start + end_weight * end
    return result.reshape(x0.shape).to(x0.dtype)
