"""Seed-addressed sampling: seed lists, one CPU generator per image, and how ranks share the seeds.

The contract: image ``s`` depends only on its seed and the sampling settings, never on the batch size, the number of
processes or which process drew it (up to the UNet's own batch-size rounding, see `fastddim.DDIMPipeline`'s ``seeds``
argument). Its initial noise is the first draw of ``torch.Generator("cpu").manual_seed(s)``. For eta > 0 each step's
noise is keyed by (seed, step):

- Triton backend (CUDA): drawn inside the fused step kernel from Philox keyed by ``s``, with the step's timestep in
  the counter (``DDIMScheduler.step``'s ``noise_seeds``): no host work per step, and new seeds replay the same
  captured graph.
- torch backend (CPU): step ``k``'s noise is the generator's ``k + 1``-th draw (the order diffusers' ``randn_tensor``
  uses for a generator list).

The two backends draw different step noise, each self-consistent: an image sampled with eta > 0 on a GPU does not
equal the one sampled on the CPU. x_T costs a CPU draw and one host-to-device copy per call.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["MAX_SEED", "MAX_SEEDS", "batches", "parse_seeds", "seed_generators", "shard"]

# torch.Generator.manual_seed takes seeds below 2**64; keeping them int64 lets numpy and .npz files hold them.
MAX_SEED = 2**63 - 1
# One seed list is materialised in memory (8 bytes a seed): 10 million is 80 MB, 200 times a 50k FID set.
MAX_SEEDS = 10_000_000


def parse_seeds(text: str) -> np.ndarray:
    """Parses a seed list such as ``"0-49999"`` or ``"0-9,20,30-31"`` (inclusive ranges and single seeds).

    Args:
        text (`str`): comma-separated items, each ``N`` or ``A-B`` with ``0 <= A <= B``.

    Returns:
        `np.ndarray`: the seeds as int64, in the order given.

    Raises:
        ValueError: a malformed item, a negative or too large seed, a descending range, a seed listed twice, or
            more than `MAX_SEEDS` seeds; the message names the item.
    """
    if not isinstance(text, str):
        raise TypeError(f"seeds must be a string such as '0-99,200', got {type(text).__name__}")
    ranges: list[tuple[int, int]] = []
    total = 0
    for item in text.split(","):
        item = item.strip()
        first, sep, last = item.partition("-")
        try:
            start = int(first)
            stop = int(last) if sep else start
        except ValueError:
            raise ValueError(
                f"{item!r} is not a seed or an inclusive range A-B of non-negative integers (e.g. 0-9,20,30-31)"
            ) from None
        if first.strip().startswith(("+", "-")) or (sep and last.strip().startswith(("+", "-"))):
            raise ValueError(f"{item!r}: seeds are non-negative integers")
        if stop > MAX_SEED:
            raise ValueError(f"{item!r}: seeds must be at most {MAX_SEED}")
        if stop < start:
            raise ValueError(f"{item!r}: a range A-B needs A <= B")
        total += stop - start + 1
        if total > MAX_SEEDS:
            raise ValueError(f"more than {MAX_SEEDS} seeds; split the work into several runs")
        ranges.append((start, stop))
    ordered = sorted(ranges)
    for (_, previous_stop), (start, _stop) in zip(ordered, ordered[1:], strict=False):
        if start <= previous_stop:
            raise ValueError(f"seed {start} is listed more than once")
    return np.concatenate([np.arange(start, stop + 1, dtype=np.int64) for start, stop in ranges])


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Validates a list of seeds for the library: ints in [0, `MAX_SEED`], no duplicates, at least one.

    Returns:
        `list[int]`: the seeds as Python ints.
    """
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence | np.ndarray):
        raise TypeError(f"seeds must be a list of ints, got {type(seeds).__name__}")
    values = []
    for seed in seeds:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seeds must be ints, got {type(seed).__name__}")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seeds must be in [0, {MAX_SEED}], got {seed}")
        values.append(int(seed))
    if not values:
        raise ValueError("seeds must hold at least one seed")
    if len(set(values)) != len(values):
        raise ValueError("seeds must not repeat a seed: each seed names one image")
    return values


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed, seeded with it: the generator list that makes image i depend on seeds[i] only.

    Args:
        seeds (`Sequence[int]`): non-negative, distinct seeds.

    Returns:
        `list[torch.Generator]`: ``torch.Generator("cpu").manual_seed(s)`` for each seed, in order.
    """
    return [torch.Generator("cpu").manual_seed(seed) for seed in check_seeds(seeds)]


def shard(seeds: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The seeds rank ``rank`` of ``world_size`` draws: every ``world_size``-th seed, starting at ``rank``.

    Strided rather than contiguous, so that a run resumed with another number of processes still shares the
    remaining seeds evenly. Which rank draws a seed never changes its image.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return seeds[rank::world_size]


def batches(seeds: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Splits ``seeds`` into consecutive batches of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
