"""Benchmark harness for fastddim: ``fastddim bench`` (or ``python -m fastddim.benchmark``).

Two benchmarks, one run, one output folder:

- **step**: one DDIM update, ``scheduler.step``, at latent and pixel-space shapes, against diffusers (eager, with a
  0-dim device timestep as Stable Diffusion pipelines pass it, and with an int timestep), ``torch.compile`` of
  diffusers' step, fastddim eager, fastddim captured in a CUDA graph, and a device-to-device ``copy_`` of the same
  bytes (the bandwidth ceiling measured in the same run). Every implementation's output is checked against diffusers
  in fp32 before it is timed.
- **loop**: a whole 50-step sampling loop with ``fastddim.DDIMPipeline`` (CUDA graph and eager, and the graph around
  ``torch.compile(unet)`` in Inductor's default mode: ``fastddim-graph-compiled``), ``diffusers.DDIMPipeline`` and
  ``diffusers.DDIMPipeline`` with ``torch.compile(unet, mode="reduce-overhead")``, on a UNet of the
  ``google/ddpm-cifar10-32`` architecture (random weights) and on the embedded digits model.

Usage::

    fastddim bench                          # full matrix on a CUDA GPU (about 5-6 minutes on an H100)
    fastddim bench --out bench-out/h100     # choose the output folder (default: bench-out/)
    fastddim bench --quick                  # small shapes only; on a CPU: torch backend vs diffusers, < 5 minutes
    fastddim bench --only step --no-compile # just the step benchmark, without torch.compile
    fastddim bench --quick --threads 1      # on a loaded/shared CPU, where torch's threads contend
    python -m fastddim.benchmark --quick    # the same without the CLI
    python -m fastddim.benchmark --print-device-slug   # e.g. nvidia-h100-80gb-hbm3, for per-device folders

Outputs in ``--out``:

- ``results.json``: ``environment`` (device, driver, CUDA, torch, triton, diffusers and fastddim versions, date),
  ``settings``, ``methodology`` and ``records``; one record per (benchmark, shape/model, dtype, config,
  implementation) with median, p20/p25/p75/p80 and IQR in µs, plus GB/s and % of the copy bandwidth (step),
  images/s, ms/step, capture time and peak memory (loop), and the speedup over diffusers eager. It is rewritten after
  every record, so an interrupted run keeps what it measured.
- ``results.md``: the same as markdown tables (also printed to stdout); on CUDA, then the issues' performance
  targets as met or not by this run (``targets`` in ``results.json``; ``--targets RESULTS_JSON`` prints them for an
  earlier run).
- ``step_us_vs_size.png``, ``step_latency_vs_size.png``, ``loop_images_per_s.png`` (matplotlib, Agg backend).

Timing (see ``methodology`` in ``results.json``):

- GPU step, ``median_us``: CUDA events around each call with the L2 cache flushed before it (a 256 MB buffer is
  zeroed outside the timed region), as ``triton.testing.do_bench`` does: device time, the basis of GB/s.
  ``latency_us``: host wall time of many back-to-back calls with one synchronize at the end, per call: what a Python
  loop feels, launch overhead and host syncs included. ``fastddim-graph`` replays a graph of several captured steps
  (one for tensors >= 2^22 elements) and divides by their number: latency without per-launch overhead.
- CPU: ``time.perf_counter`` around back-to-back calls; ``latency_us`` equals ``median_us``.
- Loop: host wall time of whole pipeline calls with a synchronize after each (1-2 warm-up calls, 3 timed calls).
- ``torch.compile`` cases run last and are skipped once ``--budget-s`` seconds have passed, so the GPU matrix ends in
  bounded time; loops that compile the UNet are run in fp16 only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA_VERSION = 1
NUM_INFERENCE_STEPS = 50
DEFAULT_OUT = "bench-out"
DEFAULT_BUDGET_S = 240.0
FLUSH_BYTES = 256 * 1024 * 1024
GPU_MESSAGE = (
    "GPU figures (Triton kernel, CUDA-graph replay, GB/s against the copy ceiling, whole-loop graphs) need a CUDA GPU: "
    "run `fastddim bench` on one."
)

STEP_IMPLS = ("copy", "diffusers", "diffusers-int", "torch.compile", "fastddim", "fastddim-graph")
LOOP_IMPLS = ("diffusers", "compile-reduce-overhead", "fastddim-eager", "fastddim-graph", "fastddim-graph-compiled")
COMPILE_IMPLS = ("torch.compile", "compile-reduce-overhead", "fastddim-graph-compiled")
# Loop implementations that compile the UNet; run in fp16 only (``Plan.compile_loop_dtypes``) and last.
COMPILED_LOOP_IMPLS = ("compile-reduce-overhead", "fastddim-graph-compiled")
# Loop implementations that replay fastddim's captured loop.
GRAPH_LOOP_IMPLS = ("fastddim-graph", "fastddim-graph-compiled")

# Keys every record carries (None where they do not apply), then the keys specific to each benchmark.
RECORD_KEYS = (
    "benchmark",
    "name",
    "impl",
    "dtype",
    "config",
    "check",
    "error",
    "skipped",
    "timing_method",
    "n_samples",
    "median_us",
    "p20_us",
    "p25_us",
    "p75_us",
    "p80_us",
    "iqr_us",
    "speedup_vs_diffusers",
    "notes",
)
STEP_KEYS = (
    "shape",
    "numel",
    "bytes_per_step",
    "gb_per_s",
    "copy_gb_per_s",
    "pct_of_copy_bw",
    "pct_of_peak_copy_bw",
    "latency_us",
    "latency_speedup_vs_diffusers",
    "compile_s",
    "capture_s",
)
LOOP_KEYS = (
    "model",
    "shape",
    "batch_size",
    "num_inference_steps",
    "images_per_s",
    "ms_per_step",
    "first_call_s",
    "capture_s",
    "peak_mem_mib",
    "scheduler_step_us",
    "scheduler_share",
    "speedup_vs_compile_reduce_overhead",
)

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

# (atol, rtol) against diffusers' step computed in fp32 on the same inputs.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 2e-2)}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ------------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One step-benchmark configuration."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    eta: float = 0.0
    thresholding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        flags = f"eta={self.eta:g}" + (" thresholding" if self.thresholding else "")
        return f"{'x'.join(map(str, self.shape))} {DTYPE_NAMES[self.dtype]} {flags}"


@dataclasses.dataclass(frozen=True)
class LoopCase:
    """One loop-benchmark configuration."""

    model: str
    batch_size: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.model} batch={self.batch_size} {DTYPE_NAMES[self.dtype]}"


@dataclasses.dataclass
class Plan:
    """What one run measures and how hard."""

    step_cases: list[StepCase]
    step_impls: tuple[str, ...]
    loop_cases: list[LoopCase]
    loop_impls: tuple[str, ...]
    num_inference_steps: int = NUM_INFERENCE_STEPS
    # Timing effort: rounds of back-to-back calls, each about target_round_s long (at most max_calls calls).
    rounds: int = 7
    target_round_s: float = 0.02
    max_calls: int = 500
    event_reps: int = 50
    event_warmup: int = 5
    loop_warmup: int = 1
    loop_rounds: int = 3
    compile_loop_dtypes: tuple[torch.dtype, ...] = (torch.float16,)
    budget_s: float = DEFAULT_BUDGET_S


def _fp(shape: tuple[int, ...], dtype: torch.dtype, eta: float = 0.0, thresholding: bool = False) -> StepCase:
    return StepCase(shape, dtype, eta, thresholding)


F16, F32 = torch.float16, torch.float32
GPU_STEP_CASES = [
    _fp((1, 4, 64, 64), F16),
    _fp((1, 4, 64, 64), F16, 1.0),
    _fp((16, 4, 128, 128), F16),
    _fp((16, 4, 128, 128), F16, 1.0),
    _fp((16, 4, 128, 128), F32),
    _fp((16, 4, 128, 128), F32, 1.0),
    # 2^26 elements: 128 MiB per fp16 tensor, far beyond L2, for bandwidth.
    _fp((64, 4, 512, 512), F16),
    _fp((64, 4, 512, 512), F16, 1.0),
    # Dynamic thresholding targets pixel-space models: rows of 12 288 and 196 608 elements, with the plain step at
    # the same shapes to compare against.
    _fp((16, 3, 64, 64), F32, thresholding=True),
    _fp((16, 3, 64, 64), F32),
    _fp((4, 3, 256, 256), F16, thresholding=True),
    _fp((4, 3, 256, 256), F16),
]
GPU_QUICK_STEP_CASES = [_fp((1, 4, 64, 64), F16), _fp((16, 4, 128, 128), F16), _fp((16, 4, 128, 128), F16, 1.0)]
CPU_QUICK_STEP_CASES = [
    _fp((1, 4, 64, 64), F32),
    _fp((1, 4, 64, 64), F32, 1.0),
    _fp((1, 4, 64, 64), F16),
    _fp((16, 4, 128, 128), F32),
    _fp((16, 3, 64, 64), F32, thresholding=True),
]
TINY_STEP_CASES = [
    _fp((2, 4, 16, 16), F32),
    _fp((2, 4, 16, 16), F32, 1.0),
    _fp((2, 3, 16, 16), F32, thresholding=True),
]

GPU_LOOP_CASES = [
    LoopCase(model, batch, dtype) for model in ("cifar10-32", "digits") for dtype in (F16, F32) for batch in (1, 16)
]
GPU_QUICK_LOOP_CASES = [LoopCase("digits", 1, F16), LoopCase("digits", 16, F16)]
# The cifar10-32 UNet takes ~0.1-0.4 s per step on a small CPU: GPU runs only.
CPU_QUICK_LOOP_CASES = [LoopCase("digits", 1, F32), LoopCase("digits", 16, F32)]
TINY_LOOP_CASES = [LoopCase("tiny", 1, F32), LoopCase("tiny", 2, F32)]


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    """The cases and timing effort for the requested mode on this device."""
    cuda = device.type == "cuda"
    compile_ok = not args.no_compile and cuda and not (args.quick or args.tiny)
    step_impls = tuple(
        i for i in STEP_IMPLS if (cuda or i != "fastddim-graph") and (compile_ok or i not in COMPILE_IMPLS)
    )
    loop_impls = tuple(
        i for i in LOOP_IMPLS if (cuda or i not in GRAPH_LOOP_IMPLS) and (compile_ok or i not in COMPILE_IMPLS)
    )
    if args.tiny:
        plan = Plan(TINY_STEP_CASES, step_impls, TINY_LOOP_CASES, loop_impls, num_inference_steps=3)
        plan.rounds, plan.target_round_s, plan.max_calls, plan.event_reps = 3, 0.002, 20, 5
        plan.loop_rounds = 2
    elif args.quick:
        step_cases = GPU_QUICK_STEP_CASES if cuda else CPU_QUICK_STEP_CASES
        loop_cases = GPU_QUICK_LOOP_CASES if cuda else CPU_QUICK_LOOP_CASES
        plan = Plan(step_cases, step_impls, loop_cases, loop_impls)
        plan.rounds = 5
        if not cuda:
            # Eager CPU loops have nothing to capture or compile: the untimed first call is warm-up enough.
            plan.loop_warmup = 0
    else:
        plan = Plan(GPU_STEP_CASES, step_impls, GPU_LOOP_CASES, loop_impls)
    if args.only == "step":
        plan.loop_cases = []
    elif args.only == "loop":
        plan.step_cases = []
    if args.steps is not None:
        plan.num_inference_steps = args.steps
    plan.budget_s = args.budget_s
    return plan


# ------------------------------------------------------------------------------------------------ environment


def device_name(device: torch.device | str | None = None) -> str:
    """A stable device name for keying results: the GPU's marketing name, or ``cpu: <model>``."""
    device = _resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_model()}"


def device_slug(device: torch.device | str | None = None) -> str:
    """``device_name`` as a folder name, e.g. ``nvidia-h100-80gb-hbm3`` (``cpu`` for any CPU)."""
    device = _resolve_device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    with contextlib.suppress(OSError):
        match = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        if match:
            return match.group(1)
    return None


def _git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when the working tree differs from it (as a copied tree can)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # (an optional or broken package must not stop a benchmark run)
        return None


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device, driver and library versions, date: the header of every results file and baseline."""
    device = _resolve_device(device)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_type": device.type,
        "driver_version": None,
        "cuda_version": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "fastddim": _version("fastddim"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "FASTDDIM_BACKEND": os.environ.get("FASTDDIM_BACKEND", "auto"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["driver_version"] = _driver_version()
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
        info["total_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    """Waits for the device (no-op on CPU): host clocks around CUDA work need it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples_us: Sequence[float]) -> dict[str, float | int]:
    """Median, p20/p25/p75/p80 and IQR (p75 - p25) of timing samples in µs."""
    values = np.asarray(samples_us, dtype=np.float64)
    p20, p25, p50, p75, p80 = np.percentile(values, [20, 25, 50, 75, 80])
    return {
        "median_us": float(p50),
        "p20_us": float(p20),
        "p25_us": float(p25),
        "p75_us": float(p75),
        "p80_us": float(p80),
        "iqr_us": float(p75 - p25),
        "n_samples": len(values),
    }


def time_wall(
    fn: Callable[[], object],
    device: torch.device,
    *,
    rounds: int = 7,
    calls_per_round: int | None = None,
    target_round_s: float = 0.02,
    max_calls: int = 500,
) -> list[float]:
    """µs per call from host wall time of back-to-back calls with one synchronize per round (launches and syncs count).

    Without ``calls_per_round``, one call calibrates how many fill ``target_round_s``, so short calls are not
    dominated by the synchronize and long ones stay bounded.
    """
    if calls_per_round is None:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        one = max(time.perf_counter() - start, 1e-7)
        calls_per_round = int(min(max(target_round_s / one, 1), max_calls))
    samples = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls_per_round):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / calls_per_round * 1e6)
    return samples


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def time_cuda_events(
    fn: Callable[[], object], device: torch.device, *, reps: int = 50, warmup: int = 5, flush_l2: bool = True
) -> list[float]:
    """µs per call of device time between CUDA events, the L2 cache flushed before each call (outside the events).

    The same method as ``triton.testing.do_bench``, with a fixed number of repetitions so runs have bounded time.
    """
    if flush_l2 and device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    flush = _flush_buffers.get(device)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends, strict=True):
        if flush_l2:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends, strict=True)]


def capture_graph(fn: Callable[[], Any], device: torch.device, *, unroll: int = 1, warmup: int = 3) -> tuple[Any, Any]:
    """Captures ``unroll`` consecutive calls of ``fn`` in one CUDA graph; returns (graph, last call's output).

    Warm-up runs on a side stream first: Triton compiles and caches (and any lazy device tables) must exist before
    capture, which forbids host syncs.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for _ in range(unroll):
            out = fn()
    torch.cuda.synchronize(device)
    return graph, out


# ------------------------------------------------------------------------------------------------ records


def new_record(benchmark: str, **fields: Any) -> dict[str, Any]:
    """A record with every schema key present (None where it does not apply)."""
    keys = RECORD_KEYS + (STEP_KEYS if benchmark == "step" else LOOP_KEYS)
    record: dict[str, Any] = dict.fromkeys(keys)
    record["benchmark"] = benchmark
    record["notes"] = []
    unknown = set(fields) - set(keys)
    if unknown:
        raise KeyError(f"unknown {benchmark} record keys: {sorted(unknown)}")
    record.update(fields)
    return record


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 500 else text[:497] + "..."


def check_step_output(
    outputs: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    noise_free_reference: torch.Tensor | None = None,
    sigma: float | None = None,
) -> dict[str, Any]:
    """Compares an implementation's (prev_sample, pred_original_sample) with the fp32 reference.

    Elementwise within the dtype's (atol, rtol) of ``TOLERANCES``. When the implementation drew its own noise
    (``noise_free_reference`` and ``sigma`` given: fastddim's in-kernel Philox), prev_sample is checked statistically
    instead: (prev - reference without noise) / sigma must look like N(0, 1).

    Returns:
        `dict`: ``passed`` (bool), ``max_abs_err``, ``atol``, ``rtol``, ``method``, and ``detail`` when it failed.
    """
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float16])
    result: dict[str, Any] = {"passed": True, "max_abs_err": 0.0, "atol": atol, "rtol": rtol, "method": "allclose"}
    pairs = list(zip(outputs, reference, strict=False))
    if noise_free_reference is not None and sigma:
        result["method"] = "allclose x0, N(0,1) test of (prev - mean) / sigma"
        z = (outputs[0].detach().double() - noise_free_reference.double()) / sigma
        mean, std = float(z.mean()), float(z.std())
        tolerance = 0.05 + 5.0 / math.sqrt(max(z.numel(), 1))
        result.update(noise_mean=mean, noise_std=std)
        if not (math.isfinite(mean) and abs(mean) < tolerance and abs(std - 1.0) < tolerance):
            result.update(passed=False, detail=f"noise mean {mean:.4f} std {std:.4f} (tolerance {tolerance:.3f})")
        pairs = pairs[1:]
    if len(outputs) < len(reference):
        return {**result, "passed": False, "detail": f"expected {len(reference)} outputs, got {len(outputs)}"}
    for index, (out, ref) in enumerate(pairs):
        if tuple(out.shape) != tuple(ref.shape):
            return {**result, "passed": False, "detail": f"output shape {tuple(out.shape)} != {tuple(ref.shape)}"}
        out32, ref32 = out.detach().float(), ref.detach().float()
        diff = (out32 - ref32).abs()
        # NaN where the reference is finite fails; NaN in both (a diverged reference) does not.
        bad = ~(diff <= atol + rtol * ref32.abs()) & ~(out32.isnan() & ref32.isnan())
        finite = diff[diff.isfinite()]
        result["max_abs_err"] = max(result["max_abs_err"], float(finite.max()) if finite.numel() else 0.0)
        if bool(bad.any()):
            result.update(passed=False, detail=f"output {index}: {int(bad.sum())} of {bad.numel()} elements off")
    return result


# ------------------------------------------------------------------------------------------------ step benchmark


@dataclasses.dataclass
class StepInputs:
    """Inputs shared by all implementations of one step case."""

    case: StepCase
    device: torch.device
    config: dict[str, Any]
    num_inference_steps: int
    timestep: int
    timestep_tensor: torch.Tensor
    model_output: torch.Tensor
    sample: torch.Tensor
    noise: torch.Tensor | None


@dataclasses.dataclass
class Prepared:
    """A ready-to-time implementation: ``fn`` runs one step (or graph replay); ``outputs`` reads its results."""

    fn: Callable[[], Any]
    outputs: Callable[[], Sequence[torch.Tensor]]
    noise_source: str | None = None
    reads_noise: bool = False
    unroll: int = 1
    compile_s: float | None = None
    capture_s: float | None = None
    in_kernel_noise: bool = False


def step_config(case: StepCase) -> dict[str, Any]:
    """The scheduler config of a case: diffusers' defaults, or Imagen-style thresholding for pixel-space cases."""
    if case.thresholding:
        return {"thresholding": True, "clip_sample": False}
    return {}


def make_step_inputs(
    case: StepCase, device: torch.device, num_inference_steps: int = NUM_INFERENCE_STEPS
) -> StepInputs:
    """Realistic (non-zero, N(0, 1)) inputs at a mid-schedule timestep, seeded."""
    import diffusers

    config = step_config(case)
    scheduler = diffusers.DDIMScheduler(**config)
    scheduler.set_timesteps(num_inference_steps)
    timestep = int(scheduler.timesteps[len(scheduler.timesteps) // 2])
    generator = torch.Generator(device="cpu").manual_seed(0)
    # Drawn in fp32 on the CPU then moved: same values on every device.
    model_output = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    sample = (torch.randn(case.shape, generator=generator) * 1.5).to(device, case.dtype)
    noise = torch.randn(case.shape, generator=generator).to(device, case.dtype) if case.eta > 0 else None
    return StepInputs(
        case=case,
        device=device,
        config=config,
        num_inference_steps=num_inference_steps,
        timestep=timestep,
        timestep_tensor=torch.tensor(timestep, device=device),
        model_output=model_output,
        sample=sample,
        noise=noise,
    )


def _diffusers_scheduler(inputs: StepInputs) -> Any:
    import diffusers

    scheduler = diffusers.DDIMScheduler(**inputs.config)
    scheduler.set_timesteps(inputs.num_inference_steps)
    return scheduler


def reference_step(inputs: StepInputs, *, with_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' step in fp32 on the inputs' device, with the pre-drawn noise (or none)."""
    scheduler = _diffusers_scheduler(inputs)
    noise = None
    if inputs.case.eta > 0:
        noise = inputs.noise.float() if with_noise else torch.zeros_like(inputs.sample, dtype=torch.float32)
    prev, x0 = scheduler.step(
        inputs.model_output.float(),
        inputs.timestep,
        inputs.sample.float(),
        eta=inputs.case.eta,
        variance_noise=noise,
        return_dict=False,
    )
    return prev, x0


def _step_sigma(inputs: StepInputs) -> float:
    scheduler = _diffusers_scheduler(inputs)
    prev_timestep = inputs.timestep - scheduler.config.num_train_timesteps // inputs.num_inference_steps
    return float(inputs.case.eta * scheduler._get_variance(inputs.timestep, prev_timestep) ** 0.5)


def verify_step(
    inputs: StepInputs, outputs: Sequence[torch.Tensor], *, in_kernel_noise: bool = False
) -> dict[str, Any]:
    """`check_step_output` of an implementation's outputs against `reference_step` on the same inputs."""
    kwargs: dict[str, Any] = {}
    if in_kernel_noise:
        kwargs = {"noise_free_reference": reference_step(inputs, with_noise=False)[0], "sigma": _step_sigma(inputs)}
    return check_step_output(list(outputs), reference_step(inputs), inputs.case.dtype, **kwargs)


def _noise_kwargs(inputs: StepInputs) -> dict[str, Any]:
    return {"variance_noise": inputs.noise} if inputs.case.eta > 0 else {}


PREDRAWN = "pre-drawn variance_noise (read by the step, RNG not timed)"


def _prepare_copy(inputs: StepInputs) -> Prepared:
    # Same bytes as the step's minimum traffic: read 2 x numel, write 2 x numel.
    src = torch.randn(2 * inputs.case.numel, device=inputs.device).to(inputs.case.dtype)
    dst = torch.empty_like(src)
    return Prepared(fn=lambda: dst.copy_(src), outputs=lambda: (dst, src))


def diffusers_step_fn(inputs: StepInputs, *, int_timestep: bool = False) -> Callable[[], Any]:
    """diffusers' eager step on the inputs, with a 0-dim device timestep (or an int) and pre-drawn noise."""
    scheduler = _diffusers_scheduler(inputs)
    timestep = inputs.timestep if int_timestep else inputs.timestep_tensor
    kwargs = _noise_kwargs(inputs)

    def fn() -> Any:
        return scheduler.step(
            inputs.model_output, timestep, inputs.sample, eta=inputs.case.eta, return_dict=False, **kwargs
        )

    return fn


def _prepare_diffusers(inputs: StepInputs, *, int_timestep: bool) -> Prepared:
    step = diffusers_step_fn(inputs, int_timestep=int_timestep)
    out: list[Any] = [None]

    def fn() -> Any:
        out[0] = step()
        return out[0]

    reads_noise = inputs.case.eta > 0
    return Prepared(
        fn=fn, outputs=lambda: out[0], noise_source=PREDRAWN if reads_noise else None, reads_noise=reads_noise
    )


def _raise_dynamo_limits() -> None:
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def _prepare_compile(inputs: StepInputs) -> Prepared:
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    _raise_dynamo_limits()
    scheduler = _diffusers_scheduler(inputs)
    timestep, eta = inputs.timestep, inputs.case.eta
    noise = inputs.noise

    # An int timestep: Dynamo specialises it to a constant, so the step compiles once per case (a tensor timestep
    # graph-breaks four times and recompiles per value).
    def step(model_output: torch.Tensor, sample: torch.Tensor, variance_noise: torch.Tensor | None) -> Any:
        return scheduler.step(
            model_output, timestep, sample, eta=eta, variance_noise=variance_noise, return_dict=False
        )

    compiled = torch.compile(step)
    out: list[Any] = [None]

    def fn() -> Any:
        out[0] = compiled(inputs.model_output, inputs.sample, noise)
        return out[0]

    sync(inputs.device)
    start = time.perf_counter()
    # Inductor's own static CUDA launcher failed every launch of this step's kernel ("CUDA driver error: invalid
    # argument") on the H100 image (torch 2.11, Triton 3.6), with or without fastddim imported, while the UNet
    # compiles launch fine; Triton's launcher is the documented fallback (pytorch/pytorch#152639). Kernels get their
    # launcher when compiled, i.e. in this first call. (Not yet confirmed on a GPU.)
    with torch._inductor.config.patch(use_static_cuda_launcher=False):
        fn()
    sync(inputs.device)
    compile_s = time.perf_counter() - start
    return Prepared(
        fn=fn,
        outputs=lambda: out[0],
        noise_source=PREDRAWN if noise is not None else None,
        reads_noise=noise is not None,
        compile_s=compile_s,
    )


def _fastddim_scheduler(inputs: StepInputs) -> Any:
    import fastddim

    scheduler = fastddim.DDIMScheduler(**inputs.config)
    scheduler.set_timesteps(inputs.num_inference_steps, device=inputs.device)
    return scheduler


def fastddim_step_fn(inputs: StepInputs) -> tuple[Callable[[], Any], bool]:
    """fastddim's step with a device timestep; returns (fn, whether noise is drawn in the kernel)."""
    scheduler = _fastddim_scheduler(inputs)
    # On CUDA, eta > 0 draws the noise in the kernel (the point of fusing it); the CPU torch backend would call
    # torch.randn inside the step, so there it gets diffusers' pre-drawn noise for a like-for-like comparison.
    in_kernel = inputs.case.eta > 0 and inputs.device.type == "cuda"
    kwargs = {} if in_kernel else _noise_kwargs(inputs)
    timestep = inputs.timestep_tensor

    def fn() -> Any:
        return scheduler.step(
            inputs.model_output, timestep, inputs.sample, eta=inputs.case.eta, return_dict=False, **kwargs
        )

    return fn, in_kernel


def _prepare_fastddim(inputs: StepInputs) -> Prepared:
    step, in_kernel = fastddim_step_fn(inputs)
    out: list[Any] = [None]

    def fn() -> Any:
        out[0] = step()
        return out[0]

    return Prepared(
        fn=fn,
        outputs=lambda: out[0],
        noise_source=_fastddim_noise_source(inputs, in_kernel),
        reads_noise=inputs.case.eta > 0 and not in_kernel,
        in_kernel_noise=in_kernel,
    )


def _fastddim_noise_source(inputs: StepInputs, in_kernel: bool) -> str | None:
    if inputs.case.eta == 0:
        return None
    return "in-kernel Philox (timed, no noise tensor read)" if in_kernel else PREDRAWN


def graph_unroll(numel: int) -> int:
    """Steps per captured graph: several for small tensors, so replay overhead is amortised; one for big ones."""
    return 10 if numel < 1 << 22 else 1


def _prepare_fastddim_graph(inputs: StepInputs) -> Prepared:
    step, in_kernel = fastddim_step_fn(inputs)
    unroll = graph_unroll(inputs.case.numel)
    start = time.perf_counter()
    graph, out = capture_graph(step, inputs.device, unroll=unroll)
    capture_s = time.perf_counter() - start
    return Prepared(
        capture_s=capture_s,
        fn=graph.replay,
        outputs=lambda: out,
        noise_source=_fastddim_noise_source(inputs, in_kernel),
        reads_noise=inputs.case.eta > 0 and not in_kernel,
        unroll=unroll,
        in_kernel_noise=in_kernel,
    )


STEP_BUILDERS: dict[str, Callable[[StepInputs], Prepared]] = {
    "copy": _prepare_copy,
    "diffusers": lambda inputs: _prepare_diffusers(inputs, int_timestep=False),
    "diffusers-int": lambda inputs: _prepare_diffusers(inputs, int_timestep=True),
    "torch.compile": _prepare_compile,
    "fastddim": _prepare_fastddim,
    "fastddim-graph": _prepare_fastddim_graph,
}
TIMESTEP_KINDS = {
    "diffusers": "0-dim device tensor (as SD pipelines pass it; host syncs on CUDA)",
    "diffusers-int": "Python int",
    "torch.compile": "Python int (constant in the compiled graph)",
    "fastddim": "0-dim device tensor",
    "fastddim-graph": "0-dim device tensor",
}


def bytes_per_step(case: StepCase, reads_noise: bool) -> int:
    """Minimum traffic of one step: read model_output and sample (and noise), write prev_sample and x_0."""
    itemsize = torch.empty((), dtype=case.dtype).element_size()
    return (4 + int(reads_noise)) * case.numel * itemsize


def run_step_impl(
    inputs: StepInputs, impl: str, plan: Plan, builder: Callable[[StepInputs], Prepared] | None = None
) -> dict:
    """Checks, then times, one implementation on one case; failures become the record's ``error``."""
    case, device = inputs.case, inputs.device
    record = new_record(
        "step",
        name=f"step/{case.label}/{impl}",
        impl=impl,
        shape=list(case.shape),
        numel=case.numel,
        dtype=DTYPE_NAMES[case.dtype],
        config={
            "eta": case.eta,
            "thresholding": case.thresholding,
            "scheduler_config": inputs.config,
            "num_inference_steps": inputs.num_inference_steps,
            "timestep": inputs.timestep,
            "timestep_kind": TIMESTEP_KINDS.get(impl),
            "noise": None,
        },
    )
    builder = builder or STEP_BUILDERS[impl]
    try:
        prepared = builder(inputs)
        record["compile_s"] = prepared.compile_s
        record["capture_s"] = prepared.capture_s
        record["config"]["noise"] = prepared.noise_source
        prepared.fn()
        sync(device)
        if impl == "copy":
            dst, src = prepared.outputs()
            record["check"] = {"passed": bool(torch.equal(dst, src)), "method": "equal"}
            record["bytes_per_step"] = 4 * case.numel * src.element_size()
        else:
            record["check"] = verify_step(inputs, prepared.outputs(), in_kernel_noise=prepared.in_kernel_noise)
            record["bytes_per_step"] = bytes_per_step(case, prepared.reads_noise)
        _time_step(prepared, record, device, plan)
        if impl == "fastddim-graph":
            record["notes"].append(f"graph of {prepared.unroll} captured step(s); figures are per step")
    except Exception as exc:  # (one failing implementation must not end the run)
        record["error"] = _error_text(exc)
        _free_memory(device)
    return record


def _time_step(prepared: Prepared, record: dict, device: torch.device, plan: Plan) -> None:
    unroll = prepared.unroll
    wall = time_wall(
        prepared.fn,
        device,
        rounds=plan.rounds,
        target_round_s=plan.target_round_s,
        max_calls=max(1, plan.max_calls // unroll),
    )
    wall = [sample / unroll for sample in wall]
    record["latency_us"] = summarize(wall)["median_us"]
    if device.type == "cuda":
        samples = time_cuda_events(prepared.fn, device, reps=plan.event_reps, warmup=plan.event_warmup)
        record.update(summarize([sample / unroll for sample in samples]))
        record["timing_method"] = "cuda-events, L2 flushed before each call; latency_us: host wall, back-to-back"
    else:
        record.update(summarize(wall))
        record["timing_method"] = "host wall (perf_counter), back-to-back calls"
    if record["bytes_per_step"] and record["median_us"]:
        record["gb_per_s"] = record["bytes_per_step"] / (record["median_us"] * 1e-6) / 1e9


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def finalize_step_records(records: list[dict]) -> None:
    """Fills copy-bandwidth percentages and speedups over diffusers eager (same shape, dtype, config)."""
    steps = [r for r in records if r["benchmark"] == "step" and r["median_us"]]
    copies = {(tuple(r["shape"]), r["dtype"]): r for r in steps if r["impl"] == "copy"}
    peak = max((r["gb_per_s"] for r in copies.values() if r["gb_per_s"]), default=None)
    baselines = {_step_key(r): r for r in steps if r["impl"] == "diffusers"}
    for record in steps:
        copy_record = copies.get((tuple(record["shape"]), record["dtype"]))
        if copy_record and copy_record["gb_per_s"] and record["gb_per_s"]:
            record["copy_gb_per_s"] = copy_record["gb_per_s"]
            record["pct_of_copy_bw"] = 100.0 * record["gb_per_s"] / copy_record["gb_per_s"]
        if peak and record["gb_per_s"]:
            record["pct_of_peak_copy_bw"] = 100.0 * record["gb_per_s"] / peak
        base = baselines.get(_step_key(record))
        if base and record["impl"] != "copy":
            record["speedup_vs_diffusers"] = base["median_us"] / record["median_us"]
            if base["latency_us"] and record["latency_us"]:
                record["latency_speedup_vs_diffusers"] = base["latency_us"] / record["latency_us"]


def _step_key(record: dict) -> tuple:
    return (tuple(record["shape"]), record["dtype"], record["config"]["eta"], record["config"]["thresholding"])


# ------------------------------------------------------------------------------------------------ loop benchmark


def _fastddim_pipeline_class() -> tuple[type | None, str | None]:
    """``fastddim.DDIMPipeline`` or (None, why not): it is imported lazily so the step benchmark never depends on it."""
    try:
        from fastddim.pipeline import DDIMPipeline
    except Exception as exc:  # (missing or broken module: skip its cases with the reason)
        return None, f"fastddim.DDIMPipeline is not available ({_error_text(exc)})"
    return DDIMPipeline, None


_unet_cache: dict[str, tuple[Any, dict[str, Any], str]] = {}


def load_unet(model: str) -> tuple[Any, dict[str, Any], str]:
    """(fp32 CPU UNet2DModel, scheduler config, weights description) for a loop-benchmark model name."""
    if model in _unet_cache:
        return _unet_cache[model]
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
    _unet_cache[model] = (unet, scheduler_config, weights)
    return _unet_cache[model]


def _sample_shape(unet: Any, batch_size: int) -> tuple[int, ...]:
    size = unet.config.sample_size
    spatial = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, unet.config.in_channels, *spatial)


def build_loop(impl: str, unet: Any, scheduler_config: dict[str, Any]) -> Callable[..., Any]:
    """A callable ``(batch_size, num_inference_steps) -> images`` for one loop implementation.

    Raises:
        SkipCase: the implementation is not available here (``fastddim.DDIMPipeline`` missing).
    """
    import diffusers

    if impl in ("diffusers", "compile-reduce-overhead"):
        if impl == "compile-reduce-overhead":
            import torch._dynamo

            torch._dynamo.reset()
            _raise_dynamo_limits()
            unet = torch.compile(unet, mode="reduce-overhead", dynamic=False)
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        return lambda batch_size, steps: pipe(batch_size=batch_size, num_inference_steps=steps, output_type="pt")

    import fastddim

    pipeline_class, why = _fastddim_pipeline_class()
    if pipeline_class is None:
        raise SkipCase(why)
    if impl == "fastddim-graph-compiled":
        # Inductor's fused UNet kernels (default mode: no CUDA graphs of its own) inside fastddim's captured loop.
        import torch._dynamo

        torch._dynamo.reset()
        _raise_dynamo_limits()
        unet = torch.compile(unet, dynamic=False)
    pipe = pipeline_class(unet, fastddim.DDIMScheduler.from_config(scheduler_config))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    cuda_graph = impl in GRAPH_LOOP_IMPLS
    return lambda batch_size, steps: pipe(
        batch_size=batch_size, num_inference_steps=steps, output_type="pt", cuda_graph=cuda_graph
    )


class SkipCase(Exception):
    """A case that cannot run here (a missing optional component); recorded as skipped, not as an error."""


_sched_step_cache: dict[tuple, float] = {}


def scheduler_step_us(
    kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, plan: Plan
) -> float:
    """µs of one scheduler step alone, the way a loop implementation runs it (for the scheduler's share of a loop)."""
    key = (kind, shape, dtype, device)
    if key not in _sched_step_cache:
        inputs = make_step_inputs(StepCase(shape, dtype), device, plan.num_inference_steps)
        unroll = 1
        if kind == "fastddim-graph":
            unroll = graph_unroll(math.prod(shape))
            fn = capture_graph(fastddim_step_fn(inputs)[0], device, unroll=unroll)[0].replay
        elif kind == "fastddim-eager":
            fn = fastddim_step_fn(inputs)[0]
        else:
            # diffusers' DDIMPipeline passes its CPU timesteps: 0-dim CPU tensors.
            scheduler = _diffusers_scheduler(inputs)
            timestep = torch.tensor(inputs.timestep)

            def fn() -> Any:
                return scheduler.step(inputs.model_output, timestep, inputs.sample, return_dict=False)

        fn()
        samples = time_wall(
            fn, device, rounds=plan.rounds, target_round_s=plan.target_round_s, max_calls=plan.max_calls
        )
        _sched_step_cache[key] = summarize(samples)["median_us"] / unroll
    return _sched_step_cache[key]


def run_loop_impl(case: LoopCase, impl: str, device: torch.device, plan: Plan) -> dict:
    """Times whole sampling loops of one implementation on one model/batch/dtype."""
    steps = plan.num_inference_steps
    record = new_record(
        "loop",
        name=f"loop/{case.label}/{impl}",
        impl=impl,
        model=case.model,
        batch_size=case.batch_size,
        dtype=DTYPE_NAMES[case.dtype],
        num_inference_steps=steps,
        config={"eta": 0.0, "thresholding": False, "generator": None},
    )
    pipe = None
    try:
        base_unet, scheduler_config, weights = load_unet(case.model)
        record["config"]["weights"] = weights
        record["config"]["scheduler_config"] = scheduler_config
        record["shape"] = list(_sample_shape(base_unet, case.batch_size))
        # nn.Module.to: ModelMixin.to warns about fp32-pinned modules even when there are none.
        unet = torch.nn.Module.to(copy.deepcopy(base_unet), device=device, dtype=case.dtype)
        # The 256 MB L2-flush buffer of the step benchmark would count in the peak memory.
        _flush_buffers.pop(device, None)
        _free_memory(device)
        pipe = build_loop(impl, unet, scheduler_config)
        # After build_loop: torch._dynamo.reset() there may clear the counters.
        skips_before = _cudagraph_skips()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with warnings.catch_warnings(record=True) as caught:
            # fastddim.DDIMPipeline warns and runs eagerly when a capture fails: that must not pass as a graph figure.
            warnings.simplefilter("always", RuntimeWarning)
            sync(device)
            start = time.perf_counter()
            pipe(case.batch_size, steps)
            sync(device)
            first_s = time.perf_counter() - start
            warmup = plan.loop_warmup + (1 if impl in COMPILED_LOOP_IMPLS else 0)
            for _ in range(warmup):
                pipe(case.batch_size, steps)
            samples = []
            for _ in range(plan.loop_rounds):
                sync(device)
                start = time.perf_counter()
                pipe(case.batch_size, steps)
                sync(device)
                samples.append((time.perf_counter() - start) * 1e6)
        fallbacks = [str(w.message) for w in caught if "eager" in str(w.message)]
        if impl in GRAPH_LOOP_IMPLS:
            record["check"] = {"passed": not fallbacks, "method": "no eager fallback warning"}
            if fallbacks:
                record["check"]["detail"] = f"fell back to eager: {fallbacks[0][:200]}"
        record["notes"].extend(str(w.message)[:300] for w in caught[:3])
        if impl == "compile-reduce-overhead" and (skipped := _cudagraph_skips() - skips_before):
            # diffusers' DDIMPipeline hands the UNet CPU timesteps, which CUDAGraph Trees refuse to capture.
            record["notes"].append(f"CUDAGraph Trees skipped cudagraphs {skipped} time(s) (inductor cudagraph_skips)")
        record.update(summarize(samples))
        median_s = record["median_us"] * 1e-6
        record["timing_method"] = "host wall per pipeline call, synchronized"
        record["images_per_s"] = case.batch_size / median_s
        record["ms_per_step"] = median_s * 1e3 / steps
        record["first_call_s"] = first_s
        if impl in GRAPH_LOOP_IMPLS or impl in COMPILED_LOOP_IMPLS:
            record["capture_s"] = first_s - median_s
        if device.type == "cuda":
            record["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        kind = "fastddim-graph" if impl in GRAPH_LOOP_IMPLS else impl if impl == "fastddim-eager" else "diffusers"
        step_us = scheduler_step_us(kind, tuple(record["shape"]), case.dtype, device, plan)
        record["scheduler_step_us"] = step_us
        record["scheduler_share"] = steps * step_us / record["median_us"]
    except SkipCase as skip:
        record["skipped"] = str(skip)
    except Exception as exc:  # (one failing implementation must not end the run)
        record["error"] = _error_text(exc)
    finally:
        del pipe
        _free_memory(device)
    return record


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def finalize_loop_records(records: list[dict]) -> None:
    """Fills speedups over diffusers eager and over compile-reduce-overhead (same model, batch and dtype)."""
    loops = [r for r in records if r["benchmark"] == "loop" and r["median_us"]]
    for baseline_impl, field in (
        ("diffusers", "speedup_vs_diffusers"),
        ("compile-reduce-overhead", "speedup_vs_compile_reduce_overhead"),
    ):
        baselines = {(r["model"], r["batch_size"], r["dtype"]): r for r in loops if r["impl"] == baseline_impl}
        for record in loops:
            base = baselines.get((record["model"], record["batch_size"], record["dtype"]))
            if base:
                record[field] = base["median_us"] / record["median_us"]


# ------------------------------------------------------------------------------------------------ targets


def _timed(records: list[dict], benchmark: str, impls: tuple[str, ...]) -> list[dict]:
    return [r for r in records if r["benchmark"] == benchmark and r["impl"] in impls and r["median_us"]]


def _step_label(record: dict) -> str:
    return f"{'x'.join(map(str, record['shape']))} {record['dtype']} eta {record['config']['eta']:g}"


def _loop_label(record: dict) -> str:
    return f"{record['model']} b{record['batch_size']} {record['dtype']}"


def _check(target: str, values: list[tuple[str, float | None]], passes: Callable[[float], bool], unit: str) -> dict:
    """One target: met when every measured value passes, None when nothing was measured."""
    measured = [(label, value) for label, value in values if value is not None]
    spec = {"%": ".1f", "x": ".2f"}[unit]
    return {
        "target": target,
        "measured": "; ".join(f"{label}: {value:{spec}}{unit}" for label, value in measured) or "not measured",
        "met": all(passes(value) for _, value in measured) if measured else None,
    }


def target_checks(records: list[dict]) -> list[dict]:
    """The scheduler and pipeline issues' performance targets (for an H100/H200), against this run's records.

    Returns one ``{"target", "measured", "met"}`` per target, ``met`` None where the run measured nothing for it. The
    figures are the records' own (speedups and % of copy bandwidth from ``finalize_*_records``); the thresholded
    step is compared with the plain step at the same shape, dtype and eta, both replayed from CUDA graphs.
    """
    steps = _timed(records, "step", ("fastddim", "fastddim-graph"))
    eager = [r for r in steps if r["impl"] == "fastddim" and not r["config"]["thresholding"]]
    latent = [r for r in eager if r["shape"] == [1, 4, 64, 64] and r["dtype"] == "fp16" and r["config"]["eta"] == 0]
    graphed = {
        (tuple(r["shape"]), r["dtype"], r["config"]["eta"], r["config"]["thresholding"]): r
        for r in steps
        if r["impl"] == "fastddim-graph"
    }
    threshold_ratios = [
        (_step_label(record), record["median_us"] / graphed[(shape, dtype, eta, False)]["median_us"])
        for (shape, dtype, eta, thresholding), record in graphed.items()
        if thresholding and (shape, dtype, eta, False) in graphed
    ]
    loops = _timed(records, "loop", GRAPH_LOOP_IMPLS)
    best_vs_compile: dict[str, float] = {}
    for r in loops:
        if r["speedup_vs_compile_reduce_overhead"]:
            label = _loop_label(r)
            best_vs_compile[label] = max(best_vs_compile.get(label, 0.0), r["speedup_vs_compile_reduce_overhead"])
    shares = [r for r in loops if r["scheduler_share"] is not None]
    worst_share = max(shares, key=lambda r: r["scheduler_share"], default=None)
    return [
        _check(
            "step: >= 90 % of copy bandwidth at >= 2^26 elements",
            [(_step_label(r), r["pct_of_copy_bw"]) for r in eager if r["numel"] >= 1 << 26],
            lambda pct: pct >= 90,
            "%",
        ),
        _check(
            "step at 1x4x64x64 fp16: >= 10x diffusers eager, device time",
            [("fastddim", r["speedup_vs_diffusers"]) for r in latent],
            lambda speedup: speedup >= 10,
            "x",
        ),
        _check(
            "step at 1x4x64x64 fp16: >= 10x diffusers eager, latency",
            [("fastddim", r["latency_speedup_vs_diffusers"]) for r in latent],
            lambda speedup: speedup >= 10,
            "x",
        ),
        _check(
            "thresholded step: <= 2x a plain step (CUDA graph, device time)",
            threshold_ratios,
            lambda ratio: ratio <= 2,
            "x",
        ),
        _check(
            "loop at batch 1: >= 5x diffusers' DDIMPipeline (fastddim-graph)",
            [
                (_loop_label(r), r["speedup_vs_diffusers"])
                for r in loops
                if r["impl"] == "fastddim-graph" and r["batch_size"] == 1
            ],
            lambda speedup: speedup >= 5,
            "x",
        ),
        _check(
            "loop: >= 1.3x torch.compile reduce-overhead (best fastddim graph)",
            list(best_vs_compile.items()),
            lambda speedup: speedup >= 1.3,
            "x",
        ),
        _check(
            "loop: scheduler share <= 3 % (largest, fastddim graphs)",
            []
            if worst_share is None
            else [(f"{_loop_label(worst_share)} {worst_share['impl']}", 100 * worst_share["scheduler_share"])],
            lambda pct: pct <= 3,
            "%",
        ),
    ]


def targets_table(records: list[dict]) -> str:
    """The targets of ``target_checks`` as a markdown section."""
    lines = ["## Targets (H100/H200)", "", "| target | measured | met |", "|---|---|---|"]
    for check in target_checks(records):
        met = {True: "yes", False: "**no**", None: "–"}[check["met"]]
        lines.append(f"| {check['target']} | {check['measured']} | {met} |")
    return "\n".join(lines + [""])


# ------------------------------------------------------------------------------------------------ reports


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def _status(record: dict) -> str:
    if record["skipped"]:
        text = f"skipped: {record['skipped'][:80]}"
    elif record["error"]:
        text = f"error: {record['error'][:80]}"
    elif record["check"] is None:
        text = "ok"
    else:
        text = "pass" if record["check"].get("passed") else f"FAIL ({record['check'].get('detail', '')})"
    # Error texts may hold pipes or newlines, which would break the markdown table.
    return text.replace("|", "/").replace("\n", " ")


def _with_range(record: dict, spec: str, scale: float = 1.0) -> str:
    """``median (p20–p80)`` scaled, or a dash when nothing was measured."""
    if record["median_us"] is None:
        return "–"
    median, p20, p80 = (record[k] * scale for k in ("median_us", "p20_us", "p80_us"))
    return f"{median:{spec}} ({p20:{spec}}–{p80:{spec}})"


def _sort_key(record: dict, order: tuple[str, ...]) -> int:
    return order.index(record["impl"]) if record["impl"] in order else len(order)


def markdown_tables(results: dict) -> str:
    """results.md: the environment line and one table per benchmark."""
    env = results["environment"]
    lines = [
        "# fastddim benchmark",
        "",
        f"{env['device']} · driver {env.get('driver_version') or '–'} · CUDA {env.get('cuda_version') or '–'} · "
        f"torch {env['torch']} · triton {env['triton']} · diffusers {env['diffusers']} · fastddim {env['fastddim']} · "
        f"{env['date']}",
        "",
    ]
    if env["device_type"] != "cuda":
        lines += [f"> {GPU_MESSAGE}", ""]
    records = results["records"]
    steps = [r for r in records if r["benchmark"] == "step"]
    if steps:
        lines += [
            "## Step (one `scheduler.step`)",
            "",
            "median µs: CUDA events with a flushed L2 on GPU (device time), host wall on CPU; latency µs: host wall per "
            "call, back-to-back. GB/s counts model_output + sample (+ noise) read and prev_sample + x_0 written.",
            "",
            "| shape | dtype | eta | thr | impl | check | median µs (p20–p80) | latency µs | GB/s | % copy | "
            "speedup | latency speedup |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = {key: i for i, key in enumerate(dict.fromkeys(_step_key(r) for r in steps))}
        for r in sorted(steps, key=lambda r: (order[_step_key(r)], _sort_key(r, STEP_IMPLS))):
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['config']['eta']:g} | "
                f"{'on' if r['config']['thresholding'] else 'off'} | {r['impl']} | {_status(r)} | "
                f"{_with_range(r, '.2f')} | "
                f"{_fmt(r['latency_us'], '.2f')} | {_fmt(r['gb_per_s'], '.1f')} | {_fmt(r['pct_of_copy_bw'], '.0f', '%')} | "
                f"{_fmt(r['speedup_vs_diffusers'], '.2f', '×')} | {_fmt(r['latency_speedup_vs_diffusers'], '.2f', '×')} |"
            )
        lines.append("")
    loops = [r for r in records if r["benchmark"] == "loop"]
    if loops:
        lines += [
            "## Loop (whole sampling loop)",
            "",
            "Host wall per pipeline call; capture s = first call minus a warm call; sched share = steps × one "
            "scheduler step alone / loop time.",
            "",
            "| model | batch | dtype | impl | status | images/s | ms/step | call ms (p20–p80) | capture s | "
            "peak MiB | sched share | speedup | vs reduce-overhead |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = {
            key: i for i, key in enumerate(dict.fromkeys((r["model"], r["dtype"], r["batch_size"]) for r in loops))
        }
        for r in sorted(
            loops, key=lambda r: (order[(r["model"], r["dtype"], r["batch_size"])], _sort_key(r, LOOP_IMPLS))
        ):
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['dtype']} | {r['impl']} | {_status(r)} | "
                f"{_fmt(r['images_per_s'], '.1f')} | {_fmt(r['ms_per_step'], '.3f')} | "
                f"{_with_range(r, '.1f', 1e-3)} | {_fmt(r['capture_s'], '.2f')} | "
                f"{_fmt(r['peak_mem_mib'], '.0f')} | {_fmt(None if r['scheduler_share'] is None else 100 * r['scheduler_share'], '.1f', '%')} | "
                f"{_fmt(r['speedup_vs_diffusers'], '.2f', '×')} | "
                f"{_fmt(r['speedup_vs_compile_reduce_overhead'], '.2f', '×')} |"
            )
        lines.append("")
    if env["device_type"] == "cuda":
        lines.append(targets_table(records))
    return "\n".join(lines)


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """PNG plots: step µs (and latency) vs tensor size per implementation; loop images/s vs batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["records"]
    written = []
    steps = [
        r
        for r in records
        if r["benchmark"] == "step" and r["median_us"] and r["config"]["eta"] == 0 and not r["config"]["thresholding"]
    ]
    for field, filename, ylabel in (
        ("median_us", "step_us_vs_size.png", "µs per step (device time on GPU)"),
        ("latency_us", "step_latency_vs_size.png", "µs per step (host wall, back-to-back)"),
    ):
        dtypes = sorted({r["dtype"] for r in steps}) or ["none"]
        fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes, strict=True):
            for color, impl in enumerate(STEP_IMPLS):
                points = sorted(
                    (r["numel"], r[field]) for r in steps if r["dtype"] == dtype and r["impl"] == impl and r[field]
                )
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=impl, color=f"C{color}")
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="elements per tensor",
                ylabel=ylabel,
                title=f"DDIM step, {dtype}, eta=0",
            )
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(results["environment"]["device"])
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        written.append(out_dir / filename)

    loops = [r for r in records if r["benchmark"] == "loop" and r["images_per_s"]]
    panels = sorted({(r["model"], r["dtype"]) for r in loops}) or [("none", "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], panels, strict=True):
        for color, impl in enumerate(LOOP_IMPLS):
            points = sorted(
                (r["batch_size"], r["images_per_s"])
                for r in loops
                if (r["model"], r["dtype"], r["impl"]) == (model, dtype, impl)
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl, color=f"C{color}")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title=f"{model} {dtype}".strip())
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{results['environment']['device']} · {results['settings']['num_inference_steps']}-step loops")
    fig.tight_layout()
    fig.savefig(out_dir / "loop_images_per_s.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "loop_images_per_s.png")
    return written


def _json_default(value: object) -> object:
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES.get(value, str(value))
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return repr(value)


def _finite(value: Any) -> Any:
    """NaN/inf floats become None: strict JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(results: dict, out_dir: Path) -> Path:
    """Writes results.json atomically (a reader never sees a half-written file)."""
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(results), indent=1, default=_json_default, allow_nan=False))
    tmp.replace(path)
    return path


METHODOLOGY = {
    "step_gpu_median": "CUDA events around each call, L2 flushed before each call by zeroing a 256 MB buffer outside "
    "the events (triton.testing.do_bench's method); fixed repetitions after warm-up",
    "step_latency": "host wall time of back-to-back calls with one torch.cuda.synchronize per round, per call",
    "step_graph": "fastddim-graph replays a CUDA graph of N captured steps (N=10 below 2^22 elements, else 1); "
    "figures are per step",
    "step_bytes": "read model_output + sample (+ noise tensor when one is read) and write prev_sample + "
    "pred_original_sample at the I/O dtype; copy moves the same bytes (read 2 x numel, write 2 x numel)",
    "step_noise": "eta > 0: diffusers and torch.compile get variance_noise pre-drawn (RNG not timed, the noise tensor "
    "read counts as traffic); fastddim on CUDA draws noise in the kernel (timed, no noise read); fastddim on CPU gets "
    "the pre-drawn noise",
    "step_check": "before timing, outputs are compared with diffusers' step in fp32 on the same inputs "
    "(fp32 atol=rtol=1e-5, fp16 1e-2); in-kernel noise is checked statistically (N(0,1) residual)",
    "loop": "host wall time per pipeline call with a synchronize after it; warm-up calls first; capture_s = first call "
    "- median call; peak memory = torch.cuda.max_memory_allocated after reset_peak_memory_stats before the first call",
    "scheduler_share": "num_inference_steps x one scheduler step alone (graph replay for fastddim-graph, eager wall "
    "for others; diffusers with a 0-dim CPU timestep as DDIMPipeline passes it) / loop time",
    "speedup_vs_diffusers": "diffusers eager median / this median at the same shape, dtype and config",
}


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmarks(plan: Plan, device: torch.device, out_dir: Path, *, plots: bool = True) -> dict:
    """Runs the plan, writing results.json as it goes; returns the results dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "environment": environment_info(device),
        "settings": {
            "num_inference_steps": plan.num_inference_steps,
            "rounds": plan.rounds,
            "event_reps": plan.event_reps,
            "loop_warmup": plan.loop_warmup,
            "loop_rounds": plan.loop_rounds,
            "step_impls": list(plan.step_impls),
            "loop_impls": list(plan.loop_impls),
            "budget_s": plan.budget_s,
        },
        "methodology": METHODOLOGY,
        "records": [],
    }
    records: list[dict] = results["records"]
    jobs: list[tuple[str, Any, str]] = []
    # Everything but torch.compile first, then compile cases (slow to build) while the time budget lasts.
    for compiled in (False, True):
        seen_copies: set[tuple] = set()
        for case in plan.step_cases:
            for impl in plan.step_impls:
                if (impl in COMPILE_IMPLS) != compiled:
                    continue
                if impl == "copy":
                    if (case.shape, case.dtype) in seen_copies:
                        continue
                    seen_copies.add((case.shape, case.dtype))
                jobs.append(("step", case, impl))
        for case in plan.loop_cases:
            for impl in plan.loop_impls:
                if (impl in COMPILE_IMPLS) != compiled:
                    continue
                if impl in COMPILED_LOOP_IMPLS and case.dtype not in plan.compile_loop_dtypes:
                    continue
                jobs.append(("loop", case, impl))
    if compile_jobs := [j for j in jobs if j[2] in COMPILED_LOOP_IMPLS]:
        # Batch 1 first (the launch-bound case where reduce-overhead matters most), each case's two compiled loops
        # next to each other so that the time budget never leaves one without the other.
        others = [j for j in jobs if j[2] not in COMPILED_LOOP_IMPLS]
        jobs = others + sorted(compile_jobs, key=lambda j: (j[1].batch_size, j[1].model))

    inputs_cache: dict[StepCase, StepInputs] = {}
    with torch.no_grad():
        for index, (benchmark, case, impl) in enumerate(jobs, 1):
            elapsed = time.perf_counter() - started
            label = f"[{index}/{len(jobs)} {elapsed:5.0f}s] {benchmark} {case.label} {impl}"
            if impl in COMPILE_IMPLS and elapsed > plan.budget_s:
                record = new_record(
                    benchmark, name=f"{benchmark}/{case.label}/{impl}", impl=impl, dtype=DTYPE_NAMES[case.dtype]
                )
                _fill_case_fields(record, case, plan)
                record["skipped"] = f"time budget of {plan.budget_s:.0f} s spent (--budget-s)"
                records.append(record)
                _progress(f"{label}: skipped (time budget)")
                continue
            try:
                if benchmark == "step":
                    if case not in inputs_cache:
                        inputs_cache.clear()
                        _free_memory(device)
                        inputs_cache[case] = make_step_inputs(case, device, plan.num_inference_steps)
                    record = run_step_impl(inputs_cache[case], impl, plan)
                else:
                    inputs_cache.clear()
                    record = run_loop_impl(case, impl, device, plan)
            except Exception as exc:  # (e.g. out of memory building a case's inputs: record it, go on)
                record = new_record(
                    benchmark, name=f"{benchmark}/{case.label}/{impl}", impl=impl, dtype=DTYPE_NAMES[case.dtype]
                )
                _fill_case_fields(record, case, plan)
                record["error"] = _error_text(exc)
                _free_memory(device)
            records.append(record)
            _progress(f"{label}: {_progress_figures(record)}")
            write_json(results, out_dir)
    inputs_cache.clear()
    finalize_step_records(records)
    finalize_loop_records(records)
    results["targets"] = target_checks(records)
    results["elapsed_s"] = time.perf_counter() - started
    write_json(results, out_dir)
    (out_dir / "results.md").write_text(markdown_tables(results) + "\n")
    if plots:
        try:
            write_plots(results, out_dir)
        except ImportError as exc:
            _progress(f"plots skipped: {exc} (pip install matplotlib)")
    return results


def _fill_case_fields(record: dict, case: StepCase | LoopCase, plan: Plan) -> None:
    if isinstance(case, StepCase):
        record.update(
            shape=list(case.shape), numel=case.numel, config={"eta": case.eta, "thresholding": case.thresholding}
        )
    else:
        record.update(
            model=case.model,
            batch_size=case.batch_size,
            num_inference_steps=plan.num_inference_steps,
            config={"eta": 0.0, "thresholding": False},
        )


def _progress_figures(record: dict) -> str:
    if record["skipped"] or record["error"]:
        return _status(record)
    if record["benchmark"] == "step":
        return (
            f"{_fmt(record['median_us'], '.2f')} µs, latency {_fmt(record['latency_us'], '.2f')} µs, "
            f"{_fmt(record['gb_per_s'], '.1f')} GB/s, check {_status(record)}"
        )
    return f"{_fmt(record['images_per_s'], '.1f')} images/s, {_fmt(record['ms_per_step'], '.3f')} ms/step"


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``fastddim bench``'s options to ``parser``."""
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT}/)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes only, no torch.compile: minutes on a CPU (torch backend vs diffusers)",
    )
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("all", "step", "loop"), default="all", help="which benchmark to run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile implementations")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"skip torch.compile cases that would start after this many seconds (default: {DEFAULT_BUDGET_S:.0f})",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"inference steps per loop (default: {NUM_INFERENCE_STEPS})"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads; default: torch's choice)"
    )
    parser.add_argument(
        "--print-device-slug",
        action="store_true",
        help="print this device's folder name (e.g. for baselines) and exit",
    )
    parser.add_argument(
        "--targets",
        type=Path,
        metavar="RESULTS_JSON",
        default=None,
        help="print the performance targets as met or not by an existing results.json, and exit",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``fastddim bench``. Returns 0, or 1 when a fastddim implementation failed its correctness check."""
    if args.steps is not None and args.steps <= 0:
        print(f"--steps must be positive, got {args.steps}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads <= 0:
            print(f"--threads must be positive, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.targets is not None:
        try:
            records = json.loads(args.targets.read_text())["records"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"--targets {args.targets}: not a readable results.json ({exc})", file=sys.stderr)
            return 2
        print(targets_table(records))
        return 0
    device = _resolve_device(args.device)
    if args.print_device_slug:
        print(device_slug(device))
        return 0
    if device.type != "cuda":
        _progress(f"Running on {device_name(device)} with the torch backend. {GPU_MESSAGE}")
        if not (args.quick or args.tiny):
            _progress("Without a GPU only --quick is meaningful; running the --quick matrix.")
            args.quick = True
    plan = make_plan(args, device)
    results = run_benchmarks(plan, device, args.out, plots=not args.no_plots)
    print(markdown_tables(results))
    print(f"\nWrote {args.out / 'results.json'}, {args.out / 'results.md'} and plots in {results['elapsed_s']:.0f} s.")
    if device.type != "cuda":
        print(GPU_MESSAGE)
    failed = [
        r["name"]
        for r in results["records"]
        if r["impl"].startswith("fastddim") and r["check"] is not None and not r["check"].get("passed")
    ]
    if failed:
        print(f"Correctness check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastddim.benchmark``."""
    parser = argparse.ArgumentParser(prog="python -m fastddim.benchmark", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
