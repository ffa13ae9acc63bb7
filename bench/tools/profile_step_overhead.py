"""Where the host time of one eager ``fastddim.DDIMScheduler.step`` goes (CUDA only).

Times back-to-back eager steps, the bare Triton launch with and without ``enable_fp_fusion``, and prints the top of a
cProfile of the step. Usage: ``python bench/tools/profile_step_overhead.py``.
"""

import cProfile
import pstats
import time

import torch

import fastddim
from fastddim import ops


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50, device="cuda")
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = scheduler.timesteps[3]
    table = scheduler.coefficient_table("cuda", 0.0)
    args = (x, x, table, t, 0, None, None, None, False, 0, True, 1.0, False, torch.float16)
    print(f"scheduler.step eta=0          {per_call_us(lambda: scheduler.step(x, t, x)):8.1f} us")
    print(f"scheduler.step eta=1 (philox) {per_call_us(lambda: scheduler.step(x, t, x, eta=1.0)):8.1f} us")
    print(f"ops.launch_ddim_step          {per_call_us(lambda: ops.launch_ddim_step(*args)):8.1f} us")
    print(f"ops.ddim_step (custom op)     {per_call_us(lambda: ops.ddim_step(*args)):8.1f} us")
    print(f"torch.randint seed            {per_call_us(lambda: torch.randint(0, 2**62, (1,), device='cuda')):8.1f} us")
    print(f"x.add(1) (eager op floor)     {per_call_us(lambda: x.add(1)):8.1f} us")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        scheduler.step(x, t, x)
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
