"""Small helpers shared by several fastddim modules: device normalisation, error text, bounded caches."""

from collections.abc import Hashable
from typing import Generic, TypeVar

import torch

__all__ = ["BoundedCache", "first_line", "normalize_device"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def normalize_device(device: str | torch.device | int | None = None) -> torch.device:
    """The ``torch.device`` a tensor placed on ``device`` would report: CUDA devices carry an explicit index.

    Args:
        device (`str`, `torch.device` or `int`, *optional*): a device, a CUDA index, or None for the CPU.

    Returns:
        `torch.device`: ``cuda:<current device>`` for a bare ``"cuda"``; otherwise ``torch.device(device)``.
    """
    if device is None:
        return torch.device("cpu")
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: for one-line error reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class BoundedCache(Generic[K, V]):
    """A dict that empties itself when full: for per-signature launch plans, where a hit must cost one lookup.

    Real workloads use a handful of signatures; the bound only keeps a process that sees unboundedly many (shapes
    drawn at random, say) from growing without limit, so dropping everything at once is good enough.
    """

    __slots__ = ("_entries", "maxsize")

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> V:
        if len(self._entries) >= self.maxsize:
            self._entries.clear()
        self._entries[key] = value
        return value

    def values(self) -> list[V]:
        return list(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
