"""The per-seed noise benchmark: images/s of seed-addressed sampling against the same loop with one generator.

What ``fastddim sample --seeds 0-4095 --batch-size 256`` computes, without writing files: ``fastddim.DDIMPipeline``
calls of ``batch_size`` images over seeds ``0 .. Plan.seeds_images - 1`` in order, ``output_type="pt"``, in one
process, the captured loop on CUDA. Three noise modes (``SEEDS_MODES``) run the same calls:

- ``seeds``: ``pipe(seeds=[...])``, each image's initial and step noise from its own seed (`fastddim.seeds`);
- ``generator``: ``pipe(batch_size=B, generator=torch.Generator(device).manual_seed(0))``, one generator per call;
- ``no-generator``: ``pipe(batch_size=B)``, the global generator.

For eta > 0 the step noise is drawn every step, which is where per-seed noise can cost most, so every case runs at
eta 0 and 1. Timing: one untimed call per mode first (capture), then the batches of seeds in order, the three modes
interleaved batch by batch (the order rotated each batch) so that drift in clocks or temperature falls on all three
alike; each call is host wall time with a synchronize after it. A record's ``images_per_s`` is the images of all its
timed calls over their summed time; ``cost_vs_generator`` is that of ``generator`` over this one's, minus one (0.02:
2 % slower).

The image files ``fastddim sample`` writes (PNG encoding, hashing, renames) are not timed: they are the same work for
every noise mode and would hide the difference measured here.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from fastddim.benchmark.cases import DTYPE_NAMES, Implementation, Plan, SeedsCase
from fastddim.benchmark.environment import free_memory
from fastddim.benchmark.loop import SkipCase, fastddim_pipeline_class, load_unet, sample_shape
from fastddim.benchmark.records import error_text, new_record
from fastddim.timing import summarize, timed_call


def _seeds_kwargs(seeds: list[int], device: torch.device) -> dict[str, Any]:
    return {"seeds": seeds}


def _generator_kwargs(seeds: list[int], device: torch.device) -> dict[str, Any]:
    return {"batch_size": len(seeds), "generator": torch.Generator(device).manual_seed(0)}


def _no_generator_kwargs(seeds: list[int], device: torch.device) -> dict[str, Any]:
    return {"batch_size": len(seeds)}


SEEDS_MODES: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("no-generator", _no_generator_kwargs),
        Implementation("generator", _generator_kwargs),
        Implementation("seeds", _seeds_kwargs),
    )
}
"""Noise modes by name, in table order; each builds the pipeline call's keyword arguments ``(seeds, device)``."""

NOISE_DESCRIPTIONS = {
    "no-generator": "pipe(batch_size=B): the global generator",
    "generator": "pipe(batch_size=B, generator=torch.Generator(device).manual_seed(0)), one generator per call",
    "seeds": "pipe(seeds=[...]): each image's noise from its own seed",
}


def new_seeds_record(case: SeedsCase, mode: str) -> dict:
    """A ``seeds`` record of one configuration and noise mode, every figure still None."""
    return new_record(
        "seeds",
        name=f"seeds/{case.label}/{mode}",
        impl=mode,
        model=case.model,
        batch_size=case.batch_size,
        dtype=DTYPE_NAMES[case.dtype],
        num_inference_steps=case.num_inference_steps,
        config={"eta": case.eta, "noise": NOISE_DESCRIPTIONS.get(mode), "output_type": "pt", "files_written": False},
    )


def run_seeds_case(case: SeedsCase, modes: tuple[str, ...], device: torch.device, plan: Plan) -> list[dict]:
    """Times ``plan.seeds_images`` images in batches of ``case.batch_size`` in each noise mode, interleaved.

    Returns:
        `list[dict]`: one record per mode (an ``error`` or ``skipped`` in each when the case could not run).
    """
    records = {mode: new_seeds_record(case, mode) for mode in modes}
    pipe = None
    try:
        pipeline_class, why = fastddim_pipeline_class()
        if pipeline_class is None:
            raise SkipCase(why)
        if "seeds" in modes and "seeds" not in inspect.signature(pipeline_class.__call__).parameters:
            raise SkipCase("fastddim.DDIMPipeline has no seeds argument")
        import fastddim

        base_unet, scheduler_config, weights = load_unet(case.model)
        unet = torch.nn.Module.to(copy.deepcopy(base_unet), device=device, dtype=case.dtype)
        pipe = pipeline_class(unet, fastddim.DDIMScheduler.from_config(scheduler_config))
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        shape = list(sample_shape(unet, case.batch_size))
        batches = [
            list(range(start, min(start + case.batch_size, plan.seeds_images)))
            for start in range(0, plan.seeds_images, case.batch_size)
        ]

        def call(mode: str, seeds: list[int]) -> float:
            kwargs = SEEDS_MODES[mode].build(seeds, device)
            return timed_call(
                lambda: pipe(num_inference_steps=case.num_inference_steps, eta=case.eta, output_type="pt", **kwargs),
                device,
            )[0]

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for mode in modes:
            records[mode]["first_call_s"] = call(mode, batches[0])
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        for index, seeds in enumerate(batches):
            for offset in range(len(modes)):
                mode = modes[(index + offset) % len(modes)]
                samples[mode].append(call(mode, seeds) * 1e6)
        for mode, record in records.items():
            record["config"]["weights"] = weights
            record["shape"] = shape
            record.update(summarize(samples[mode]))
            record["timing_method"] = "host wall per pipeline call, synchronized; modes interleaved batch by batch"
            record["images"] = plan.seeds_images
            record["total_s"] = sum(samples[mode]) * 1e-6
            record["images_per_s"] = plan.seeds_images / record["total_s"]
            record["ms_per_step"] = record["median_us"] * 1e-3 / case.num_inference_steps
            if device.type == "cuda":
                record["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        finalize_seeds_records(list(records.values()))
    except SkipCase as skip:
        for record in records.values():
            record["skipped"] = str(skip)
    except Exception as exc:  # (one failing case must not end the run)
        for record in records.values():
            record["error"] = error_text(exc)
    finally:
        pipe = None
        free_memory(device)
    return list(records.values())


def finalize_seeds_records(records: list[dict]) -> None:
    """Fills each record's cost against the ``generator`` and ``no-generator`` modes of the same case."""
    timed = [r for r in records if r["benchmark"] == "seeds" and r["images_per_s"]]

    def key(r: dict) -> tuple:
        return (r["model"], r["batch_size"], r["dtype"], r["num_inference_steps"], r["config"]["eta"])

    for baseline, field in (("generator", "cost_vs_generator"), ("no-generator", "cost_vs_no_generator")):
        bases = {key(r): r for r in timed if r["impl"] == baseline}
        for record in timed:
            if (base := bases.get(key(record))) is not None:
                record[field] = base["images_per_s"] / record["images_per_s"] - 1.0
