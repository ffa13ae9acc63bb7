"""The eager loop's host work per step against diffusers' (the pipelines issue: fastddim's eager loop must never be
slower than diffusers'). An eager loop at small batch is host-bound, so what it costs per step is what the host
dispatches per step: counted here as ATen operator calls (CPU), and as host-device synchronizations (CUDA).

Per-step figures are the difference between a call of ``LONG`` steps and one of ``SHORT`` steps, divided by the
steps between them: the per-call work (timesteps, initial noise, output conversion) cancels out.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastddim.benchmark import eager
from fastddim.benchmark.cases import LoopCase, SDCase

SHORT, LONG = 2, 6
CASES = {
    "unconditional": lambda steps: LoopCase("tiny", 1, torch.float32),
    "text-to-image": lambda steps: SDCase("tiny-sd", 1, torch.float32, steps),
}


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _calls(pipeline: str, steps: int, device: torch.device) -> dict[str, eager.EagerCall]:
    case = CASES[pipeline](steps)
    if isinstance(case, SDCase):
        return eager._sd_calls(case, device)
    return eager._loop_calls(case, device, steps)


def _per_step(count_call, pipeline: str, device: torch.device) -> dict[str, collections.Counter[str]]:
    """Per implementation: what ``count_call(call)`` counts per step (a Counter by name)."""
    per_step = {}
    for impl in eager.EAGER_IMPLS:
        short, long = (_calls(pipeline, steps, device)[impl] for steps in (SHORT, LONG))
        short(), long()  # warm
        extra = count_call(long)
        extra.subtract(count_call(short))
        per_step[impl] = collections.Counter({name: n / (LONG - SHORT) for name, n in extra.items() if n})
    return per_step


def _count_operators(call: eager.EagerCall) -> collections.Counter[str]:
    with torch.no_grad(), OperatorCount() as mode:
        call()
    return mode.counts


@pytest.mark.parametrize("pipeline", list(CASES))
def test_eager_loop_dispatches_no_more_operators_per_step_than_diffusers(pipeline):
    per_step = _per_step(_count_operators, pipeline, torch.device("cpu"))
    fastddim_ops, diffusers_ops = (sum(per_step[impl].values()) for impl in ("fastddim-eager", "diffusers"))
    # Both run the same UNet; the step is one fused operation in fastddim (its torch twin on the CPU: a handful of
    # out= operations), a dozen indexing and arithmetic operations in diffusers.
    assert fastddim_ops <= diffusers_ops, (per_step["fastddim-eager"], per_step["diffusers"])
    assert per_step["fastddim-eager"]["aten.convolution.default"] == per_step["diffusers"]["aten.convolution.default"]


def _count_syncs(call: eager.EagerCall) -> collections.Counter[str]:
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                call()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return collections.Counter("synchronizing" for warning in caught if "synchroniz" in str(warning.message).lower())


@pytest.mark.gpu
@pytest.mark.parametrize("pipeline", list(CASES))
def test_eager_loop_never_syncs_per_step_on_cuda(pipeline):
    per_step = _per_step(_count_syncs, pipeline, torch.device("cuda"))
    # diffusers' loop synchronizes every step (CPU timesteps copied to the device, or its CPU table indexed by a device
    # timestep): the counter sees syncs where there are some.
    assert per_step["diffusers"]["synchronizing"] >= 1, per_step["diffusers"]
    assert per_step["fastddim-eager"]["synchronizing"] == 0, per_step["fastddim-eager"]
