"""Records: one dict per (benchmark, case, implementation), their schema, correctness checks and results.json.

Every record carries every key of its benchmark (None where it does not apply), so readers of ``results.json`` never
meet a missing key; ``outcome`` classifies a record as ok, skipped, failed (its correctness check) or error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastddim.benchmark.cases import DTYPE_NAMES
from fastddim.utils import first_line

SCHEMA_VERSION = 1

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
# DDIM inversion then sampling back (fastddim.benchmark.reconstruction).
RECONSTRUCTION_KEYS = ("model", "batch_size", "num_inference_steps", "first_call_s", "mse", "latent_std")
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
    "limit_us",
    "vs_limit",
)
# Text-to-image loops with classifier-free guidance (fastddim.benchmark.sd).
SD_KEYS = (
    "model",
    "shape",
    "batch_size",
    "num_inference_steps",
    "guidance_scale",
    "images_per_s",
    "ms_per_step",
    "first_call_s",
    "capture_s",
    "peak_mem_mib",
    "speedup_vs_compile_reduce_overhead",
    "limit_us",
    "vs_limit",
)

# Per-seed noise against one generator (fastddim.benchmark.per_seed).
SEEDS_KEYS = (
    "model",
    "shape",
    "batch_size",
    "num_inference_steps",
    "images",
    "total_s",
    "images_per_s",
    "ms_per_step",
    "first_call_s",
    "peak_mem_mib",
    "cost_vs_generator",
    "cost_vs_no_generator",
)

# The eager loops of diffusers and fastddim timed alternately (fastddim.benchmark.eager).
EAGER_KEYS = (
    "model",
    "shape",
    "batch_size",
    "num_inference_steps",
    "images_per_s",
    "ms_per_step",
    "paired_speedup_vs_diffusers",
    "paired_speedup_p20",
    "paired_speedup_p80",
)

BENCHMARK_KEYS = {
    "step": STEP_KEYS,
    "loop": LOOP_KEYS,
    "sd": SD_KEYS,
    "reconstruction": RECONSTRUCTION_KEYS,
    "seeds": SEEDS_KEYS,
    "eager": EAGER_KEYS,
}

# (atol, rtol) against diffusers' step computed in fp32 on the same inputs.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 2e-2)}


def new_record(benchmark: str, **fields: Any) -> dict[str, Any]:
    """A record with every schema key present (None where it does not apply)."""
    keys = RECORD_KEYS + BENCHMARK_KEYS[benchmark]
    record: dict[str, Any] = dict.fromkeys(keys)
    record["benchmark"] = benchmark
    record["notes"] = []
    unknown = set(fields) - set(keys)
    if unknown:
        raise KeyError(f"unknown {benchmark} record keys: {sorted(unknown)}")
    record.update(fields)
    return record


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters: a record's ``error``."""
    text = f"{type(exc).__name__}: {first_line(exc)}"
    return text if len(text) <= 500 else text[:497] + "..."


def check_step_output(
    outputs: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    noise_free_reference: torch.Tensor | None = None,
    sigma: float | None = None,
    exact: bool = False,
) -> dict[str, Any]:
    """Compares an implementation's (prev_sample, pred_original_sample) with the fp32 reference.

    Elementwise within the dtype's (atol, rtol) of ``TOLERANCES``, or bit for bit with ``exact`` (then atol = rtol =
    0; NaN must stand where the reference has NaN). When the implementation drew its own noise
    (``noise_free_reference`` and ``sigma`` given: fastddim's in-kernel Philox), prev_sample is checked statistically
    instead: (prev - reference without noise) / sigma must look like N(0, 1).

    Returns:
        `dict`: ``passed`` (bool), ``max_abs_err``, ``atol``, ``rtol``, ``method``, and ``detail`` when it failed.
    """
    atol, rtol = (0.0, 0.0) if exact else TOLERANCES.get(dtype, TOLERANCES[torch.float16])
    method = "equal" if exact else "allclose"
    result: dict[str, Any] = {"passed": True, "max_abs_err": 0.0, "atol": atol, "rtol": rtol, "method": method}
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


OUTCOMES = ("ok", "skipped", "failed", "error")


def outcome(record: dict) -> str:
    """``skipped`` (could not run here, not an error), ``error`` (raised), ``failed`` (its correctness check), ``ok``."""
    if record["skipped"]:
        return "skipped"
    if record["error"]:
        return "error"
    if record["check"] is not None and not record["check"].get("passed"):
        return "failed"
    return "ok"


METHODOLOGY = {
    "step_gpu_median": "triton.testing.do_bench (return_mode='all', then median and quantiles): CUDA events around "
    "each call, L2 flushed before each call by zeroing a 256 MB buffer outside the events; warm-up and repetitions "
    "from its ms budgets (settings.device_warmup_ms, settings.device_rep_ms)",
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
    "seeds": "per-seed noise: fastddim.DDIMPipeline calls of batch_size images over seeds 0 .. images - 1 "
    "(output_type='pt', no files written: the PNG/npz writing of fastddim sample is the same for every mode) in three "
    "noise modes: seeds=[...] (one generator per image), one torch.Generator(device).manual_seed(0) per call, and no "
    "generator; one untimed call per mode first, then the batches in order with the modes interleaved batch by batch "
    "(order rotated); host wall per call with a synchronize after it; images_per_s = images / summed call time; "
    "cost_vs_generator = generator images/s / this images/s - 1",
    "limit": "unet-limit rows: the physical limit of a loop, N x the UNet's own time per call on the batch the loop "
    "feeds it (the classifier-free-guidance batch in sd): on CUDA device time, CUDA events around back-to-back "
    "replays of a CUDA graph holding that one UNet call alone; on a CPU host wall of eager calls. vs_limit = loop "
    "time / limit at the same model, batch, dtype and steps",
    "sd": "text-to-image loops: host wall time per pipeline call (prompt_embeds/negative_prompt_embeds given, "
    "output_type='latent', no text encoder or VAE in the pipeline, fixed seed-0 latents and embeddings, eta 0, "
    "guidance 7.5) with a synchronize after it; the first call is checked against diffusers eager's latents "
    "(relative L2 error <= 2e-2 in fp16, 1e-3 in fp32) and gives capture_s = first call - median call; then warm-up "
    "(one call for torch.compile cases) and settings.sd_rounds timed calls; peak memory as for loop (the UNet's "
    "weights included); diffusers eager's first call is the reference",
}


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
