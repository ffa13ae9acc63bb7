"""Benchmark harness for fastddim: ``fastddim bench`` (or ``python -m fastddim.benchmark``).

Five benchmarks, one run, one output folder:

- **step** (`fastddim.benchmark.step`): one DDIM update, ``scheduler.step``, at latent and pixel-space shapes, against
  diffusers (eager, with a 0-dim device timestep as Stable Diffusion pipelines pass it, and with an int timestep),
  ``torch.compile`` of diffusers' step, fastddim eager, fastddim captured in a CUDA graph, and a device-to-device
  ``copy_`` of the same bytes (the bandwidth ceiling measured in the same run). Every implementation's output is
  checked against diffusers in fp32 before it is timed. Beside the forward step, the inverse step, the step with
  per-sample timesteps and forward + backward through autograd (`fastddim.benchmark.step_kinds`), fp32 checked bit for
  bit against diffusers.
- **loop** (`fastddim.benchmark.loop`): a whole 50-step sampling loop with ``fastddim.DDIMPipeline`` (CUDA graph and
  eager, and the graph around ``torch.compile(unet)``: ``fastddim-graph-compiled``), ``diffusers.DDIMPipeline`` and
  ``diffusers.DDIMPipeline`` with ``torch.compile(unet, mode="reduce-overhead")``, on a UNet of the
  ``google/ddpm-cifar10-32`` architecture (random weights) and on the embedded digits model; and ``unet-limit``, the
  loop's physical limit (`fastddim.benchmark.limit`: N x one UNet call captured alone, CUDA-event device time), with
  ``vs_limit`` = loop time / limit on every loop record; pixel-space loops with dynamic thresholding too.
- **sd** (`fastddim.benchmark.sd`): text-to-image loops with classifier-free guidance on random-weight UNets of the
  SD1.5 and SDXL architectures (fp16, batch 1 and 4, 30 and 50 steps): diffusers' Stable Diffusion pipelines eager and
  with ``torch.compile(unet, mode="reduce-overhead")``, fastddim's eager, graph and graph-around-compiled-UNet loops,
  and the limit on the CFG batch; every fastddim loop's latents are checked against diffusers eager's first.
- **reconstruction** (`fastddim.benchmark.reconstruction`): DDIM inversion then sampling back on real digits.
- **seeds** (`fastddim.benchmark.per_seed`): images/s of seed-addressed sampling (``DDIMPipeline(seeds=...)``, what
  ``fastddim sample --seeds`` runs, without writing files) against one generator and none, batch 256, CIFAR-10
  architecture, fp16, 10 and 50 steps, eta 0 and 1.

Usage::

    fastddim bench                          # full matrix on a CUDA GPU (about 15 minutes on an H100, 9 of them --only sd)
    fastddim bench --out bench-out/h100     # choose the output folder (default: bench-out/)
    fastddim bench --quick                  # small shapes only; on a CPU: torch backend vs diffusers, < 5 minutes
    fastddim bench --only step --no-compile # just the step benchmark, without torch.compile
    fastddim bench --only sd --sd-cases 'sd15 batch=1'  # text-to-image loops, SD1.5 architecture at batch 1
    fastddim bench --only loop --loop-cases thresholding  # the thresholded pixel-space loops only
    fastddim bench --only seeds             # per-seed noise against one generator
    fastddim bench --quick --threads 1      # on a loaded/shared CPU, where torch's threads contend
    python -m fastddim.benchmark --quick    # the same without the CLI
    python -m fastddim.benchmark --print-device-slug   # e.g. nvidia-h100-80gb-hbm3, for per-device folders

As a CI step: exit status 1 when any case errored or failed its correctness check (a summary line counts ok,
skipped, failed and errored cases; skips, such as ``torch.compile`` cases past ``--budget-s`` or an implementation
unavailable here, are not errors), 2 with one ``error:`` line for an unusable ``--out`` or ``--device``, checked
before any case runs.

Outputs in ``--out``:

- ``results.json``: ``environment`` (device, driver, CUDA, torch, triton, diffusers and fastddim versions, date),
  ``settings``, ``methodology`` and ``records``; one record per (benchmark, shape/model, dtype, config,
  implementation) with median, p20/p25/p75/p80 and IQR in µs, plus GB/s and % of the copy bandwidth (step),
  images/s, ms/step, capture time and peak memory (loop), and the speedup over diffusers eager. It is rewritten after
  every record, so an interrupted run keeps what it measured. The issues' performance targets are read from it by
  ``python bench/targets.py results.json`` (in the repository, not the package).
- ``results.md``: the same as markdown tables (also printed to stdout).
- ``step_us_vs_size.png``, ``step_latency_vs_size.png``, ``loop_images_per_s.png`` (matplotlib, Agg backend).

Timing (`fastddim.timing`; see ``methodology`` in ``results.json``): on CUDA a step's ``median_us`` is device time
from ``triton.testing.do_bench`` (L2 flushed before each call), the basis of GB/s; ``latency_us`` is host wall time
of back-to-back calls, per call. On a CPU both are host wall time. Loops: host wall time of whole synchronized
pipeline calls. ``torch.compile`` cases run last and are skipped once ``--budget-s`` seconds have passed.

Modules: `cases` (cases, implementations, plans), `environment`, `records` (schema, checks, results.json), `step`,
`step_kinds`, `loop`, `limit`, `sd`, `reconstruction`, `per_seed`, `runner` (a run), `report` (results.md, plots), `command` (options, checks, exit status). To add a case,
append it to the lists in `cases`; to add an implementation, register it in ``step.STEP_IMPLEMENTATIONS``,
``loop.LOOP_IMPLEMENTATIONS`` or ``sd.SD_IMPLEMENTATIONS`` (see those modules).
"""

from fastddim.benchmark.command import add_arguments, main, run
from fastddim.benchmark.environment import environment_info
from fastddim.benchmark.runner import make_plan, run_benchmarks

__all__ = ["add_arguments", "environment_info", "main", "make_plan", "run", "run_benchmarks"]
