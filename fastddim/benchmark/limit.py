"""The physical limit of a sampling loop: N x the device time of the denoiser's own call, captured alone.

A loop of N steps cannot take less than N UNet calls on the batch the loop feeds it (the classifier-free-guidance
batch of 2 x batch size for the text-to-image loop, the batch itself for the unconditional one). On CUDA the UNet
call is captured in a CUDA graph on its own and replayed back to back between two CUDA events, so the figure is the
UNet's device time with no Python, no launch gaps and no scheduler or guidance work: what a loop would take if
everything but the UNet were free. ``loop time / limit`` (``vs_limit`` in the records) is then how much of a loop is
overhead. On a CPU there is no device clock: the limit is host wall time of back-to-back eager UNet calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from fastddim.benchmark.cases import Implementation, Plan
from fastddim.timing import capture_graph, summarize, sync, time_wall

LIMIT_IMPL = "unet-limit"


def loop_implementations(
    diffusers_loop: Callable[..., Any], fastddim_loop: Callable[..., Any]
) -> dict[str, Implementation]:
    """The whole-loop implementations by name, in table order, from a benchmark's two builders: diffusers' pipeline
    (``compile_mode``: its UNet under ``torch.compile``) and fastddim's (``cuda_graph``, ``compile_unet``); and the
    physical limit, measured by the benchmark itself."""
    return {
        impl.name: impl
        for impl in (
            Implementation("diffusers", diffusers_loop),
            Implementation(
                "compile-reduce-overhead",
                functools.partial(diffusers_loop, compile_mode="reduce-overhead"),
                compiles=True,
            ),
            Implementation("fastddim-eager", functools.partial(fastddim_loop, cuda_graph=False)),
            Implementation("fastddim-graph", functools.partial(fastddim_loop, cuda_graph=True), cuda_graph=True),
            Implementation(
                "fastddim-graph-compiled",
                functools.partial(fastddim_loop, cuda_graph=True, compile_unet=True),
                cuda_graph=True,
                compiles=True,
            ),
            Implementation(LIMIT_IMPL, lambda *args: None, limit=True),
        )
    }


LIMIT_METHOD_CUDA = (
    "N x device time of one UNet call: CUDA events around back-to-back replays of a CUDA graph holding that call "
    "alone (median over rounds)"
)
LIMIT_METHOD_CPU = "N x host wall time of one eager UNet call, back-to-back (no device clock on a CPU)"
# Device time per round of back-to-back replays: long enough that the two events' resolution (about 0.5 µs) and
# the first replay's launch are negligible.
TARGET_ROUND_MS = 50.0


def captured_call_device_us(
    fn: Callable[[], Any], device: torch.device, *, rounds: int = 5, target_round_ms: float = TARGET_ROUND_MS
) -> list[float]:
    """Device µs per call of ``fn`` captured alone in a CUDA graph, one sample per round of back-to-back replays.

    Args:
        fn (`Callable[[], Any]`): the call (e.g. a UNet forward); it must be capturable (no host sync).
        device (`torch.device`): a CUDA device.
        rounds (`int`, defaults to 5): rounds timed; one sample each.
        target_round_ms (`float`, defaults to 50): the device time of a round; one replay calibrates the count.

    Returns:
        `list[float]`: µs per call, one per round.
    """
    if device.type != "cuda":
        raise ValueError(f"captured_call_device_us needs a CUDA device, got {device}")
    graph, _ = capture_graph(fn, device, unroll=1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stream = torch.cuda.current_stream(device)

    def timed_round(calls: int) -> float:
        start.record(stream)
        for _ in range(calls):
            graph.replay()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / calls

    one_us = timed_round(1)
    calls = int(min(max(target_round_ms * 1e3 / max(one_us, 1.0), 1), 200))
    return [timed_round(calls) for _ in range(rounds)]


def unet_call_us(fn: Callable[[], Any], device: torch.device, plan: Plan) -> tuple[list[float], str]:
    """µs per call of the UNet call ``fn`` (device time on CUDA, host wall on a CPU) and how it was measured."""
    if device.type == "cuda":
        return captured_call_device_us(fn, device, rounds=plan.rounds), LIMIT_METHOD_CUDA
    fn()
    sync(device)
    samples = time_wall(fn, device, rounds=plan.rounds, target_round_s=plan.target_round_s, max_calls=plan.max_calls)
    return samples, LIMIT_METHOD_CPU


def fill_limit_record(record: dict, per_call_us: list[float], method: str, steps: int, batch_size: int) -> None:
    """Fills a limit record's figures: loop time N x the per-call time, images/s and ms per step at the limit."""
    record.update(summarize([steps * sample for sample in per_call_us]))
    record["timing_method"] = method
    record["ms_per_step"] = record["median_us"] * 1e-3 / steps
    record["images_per_s"] = batch_size / (record["median_us"] * 1e-6)
    record["limit_us"] = record["median_us"]
    record["vs_limit"] = 1.0


def fill_vs_limit(records: list[dict], benchmark: str, key: Callable[[dict], tuple]) -> None:
    """Fills ``limit_us`` and ``vs_limit`` (loop time / limit) of ``benchmark``'s timed records from the limit record
    of the same configuration (``key``)."""
    timed = [r for r in records if r["benchmark"] == benchmark and r["median_us"]]
    limits = {key(r): r["median_us"] for r in timed if r["impl"] == LIMIT_IMPL}
    for record in timed:
        limit_us = limits.get(key(record))
        if limit_us:
            record["limit_us"] = limit_us
            record["vs_limit"] = record["median_us"] / limit_us
