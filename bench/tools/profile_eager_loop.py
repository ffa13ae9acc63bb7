"""Why one eager loop would be slower than another: diffusers' pipeline against fastddim's with ``cuda_graph=False``.

For each case, both pipelines on one UNet (the harness's builders, `fastddim.benchmark.eager`), in both orders
(diffusers first, then fastddim first), one warm call each under ``torch.profiler``, printing per call:

- wall ms, and the GPU's busy time (sum of kernel and memcpy time) over it: near 1 the loop is device-bound, near 0
  host-bound;
- CUDA runtime calls by kind: kernel launches, memcpys, synchronizations (a sync per step shows here);
- the GPU kernels: count, total time, and the names one implementation runs that the other does not (a different cuDNN
  or cuBLAS algorithm shows as a different kernel name);
- the top operators by self CPU time;
- the global backend flags before and after the call (TF32, cuDNN benchmark/deterministic, matmul precision), so a
  pipeline that changes them is caught.

Usage (on a GPU; ``--tiny`` runs the tiny models, also on a CPU, to check the script):

    python bench/tools/profile_eager_loop.py [--tiny] [--device cuda]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastddim.benchmark import eager
from fastddim.benchmark.cases import LoopCase, SDCase
from fastddim.timing import default_device, sync

F32 = torch.float32
CASES = [LoopCase("digits", 1, F32), LoopCase("cifar10-32", 1, F32), SDCase("sd15", 1, F32, 30)]
TINY_CASES = [LoopCase("tiny", 1, F32), SDCase("tiny-sd", 1, F32, 2)]
RUNTIME_KINDS = {
    "launch": ("LaunchKernel", "cuLaunch", "cudaGraphLaunch"),
    "memcpy": ("Memcpy",),
    "sync": ("Synchronize",),
    "memset": ("Memset",),
}


def backend_flags() -> dict[str, object]:
    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def profile_call(call: eager.EagerCall, device: torch.device) -> tuple[float, object]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    return wall_ms, prof


def summarize(name: str, wall_ms: float, prof: object, steps: int) -> set[str]:
    """Prints one call's profile; returns the names of the device kernels it ran."""
    events = prof.key_averages()
    runtime = collections.Counter()
    kernels: dict[str, tuple[int, float]] = {}
    device_us = 0.0
    for event in events:
        for kind, needles in RUNTIME_KINDS.items():
            if any(needle in event.key for needle in needles) and event.device_type.name == "CPU":
                runtime[kind] += event.count
        device_time = getattr(event, "self_device_time_total", 0.0) or 0.0
        if event.device_type.name == "CUDA" and device_time > 0:
            kernels[event.key] = (event.count, device_time)
            device_us += device_time
    print(f"  {name}: {wall_ms:.1f} ms ({wall_ms / steps:.3f} ms/step), GPU busy {device_us / 1e3 / wall_ms:.0%}")
    print("    runtime calls per step: " + ", ".join(f"{k} {v / steps:.1f}" for k, v in sorted(runtime.items())))
    top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:6]
    print(f"    {len(kernels)} kernel names; top by device time:")
    for kernel, (count, total) in top_kernels:
        print(f"      {total / 1e3:8.2f} ms  x{count:<5} {kernel[:110]}")
    print("    top operators by self CPU time:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"      {event.self_cpu_time_total / 1e3:8.2f} ms  x{event.count:<5} {event.key[:80]}")
    return set(kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test models (a check of this script)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    plan = eager.Plan([], (), [], (), num_inference_steps=50)
    print(f"device {device}; torch {torch.__version__}; flags {backend_flags()}")
    for case in TINY_CASES if args.tiny else CASES:
        steps = case.num_inference_steps if isinstance(case, SDCase) else plan.num_inference_steps
        calls = eager._sd_calls(case, device) if isinstance(case, SDCase) else eager._loop_calls(case, device, steps)
        print(f"\n== {case.label}, {steps} steps")
        for call in calls.values():
            call()  # warm: cuDNN heuristics, Triton compilation, allocator
        profile_call(calls[eager.EAGER_IMPLS[0]], device)  # the profiler's own first-use cost, discarded
        for order in (eager.EAGER_IMPLS, eager.EAGER_IMPLS[::-1]):
            print(f" order: {' then '.join(order)}")
            names = {}
            for impl in order:
                before = backend_flags()
                wall_ms, prof = profile_call(calls[impl], device)
                names[impl] = summarize(impl, wall_ms, prof, steps)
                if (after := backend_flags()) != before:
                    print(f"    backend flags changed by the call: {before} -> {after}")
            only = {impl: sorted(names[impl] - names[other]) for impl, other in zip(order, order[::-1], strict=True)}
            for impl, kernels in only.items():
                if kernels:
                    print(f"    kernels only {impl} ran: " + "; ".join(k[:70] for k in kernels[:6]))
        calls.clear()


if __name__ == "__main__":
    with torch.no_grad():
        main()
