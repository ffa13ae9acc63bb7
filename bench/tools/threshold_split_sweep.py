"""How the dynamic-thresholding scale kernel's time depends on how its rows are split over programs (CUDA only).

For each case, times the scale kernel alone and the whole thresholded step against a plain fused step, replayed from
CUDA graphs (``triton.testing.do_bench_cudagraph``: device time, no launch overhead), for several values of
``fastddim.threshold.MIN_PROGRAM_SPAN`` (the fewest elements a program gets; "one program per row" disables the
split), each with the later radix passes counting matching keys per key (``PER_KEY_COUNT_SPANS`` 1, the default, or
4) and always by ``tl.histogram`` (0). It is the evidence behind those constants.

Usage: ``python bench/tools/threshold_split_sweep.py``.
"""

import torch
from triton.testing import do_bench_cudagraph

from fastddim import DDIMScheduler, threshold

CASES = [((1, 4, 64, 64), torch.float16), ((16, 3, 64, 64), torch.float32), ((4, 3, 256, 256), torch.float16)]
SPANS = [256, 512, 1024, 2048, 4096, None]
PER_KEY_COUNT_SPANS = [1, 4, 0]


def sweep_case(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    generator = torch.Generator(device).manual_seed(0)
    model_output = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    sample = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    plain = DDIMScheduler()
    thresholded = DDIMScheduler(thresholding=True)
    for scheduler in (plain, thresholded):
        scheduler.set_timesteps(50, device=device)
    timestep = plain.timesteps[10]
    table = thresholded.coefficient_table(device)

    def plain_step() -> None:
        plain.step(model_output, timestep, sample, return_dict=False)

    def thresholded_step() -> None:
        thresholded.step(model_output, timestep, sample, return_dict=False)

    def scale() -> None:
        threshold.launch_dynamic_threshold_scale(
            model_output, sample, table, timestep, 0, 0, 0.995, 1.0, traceable=False
        )

    plain_us = do_bench_cudagraph(plain_step) * 1e3
    label = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    for span in SPANS:
        for per_key_spans in PER_KEY_COUNT_SPANS:
            threshold.MIN_PROGRAM_SPAN = span or 1 << 62
            threshold.PER_KEY_COUNT_SPANS = per_key_spans
            threshold.THRESHOLD_PLANS.clear()
            config = threshold._threshold_launch_config(
                sample[0].numel(), True, shape[0], threshold._max_resident_programs(device)
            )
            scale_us = do_bench_cudagraph(scale) * 1e3
            step_us = do_bench_cudagraph(thresholded_step) * 1e3
            print(
                f"{label:28s} {str(span or 'one/row'):>9s} {config.programs_per_row:>4d} {config.program_span:>6d} "
                f"{config.per_key_count_limit:>8d} {scale_us:8.2f} {step_us:9.2f} {plain_us:7.2f} "
                f"{step_us / plain_us:5.2f}x",
                flush=True,
            )


def main() -> None:
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; µs per call, CUDA-graph replay (device time)")
    print(
        f"{'case':28s} {'min span':>9s} {'C':>4s} {'span':>6s} {'per key':>8s} {'scale':>8s} {'thr step':>9s} "
        f"{'plain':>7s} {'ratio':>6s}"
    )
    for shape, dtype in CASES:
        sweep_case(shape, dtype, device)


if __name__ == "__main__":
    main()
