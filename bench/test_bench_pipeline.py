"""Regression benchmarks of whole sampling loops (pytest-benchmark); workflow in ``bench/conftest.py``.

Each round is one synchronized pipeline call. The first call (CUDA-graph capture) is timed separately and kept in
``extra_info`` with images/s, ms/step and peak memory. Cases with ``fastddim.DDIMPipeline`` skip while it is not
importable. The unconditional loops are ``fastddim bench``'s loop cases, the text-to-image ones its ``sd`` cases (from
prompt embeddings to latents, classifier-free guidance on; `fastddim.benchmark.sd`).
"""

import copy
import time
import warnings
from collections.abc import Callable

import pytest
import torch

from fastddim.benchmark import loop, sd
from fastddim.benchmark.cases import DTYPE_NAMES, SDCase
from fastddim.timing import sync

F16, F32 = torch.float16, torch.float32

GPU_LOOPS = [
    ("digits", 1, F16, "fastddim-graph"),
    ("digits", 1, F16, "fastddim-eager"),
    ("digits", 1, F16, "diffusers"),
    ("digits", 16, F16, "fastddim-graph"),
    ("cifar10-32", 1, F16, "fastddim-graph"),
    ("cifar10-32", 1, F16, "diffusers"),
    ("cifar10-32", 16, F16, "fastddim-graph"),
]
CPU_LOOPS = [("digits", 1, F32, "fastddim-eager"), ("digits", 1, F32, "diffusers")]
GPU_STEPS, CPU_STEPS = 50, 10
# Text-to-image: the SD1.5 architecture at batch 1, 30 steps (random weights); a tiny UNet on the CPU.
GPU_SD_LOOPS = [("sd15", 1, F16, impl) for impl in ("fastddim-graph", "fastddim-eager", "diffusers")]
CPU_SD_LOOPS = [("tiny-sd", 1, F32, impl) for impl in ("fastddim-eager", "diffusers")]
GPU_SD_STEPS, CPU_SD_STEPS = 30, 2


def _params(loops: list[tuple]) -> list:
    return [pytest.param(*loop, id=f"{loop[0]}-b{loop[1]}-{DTYPE_NAMES[loop[2]]}-{loop[3]}") for loop in loops]


def _run_loop(
    benchmark: object, model: str, batch: int, dtype: torch.dtype, impl: str, device: torch.device, steps: int
) -> None:
    base_unet, scheduler_config, weights = loop.load_unet(model)
    unet = torch.nn.Module.to(copy.deepcopy(base_unet), device=device, dtype=dtype)
    try:
        pipe = loop.build_loop(impl, unet, scheduler_config)
    except loop.SkipCase as skip:
        pytest.skip(str(skip))
    _time_loop(benchmark, lambda: pipe(batch, steps), model, batch, dtype, impl, device, steps, weights)


def _run_sd_loop(
    benchmark: object, model: str, batch: int, dtype: torch.dtype, impl: str, device: torch.device, steps: int
) -> None:
    unet = sd.load_sd_unet(model, device, dtype)
    case = SDCase(model, batch, dtype, steps)
    arguments = sd.call_arguments(case, sd.make_sd_inputs(case, unet, device))
    pipe = sd.SD_IMPLEMENTATIONS[impl].build(sd.SD_MODELS[model][1], unet)
    weights = f"random ({model} architecture)"
    _time_loop(benchmark, lambda: pipe(arguments), model, batch, dtype, impl, device, steps, weights)


def _time_loop(
    benchmark: object,
    call: Callable[[], object],
    model: str,
    batch: int,
    dtype: torch.dtype,
    impl: str,
    device: torch.device,
    steps: int,
    weights: str,
) -> None:
    def target() -> None:
        call()
        sync(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        start = time.perf_counter()
        target()
        first_s = time.perf_counter() - start
        benchmark.group = f"loop {model} batch={batch} {DTYPE_NAMES[dtype]} steps={steps}"
        benchmark.pedantic(target, rounds=3, warmup_rounds=1, iterations=1)
    fallbacks = [str(w.message) for w in caught if "eager" in str(w.message)]
    assert not (impl == "fastddim-graph" and fallbacks), f"CUDA-graph capture fell back to eager: {fallbacks[0]}"
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median_s = getattr(stats, "median", None)
    benchmark.extra_info.update(
        weights=weights,
        num_inference_steps=steps,
        first_call_s=first_s,
        images_per_s=None if not median_s else batch / median_s,
        ms_per_step=None if not median_s else median_s * 1e3 / steps,
        peak_mem_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("model", "batch", "dtype", "impl"), _params(GPU_LOOPS))
def test_loop_gpu(benchmark: object, model: str, batch: int, dtype: torch.dtype, impl: str) -> None:
    _run_loop(benchmark, model, batch, dtype, impl, torch.device("cuda", torch.cuda.current_device()), GPU_STEPS)


@pytest.mark.parametrize(("model", "batch", "dtype", "impl"), _params(CPU_LOOPS))
def test_loop_cpu(benchmark: object, model: str, batch: int, dtype: torch.dtype, impl: str) -> None:
    _run_loop(benchmark, model, batch, dtype, impl, torch.device("cpu"), CPU_STEPS)


@pytest.mark.gpu
@pytest.mark.parametrize(("model", "batch", "dtype", "impl"), _params(GPU_SD_LOOPS))
def test_sd_loop_gpu(benchmark: object, model: str, batch: int, dtype: torch.dtype, impl: str) -> None:
    _run_sd_loop(benchmark, model, batch, dtype, impl, torch.device("cuda", torch.cuda.current_device()), GPU_SD_STEPS)


@pytest.mark.parametrize(("model", "batch", "dtype", "impl"), _params(CPU_SD_LOOPS))
def test_sd_loop_cpu(benchmark: object, model: str, batch: int, dtype: torch.dtype, impl: str) -> None:
    _run_sd_loop(benchmark, model, batch, dtype, impl, torch.device("cpu"), CPU_SD_STEPS)
