"""The step benchmark: one DDIM update, ``scheduler.step``, per implementation, checked against diffusers, timed.

Implementations (``STEP_IMPLEMENTATIONS``): a device-to-device ``copy_`` of the same bytes (the bandwidth ceiling
measured in the same run), diffusers eager with a 0-dim device timestep (as Stable Diffusion pipelines pass it) and
with an int, ``torch.compile`` of diffusers' step, fastddim eager, and fastddim replayed from a CUDA graph.

To add an implementation: write a builder ``(StepInputs) -> Prepared`` (``fn`` runs one step, ``outputs`` returns
(prev_sample, pred_original_sample) of the last call) and add an `Implementation` to ``STEP_IMPLEMENTATIONS``; its
outputs are checked against diffusers in fp32 before it is timed. A case's ``kind`` (`StepCase`) selects what is
stepped: the forward step here, the inverse, per-sample-timestep and forward + backward steps in
`fastddim.benchmark.step_kinds` (with their diffusers references); an implementation that runs only some kinds says
so in ``Implementation.step_kinds``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastddim import compat
from fastddim.benchmark import step_kinds
from fastddim.benchmark.cases import DTYPE_NAMES, NUM_INFERENCE_STEPS, Implementation, Plan, StepCase
from fastddim.benchmark.environment import free_memory
from fastddim.benchmark.records import check_step_output, error_text, new_record
from fastddim.benchmark.step_kinds import diffusers_scheduler, fastddim_scheduler
from fastddim.timing import capture_graph, device_time_us, graph_unroll, summarize, sync, time_wall

__all__ = [
    "STEP_IMPLEMENTATIONS",
    "Prepared",
    "StepInputs",
    "diffusers_scheduler",
    "fastddim_scheduler",
    "make_step_inputs",
    "reference_step",
    "run_step_impl",
]


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
    # The per-sample kind's (B,) int64 CPU timesteps; the backward kind's (g_prev, g_x0).
    timesteps: torch.Tensor | None = None
    grad_outputs: tuple[torch.Tensor, torch.Tensor] | None = None


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
    config = step_config(case)
    timestep = step_kinds.mid_timestep(case.kind, config, num_inference_steps)
    generator = torch.Generator(device="cpu").manual_seed(0)
    # Drawn in fp32 on the CPU then moved: same values on every device.
    model_output = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    sample = (torch.randn(case.shape, generator=generator) * 1.5).to(device, case.dtype)
    noise = torch.randn(case.shape, generator=generator).to(device, case.dtype) if case.eta > 0 else None
    timesteps = grad_outputs = None
    if case.kind == "per-sample":
        timesteps = step_kinds.per_sample_timesteps(config, num_inference_steps, case.shape[0])
    if case.kind == "backward":
        grad_outputs = tuple(torch.randn(case.shape, generator=generator).to(device, case.dtype) for _ in range(2))
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
        timesteps=timesteps,
        grad_outputs=grad_outputs,
    )


def reference_step(inputs: StepInputs, *, with_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' step in fp32 on the inputs' device, with the pre-drawn noise (or none); for the other kinds,
    `fastddim.benchmark.step_kinds.reference`."""
    if inputs.case.kind != "step":
        return step_kinds.reference(inputs)
    scheduler = diffusers_scheduler(inputs)
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


def step_sigma(inputs: StepInputs) -> float:
    """sigma_t of the inputs' step, DDIM paper eq. 16: eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))."""
    scheduler = diffusers_scheduler(inputs)
    prev_timestep = inputs.timestep - scheduler.config.num_train_timesteps // inputs.num_inference_steps
    alpha_t = float(scheduler.alphas_cumprod[inputs.timestep])
    alpha_prev = (
        float(scheduler.alphas_cumprod[prev_timestep]) if prev_timestep >= 0 else float(scheduler.final_alpha_cumprod)
    )
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return float(inputs.case.eta * variance**0.5)


def verify_step(
    inputs: StepInputs, outputs: Sequence[torch.Tensor], *, in_kernel_noise: bool = False
) -> dict[str, Any]:
    """`check_step_output` of an implementation's outputs against `reference_step` on the same inputs; the inverse,
    per-sample and backward kinds in fp32 must equal diffusers bit for bit (their issue's promise)."""
    kwargs: dict[str, Any] = {"exact": inputs.case.kind != "step" and inputs.case.dtype == torch.float32}
    if in_kernel_noise:
        kwargs = {"noise_free_reference": reference_step(inputs, with_noise=False)[0], "sigma": step_sigma(inputs)}
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
    if inputs.case.kind != "step":
        return step_kinds.diffusers_step_fn(inputs, int_timestep=int_timestep)
    scheduler = diffusers_scheduler(inputs)
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


def _prepare_compile(inputs: StepInputs) -> Prepared:
    compat.reset_dynamo()
    compat.raise_dynamo_limits()
    scheduler = diffusers_scheduler(inputs)
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
    # Inductor's static CUDA launcher failed this step's kernel on an H100: see compat.inductor_triton_launcher.
    with compat.inductor_triton_launcher():
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


def fastddim_step_fn(inputs: StepInputs) -> tuple[Callable[[], Any], bool]:
    """fastddim's step with a device timestep; returns (fn, whether noise is drawn in the kernel)."""
    if inputs.case.kind != "step":
        return step_kinds.fastddim_step_fn(inputs), False
    scheduler = fastddim_scheduler(inputs)
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


STEP_IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("copy", _prepare_copy),
        Implementation(
            "diffusers",
            functools.partial(_prepare_diffusers, int_timestep=False),
            timestep_kind="0-dim device tensor (as SD pipelines pass it; host syncs on CUDA)",
        ),
        Implementation(
            "diffusers-int", functools.partial(_prepare_diffusers, int_timestep=True), timestep_kind="Python int"
        ),
        Implementation(
            "torch.compile",
            _prepare_compile,
            compiles=True,
            timestep_kind="Python int (constant in the compiled graph)",
            step_kinds=("step",),
        ),
        Implementation("fastddim", _prepare_fastddim, timestep_kind="0-dim device tensor"),
        Implementation(
            "fastddim-graph", _prepare_fastddim_graph, cuda_graph=True, timestep_kind="0-dim device tensor"
        ),
    )
}
"""Step implementations by name, in table order; each builds a `Prepared` from `StepInputs`."""


def bytes_per_step(case: StepCase, reads_noise: bool) -> int:
    """Minimum traffic of one step: read model_output and sample (and noise), write prev_sample and x_0; a backward
    case also reads the two output gradients and writes the two input gradients."""
    itemsize = torch.empty((), dtype=case.dtype).element_size()
    return (step_kinds.bytes_multiplier(case.kind) + int(reads_noise)) * case.numel * itemsize


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
            "kind": case.kind,
            "eta": case.eta,
            "thresholding": case.thresholding,
            "scheduler_config": inputs.config,
            "num_inference_steps": inputs.num_inference_steps,
            "timestep": inputs.timestep if inputs.timesteps is None else inputs.timesteps.tolist(),
            "timestep_kind": STEP_IMPLEMENTATIONS[impl].timestep_kind if impl in STEP_IMPLEMENTATIONS else None,
            "noise": None,
        },
    )
    if case.kind == "per-sample" and impl in step_kinds.PER_SAMPLE_TIMESTEP_KINDS:
        record["config"]["timestep_kind"] = step_kinds.PER_SAMPLE_TIMESTEP_KINDS[impl]
    builder = builder or STEP_IMPLEMENTATIONS[impl].build
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
        if prepared.capture_s is not None:
            record["notes"].append(f"graph of {prepared.unroll} captured step(s); figures are per step")
    except Exception as exc:  # (one failing implementation must not end the run)
        record["error"] = error_text(exc)
        free_memory(device)
    return record


def _time_step(prepared: Prepared, record: dict, device: torch.device, plan: Plan) -> None:
    # Host latency always; on CUDA the record's median is device time (do_bench), on a CPU the host wall time.
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
        stats = device_time_us(prepared.fn, device, warmup_ms=plan.device_warmup_ms, rep_ms=plan.device_rep_ms)
        record.update({key: value if key == "n_samples" else value / unroll for key, value in stats.items()})
        record["timing_method"] = "triton.testing.do_bench (L2 flushed before each call); latency_us: host wall"
    else:
        record.update(summarize(wall))
        record["timing_method"] = "host wall (perf_counter), back-to-back calls"
    if record["bytes_per_step"] and record["median_us"]:
        record["gb_per_s"] = record["bytes_per_step"] / (record["median_us"] * 1e-6) / 1e9


def finalize_step_records(records: list[dict]) -> None:
    """Fills copy-bandwidth percentages and speedups over diffusers eager (same shape, dtype, config)."""
    steps = [r for r in records if r["benchmark"] == "step" and r["median_us"]]
    copies = {(tuple(r["shape"]), r["dtype"]): r for r in steps if r["impl"] == "copy"}
    peak = max((r["gb_per_s"] for r in copies.values() if r["gb_per_s"]), default=None)
    baselines = {step_key(r): r for r in steps if r["impl"] == "diffusers"}
    for record in steps:
        copy_record = copies.get((tuple(record["shape"]), record["dtype"]))
        if copy_record and copy_record["gb_per_s"] and record["gb_per_s"]:
            record["copy_gb_per_s"] = copy_record["gb_per_s"]
            record["pct_of_copy_bw"] = 100.0 * record["gb_per_s"] / copy_record["gb_per_s"]
        if peak and record["gb_per_s"]:
            record["pct_of_peak_copy_bw"] = 100.0 * record["gb_per_s"] / peak
        base = baselines.get(step_key(record))
        if base and record["impl"] != "copy":
            record["speedup_vs_diffusers"] = base["median_us"] / record["median_us"]
            if base["latency_us"] and record["latency_us"]:
                record["latency_speedup_vs_diffusers"] = base["latency_us"] / record["latency_us"]


def step_key(record: dict) -> tuple:
    """What makes step records comparable: shape, dtype, eta, thresholding, kind (``step`` in records without one)."""
    config = record["config"]
    return (tuple(record["shape"]), record["dtype"], config["eta"], config["thresholding"], config.get("kind", "step"))
