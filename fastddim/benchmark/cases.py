"""What the harness measures: step and loop cases, the implementation record, and a run's plan.

To add a case, append it to the lists below (``GPU_*`` for the full matrix on a GPU, ``*_QUICK_*`` for ``--quick``,
``TINY_*`` for the harness's own tests). To add an implementation, see `fastddim.benchmark.step` and
`fastddim.benchmark.loop`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

NUM_INFERENCE_STEPS = 50
DEFAULT_BUDGET_S = 240.0
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation a benchmark times, and where it can run.

    Attributes:
        name (`str`): its name in records, tables and ``settings`` (e.g. ``fastddim-graph``).
        build (`Callable`): builds it; the signature is the benchmark's (see ``STEP_IMPLEMENTATIONS`` in
            `fastddim.benchmark.step`, ``LOOP_IMPLEMENTATIONS`` in `fastddim.benchmark.loop`).
        cuda_graph (`bool`): replays a CUDA graph, so runs on CUDA only (and its loop is checked for an eager
            fallback).
        compiles (`bool`): uses ``torch.compile``: left out by ``--no-compile`` and ``--quick``, run after everything
            else while ``--budget-s`` lasts (compiled loops in fp16 only).
        timestep_kind (`str`, *optional*): how a step implementation receives the timestep (recorded in ``config``).
        limit (`bool`): not an implementation but the loop's physical limit (`fastddim.benchmark.limit`): N x the
            UNet's own time per call, measured once per configuration.
        step_kinds (`tuple[str, ...]`, *optional*): the `StepCase` kinds a step implementation runs (None: all).
    """

    name: str
    build: Callable[..., Any]
    cuda_graph: bool = False
    compiles: bool = False
    timestep_kind: str | None = None
    limit: bool = False
    step_kinds: tuple[str, ...] | None = None

    def runs(self, kind: str) -> bool:
        """Whether this implementation runs step cases of ``kind``."""
        return self.step_kinds is None or kind in self.step_kinds


# What one step case times (see `fastddim.benchmark.step_kinds`): the forward step, the inverse step (DDIM inversion),
# the forward step with a (B,) per-sample timestep tensor, and the forward step followed by its backward.
STEP_KINDS = ("step", "inverse", "per-sample", "backward")


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One step-benchmark configuration; ``kind`` is one of `STEP_KINDS` (the inverse, per-sample and backward kinds
    take eta 0, the inverse one no thresholding, which diffusers' inverse scheduler does not have)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    eta: float = 0.0
    thresholding: bool = False
    kind: str = "step"

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"kind must be one of {STEP_KINDS}, got {self.kind!r}")
        if self.kind != "step" and self.eta != 0:
            raise ValueError(f"a {self.kind} step case takes eta 0, got {self.eta}")
        if self.kind == "inverse" and self.thresholding:
            raise ValueError("an inverse step case cannot threshold (diffusers' DDIMInverseScheduler does not)")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        flags = f"eta={self.eta:g}" + (" thresholding" if self.thresholding else "")
        kind = "" if self.kind == "step" else f" {self.kind}"
        return f"{'x'.join(map(str, self.shape))} {DTYPE_NAMES[self.dtype]} {flags}{kind}"


@dataclasses.dataclass(frozen=True)
class LoopCase:
    """One loop-benchmark configuration: a model name known to `fastddim.benchmark.loop.load_unet`; ``thresholding``
    adds Imagen-style dynamic thresholding to the model's scheduler config (pixel-space models)."""

    model: str
    batch_size: int
    dtype: torch.dtype
    thresholding: bool = False

    @property
    def label(self) -> str:
        flags = " thresholding" if self.thresholding else ""
        return f"{self.model} batch={self.batch_size} {DTYPE_NAMES[self.dtype]}{flags}"


@dataclasses.dataclass(frozen=True)
class SDCase:
    """One text-to-image loop configuration: a UNet architecture known to `fastddim.benchmark.sd`, the number of
    images, dtype, steps and guidance scale (classifier-free guidance on when above 1)."""

    model: str
    batch_size: int
    dtype: torch.dtype
    num_inference_steps: int
    guidance_scale: float = 7.5

    @property
    def label(self) -> str:
        return (
            f"{self.model} batch={self.batch_size} {DTYPE_NAMES[self.dtype]} steps={self.num_inference_steps} "
            f"cfg={self.guidance_scale:g}"
        )


@dataclasses.dataclass(frozen=True)
class SeedsCase:
    """One per-seed noise configuration (`fastddim.benchmark.per_seed`): a loop model, batch size, dtype, number of
    steps and eta, sampled in each noise mode."""

    model: str
    batch_size: int
    dtype: torch.dtype
    num_inference_steps: int
    eta: float

    @property
    def label(self) -> str:
        return (
            f"{self.model} batch={self.batch_size} {DTYPE_NAMES[self.dtype]} steps={self.num_inference_steps} "
            f"eta={self.eta:g}"
        )


@dataclasses.dataclass
class Plan:
    """What one run measures and how hard."""

    step_cases: list[StepCase]
    step_impls: tuple[str, ...]
    loop_cases: list[LoopCase]
    loop_impls: tuple[str, ...]
    num_inference_steps: int = NUM_INFERENCE_STEPS
    # Host latency: rounds of back-to-back calls, each about target_round_s long (at most max_calls calls).
    rounds: int = 7
    target_round_s: float = 0.02
    max_calls: int = 500
    # Device time: triton.testing.do_bench's budgets.
    device_warmup_ms: float = 25.0
    device_rep_ms: float = 100.0
    loop_warmup: int = 1
    loop_rounds: int = 3
    compile_loop_dtypes: tuple[torch.dtype, ...] = (torch.float16,)
    budget_s: float = DEFAULT_BUDGET_S
    # Reconstruction (invert, then sample back) of this many real digits, once per number of steps S.
    reconstruction_steps: tuple[int, ...] = ()
    reconstruction_images: int = 256
    # Text-to-image loops (fastddim.benchmark.sd): steps are the cases' own; the first call is the correctness check
    # (and the capture/compile), then sd_warmup more calls (one more for torch.compile cases), then sd_rounds timed.
    sd_cases: list[SDCase] = dataclasses.field(default_factory=list)
    sd_impls: tuple[str, ...] = ()
    sd_warmup: int = 0
    sd_rounds: int = 3
    # Per-seed noise (fastddim.benchmark.per_seed): seeds 0 .. seeds_images - 1 in each noise mode.
    seeds_cases: list[SeedsCase] = dataclasses.field(default_factory=list)
    seeds_modes: tuple[str, ...] = ()
    seeds_images: int = 4096
    # The eager loops of diffusers and fastddim, alternately (fastddim.benchmark.eager): unconditional (LoopCase, the
    # run's num_inference_steps) and text-to-image (SDCase) cases, eager_rounds rounds after one warm-up call each.
    eager_cases: list[LoopCase | SDCase] = dataclasses.field(default_factory=list)
    eager_rounds: int = 10


F16, F32 = torch.float16, torch.float32
GPU_STEP_CASES = [
    StepCase((1, 4, 64, 64), F16),
    StepCase((1, 4, 64, 64), F16, 1.0),
    StepCase((16, 4, 128, 128), F16),
    StepCase((16, 4, 128, 128), F16, 1.0),
    StepCase((16, 4, 128, 128), F32),
    StepCase((16, 4, 128, 128), F32, 1.0),
    # 2^26 elements: 128 MiB per fp16 tensor, far beyond L2, for bandwidth.
    StepCase((64, 4, 512, 512), F16),
    StepCase((64, 4, 512, 512), F16, 1.0),
    # Dynamic thresholding targets pixel-space models: rows of 12 288 and 196 608 elements, with the plain step at
    # the same shapes to compare against.
    StepCase((16, 3, 64, 64), F32, thresholding=True),
    StepCase((16, 3, 64, 64), F32),
    StepCase((4, 3, 256, 256), F16, thresholding=True),
    StepCase((4, 3, 256, 256), F16),
    # The scheduler issue's other steps, against diffusers: the inverse step, per-sample timesteps (diffusers loops
    # over the samples) and forward + backward through autograd, at a latent shape in both dtypes.
    *(
        StepCase(shape, dtype, kind=kind)
        for kind in ("inverse", "per-sample", "backward")
        for shape in ((1, 4, 64, 64), (16, 4, 128, 128))
        for dtype in (F16, F32)
        if kind != "per-sample" or shape[0] > 1
    ),
]
GPU_QUICK_STEP_CASES = [
    StepCase((1, 4, 64, 64), F16),
    StepCase((16, 4, 128, 128), F16),
    StepCase((16, 4, 128, 128), F16, 1.0),
]
CPU_QUICK_STEP_CASES = [
    StepCase((1, 4, 64, 64), F32),
    StepCase((1, 4, 64, 64), F32, 1.0),
    StepCase((1, 4, 64, 64), F16),
    StepCase((16, 4, 128, 128), F32),
    StepCase((16, 3, 64, 64), F32, thresholding=True),
]
TINY_STEP_CASES = [
    StepCase((2, 4, 16, 16), F32),
    StepCase((2, 4, 16, 16), F32, 1.0),
    StepCase((2, 3, 16, 16), F32, thresholding=True),
    StepCase((2, 4, 16, 16), F32, kind="inverse"),
    StepCase((2, 4, 16, 16), F32, kind="per-sample"),
    StepCase((2, 4, 16, 16), F32, kind="backward"),
    StepCase((2, 4, 16, 16), F16, kind="backward"),
]

GPU_LOOP_CASES = [
    LoopCase(model, batch, dtype) for model in ("cifar10-32", "digits") for dtype in (F16, F32) for batch in (1, 16)
] + [
    # The thresholded step inside pixel-space loops, where the scheduler's share of loop time must stay small.
    LoopCase(model, 16, F16, thresholding=True)
    for model in ("cifar10-32", "digits")
]
GPU_QUICK_LOOP_CASES = [LoopCase("digits", 1, F16), LoopCase("digits", 16, F16)]
# The cifar10-32 UNet takes ~0.1-0.4 s per step on a small CPU: GPU runs only.
CPU_QUICK_LOOP_CASES = [LoopCase("digits", 1, F32), LoopCase("digits", 16, F32)]
TINY_LOOP_CASES = [LoopCase("tiny", 1, F32), LoopCase("tiny", 2, F32), LoopCase("tiny", 2, F32, thresholding=True)]

# Text-to-image: the SD1.5 architecture at 30 and 50 steps, batch 1 and 4, fp16 (and fp32 at batch 1, the eager loops'
# reference point); the SDXL architecture at batch 1. Batch 1 first: the launch-bound case.
GPU_SD_CASES = [SDCase("sd15", batch, F16, steps) for batch in (1, 4) for steps in (30, 50)] + [
    SDCase("sdxl", 1, F16, 30),
    SDCase("sd15", 1, F32, 30),
]
GPU_QUICK_SD_CASES = [SDCase("sd15", 1, F16, 30)]
# The SD1.5 UNet takes seconds per call on a small CPU: GPU runs only.
CPU_QUICK_SD_CASES: list[SDCase] = []
TINY_SD_CASES = [SDCase("tiny-sd", 2, F32, 2), SDCase("tiny-sdxl", 1, F32, 2)]

# The eager loops against diffusers', interleaved: batch 1 (host-bound) in both dtypes for both unconditional UNets,
# cifar10-32 at batch 16 in fp32, and the SD1.5 architecture at batch 1. About 2 minutes on an H100.
GPU_EAGER_CASES: list[LoopCase | SDCase] = [
    *(LoopCase(model, 1, dtype) for model in ("cifar10-32", "digits") for dtype in (F16, F32)),
    LoopCase("cifar10-32", 16, F32),
    *(SDCase("sd15", 1, dtype, 30) for dtype in (F16, F32)),
]
GPU_QUICK_EAGER_CASES: list[LoopCase | SDCase] = [LoopCase("digits", 1, F16)]
CPU_QUICK_EAGER_CASES: list[LoopCase | SDCase] = [LoopCase("digits", 1, F32)]
TINY_EAGER_CASES: list[LoopCase | SDCase] = [LoopCase("tiny", 1, F32), SDCase("tiny-sd", 1, F32, 2)]

# Per-seed noise: `fastddim sample --seeds 0-4095` at batch 256 with the CIFAR-10 architecture, fp16, 10 and 50 steps,
# eta 0 and 1 (eta 1 draws noise every step). About 2 minutes on an H100.
GPU_SEEDS_CASES = [SeedsCase("cifar10-32", 256, F16, steps, eta) for steps in (10, 50) for eta in (0.0, 1.0)]
GPU_QUICK_SEEDS_CASES = [SeedsCase("cifar10-32", 256, F16, 10, 1.0)]
# The cifar10-32 UNet at batch 256 takes tens of seconds per step on a small CPU: GPU runs only.
CPU_QUICK_SEEDS_CASES: list[SeedsCase] = []
TINY_SEEDS_CASES = [SeedsCase("tiny", 2, F32, 2, eta) for eta in (0.0, 1.0)]
