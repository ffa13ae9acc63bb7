"""Where the host time of one eager ``fastddim.DDIMScheduler.step`` goes.

Two modes:

- default (CUDA): times back-to-back eager steps, the bare launcher and the custom op, the seed draw and one eager
  torch op for scale, then prints the top of a cProfile of the step.
- ``--host-only`` (any machine, no GPU needed): replaces the Triton kernels by no-ops and times ``step`` on CPU
  tensors through the Triton launch path, so it measures fastddim's own Python (validation, launch plan, output
  allocation, ``DDIMSchedulerOutput``) without Triton's dispatch or the GPU. diffusers' step on a tiny CPU tensor
  is printed next to it for scale.

Usage: ``python bench/tools/profile_step_overhead.py [--host-only]``.
"""

import argparse
import cProfile
import os
import pstats
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
    os.environ["TRITON_INTERPRET"] = "1"  # before fastddim imports its kernels
    os.environ["FASTDDIM_BACKEND"] = "triton"
    import diffusers
    import torch

    import fastddim
    from fastddim import ops

    class NoOpKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    ops._ddim_step_kernel = ops._ddim_step_flat_kernel = NoOpKernel()
    torch.set_num_threads(1)
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    reference = diffusers.DDIMScheduler()
    reference.set_timesteps(50)
    x = torch.randn(1, 4, 64, 64)
    tiny = torch.randn(1, 4, 8, 8)
    t = scheduler.timesteps[3]

    def nothing() -> None:
        return None

    print("fastddim host time per step, kernels replaced by no-ops (CPU tensors, (1, 4, 64, 64)):")
    print(f"  step(x, tensor t, x)                {per_call_us(lambda: scheduler.step(x, t, x), nothing):8.1f} us")
    print(f"  step(x, int t, x)                   {per_call_us(lambda: scheduler.step(x, 901, x), nothing):8.1f} us")
    tuple_step = per_call_us(lambda: scheduler.step(x, t, x, return_dict=False), nothing)
    print(f"  step(..., return_dict=False)        {tuple_step:8.1f} us")
    noise_step = per_call_us(lambda: scheduler.step(x, t, x, eta=1.0, variance_noise=x), nothing)
    print(f"  step(..., eta=1, variance_noise=x)  {noise_step:8.1f} us")
    print("for scale:")
    print(
        f"  diffusers step, (1, 4, 8, 8) CPU    {per_call_us(lambda: reference.step(tiny, t, tiny), nothing):8.1f} us"
    )
    print(f"  tiny.add(1)                         {per_call_us(lambda: tiny.add(1), nothing):8.1f} us")


def cuda() -> None:
    import torch

    import fastddim
    from fastddim import ops

    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50, device="cuda")
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = scheduler.timesteps[3]
    table = scheduler.coefficient_table("cuda", 0.0)
    args = (x, x, table, t, 0, None, None, None, False, 0, True, 1.0, False, torch.float16)
    sync = torch.cuda.synchronize
    print(f"scheduler.step eta=0          {per_call_us(lambda: scheduler.step(x, t, x), sync):8.1f} us")
    print(f"scheduler.step eta=1 (philox) {per_call_us(lambda: scheduler.step(x, t, x, eta=1.0), sync):8.1f} us")
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
