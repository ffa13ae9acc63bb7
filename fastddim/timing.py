"""Timing primitives: the one module the benchmark harness (`fastddim.benchmark`), the pytest-benchmark suite
(``bench/``) and the users' CI plugin (`fastddim.testing`) share.

Two clocks, because a DDIM step has two costs:

- **device time**, `device_time_us`: ``triton.testing.do_bench``: CUDA events around each call, the L2 cache flushed
  (a 256 MB buffer zeroed) before each call, outside the events. What the GPU spends; the basis of GB/s. The flush
  and the per-call events hide launch overhead (triton-lang/triton#404), so it says nothing about latency.
- **host latency**, `time_wall`: ``time.perf_counter`` around many back-to-back calls with one synchronize per round,
  per call: what a Python sampling loop feels, launches and host syncs included. ``do_bench`` cannot serve here: it
  separates calls by a flush and events, so the host's launch cost overlaps them instead of adding up. It is also the
  only clock on a CPU.

Whole sampling loops are host-timed per call, with a synchronize after it: a loop's host work (Python per step, CPU
timesteps, any synchronization inside the pipeline) is part of what a user waits for, and device events would leave
it out wherever the host is the bottleneck.

A CUDA graph replay is timed like any call (``fn=graph.replay``); `capture_graph` captures several steps in one graph
so that per-replay overhead is amortised, and figures are divided by `graph_unroll`.
"""

from __future__ import annotations

import contextlib
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastddim.utils import normalize_device

__all__ = [
    "capture_graph",
    "cpu_model",
    "default_device",
    "device_name",
    "device_slug",
    "device_time_us",
    "graph_unroll",
    "summarize",
    "sync",
    "time_wall",
    "timed_call",
]


def default_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    return normalize_device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Waits for the device (no-op on a CPU): host clocks around CUDA work need it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``, host wall time between two synchronizes: a whole pipeline call as a
    user waits for it."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def summarize(samples_us: Sequence[float]) -> dict[str, float | int]:
    """Median, p20/p25/p75/p80 and IQR (p75 - p25) of timing samples.

    Args:
        samples_us (`Sequence[float]`): one time per call (or per round), in µs.

    Returns:
        `dict`: ``median_us``, ``p20_us``, ``p25_us``, ``p75_us``, ``p80_us``, ``iqr_us`` and ``n_samples``.
    """
    values = np.asarray(samples_us, dtype=np.float64)
    p20, p25, p50, p75, p80 = np.percentile(values, [20, 25, 50, 75, 80])
    return {
        "median_us": float(p50),
        "p20_us": float(p20),
        "p25_us": float(p25),
        "p75_us": float(p75),
        "p80_us": float(p80),
        "iqr_us": float(p75 - p25),
        "n_samples": len(values),
    }


def time_wall(
    fn: Callable[[], object],
    device: torch.device,
    *,
    rounds: int = 7,
    calls_per_round: int | None = None,
    target_round_s: float = 0.02,
    max_calls: int = 500,
) -> list[float]:
    """µs per call from host wall time of back-to-back calls, with one synchronize per round.

    Args:
        fn (`Callable[[], object]`): one call to time (already warmed up: compiled, captured, allocated).
        device (`torch.device`): where ``fn`` runs; CUDA is synchronized before and after each round.
        rounds (`int`, defaults to 7): rounds timed; one sample each.
        calls_per_round (`int`, *optional*): calls per round; by default one call calibrates how many fill
            ``target_round_s``, so short calls are not dominated by the synchronize and long ones stay bounded.
        target_round_s (`float`, defaults to 0.02): the calibrated duration of a round.
        max_calls (`int`, defaults to 500): the most calls a calibrated round makes.

    Returns:
        `list[float]`: µs per call, one per round.
    """
    if calls_per_round is None:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        one = max(time.perf_counter() - start, 1e-7)
        calls_per_round = int(min(max(target_round_s / one, 1), max_calls))
    samples = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls_per_round):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / calls_per_round * 1e6)
    return samples


def device_time_us(
    fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0
) -> dict[str, float | int]:
    """Device time of ``fn`` by ``triton.testing.do_bench``: CUDA events, L2 flushed before each call.

    Args:
        fn (`Callable[[], object]`): one call to time; it must not synchronize with the host.
        device (`torch.device`): a CUDA device; ``fn`` runs with it current.
        warmup_ms (`float`, defaults to 25): do_bench's warm-up budget, in ms.
        rep_ms (`float`, defaults to 100): do_bench's measurement budget, in ms (it picks the repetitions).

    Returns:
        `dict`: `summarize` of the per-call device times in µs.
    """
    if device.type != "cuda":
        raise ValueError(f"device_time_us needs a CUDA device, got {device}")
    from triton.testing import do_bench

    with torch.cuda.device(device):
        # return_mode="all": every sample, so the quantiles are computed as for host timings (`summarize`).
        samples_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return summarize([sample * 1e3 for sample in samples_ms])


def graph_unroll(numel: int) -> int:
    """Steps per captured graph: several for small tensors, so replay overhead is amortised; one for big ones."""
    return 10 if numel < 1 << 22 else 1


def capture_graph(fn: Callable[[], Any], device: torch.device, *, unroll: int = 1, warmup: int = 3) -> tuple[Any, Any]:
    """Captures ``unroll`` consecutive calls of ``fn`` in one CUDA graph.

    Warm-up runs on a side stream first: Triton compiles and caches (and any lazy device tables) must exist before
    capture, which forbids host syncs. The capture uses the same stream: per-stream caches (the thresholding
    kernels' scratch buffers) then already exist, rather than being made, and filled, inside the graph.

    Returns:
        `tuple`: (the ``torch.cuda.CUDAGraph``, the last captured call's output).
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(unroll):
            out = fn()
    torch.cuda.synchronize(device)
    return graph, out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str | None = None) -> str:
    """A stable name for keying timings: the GPU's marketing name, or ``cpu: <model>``.

    Args:
        device (`torch.device` or `str`, *optional*): defaults to `default_device`.
    """
    device = default_device() if device is None else normalize_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}"


def device_slug(device: torch.device | str | None = None) -> str:
    """`device_name` as a folder name, e.g. ``nvidia-h100-80gb-hbm3`` (``cpu`` for any CPU)."""
    device = default_device() if device is None else normalize_device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"
