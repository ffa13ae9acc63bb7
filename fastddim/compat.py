"""Private torch APIs the benchmark harness uses (Dynamo and Inductor knobs), verified on torch 2.11 and 2.13.

Each function degrades to a no-op (or 0) where the knob does not exist, so a torch release that renames one makes the
harness lose a tuning or a note, never fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["cudagraph_skip_count", "inductor_triton_launcher", "raise_dynamo_limits", "reset_dynamo"]


def reset_dynamo() -> None:
    """Forgets every compiled graph and guard (``torch._dynamo.reset()``): each benchmark case compiles afresh."""
    import torch._dynamo

    torch._dynamo.reset()


def raise_dynamo_limits(minimum: int = 256) -> None:
    """Raises Dynamo's recompile limits to at least ``minimum``.

    A benchmark compiles one function per shape and dtype; past the default limit (8) Dynamo silently falls back to
    eager, which would pass as a compiled figure.

    Args:
        minimum (`int`, defaults to 256): the lowest value each limit is left at.
    """
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), minimum))


@contextlib.contextmanager
def inductor_triton_launcher() -> Iterator[None]:
    """Inductor kernels compiled inside this context launch through Triton's launcher, not Inductor's static one.

    Inductor's static CUDA launcher failed every launch of the DDIM step's kernel ("CUDA driver error: invalid
    argument") on an H100 with torch 2.11 and Triton 3.6; Triton's launcher is the documented fallback
    (pytorch/pytorch#152639). Kernels get their launcher when compiled, i.e. in the first call of a compiled function.
    """
    import torch._inductor.config

    if not hasattr(torch._inductor.config, "use_static_cuda_launcher"):
        yield
        return
    with torch._inductor.config.patch(use_static_cuda_launcher=False):
        yield


def cudagraph_skip_count() -> int:
    """How many times Inductor's CUDAGraph Trees declined to capture a graph in this process (0 if not counted)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"]["cudagraph_skips"])
