"""Small helpers shared by several fastddim modules: device normalisation, error text, bounded caches."""

from collections.abc import Hashable
from typing import Generic, TypeVar

import torch

__all__ = ["BoundedCache", "first_line", "normalize_device", "parse_device"]

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


def parse_device(name: str) -> torch.device:
    """A device named on a command line (``cpu``, ``cuda``, ``cuda:N``), checked against this machine.

    Returns:
        `torch.device`: as `normalize_device` returns it.

    Raises:
        ValueError: what is wrong (not a torch device, not cpu or cuda, no CUDA, no such CUDA index), worded to follow
            the option's name in a one-line error.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError("not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"only {count} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError("only cpu and cuda devices are supported")
    return normalize_device(device)


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
