"""The loop benchmark: whole sampling loops (``num_inference_steps`` steps of a UNet and a scheduler) per implementation.

Implementations (``LOOP_IMPLEMENTATIONS``): ``fastddim.DDIMPipeline`` replaying its captured loop (``fastddim-graph``)
and eager (``fastddim-eager``), the captured loop around ``torch.compile(unet)`` in Inductor's default mode
(``fastddim-graph-compiled``), ``diffusers.DDIMPipeline`` and ``diffusers.DDIMPipeline`` with
``torch.compile(unet, mode="reduce-overhead")``, and ``unet-limit``, the physical limit (`fastddim.benchmark.limit`:
N x one captured UNet call alone, device time); models (`load_unet`): a UNet of the ``google/ddpm-cifar10-32``
architecture (random weights), the embedded digits model, and a tiny UNet for tests.

To add an implementation: a builder ``(unet, scheduler_config) -> callable(batch_size, num_inference_steps)`` that
returns images, added to ``LOOP_IMPLEMENTATIONS``; raise `SkipCase` where it cannot run here (a missing optional
component), which records a skip, not an error. To add a model: a branch in `load_unet` and cases in
`fastddim.benchmark.cases`.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fastddim import compat
from fastddim.benchmark.cases import DTYPE_NAMES, Implementation, LoopCase, Plan, StepCase
from fastddim.benchmark.environment import free_memory
from fastddim.benchmark.limit import LIMIT_IMPL, fill_limit_record, fill_vs_limit, loop_implementations, unet_call_us
from fastddim.benchmark.records import error_text, new_record
from fastddim.benchmark.step import diffusers_scheduler, fastddim_step_fn, make_step_inputs
from fastddim.timing import capture_graph, graph_unroll, summarize, time_wall, timed_call
from fastddim.utils import BoundedCache

# google/ddpm-cifar10-32's unet/config.json. Several values differ from UNet2DModel's defaults (freq_shift,
# flip_sin_to_cos, downsample_padding, norm_eps, attention_head_dim), so all are spelled out.
CIFAR10_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
}
# A UNet small enough for the harness's own tests.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def fastddim_pipeline_class() -> tuple[type | None, str | None]:
    """``fastddim.DDIMPipeline`` or (None, why not): it is imported lazily so the step benchmark never depends on it."""
    try:
        from fastddim.pipeline import DDIMPipeline
    except Exception as exc:  # (missing or broken module: skip its cases with the reason)
        return None, f"fastddim.DDIMPipeline is not available ({error_text(exc)})"
    return DDIMPipeline, None


_unet_cache: BoundedCache[str, tuple[Any, dict[str, Any], str]] = BoundedCache(8)


def load_unet(model: str) -> tuple[Any, dict[str, Any], str]:
    """(fp32 CPU UNet2DModel, scheduler config, weights description) for a loop-benchmark model name."""
    if (cached := _unet_cache.get(model)) is not None:
        return cached
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    if model == "cifar10-32":
        unet, scheduler_config, weights = (
            UNet2DModel(**CIFAR10_UNET_CONFIG),
            {},
            "random (google/ddpm-cifar10-32 architecture)",
        )
    elif model == "tiny":
        unet, scheduler_config, weights = UNet2DModel(**TINY_UNET_CONFIG), {}, "random (tiny test UNet)"
    elif model == "digits":
        from fastddim.models import default_model_dir

        try:
            folder = default_model_dir()
        except FileNotFoundError:
            # The architecture alone fixes the timing; random weights keep the benchmark usable before training.
            from fastddim.train_digits import build_unet

            unet, scheduler_config, weights = build_unet(), {}, "random (embedded digits model not found)"
        else:
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
            scheduler_config = {}
            if (folder / "scheduler").is_dir():
                scheduler_config = dict(DDIMScheduler.load_config(folder, subfolder="scheduler"))
            weights = f"embedded ({folder})"
    else:
        raise ValueError(f"unknown model {model!r}")
    unet.eval().requires_grad_(False)
    scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return _unet_cache.put(model, (unet, scheduler_config, weights))


def sample_shape(unet: Any, batch_size: int) -> tuple[int, ...]:
    """(B, C, H, W) of the samples ``unet`` takes at ``batch_size``."""
    size = unet.config.sample_size
    spatial = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, unet.config.in_channels, *spatial)


# Imagen-style dynamic thresholding (diffusers' defaults: ratio 0.995, max 1.0) instead of clipping, as the step
# benchmark's thresholded cases (`fastddim.benchmark.step.step_config`) use it.
THRESHOLDING_CONFIG: dict[str, Any] = {"thresholding": True, "clip_sample": False}


class SkipCase(Exception):
    """A case that cannot run here (a missing optional component); recorded as skipped, not as an error."""


LoopFn = Callable[[int, int], Any]


def _diffusers_loop(unet: Any, scheduler_config: dict[str, Any], *, compile_mode: str | None = None) -> LoopFn:
    import diffusers

    if compile_mode is not None:
        compat.reset_dynamo()
        compat.raise_dynamo_limits()
        unet = torch.compile(unet, mode=compile_mode, dynamic=False)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return lambda batch_size, steps: pipe(batch_size=batch_size, num_inference_steps=steps, output_type="pt")


def _fastddim_loop(
    unet: Any, scheduler_config: dict[str, Any], *, cuda_graph: bool, compile_unet: bool = False
) -> LoopFn:
    import fastddim

    pipeline_class, why = fastddim_pipeline_class()
    if pipeline_class is None:
        raise SkipCase(why)
    if compile_unet:
        # Inductor's fused UNet kernels (default mode: no CUDA graphs of its own) inside fastddim's captured loop.
        compat.reset_dynamo()
        compat.raise_dynamo_limits()
        unet = torch.compile(unet, dynamic=False)
    pipe = pipeline_class(unet, fastddim.DDIMScheduler.from_config(scheduler_config))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return lambda batch_size, steps: pipe(
        batch_size=batch_size, num_inference_steps=steps, output_type="pt", cuda_graph=cuda_graph
    )


LOOP_IMPLEMENTATIONS: dict[str, Implementation] = loop_implementations(_diffusers_loop, _fastddim_loop)
"""Loop implementations by name, in table order; each builds ``(batch_size, steps) -> images`` from a UNet."""


def build_loop(impl: str, unet: Any, scheduler_config: dict[str, Any]) -> LoopFn:
    """A callable ``(batch_size, num_inference_steps) -> images`` for one loop implementation.

    Raises:
        SkipCase: the implementation is not available here (``fastddim.DDIMPipeline`` missing).
    """
    return LOOP_IMPLEMENTATIONS[impl].build(unet, scheduler_config)


_sched_step_cache: BoundedCache[tuple, float] = BoundedCache(64)


def scheduler_step_us(
    kind: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    plan: Plan,
    *,
    thresholding: bool = False,
) -> float:
    """µs of one scheduler step alone, the way a loop implementation runs it (for the scheduler's share of a loop),
    thresholded as the loop's scheduler is."""
    key = (kind, shape, dtype, device, thresholding)
    cached = _sched_step_cache.get(key)
    if cached is None:
        case = StepCase(shape, dtype, thresholding=thresholding)
        inputs = make_step_inputs(case, device, plan.num_inference_steps)
        unroll = 1
        if kind == "fastddim-graph":
            unroll = graph_unroll(math.prod(shape))
            fn = capture_graph(fastddim_step_fn(inputs)[0], device, unroll=unroll)[0].replay
        elif kind == "fastddim-eager":
            fn = fastddim_step_fn(inputs)[0]
        else:
            # diffusers' DDIMPipeline passes its CPU timesteps: 0-dim CPU tensors.
            scheduler = diffusers_scheduler(inputs)
            timestep = torch.tensor(inputs.timestep)

            def fn() -> Any:
                return scheduler.step(inputs.model_output, timestep, inputs.sample, return_dict=False)

        fn()
        samples = time_wall(
            fn, device, rounds=plan.rounds, target_round_s=plan.target_round_s, max_calls=plan.max_calls
        )
        cached = _sched_step_cache.put(key, summarize(samples)["median_us"] / unroll)
    return cached


def run_loop_impl(case: LoopCase, impl: str, device: torch.device, plan: Plan) -> dict:
    """Times whole sampling loops of one implementation on one model/batch/dtype."""
    steps = plan.num_inference_steps
    implementation = LOOP_IMPLEMENTATIONS[impl]
    record = new_record(
        "loop",
        name=f"loop/{case.label}/{impl}",
        impl=impl,
        model=case.model,
        batch_size=case.batch_size,
        dtype=DTYPE_NAMES[case.dtype],
        num_inference_steps=steps,
        config={"eta": 0.0, "thresholding": case.thresholding, "generator": None},
    )
    pipe = call = None
    try:
        base_unet, scheduler_config, weights = load_unet(case.model)
        if case.thresholding:
            scheduler_config = {**scheduler_config, **THRESHOLDING_CONFIG}
        record["config"]["weights"] = weights
        record["config"]["scheduler_config"] = scheduler_config
        record["shape"] = list(sample_shape(base_unet, case.batch_size))
        # nn.Module.to: ModelMixin.to warns about fp32-pinned modules even when there are none.
        unet = torch.nn.Module.to(copy.deepcopy(base_unet), device=device, dtype=case.dtype)
        free_memory(device)
        if implementation.limit:
            sample = torch.randn(record["shape"], generator=torch.Generator().manual_seed(0)).to(device, case.dtype)
            timestep = torch.tensor(500, device=device)
            per_call_us, method = unet_call_us(lambda: unet(sample, timestep).sample, device, plan)
            fill_limit_record(record, per_call_us, method, steps, case.batch_size)
            return record
        pipe = implementation.build(unet, scheduler_config)
        # After building: resetting Dynamo there may clear the counters.
        skips_before = compat.cudagraph_skip_count()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with warnings.catch_warnings(record=True) as caught:
            # fastddim.DDIMPipeline warns and runs eagerly when a capture fails: that must not pass as a graph figure.
            warnings.simplefilter("always", RuntimeWarning)
            call = functools.partial(pipe, case.batch_size, steps)
            first_s, _ = timed_call(call, device)
            for _ in range(plan.loop_warmup + (1 if implementation.compiles else 0)):
                call()
            samples = [timed_call(call, device)[0] * 1e6 for _ in range(plan.loop_rounds)]
        fallbacks = [str(w.message) for w in caught if "eager" in str(w.message)]
        if implementation.cuda_graph:
            record["check"] = {"passed": not fallbacks, "method": "no eager fallback warning"}
            if fallbacks:
                record["check"]["detail"] = f"fell back to eager: {fallbacks[0][:200]}"
        record["notes"].extend(str(w.message)[:300] for w in caught[:3])
        if impl == "compile-reduce-overhead" and (skipped := compat.cudagraph_skip_count() - skips_before):
            # diffusers' DDIMPipeline hands the UNet CPU timesteps, which CUDAGraph Trees refuse to capture.
            record["notes"].append(f"CUDAGraph Trees skipped cudagraphs {skipped} time(s) (inductor cudagraph_skips)")
        record.update(summarize(samples))
        median_s = record["median_us"] * 1e-6
        record["timing_method"] = "host wall per pipeline call, synchronized"
        record["images_per_s"] = case.batch_size / median_s
        record["ms_per_step"] = median_s * 1e3 / steps
        record["first_call_s"] = first_s
        if implementation.cuda_graph or implementation.compiles:
            record["capture_s"] = first_s - median_s
        if device.type == "cuda":
            record["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        kind = "fastddim-graph" if implementation.cuda_graph else impl if impl == "fastddim-eager" else "diffusers"
        step_us = scheduler_step_us(
            kind, tuple(record["shape"]), case.dtype, device, plan, thresholding=case.thresholding
        )
        record["scheduler_step_us"] = step_us
        record["scheduler_share"] = steps * step_us / record["median_us"]
    except SkipCase as skip:
        record["skipped"] = str(skip)
    except Exception as exc:  # (one failing implementation must not end the run)
        record["error"] = error_text(exc)
    finally:
        pipe = call = None
        free_memory(device)
    return record


def finalize_loop_records(records: list[dict]) -> None:
    """Fills speedups over diffusers eager and over compile-reduce-overhead, and loop time / limit (same model, batch
    and dtype)."""
    loops = [r for r in records if r["benchmark"] == "loop" and r["median_us"] and r["impl"] != LIMIT_IMPL]
    for baseline_impl, field in (
        ("diffusers", "speedup_vs_diffusers"),
        ("compile-reduce-overhead", "speedup_vs_compile_reduce_overhead"),
    ):
        baselines = {loop_key(r): r for r in loops if r["impl"] == baseline_impl}
        for record in loops:
            base = baselines.get(loop_key(record))
            if base:
                record[field] = base["median_us"] / record["median_us"]
    fill_vs_limit(records, "loop", loop_key)


def loop_key(record: dict) -> tuple:
    """What makes loop records comparable: model, batch size, dtype, thresholding (off in records without it)."""
    thresholding = bool(record["config"] and record["config"].get("thresholding"))
    return (record["model"], record["batch_size"], record["dtype"], thresholding)
