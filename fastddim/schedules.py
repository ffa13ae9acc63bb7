"""Sampling schedules of ``fastddim.DDIMScheduler``: diffusers' spacings, the DDIM paper's quadratic skip, custom lists.

A schedule is a strictly descending int64 array of training timesteps in [0, T). What a step needs from it is each
timestep's *previous* timestep, which the coefficient table (``fastddim.reference.build_coefficient_table``) stores
per row, so kernels read it by indexing and never branch on the host:

- diffusers' formula (the default, ``prev_timestep_from_schedule=False``): prev(t) = t - T // N. It matches the
  schedule only for ``leading`` spacing; for ``trailing``, ``linspace``, ``quad`` and custom schedules the step lands
  between schedule entries (diffusers #9261, #11347, #12633), which a drop-in must still reproduce.
- from the schedule (``prev_timestep_from_schedule=True``): prev(t_i) = t_{i+1}, and past the last entry
  ``final_alpha_cumprod`` (DDIM eq. (12) with the paper's sub-sequence tau, section 4.2). Rows of timesteps that are
  not in the schedule keep diffusers' formula.
"""

from collections.abc import Sequence

import numpy as np
import torch

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "quad")


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int
) -> np.ndarray:
    """The descending int64 schedule of N = ``num_inference_steps`` timesteps for a ``timestep_spacing``.

    ``leading``, ``trailing`` and ``linspace`` are diffusers' (``trailing`` keeps the first N where diffusers' float
    arange yields N + 1 ending in -1). ``quad`` is the DDIM paper's quadratic skip (ermongroup/ddim ``--skip_type
    quad``): floor(linspace(0, sqrt(0.8 T), N)^2), ascending, then reversed for sampling. Its small squares repeat
    (0, 0, 0, 1, ... for N = 100, T = 1000); repeated timesteps are removed, since a step from t to t is a model call
    that does nothing, so a ``quad`` schedule can have fewer than N timesteps (never fewer than one). Only
    ``leading`` adds ``steps_offset``, as in diffusers.

    Args:
        spacing (`str`): one of ``TIMESTEP_SPACINGS``.
        num_train_timesteps (`int`): T.
        num_inference_steps (`int`): N, in [1, T].
        steps_offset (`int`): added to ``leading`` timesteps.

    Returns:
        `np.ndarray`: int64 timesteps, strictly descending (``leading`` with an offset may reach T).
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
        return timesteps + steps_offset
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_inference_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
        return timesteps[:num_inference_steps]
    if spacing == "quad":
        ascending = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_inference_steps) ** 2).astype(np.int64)
        return np.unique(ascending)[::-1].copy()
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def check_custom_timesteps(timesteps: object, num_train_timesteps: int) -> np.ndarray:
    """Validates a custom schedule: a non-empty, strictly descending sequence of ints in [0, T).

    Args:
        timesteps: a list/tuple of ints, a 1-D integer numpy array or a 1-D integer tensor.
        num_train_timesteps (`int`): T.

    Returns:
        `np.ndarray`: the schedule as int64.

    Raises:
        TypeError: not a sequence of integers. ValueError: empty, not strictly descending, or out of [0, T).
    """
    if isinstance(timesteps, torch.Tensor):
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must hold integers, got a tensor of dtype {timesteps.dtype}")
        array = timesteps.detach().cpu().numpy()
    elif isinstance(timesteps, np.ndarray | Sequence) and not isinstance(timesteps, str | bytes):
        array = np.asarray(timesteps)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"timesteps must be a sequence of ints, got dtype {array.dtype}: {list(timesteps)[:8]}")
    else:
        raise TypeError(f"timesteps must be a sequence of ints, got {type(timesteps).__name__}")
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {array.shape}")
    array = array.astype(np.int64)
    if not (np.diff(array) < 0).all():
        raise ValueError(f"timesteps must be strictly descending, got {array.tolist()[:16]}")
    if array[0] >= num_train_timesteps or array[-1] < 0:
        raise ValueError(
            f"timesteps must lie in [0, num_train_timesteps = {num_train_timesteps}), got {array[-1]} .. {array[0]}"
        )
    return array


def previous_timesteps(
    num_train_timesteps: int, num_inference_steps: int, schedule: np.ndarray | None = None
) -> torch.Tensor:
    """The previous timestep of every training timestep, the table's per-row ``t_prev`` (negative: none).

    Args:
        num_train_timesteps (`int`): T.
        num_inference_steps (`int`): N, which fixes diffusers' stride T // N.
        schedule (`np.ndarray`, *optional*): a descending schedule whose entries step to the next entry (the last to
            -1, i.e. ``final_alpha_cumprod``); rows not in it, and all rows when None, use t - T // N.

    Returns:
        `torch.Tensor`: int64 [T].
    """
    prev = torch.arange(num_train_timesteps) - num_train_timesteps // num_inference_steps
    if schedule is not None:
        in_range = (schedule >= 0) & (schedule < num_train_timesteps)
        targets = np.append(schedule[1:], -1)
        prev[torch.from_numpy(schedule[in_range])] = torch.from_numpy(targets[in_range])
    return prev
