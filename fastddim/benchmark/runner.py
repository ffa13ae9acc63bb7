"""A run: the plan for the requested mode and device, every (case, implementation) in turn, results written as it goes.

Cases never end a run: an implementation that raises becomes a record with an ``error``, one that cannot run here a
record with ``skipped`` (a missing optional component, or a ``torch.compile`` case past the time budget), and
`summarize_outcomes` tells them apart for the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastddim.benchmark import cases, eager, loop, per_seed, reconstruction, sd, step
from fastddim.benchmark.cases import DTYPE_NAMES, LoopCase, Plan, SDCase, SeedsCase, StepCase
from fastddim.benchmark.environment import environment_info, free_memory
from fastddim.benchmark.records import METHODOLOGY, SCHEMA_VERSION, error_text, new_record, outcome, write_json
from fastddim.benchmark.report import fmt, markdown_tables, status, write_plots


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    """The cases and timing effort for the requested mode (``--quick``, ``--tiny``, ``--only``...) on this device."""
    cuda = device.type == "cuda"
    compile_ok = not args.no_compile and cuda and not (args.quick or args.tiny)

    def available(implementations: dict[str, cases.Implementation]) -> tuple[str, ...]:
        return tuple(
            name
            for name, impl in implementations.items()
            if (cuda or not impl.cuda_graph) and (compile_ok or not impl.compiles)
        )

    step_impls, loop_impls = available(step.STEP_IMPLEMENTATIONS), available(loop.LOOP_IMPLEMENTATIONS)
    sd_impls = available(sd.SD_IMPLEMENTATIONS)
    if args.tiny:
        plan = Plan(cases.TINY_STEP_CASES, step_impls, cases.TINY_LOOP_CASES, loop_impls, num_inference_steps=3)
        plan.rounds, plan.target_round_s, plan.max_calls = 3, 0.002, 20
        plan.device_warmup_ms, plan.device_rep_ms = 2.0, 5.0
        plan.loop_rounds = 2
        plan.sd_cases, plan.sd_rounds = list(cases.TINY_SD_CASES), 2
        plan.seeds_cases, plan.seeds_images = list(cases.TINY_SEEDS_CASES), 4
        plan.eager_cases, plan.eager_rounds = list(cases.TINY_EAGER_CASES), 2
    elif args.quick:
        step_cases = cases.GPU_QUICK_STEP_CASES if cuda else cases.CPU_QUICK_STEP_CASES
        loop_cases = cases.GPU_QUICK_LOOP_CASES if cuda else cases.CPU_QUICK_LOOP_CASES
        plan = Plan(step_cases, step_impls, loop_cases, loop_impls)
        plan.sd_cases = list(cases.GPU_QUICK_SD_CASES if cuda else cases.CPU_QUICK_SD_CASES)
        plan.seeds_cases = list(cases.GPU_QUICK_SEEDS_CASES if cuda else cases.CPU_QUICK_SEEDS_CASES)
        plan.seeds_images = 1024
        plan.eager_cases = list(cases.GPU_QUICK_EAGER_CASES if cuda else cases.CPU_QUICK_EAGER_CASES)
        plan.eager_rounds = 6
        plan.rounds = 5
        if not cuda:
            # Eager CPU loops have nothing to capture or compile: the untimed first call is warm-up enough.
            plan.loop_warmup = 0
    else:
        plan = Plan(cases.GPU_STEP_CASES, step_impls, cases.GPU_LOOP_CASES, loop_impls)
        plan.sd_cases = list(cases.GPU_SD_CASES)
        plan.seeds_cases = list(cases.GPU_SEEDS_CASES)
        plan.eager_cases = list(cases.GPU_EAGER_CASES)
    plan.sd_impls = sd_impls
    plan.seeds_modes = tuple(per_seed.SEEDS_MODES)
    if not args.tiny:
        # The DDIM paper's Table 2 steps on 256 digits; --quick on a CPU (minutes per S there) does two on 64 unless
        # the reconstruction is all it runs.
        full = cuda or not args.quick or args.only == "reconstruction"
        plan.reconstruction_steps = (10, 20, 50, 100) if full else (10, 50)
        plan.reconstruction_images = 256 if full else 64
    if args.only != "all":
        if args.only != "step":
            plan.step_cases = []
        if args.only != "loop":
            plan.loop_cases = []
        if args.only != "sd":
            plan.sd_cases = []
        if args.only != "reconstruction":
            plan.reconstruction_steps = ()
        if args.only != "seeds":
            plan.seeds_cases = []
        if args.only != "eager":
            plan.eager_cases = []
    if args.steps is not None:
        plan.num_inference_steps = args.steps
        steps_cases = (dataclasses.replace(case, num_inference_steps=args.steps) for case in plan.sd_cases)
        plan.sd_cases = list(dict.fromkeys(steps_cases))
        seeds_cases = (dataclasses.replace(case, num_inference_steps=args.steps) for case in plan.seeds_cases)
        plan.seeds_cases = list(dict.fromkeys(seeds_cases))
        eager_cases = (
            dataclasses.replace(case, num_inference_steps=args.steps) if isinstance(case, SDCase) else case
            for case in plan.eager_cases
        )
        plan.eager_cases = list(dict.fromkeys(eager_cases))
    if getattr(args, "loop_cases", None) is not None:
        plan.loop_cases = [case for case in plan.loop_cases if args.loop_cases.search(case.label)]
    if getattr(args, "sd_cases", None) is not None:
        plan.sd_cases = [case for case in plan.sd_cases if args.sd_cases.search(case.label)]
    plan.budget_s = args.budget_s
    return plan


Job = tuple[str, StepCase | LoopCase | SDCase | SeedsCase | int, str]
# A per-seed case times all its noise modes in one job (they are interleaved): its job's implementation name.
SEEDS_JOB = "noise modes"
# An eager case times diffusers' and fastddim's eager loops in one job (interleaved).
EAGER_JOB = "eager loops"


def compiled_impls() -> set[str]:
    """Names of the step, loop and text-to-image implementations that use ``torch.compile``."""
    implementations = {**step.STEP_IMPLEMENTATIONS, **loop.LOOP_IMPLEMENTATIONS, **sd.SD_IMPLEMENTATIONS}
    return {name for name, impl in implementations.items() if impl.compiles}


def plan_jobs(plan: Plan) -> list[Job]:
    """(benchmark, case, implementation) in run order: everything but ``torch.compile`` first, compiled cases last."""
    compiles = compiled_impls()
    jobs: list[Job] = []
    for compiled in (False, True):
        seen_copies: set[tuple] = set()
        for case in plan.step_cases:
            for impl in plan.step_impls:
                if (impl in compiles) != compiled:
                    continue
                if impl in step.STEP_IMPLEMENTATIONS and not step.STEP_IMPLEMENTATIONS[impl].runs(case.kind):
                    continue
                if impl == "copy":
                    # The copy ceiling depends on bytes only: once per shape and dtype.
                    if (case.shape, case.dtype) in seen_copies:
                        continue
                    seen_copies.add((case.shape, case.dtype))
                jobs.append(("step", case, impl))
        for case in plan.loop_cases:
            for impl in plan.loop_impls:
                if (impl in compiles) != compiled:
                    continue
                if impl in compiles and case.dtype not in plan.compile_loop_dtypes:
                    continue
                jobs.append(("loop", case, impl))
        for case in plan.sd_cases:
            for impl in plan.sd_impls:
                if (impl in compiles) != compiled:
                    continue
                if impl in compiles and case.dtype not in plan.compile_loop_dtypes:
                    continue
                jobs.append(("sd", case, impl))
    compiled_loops = [job for job in jobs if job[0] in ("loop", "sd") and job[2] in compiles]
    if compiled_loops:
        # Batch 1 first (the launch-bound case where reduce-overhead matters most), each case's compiled loops next to
        # each other so that the time budget never leaves one without the other; text-to-image cases in their list's
        # order (the SD1.5 architecture first) after the unconditional ones.
        others = [job for job in jobs if job not in compiled_loops]
        sd_order = {case: i for i, case in enumerate(plan.sd_cases)}

        def compiled_order(job: Job) -> tuple:
            case = job[1]
            if job[0] == "sd":
                return (case.batch_size, 1, sd_order[case], "")
            return (case.batch_size, 0, 0, case.model)

        jobs = others + sorted(compiled_loops, key=compiled_order)
    # Reconstruction and per-seed noise need no torch.compile: before the compiled cases, which the budget may cut.
    reconstructions: list[Job] = [("reconstruction", steps, "fastddim") for steps in plan.reconstruction_steps]
    if plan.seeds_modes:
        reconstructions += [("seeds", case, SEEDS_JOB) for case in plan.seeds_cases]
    reconstructions += [("eager", case, EAGER_JOB) for case in plan.eager_cases]
    first_compiled = next((i for i, job in enumerate(jobs) if job[2] in compiles), len(jobs))
    return jobs[:first_compiled] + reconstructions + jobs[first_compiled:]


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the tables)."""
    print(message, file=sys.stderr, flush=True)


def run_benchmarks(plan: Plan, device: torch.device, out_dir: Path, *, plots: bool = True) -> dict:
    """Runs the plan, writing results.json after every record, then results.md and the plots.

    Args:
        plan (`Plan`): what to measure.
        device (`torch.device`): where (already validated).
        out_dir (`Path`): the output folder, created if missing.
        plots (`bool`, defaults to `True`): write the PNG plots (skipped with a message without matplotlib).

    Returns:
        `dict`: the results, with ``written`` (the paths written, not saved in results.json).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "environment": environment_info(device),
        "settings": {
            "num_inference_steps": plan.num_inference_steps,
            "rounds": plan.rounds,
            "device_warmup_ms": plan.device_warmup_ms,
            "device_rep_ms": plan.device_rep_ms,
            "loop_warmup": plan.loop_warmup,
            "loop_rounds": plan.loop_rounds,
            "step_impls": list(plan.step_impls),
            "loop_impls": list(plan.loop_impls),
            "sd_impls": list(plan.sd_impls),
            "sd_warmup": plan.sd_warmup,
            "sd_rounds": plan.sd_rounds,
            "seeds_modes": list(plan.seeds_modes),
            "seeds_images": plan.seeds_images,
            "eager_rounds": plan.eager_rounds,
            "budget_s": plan.budget_s,
        },
        "methodology": METHODOLOGY,
        "records": [],
    }
    records: list[dict] = results["records"]
    jobs = plan_jobs(plan)
    compiles = compiled_impls()
    inputs_cache: dict[StepCase, step.StepInputs] = {}
    with torch.no_grad():
        for index, (benchmark, case, impl) in enumerate(jobs, 1):
            elapsed = time.perf_counter() - started
            case_label = f"S={case}" if benchmark == "reconstruction" else case.label
            label = f"[{index}/{len(jobs)} {elapsed:5.0f}s] {benchmark} {case_label} {impl}"
            produced: list[dict] = []
            if impl in compiles and elapsed > plan.budget_s:
                record = _case_record(benchmark, case, impl, plan)
                record["skipped"] = f"time budget of {plan.budget_s:.0f} s spent (--budget-s)"
            elif benchmark == "seeds":
                inputs_cache.clear()
                produced = per_seed.run_seeds_case(case, plan.seeds_modes, device, plan)
                record = produced.pop()
            elif benchmark == "eager":
                inputs_cache.clear()
                produced = eager.run_eager_case(case, device, plan)
                record = produced.pop()
            else:
                try:
                    if benchmark == "step":
                        if case not in inputs_cache:
                            inputs_cache.clear()
                            free_memory(device)
                            inputs_cache[case] = step.make_step_inputs(case, device, plan.num_inference_steps)
                        record = step.run_step_impl(inputs_cache[case], impl, plan)
                    elif benchmark == "reconstruction":
                        inputs_cache.clear()
                        record = reconstruction.reconstruction_record(case, plan, device)
                    elif benchmark == "sd":
                        inputs_cache.clear()
                        record = sd.run_sd_impl(case, impl, device, plan)
                    else:
                        inputs_cache.clear()
                        record = loop.run_loop_impl(case, impl, device, plan)
                except Exception as exc:  # (e.g. out of memory building a case's inputs: record it, go on)
                    record = _case_record(benchmark, case, impl, plan)
                    record["error"] = error_text(exc)
                    free_memory(device)
            for done in (*produced, record):
                records.append(done)
                mode = f" {done['impl']}" if benchmark in ("seeds", "eager") else ""
                progress(f"{label}{mode}: {_progress_figures(done)}")
            write_json(results, out_dir)
    inputs_cache.clear()
    step.finalize_step_records(records)
    loop.finalize_loop_records(records)
    sd.finalize_sd_records(records)
    results["elapsed_s"] = time.perf_counter() - started
    written = [write_json(results, out_dir), out_dir / "results.md"]
    written[1].write_text(markdown_tables(results) + "\n")
    if plots:
        try:
            written += write_plots(results, out_dir)
        except ImportError as exc:
            progress(f"plots skipped: {exc} (pip install matplotlib)")
    results["written"] = written
    return results


def summarize_outcomes(records: list[dict]) -> dict[str, list[dict]]:
    """Records by `outcome`: ``ok``, ``skipped``, ``failed`` (correctness check) and ``error``."""
    by_outcome: dict[str, list[dict]] = {"ok": [], "skipped": [], "failed": [], "error": []}
    for record in records:
        by_outcome[outcome(record)].append(record)
    return by_outcome


def _case_record(benchmark: str, case: StepCase | LoopCase | SDCase | SeedsCase | int, impl: str, plan: Plan) -> dict:
    if benchmark == "eager":
        return eager.new_eager_record(case, impl)
    if benchmark == "reconstruction":
        name = f"reconstruction/{reconstruction.DIGITS_MODEL}/S={case}"
        return new_record(benchmark, name=name, impl=impl, dtype="fp32", num_inference_steps=case)
    if isinstance(case, SDCase):
        return sd.new_sd_record(case, impl)
    if isinstance(case, SeedsCase):
        return per_seed.new_seeds_record(case, impl)
    record = new_record(benchmark, name=f"{benchmark}/{case.label}/{impl}", impl=impl, dtype=DTYPE_NAMES[case.dtype])
    if isinstance(case, StepCase):
        record.update(
            shape=list(case.shape),
            numel=case.numel,
            config={"kind": case.kind, "eta": case.eta, "thresholding": case.thresholding},
        )
    else:
        record.update(
            model=case.model,
            batch_size=case.batch_size,
            num_inference_steps=plan.num_inference_steps,
            config={"eta": 0.0, "thresholding": case.thresholding},
        )
    return record


def _progress_figures(record: dict) -> str:
    if record["skipped"] or record["error"]:
        return status(record)
    if record["benchmark"] == "reconstruction":
        return f"MSE {fmt(record['mse'], '.5f')} over {record['batch_size']} digits"
    if record["benchmark"] == "step":
        return (
            f"{fmt(record['median_us'], '.2f')} µs, latency {fmt(record['latency_us'], '.2f')} µs, "
            f"{fmt(record['gb_per_s'], '.1f')} GB/s, check {status(record)}"
        )
    figures = f"{fmt(record['images_per_s'], '.1f')} images/s, {fmt(record['ms_per_step'], '.3f')} ms/step"
    if record["benchmark"] == "seeds" and record["cost_vs_generator"] is not None:
        figures += f", {100 * record['cost_vs_generator']:+.1f} % vs one generator"
    if record["benchmark"] == "eager" and record["paired_speedup_vs_diffusers"] is not None:
        figures += f", {record['paired_speedup_vs_diffusers']:.2f}x diffusers (paired)"
    if record["benchmark"] in ("sd", "eager") and record["check"] is not None:
        figures += f", check {status(record)} (rel. L2 {fmt(record['check'].get('rel_l2_err'), '.2g')})"
    return figures
