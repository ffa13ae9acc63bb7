"""Spherical interpolation of Gaussian latents, as the DDIM paper interpolates x_T (section 5.3, Figure 6).

DDIM sampling is deterministic, so x_T is a latent code of the image: interpolating two codes and sampling from each
interpolant gives a semantically smooth path between two images. The codes are high-dimensional Gaussian samples,
which concentrate near the sphere of radius sqrt(d); a straight line between two of them passes well inside it,
where the model has seen no inputs, so the paper interpolates along the great circle instead (slerp, Shoemake 1985):

    x(alpha) = sin((1 - alpha) theta) / sin(theta) x0 + sin(alpha theta) / sin(theta) x1,
    theta = arccos(<x0, x1> / (|x0| |x1|)).
"""

import torch

__all__ = ["slerp"]

# Below this sin(theta) (vectors parallel, or antiparallel, to fp32 precision) the weights' ratio is ill-conditioned:
# slerp falls back to its own limit for parallel vectors, linear interpolation.
_MIN_SIN_THETA = 1e-6


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation between latents, row by row along dim 0 (the batch).

    Each batch entry is one flattened vector with its own angle. ``alpha`` may be a number (every row), or a tensor
    of shape (B,) with one weight per row; rows of size 1 in ``x0``/``x1`` broadcast, so
    ``slerp(xa, xb, torch.linspace(0, 1, 9))`` with ``xa``/``xb`` of shape (1, C, H, W) gives 9 frames.
    For (anti)parallel rows (sin theta < 1e-6, where the great circle is numerically undefined) the result is the
    linear interpolation (1 - alpha) x0 + alpha x1, slerp's limit for parallel vectors. Computed in fp32 (fp64 for
    fp64 inputs) and returned in the inputs' dtype; alpha = 0 and 1 give x0 and x1 exactly.

    Args:
        x0 (`torch.Tensor`): [B, ...] floating-point latents (alpha = 0).
        x1 (`torch.Tensor`): latents of the same shape but for broadcast size-1 batch, same dtype and device.
        alpha (`float` or `torch.Tensor`): interpolation weight(s); values outside [0, 1] extrapolate on the circle.

    Returns:
        `torch.Tensor`: [B, ...] the interpolants.

    Raises:
        TypeError: non-tensor or non-floating-point latents, a non-real ``alpha``. ValueError: shapes, dtypes or
            devices that do not match, or an ``alpha`` that is not a number or (B,).
    """
    for name, value in (("x0", x0), ("x1", x1)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {value!r:.60}")
        if value.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-dim tensor")
    if x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(
            f"x0 and x1 must share dtype and device, got {x0.dtype}/{x0.device} and {x1.dtype}/{x1.device}"
        )
    if x0.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x0 and x1 must have the same shape per row, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    compute_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if isinstance(alpha, torch.Tensor):
        if not (alpha.is_floating_point() or alpha.dtype in (torch.int64, torch.int32)) or alpha.dim() > 1:
            raise ValueError(
                f"alpha must be a number or a (batch,) real tensor, got {alpha.dtype} {tuple(alpha.shape)}"
            )
        weights = alpha.to(x0.device, compute_dtype).reshape(-1)
    elif isinstance(alpha, int | float) and not isinstance(alpha, bool):
        weights = torch.full((1,), float(alpha), dtype=compute_dtype, device=x0.device)
    else:
        raise TypeError(f"alpha must be a real number or a tensor, got {type(alpha).__name__}")
    try:
        batch = torch.broadcast_shapes((x0.shape[0],), (x1.shape[0],), weights.shape)[0]
    except RuntimeError:
        raise ValueError(
            f"batch sizes do not broadcast: x0 {x0.shape[0]}, x1 {x1.shape[0]}, alpha {weights.numel()}"
        ) from None

    row_shape = x0.shape[1:]
    a = x0.to(compute_dtype).reshape(x0.shape[0], -1).expand(batch, -1)
    b = x1.to(compute_dtype).reshape(x1.shape[0], -1).expand(batch, -1)
    weights = weights.expand(batch)[:, None]
    cos_theta = (a * b).sum(dim=1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    theta = torch.acos(cos_theta.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    curved = sin_theta >= _MIN_SIN_THETA
    safe_sin = torch.where(curved, sin_theta, torch.ones_like(sin_theta))
    weight0 = torch.where(curved, torch.sin((1 - weights) * theta) / safe_sin, 1 - weights)
    weight1 = torch.where(curved, torch.sin(weights * theta) / safe_sin, weights)
    # Exact endpoints whatever the rounding of the sines.
    weight0 = torch.where(weights == 0, 1.0, torch.where(weights == 1, 0.0, weight0))
    weight1 = torch.where(weights == 0, 0.0, torch.where(weights == 1, 1.0, weight1))
    out = weight0 * a + weight1 * b
    return out.reshape(batch, *row_shape).to(x0.dtype)
