"""The eager loops side by side: diffusers' pipeline and fastddim's with ``cuda_graph=False``, interleaved round by round.

Why a benchmark of its own: an eager loop at small batch is host-bound (the GPU finishes each kernel before the host
has issued the next), so its time is the CPU's time through Python, and a CPU's speed drifts (clocks, other tenants of
the machine, caches). The loop and text-to-image benchmarks time each implementation's rounds back to back, so a
drift between two cases lands on one implementation alone: in the committed H100 run of 2026-11-23, diffusers' own
eager loop on the digits UNet took 6.1, 9.5, 7.3 and 10.8 ms per step over four configurations whose host work per
step is the same. Here both pipelines share one UNet and run alternately, the order swapped every round (AB, BA,
AB, ...), so drift falls on both alike, and the figure compared is the median of the per-round ratios.

Cases: a `LoopCase` compares ``diffusers.DDIMPipeline`` with ``fastddim.DDIMPipeline`` (``output_type="pt"``, eta 0,
the loop benchmark's models); an `SDCase` compares diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
(diffusers' ``DDIMScheduler``) with fastddim's, from prompt embeddings to latents as in `fastddim.benchmark.sd`.

Correctness: each pipeline's first call starts from the same initial noise (the global seed for unconditional loops,
the case's fixed latents for text-to-image), and fastddim's output is compared with diffusers' by relative L2 error
within ``sd.SD_CHECK_BOUNDS``; that first call of each is also its warm-up. Timing: ``Plan.eager_rounds`` rounds, each
call host wall time with a synchronize after it. The fastddim record's ``paired_speedup_vs_diffusers`` is the median over rounds of
diffusers' time / fastddim's in the same round (``paired_speedup_p20`` / ``_p80``: its 20th and 80th percentiles);
``speedup_vs_diffusers`` is the ratio of the two medians.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from fastddim.benchmark.cases import DTYPE_NAMES, LoopCase, Plan, SDCase
from fastddim.benchmark.environment import free_memory
from fastddim.benchmark.records import error_text, new_record
from fastddim.timing import summarize, timed_call

# The two implementations of every case, in table order.
EAGER_IMPLS = ("diffusers", "fastddim-eager")

EagerCall = Callable[[], torch.Tensor]


def new_eager_record(case: LoopCase | SDCase, impl: str) -> dict:
    """An ``eager`` record of one case and implementation, every figure still None."""
    steps = case.num_inference_steps if isinstance(case, SDCase) else None
    return new_record(
        "eager",
        name=f"eager/{case.label}/{impl}",
        impl=impl,
        model=case.model,
        batch_size=case.batch_size,
        dtype=DTYPE_NAMES[case.dtype],
        num_inference_steps=steps,
        config={"eta": 0.0, "pipeline": "text-to-image" if isinstance(case, SDCase) else "unconditional"},
    )


def _loop_calls(case: LoopCase, device: torch.device, steps: int) -> dict[str, EagerCall]:
    """The unconditional pipelines' calls on one copy of the case's UNet, each from the same seeded initial noise."""
    from fastddim.benchmark import loop

    base_unet, scheduler_config, _ = loop.load_unet(case.model)
    unet = torch.nn.Module.to(copy.deepcopy(base_unet), device=device, dtype=case.dtype)
    builds = {impl: loop.build_loop(impl, unet, scheduler_config) for impl in EAGER_IMPLS}

    def call(impl: str) -> EagerCall:
        def run() -> torch.Tensor:
            # Both pipelines draw x_T from the global generator: the same seed gives the same noise.
            torch.manual_seed(0)
            images = builds[impl](case.batch_size, steps).images
            if isinstance(images, np.ndarray):
                # Older diffusers' DDIMPipeline (0.35 among them) returns NHWC NumPy images for output_type "pt" too:
                # back on the device, where fastddim's images are compared with them.
                images = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
            return images

        return run

    return {impl: call(impl) for impl in EAGER_IMPLS}


def _sd_calls(case: SDCase, device: torch.device) -> dict[str, EagerCall]:
    """The text-to-image pipelines' calls on the case's UNet, from its fixed latents and embeddings."""
    from fastddim.benchmark import sd

    unet = sd.load_sd_unet(case.model, device, case.dtype)
    arguments = sd.call_arguments(case, sd.make_sd_inputs(case, unet, device))
    builds = {impl: sd.SD_IMPLEMENTATIONS[impl].build(sd.SD_MODELS[case.model][1], unet) for impl in EAGER_IMPLS}
    return {impl: (lambda build=build: build(arguments)) for impl, build in builds.items()}


def run_eager_case(case: LoopCase | SDCase, device: torch.device, plan: Plan) -> list[dict]:
    """Checks fastddim's eager loop against diffusers', then times both interleaved.

    Returns:
        `list[dict]`: one record per implementation of `EAGER_IMPLS` (an ``error`` in each when the case failed).
    """
    from fastddim.benchmark.sd import check_latents

    records = {impl: new_eager_record(case, impl) for impl in EAGER_IMPLS}
    calls: dict[str, EagerCall] = {}
    try:
        if isinstance(case, SDCase):
            steps = case.num_inference_steps
            calls = _sd_calls(case, device)
        else:
            steps = plan.num_inference_steps
            calls = _loop_calls(case, device, steps)
        first = {}
        for impl, call in calls.items():
            first[impl] = call().detach().clone()
        records["fastddim-eager"]["check"] = check_latents(first["fastddim-eager"], first["diffusers"], case.dtype)
        records["fastddim-eager"]["check"]["method"] = "relative L2 error vs diffusers eager, same initial noise"
        shape = list(first["diffusers"].shape)
        del first
        samples: dict[str, list[float]] = {impl: [] for impl in EAGER_IMPLS}
        for round_index in range(plan.eager_rounds):
            order = EAGER_IMPLS if round_index % 2 == 0 else EAGER_IMPLS[::-1]
            for impl in order:
                samples[impl].append(timed_call(calls[impl], device)[0] * 1e6)
        for impl, record in records.items():
            record.update(summarize(samples[impl]))
            record["shape"] = shape
            record["num_inference_steps"] = steps
            record["timing_method"] = "host wall per pipeline call, synchronized; implementations interleaved"
            median_s = record["median_us"] * 1e-6
            record["images_per_s"] = case.batch_size / median_s
            record["ms_per_step"] = median_s * 1e3 / steps
        fill_paired_speedup(records["fastddim-eager"], samples["diffusers"], samples["fastddim-eager"])
        records["diffusers"]["speedup_vs_diffusers"] = 1.0
    except Exception as exc:  # (one failing case must not end the run)
        for record in records.values():
            record["error"] = error_text(exc)
    finally:
        calls.clear()
        free_memory(device)
    return list(records.values())


def fill_paired_speedup(record: dict, baseline_us: list[float], timed_us: list[float]) -> None:
    """Fills the speedup over the baseline from rounds timed alternately: per-round ratios' median and p20/p80, and
    the ratio of the two medians."""
    ratios = np.asarray(baseline_us, dtype=np.float64) / np.asarray(timed_us, dtype=np.float64)
    p20, p50, p80 = np.percentile(ratios, [20, 50, 80])
    record["paired_speedup_vs_diffusers"] = float(p50)
    record["paired_speedup_p20"] = float(p20)
    record["paired_speedup_p80"] = float(p80)
    record["speedup_vs_diffusers"] = float(np.median(baseline_us) / np.median(timed_us))
