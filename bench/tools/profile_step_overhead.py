"""Where the host time of one eager ``fastddim.DDIMScheduler.step`` goes.

Two modes:

- default (CUDA): times back-to-back eager steps with the public launch path (``FASTDDIM_SAFE_LAUNCH=1``) and with
  every fast path of ``fastddim.compat`` (``FASTDDIM_SAFE_LAUNCH=0``), interleaved in one process, and the share of
  the step's latency the fast paths save; then the bare launcher and the custom op, the seed draw and one eager torch
  op for scale, and the top of a cProfile of the step.
- ``--host-only`` (any machine, no GPU needed; run from the repository root): ``step`` on CPU tensors through the
  Triton launch path with Triton's CUDA driver replaced by a recording stand-in (``tests/direct_launch_probe.py``),
  so everything but the CUDA driver call itself is timed: fastddim's Python plus either Triton's dispatch or the
  direct launch of the compiled kernel. With no-op kernels it also times fastddim's Python alone. diffusers' step on a
  tiny CPU tensor is printed for scale.

Usage: ``python bench/tools/profile_step_overhead.py [--host-only]``.
"""

import argparse
import collections
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Callable


def per_call_us(fn: Callable[[], object], sync: Callable[[], None], n: int = 1000, repeats: int = 7) -> float:
    """Best of ``repeats`` averages over ``n`` calls, in microseconds (the minimum filters scheduler noise)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def host_only() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, before fastddim imports them
    os.environ["FASTDDIM_BACKEND"] = "triton"
    sys.path.insert(0, os.getcwd())
    import diffusers
    import torch
    from triton.runtime.driver import driver

    from tests import direct_launch_probe

    driver.set_active(direct_launch_probe.RecordingDriver())
    direct_launch_probe.RECORDED = collections.deque(maxlen=1)  # keep only the last launch while timing
    os.environ["FASTDDIM_SAFE_LAUNCH"] = "0"
    import fastddim
    from fastddim import compat, ops

    # CPU tensors stand in for CUDA ones: the Triton backend, and a device to launch compiled kernels on.
    fastddim.DDIMScheduler._backend_for = staticmethod(lambda sample: "triton")
    torch.set_num_threads(1)
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    reference = diffusers.DDIMScheduler()
    reference.set_timesteps(50)
    x = torch.randn(1, 4, 64, 64, dtype=torch.float16)
    tiny = torch.randn(1, 4, 8, 8)
    t = scheduler.timesteps[3]

    def nothing() -> None:
        return None

    def step() -> object:
        return scheduler.step(x, t, x)

    # A thresholded step (two launches), with rows split as on an H100's 132 SMs.
    from fastddim import threshold

    threshold._max_resident_programs = lambda device: 132
    thresholded = fastddim.DDIMScheduler(thresholding=True)
    thresholded.set_timesteps(50)
    x_thr = torch.randn(16, 3, 64, 64)

    def thresholded_step() -> object:
        return thresholded.step(x_thr, t, x_thr)

    print("fastddim host time per step((1, 4, 64, 64) fp16, tensor timestep), all but the CUDA driver call:")
    compat._direct_launch_device = lambda tensor: 0
    print(f"  direct launch of the compiled kernel   {per_call_us(step, nothing):8.1f} us")
    thresholded_direct = per_call_us(thresholded_step, nothing)
    compat._direct_launch_device = lambda tensor: None
    print(f"  through Triton's dispatch              {per_call_us(step, nothing):8.1f} us")
    print("thresholded step((16, 3, 64, 64) fp32, rows split over 132 SMs), all but the CUDA driver calls:")
    print(f"  direct launches of both kernels        {thresholded_direct:8.1f} us")
    print(f"  through Triton's dispatch              {per_call_us(thresholded_step, nothing):8.1f} us")

    class NoOpKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    ops.ddim_step_kernel = ops.ddim_step_flat_kernel = NoOpKernel()
    ops.STEP_PLANS.clear()
    print(f"  fastddim's Python alone (no-op kernel) {per_call_us(step, nothing):8.1f} us")
    print("for scale:")
    print(
        f"  diffusers step, (1, 4, 8, 8) CPU       {per_call_us(lambda: reference.step(tiny, t, tiny), nothing):8.1f} us"
    )
    print(f"  tiny.add(1)                            {per_call_us(lambda: tiny.add(1), nothing):8.1f} us")


def cuda() -> None:
    import torch

    import fastddim
    from fastddim import compat, ops

    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50, device="cuda")
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = scheduler.timesteps[3]
    table = scheduler.coefficient_table("cuda", 0.0)
    args = (x, x, table, t, 0, None, None, None, False, 0, True, 1.0, False, torch.float16)
    sync = torch.cuda.synchronize

    # The rule: the private fast paths stay only if they save >= 20 % of the eager step's latency.
    latencies: dict[str, list[float]] = {"1": [], "0": []}
    for _ in range(3):
        for mode in latencies:
            os.environ["FASTDDIM_SAFE_LAUNCH"] = mode
            compat.refresh()
            latencies[mode].append(per_call_us(lambda: scheduler.step(x, t, x), sync))
    public, fast = min(latencies["1"]), min(latencies["0"])
    print(f"step (1,4,64,64) fp16 eta=0, FASTDDIM_SAFE_LAUNCH=1 (public paths) {public:8.1f} us")
    print(f"step (1,4,64,64) fp16 eta=0, FASTDDIM_SAFE_LAUNCH=0 (fast paths)   {fast:8.1f} us")
    print(f"fast paths save {100 * (1 - fast / public):.1f} % of the eager step's latency (keep them if >= 20 %)")
    os.environ["FASTDDIM_SAFE_LAUNCH"] = "0"
    compat.refresh()
    print(f"scheduler.step eta=0          {per_call_us(lambda: scheduler.step(x, t, x), sync):8.1f} us")
    print(f"scheduler.step eta=1 (philox) {per_call_us(lambda: scheduler.step(x, t, x, eta=1.0), sync):8.1f} us")
    thresholded = fastddim.DDIMScheduler(thresholding=True)
    thresholded.set_timesteps(50, device="cuda")
    x_thr = torch.randn(16, 3, 64, 64, device="cuda")
    thresholded_us = per_call_us(lambda: thresholded.step(x_thr, t, x_thr), sync)
    print(f"thresholded step 16x3x64x64   {thresholded_us:8.1f} us")
    launcher = per_call_us(lambda: ops.launch_ddim_step(*args, traceable=False), sync)
    print(f"ops.launch_ddim_step          {launcher:8.1f} us")
    print(f"ops.ddim_step (custom op)     {per_call_us(lambda: ops.ddim_step(*args), sync):8.1f} us")
    seed = per_call_us(lambda: torch.randint(0, 2**62, (1,), device="cuda"), sync)
    print(f"torch.randint seed            {seed:8.1f} us")
    print(f"x.add(1) (eager op floor)     {per_call_us(lambda: x.add(1), sync):8.1f} us")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        scheduler.step(x, t, x)
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-only", action="store_true", help="no GPU: time fastddim's Python with no-op kernels")
    host_only() if parser.parse_args().host_only else cuda()
