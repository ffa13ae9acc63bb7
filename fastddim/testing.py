"""Performance regression checks for your own CI, on pytest-benchmark: fastddim's step and your loop, at your shapes.

Load the plugin with ``pytest -p fastddim.testing`` (or ``pytest_plugins = ["fastddim.testing"]`` in your root
``conftest.py``); it needs pytest-benchmark (``pip install pytest-benchmark``) and provides the ``fastddim_perf``
fixture, one measurement per test (as pytest-benchmark's ``benchmark`` fixture, which it wraps)::

    import torch

    def test_fastddim_step(fastddim_perf):
        fastddim_perf.step((2, 4, 64, 64), torch.float16)                  # eager step, device timestep

    def test_fastddim_step_graph(fastddim_perf):
        fastddim_perf.step((2, 4, 64, 64), torch.float16, cuda_graph=True)  # replayed from a CUDA graph

    def test_my_loop(fastddim_perf, my_pipe):
        fastddim_perf.loop(lambda: my_pipe(batch_size=4, output_type="pt"))

Baselines and the regression gate are pytest-benchmark's own, one storage folder per device::

    DEV=$(python -m fastddim.benchmark --print-device-slug)
    pytest -p fastddim.testing --benchmark-storage=perf/$DEV --benchmark-save=baseline        # record
    pytest -p fastddim.testing --benchmark-storage=perf/$DEV \\
        --benchmark-compare --benchmark-compare-fail=median:10%                                 # gate

Saved runs record the device and the torch, triton, diffusers and fastddim versions in ``machine_info["fastddim"]``;
comparing runs of two different devices is refused (a usage error) rather than reported as a regression. Each round
is host wall time of back-to-back calls followed by a synchronize (what a sampling loop feels); on CUDA the device
time of one step (``triton.testing.do_bench``, L2 flushed) is added to ``extra_info``. Medians on shared cloud GPUs
move by a few percent between runs: gate at 10 %, not 2 %.
"""

from __future__ import annotations

import importlib.metadata
import math
import operator
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fastddim.timing import capture_graph, default_device, device_name, device_time_us, graph_unroll, sync
from fastddim.utils import normalize_device

__all__ = ["PerfGuard", "fastddim_machine_info", "step_callable"]

# Steps per timed round: enough back-to-back launches below 2^22 elements (launch-bound) that one synchronize does not
# dominate, few above (bandwidth-bound).
SMALL_STEPS_PER_ROUND, LARGE_STEPS_PER_ROUND = 20, 2


def step_callable(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float16,
    *,
    eta: float = 0.0,
    thresholding: bool = False,
    cuda_graph: bool = False,
    device: str | torch.device | None = None,
    num_inference_steps: int = 50,
) -> tuple[Callable[[], Any], int]:
    """fastddim's ``DDIMScheduler.step`` at one shape, ready to time, as a sampling loop calls it.

    Inputs are seeded N(0, 1) tensors at a mid-schedule timestep, given as a 0-dim device tensor; on CUDA, eta > 0
    draws the noise in the kernel.

    Args:
        shape (`tuple[int, ...]`): the sample shape, batch first.
        dtype (`torch.dtype`, defaults to `torch.float16`): sample and model-output dtype.
        eta (`float`, defaults to 0.0): DDIM eta.
        thresholding (`bool`, defaults to `False`): dynamic thresholding (with ``clip_sample=False``).
        cuda_graph (`bool`, defaults to `False`): replay steps captured in a CUDA graph (CUDA only).
        device (`str` or `torch.device`, *optional*): defaults to CUDA when available, else the CPU (torch backend).
        num_inference_steps (`int`, defaults to 50): the schedule the timestep is taken from.

    Returns:
        `tuple`: (a callable running the step, or one graph replay; how many steps one call runs).
    """
    import fastddim

    try:
        sizes = tuple(operator.index(size) for size in shape)
    except TypeError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    shape = sizes
    device = default_device() if device is None else normalize_device(device)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device}")
    config = {"thresholding": True, "clip_sample": False} if thresholding else {}
    scheduler = fastddim.DDIMScheduler(**config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timestep = scheduler.timesteps[len(scheduler.timesteps) // 2]
    generator = torch.Generator("cpu").manual_seed(0)
    model_output = torch.randn(shape, generator=generator).to(device, dtype)
    sample = torch.randn(shape, generator=generator).to(device, dtype)
    # On a CPU the step would draw its noise with torch.randn; pre-drawn noise keeps the RNG out of the timing there.
    noise = {}
    if eta > 0 and device.type != "cuda":
        noise = {"variance_noise": torch.randn(shape, generator=generator).to(device, dtype)}

    def step() -> Any:
        return scheduler.step(model_output, timestep, sample, eta=eta, return_dict=False, **noise)

    with torch.no_grad():
        step()
        if not cuda_graph:
            return step, 1
        unroll = graph_unroll(model_output.numel())
        graph, _ = capture_graph(step, device, unroll=unroll)
    return graph.replay, unroll


def fastddim_machine_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """What a saved run records under ``machine_info["fastddim"]``: the device and library versions (no date)."""
    device = default_device() if device is None else normalize_device(device)
    info: dict[str, Any] = {
        "device": device_name(device),
        "cuda_version": torch.version.cuda,
        "torch": torch.__version__,
    }
    for name in ("triton", "diffusers", "fastddim"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


class PerfGuard:
    """What the ``fastddim_perf`` fixture returns: pytest-benchmark measurements of fastddim's step or your loop."""

    def __init__(self, benchmark: Any):
        self.benchmark = benchmark

    def step(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float16,
        *,
        rounds: int = 20,
        warmup_rounds: int = 2,
        steps_per_round: int | None = None,
        **step_kwargs: Any,
    ) -> dict[str, Any]:
        """Times fastddim's step at ``shape``/``dtype`` with pytest-benchmark.

        Args:
            shape (`tuple[int, ...]`): the sample shape, batch first.
            dtype (`torch.dtype`, defaults to `torch.float16`): sample and model-output dtype.
            rounds (`int`, defaults to 20): timed rounds; each runs ``steps_per_round`` steps, then synchronizes.
            warmup_rounds (`int`, defaults to 2): untimed rounds first.
            steps_per_round (`int`, *optional*): defaults to 20 below 2^22 elements, else 2.
            **step_kwargs: ``eta``, ``thresholding``, ``cuda_graph``, ``device``, ``num_inference_steps`` of
                `step_callable`.

        Returns:
            `dict`: the ``extra_info`` saved with the run: ``host_us_per_step`` (median), ``steps_per_round`` and,
            on CUDA, ``device_us_per_step``.
        """
        _check_rounds(rounds, warmup_rounds)
        if steps_per_round is not None and steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
        device = normalize_device(step_kwargs.get("device") or default_device())
        step_kwargs["device"] = device
        fn, unroll = step_callable(shape, dtype, **step_kwargs)
        if steps_per_round is None:
            steps_per_round = SMALL_STEPS_PER_ROUND if math.prod(shape) < 1 << 22 else LARGE_STEPS_PER_ROUND
        calls = max(1, steps_per_round // unroll)

        def one_round() -> None:
            for _ in range(calls):
                fn()
            sync(device)

        with torch.no_grad():
            self.benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
            device_us = None
            if device.type == "cuda":
                device_us = device_time_us(fn, device)["median_us"] / unroll
        steps = calls * unroll
        median_s = _median_s(self.benchmark)
        info = {
            "shape": list(shape),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "steps_per_round": steps,
            "host_us_per_step": None if median_s is None else median_s * 1e6 / steps,
            "device_us_per_step": device_us,
            **{key: value for key, value in step_kwargs.items() if key != "device"},
        }
        self.benchmark.extra_info.update(info)
        return info

    def loop(
        self,
        call: Callable[[], Any],
        *,
        device: str | torch.device | None = None,
        rounds: int = 5,
        warmup_rounds: int = 1,
    ) -> dict[str, Any]:
        """Times whole calls of ``call`` (e.g. ``lambda: pipe(batch_size=4, output_type="pt")``), synchronized.

        The first call (CUDA-graph capture, compilation) is timed on its own, then ``warmup_rounds`` untimed calls.

        Args:
            call (`Callable[[], Any]`): one sampling loop.
            device (`str` or `torch.device`, *optional*): the device to synchronize; defaults to CUDA when available.
            rounds (`int`, defaults to 5): timed calls.
            warmup_rounds (`int`, defaults to 1): untimed calls after the first.

        Returns:
            `dict`: the ``extra_info`` saved with the run: ``first_call_s`` and ``median_call_s``.
        """
        _check_rounds(rounds, warmup_rounds)
        device = default_device() if device is None else normalize_device(device)

        def one_call() -> None:
            call()
            sync(device)

        sync(device)
        start = time.perf_counter()
        one_call()
        first_s = time.perf_counter() - start
        self.benchmark.pedantic(one_call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        info = {"device": str(device), "first_call_s": first_s, "median_call_s": _median_s(self.benchmark)}
        self.benchmark.extra_info.update(info)
        return info


def _check_rounds(rounds: int, warmup_rounds: int) -> None:
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup_rounds < 0:
        raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")


def _median_s(benchmark: Any) -> float | None:
    # None under --benchmark-disable, where pedantic runs the target once and keeps no statistics.
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    return getattr(stats, "median", None)


@pytest.fixture
def fastddim_perf(request: pytest.FixtureRequest) -> PerfGuard:
    """pytest-benchmark measurements of fastddim's step (``.step``) or your sampling loop (``.loop``)."""
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        pytest.fail("fastddim_perf needs pytest-benchmark: pip install pytest-benchmark", pytrace=False)
    return PerfGuard(benchmark)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Records the device and library versions with every saved run."""
    machine_info["fastddim"] = fastddim_machine_info()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_compare_machine_info(
    config: pytest.Config, benchmarksession: object, machine_info: dict, compared_benchmark: dict
) -> None:
    """Refuses to compare runs of two devices: a different GPU is not a regression."""
    saved = (compared_benchmark.get("machine_info") or {}).get("fastddim") or {}
    current = machine_info.get("fastddim") or {}
    if saved.get("device") and current.get("device") and saved["device"] != current["device"]:
        raise pytest.UsageError(
            f"refusing to compare benchmarks of {saved['device']!r} with this {current['device']!r}: use one "
            "--benchmark-storage folder per device"
        )
