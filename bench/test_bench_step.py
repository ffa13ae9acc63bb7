"""Regression benchmarks of one DDIM step (pytest-benchmark); workflow in ``bench/conftest.py``.

GPU cases time ``steps`` consecutive steps followed by ``torch.cuda.synchronize()`` per round (host wall time, launch
overhead included); ``extra_info`` adds the per-step host time, the device-time median (``triton.testing.do_bench``,
L2 flushed, through `fastddim.timing`) and GB/s. Every case checks its output against diffusers in fp32 before it is
timed.
"""

import pytest
import torch

from fastddim import timing
from fastddim.benchmark import step as bench_step
from fastddim.benchmark.cases import StepCase

F16, F32 = torch.float16, torch.float32
CUDA = torch.device("cuda") if torch.cuda.is_available() else None
CPU = torch.device("cpu")

# (case, implementations). diffusers is timed at two sizes only: context for the fastddim figures, not a target.
GPU_CASES = [
    (StepCase((1, 4, 64, 64), F16), ("fastddim", "fastddim-graph", "diffusers")),
    (StepCase((16, 4, 128, 128), F16), ("fastddim", "fastddim-graph", "diffusers")),
    (StepCase((16, 4, 128, 128), F32), ("fastddim", "fastddim-graph")),
    (StepCase((16, 4, 128, 128), F16, eta=1.0), ("fastddim", "fastddim-graph")),
    (StepCase((64, 4, 512, 512), F16), ("fastddim", "fastddim-graph")),
    (StepCase((16, 3, 64, 64), F32, thresholding=True), ("fastddim", "fastddim-graph")),
]
CPU_CASES = [
    (StepCase((1, 4, 32, 32), F32), ("fastddim", "diffusers")),
    (StepCase((2, 4, 64, 64), F32, eta=1.0), ("fastddim", "diffusers")),
]


def _params(cases: list[tuple[StepCase, tuple[str, ...]]]) -> list:
    return [
        pytest.param(case, impl, id=f"{case.label.replace(' ', '-')}-{impl}")
        for case, impls in cases
        for impl in impls
    ]


def _checked_step(case: StepCase, impl: str, device: torch.device) -> tuple[bench_step.StepInputs, object, int]:
    """(inputs, callable running one step or one graph replay, steps per call), after a correctness check."""
    inputs = bench_step.make_step_inputs(case, device)
    if impl == "diffusers":
        step, in_kernel = bench_step.diffusers_step_fn(inputs), False
    else:
        step, in_kernel = bench_step.fastddim_step_fn(inputs)
    check = bench_step.verify_step(inputs, step(), in_kernel_noise=in_kernel)
    assert check["passed"], f"{impl} output differs from diffusers: {check}"
    if impl == "fastddim-graph":
        unroll = timing.graph_unroll(case.numel)
        return inputs, timing.capture_graph(step, device, unroll=unroll)[0].replay, unroll
    return inputs, step, 1


def _median_s(benchmark: object) -> float | None:
    # None under --benchmark-disable, where pedantic runs the target once and keeps no statistics.
    stats = getattr(benchmark, "stats", None)
    return getattr(getattr(stats, "stats", None), "median", None)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "impl"), _params(GPU_CASES))
def test_step_gpu(benchmark: object, case: StepCase, impl: str) -> None:
    with torch.no_grad():
        inputs, fn, unroll = _checked_step(case, impl, CUDA)
        # About 20 steps per round below 2^22 elements (launch-bound), 2 above (bandwidth-bound).
        steps_per_round = 20 if case.numel < 1 << 22 else 2
        calls = max(1, steps_per_round // unroll)

        def target() -> None:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        benchmark.group = f"step {case.label}"
        benchmark.pedantic(target, rounds=30, warmup_rounds=3, iterations=1)
        steps = calls * unroll
        gpu = {key: value / unroll for key, value in timing.device_time_us(fn, CUDA).items() if key != "n_samples"}
    reads_noise = case.eta > 0 and impl == "diffusers"
    bytes_per_step = bench_step.bytes_per_step(case, reads_noise)
    median_s = _median_s(benchmark)
    benchmark.extra_info.update(
        steps_per_round=steps,
        host_us_per_step=None if median_s is None else median_s * 1e6 / steps,
        gpu_median_us=gpu["median_us"],
        gpu_p20_us=gpu["p20_us"],
        gpu_p80_us=gpu["p80_us"],
        gb_per_s=bytes_per_step / (gpu["median_us"] * 1e-6) / 1e9,
        bytes_per_step=bytes_per_step,
        timestep=inputs.timestep,
    )


@pytest.mark.parametrize(("case", "impl"), _params(CPU_CASES))
def test_step_cpu(benchmark: object, case: StepCase, impl: str) -> None:
    with torch.no_grad():
        _, fn, _ = _checked_step(case, impl, CPU)
        benchmark.group = f"cpu step {case.label}"
        benchmark.pedantic(fn, rounds=20, warmup_rounds=2, iterations=10)
