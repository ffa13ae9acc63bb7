"""The text-to-image loop benchmark: Stable Diffusion-family denoising loops with classifier-free guidance.

What is timed: a whole pipeline call, ``pipe(prompt_embeds=..., negative_prompt_embeds=..., latents=...,
guidance_scale=7.5, eta=0, output_type="latent")``, host wall time with a synchronize after it. The pipelines are
built without text encoders, tokenizers or VAE (``None``: the embeddings are given and no image is decoded), so the
call is the denoising loop plus the pipelines' own light per-call work (input checks, timesteps, the CFG batch
concatenation, SDXL's time ids): what a user's call costs once the prompt is encoded, before the decode. The
embeddings and initial latents are fixed random tensors (seed 0), the same for every implementation.

Models (`load_sd_unet`, random weights, built on the device): ``sd15``, the Stable Diffusion 1.5 UNet architecture
(64 x 64 latents, cross-attention 768); ``sdxl``, the SDXL base UNet architecture (128 x 128 latents, text_time added
conditioning); ``tiny-sd`` and ``tiny-sdxl`` for the harness's own tests.

Implementations (``SD_IMPLEMENTATIONS``): ``diffusers`` (``diffusers.StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` with diffusers' ``DDIMScheduler``), ``compile-reduce-overhead`` (the same with
``torch.compile(unet, mode="reduce-overhead")``), ``fastddim-eager`` (``fastddim.StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` with ``cuda_graph=False``), ``fastddim-graph`` (the whole loop one CUDA graph),
``fastddim-graph-compiled`` (that graph around ``torch.compile(unet)``, Inductor's default mode) and ``unet-limit``,
the physical limit (`fastddim.benchmark.limit`): N x the UNet's own time per call on the CFG batch.

Correctness: before timing, every implementation's first call is compared with diffusers eager's latents (same
embeddings, same initial latents, eta 0): relative L2 error ``||x - x_ref|| / ||x_ref||`` within ``SD_CHECK_BOUNDS``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fastddim import compat
from fastddim.benchmark.cases import DTYPE_NAMES, Implementation, Plan, SDCase
from fastddim.benchmark.environment import free_memory
from fastddim.benchmark.limit import LIMIT_IMPL, fill_limit_record, fill_vs_limit, loop_implementations, unet_call_us
from fastddim.benchmark.records import error_text, new_record
from fastddim.timing import summarize, timed_call
from fastddim.utils import BoundedCache

# runwayml/stable-diffusion-v1-5's unet/config.json, the values that fix the architecture (the rest are
# UNet2DConditionModel's defaults).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, likewise.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# UNets small enough for the harness's own tests (tests/sd_components.py's shapes).
TINY_SD_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 2,
}
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **TINY_SD_UNET_CONFIG,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 1),
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 64,
}
# (UNet config, pipeline family) per model name.
SD_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "sd15": (SD15_UNET_CONFIG, "sd"),
    "sdxl": (SDXL_UNET_CONFIG, "sdxl"),
    "tiny-sd": (TINY_SD_UNET_CONFIG, "sd"),
    "tiny-sdxl": (TINY_SDXL_UNET_CONFIG, "sdxl"),
}
# Stable Diffusion's DDIM configuration (the scheduler folder of SD1.5 and SDXL base with DDIM swapped in).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
# The pipelines' latent-to-pixel factor without a VAE (diffusers' default): heights of sample_size x 8 pixels.
VAE_SCALE_FACTOR = 8
# CLIP's context length: the prompt embeddings' sequence length.
PROMPT_TOKENS = 77
# Relative L2 error of the final latents against diffusers eager's. fp16: the UNet's and step's roundings (unit
# roundoff 2^-11 ~ 5e-4 per operation) differ where the kernels differ (the fused step computes in fp32 and rounds
# once; Inductor fuses the UNet differently), and each step feeds the next, so a few 1e-3 after 30-50 steps is
# expected; 2e-2 leaves a margin while a wrong step or guidance (errors of order 1) fails by far. fp32: identical
# UNet kernels, steps that differ by float roundoff (~1e-7), amplified through the loop; bit-identical on the CPU.
SD_CHECK_BOUNDS = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-3}


@dataclasses.dataclass
class SDInputs:
    """The fixed inputs of one configuration: initial latents and (negative) prompt embeddings, on the device."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


_unet_cache: BoundedCache[tuple, Any] = BoundedCache(1)


def load_sd_unet(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight ``UNet2DConditionModel`` of ``model``'s architecture on ``device`` in ``dtype`` (seed 0).

    Built directly on the device (an SD-sized UNet takes many seconds to initialise on a CPU) and shared by every
    implementation of a configuration: none of them modifies the weights. One model is kept at a time.
    """
    if model not in SD_MODELS:
        raise ValueError(f"model: expected one of {sorted(SD_MODELS)}, got {model!r}")
    key = (model, device, dtype)
    if (cached := _unet_cache.get(key)) is not None:
        return cached
    from diffusers import UNet2DConditionModel

    _unet_cache.clear()
    free_memory(device)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD_MODELS[model][0])
    # nn.Module.to: ModelMixin.to warns about fp32-pinned modules even when there are none.
    unet = torch.nn.Module.to(unet, dtype=dtype).eval().requires_grad_(False)
    return _unet_cache.put(key, unet)


def make_sd_inputs(case: SDCase, unet: Any, device: torch.device) -> SDInputs:
    """Seeded random latents and embeddings of ``unet``'s shapes (CPU generator, so every device gets the same)."""
    config = unet.config
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=case.dtype)

    size = config.sample_size
    inputs = SDInputs(
        latents=randn(case.batch_size, config.in_channels, size, size),
        prompt_embeds=randn(case.batch_size, PROMPT_TOKENS, config.cross_attention_dim),
        negative_prompt_embeds=randn(case.batch_size, PROMPT_TOKENS, config.cross_attention_dim),
    )
    if config.addition_embed_type == "text_time":
        # The pooled text embedding fills what the six time ids leave of the added embedding's input.
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs.pooled_prompt_embeds = randn(case.batch_size, pooled)
        inputs.negative_pooled_prompt_embeds = randn(case.batch_size, pooled)
    return inputs


def call_arguments(case: SDCase, inputs: SDInputs) -> dict[str, Any]:
    """The pipeline call's keyword arguments for one configuration (``output_type="latent"``, eta 0)."""
    height, width = (size * VAE_SCALE_FACTOR for size in inputs.latents.shape[-2:])
    arguments: dict[str, Any] = {
        "prompt_embeds": inputs.prompt_embeds,
        "negative_prompt_embeds": inputs.negative_prompt_embeds,
        "latents": inputs.latents,
        "height": height,
        "width": width,
        "num_inference_steps": case.num_inference_steps,
        "guidance_scale": case.guidance_scale,
        "eta": 0.0,
        "output_type": "latent",
    }
    if inputs.pooled_prompt_embeds is not None:
        arguments["pooled_prompt_embeds"] = inputs.pooled_prompt_embeds
        arguments["negative_pooled_prompt_embeds"] = inputs.negative_pooled_prompt_embeds
    return arguments


def make_pipeline(family: str, unet: Any, *, fastddim: bool) -> Any:
    """A text-to-image pipeline (diffusers' or fastddim's) with only a UNet and a DDIM scheduler."""
    import diffusers

    import fastddim as fastddim_package

    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER_CONFIG)
    package = fastddim_package if fastddim else diffusers
    none = {"vae": None, "text_encoder": None, "tokenizer": None, "image_encoder": None, "feature_extractor": None}
    if family == "sdxl":
        pipe = package.StableDiffusionXLPipeline(
            unet=unet, scheduler=scheduler, text_encoder_2=None, tokenizer_2=None, add_watermarker=False, **none
        )
    else:
        pipe = package.StableDiffusionPipeline(
            unet=unet, scheduler=scheduler, safety_checker=None, requires_safety_checker=False, **none
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDLoopFn = Callable[[dict[str, Any]], torch.Tensor]


def _compiled(unet: Any, mode: str | None) -> Any:
    compat.reset_dynamo()
    compat.raise_dynamo_limits()
    return torch.compile(unet, dynamic=False) if mode is None else torch.compile(unet, mode=mode, dynamic=False)


def _diffusers_sd(family: str, unet: Any, *, compile_mode: str | None = None) -> SDLoopFn:
    if compile_mode is not None:
        unet = _compiled(unet, compile_mode)
    pipe = make_pipeline(family, unet, fastddim=False)
    return lambda arguments: pipe(**arguments).images


def _fastddim_sd(family: str, unet: Any, *, cuda_graph: bool, compile_unet: bool = False) -> SDLoopFn:
    if compile_unet:
        # Inductor's fused UNet kernels (default mode: no CUDA graphs of its own) inside fastddim's captured loop.
        unet = _compiled(unet, None)
    pipe = make_pipeline(family, unet, fastddim=True)
    return lambda arguments: pipe(**arguments, cuda_graph=cuda_graph).images


SD_IMPLEMENTATIONS: dict[str, Implementation] = loop_implementations(_diffusers_sd, _fastddim_sd)
"""Text-to-image implementations by name, in table order; each builds ``(family, unet) -> (call arguments ->
latents)``."""


# Final latents are small (128 KiB for SD1.5 at batch 4 in fp16): one per case of a full run.
_reference_cache: BoundedCache[tuple, torch.Tensor] = BoundedCache(16)


def reference_latents(case: SDCase, device: torch.device) -> torch.Tensor:
    """diffusers eager's final latents for this configuration (computed once, then cached)."""
    key = (case, device)
    if (cached := _reference_cache.get(key)) is None:
        unet = load_sd_unet(case.model, device, case.dtype)
        pipe = make_pipeline(SD_MODELS[case.model][1], unet, fastddim=False)
        arguments = call_arguments(case, make_sd_inputs(case, unet, device))
        cached = _reference_cache.put(key, pipe(**arguments).images.detach().clone())
    return cached


def check_latents(latents: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """Relative L2 error of ``latents`` against diffusers eager's, within ``SD_CHECK_BOUNDS[dtype]``.

    Returns:
        `dict`: ``passed``, ``rel_l2_err``, ``max_abs_err``, ``bound``, ``method``, and ``detail`` when it failed.
    """
    bound = SD_CHECK_BOUNDS.get(dtype, SD_CHECK_BOUNDS[torch.float16])
    result: dict[str, Any] = {"passed": True, "bound": bound, "method": "relative L2 error vs diffusers eager"}
    if tuple(latents.shape) != tuple(reference.shape):
        return {**result, "passed": False, "detail": f"shape {tuple(latents.shape)} != {tuple(reference.shape)}"}
    out, ref = latents.detach().double(), reference.detach().double()
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    result.update(rel_l2_err=rel, max_abs_err=float((out - ref).abs().max()))
    if not (math.isfinite(rel) and rel <= bound):
        result.update(passed=False, detail=f"relative L2 error {rel:.3g} > {bound:g}")
    return result


def _size(unet: Any) -> int:
    size = unet.config.sample_size
    return size if isinstance(size, int) else size[0]


def unet_call(case: SDCase, unet: Any, inputs: SDInputs, device: torch.device) -> Callable[[], torch.Tensor]:
    """One UNet call on the CFG batch, as the loop makes it (a 0-dim device timestep, SDXL's added conditioning).

    Returns:
        `Callable[[], torch.Tensor]`: the call, on fixed inputs (capturable: nothing is allocated on the host).
    """
    cfg = case.guidance_scale > 1
    sample = torch.cat([inputs.latents] * 2) if cfg else inputs.latents
    embeds = torch.cat([inputs.negative_prompt_embeds, inputs.prompt_embeds]) if cfg else inputs.prompt_embeds
    added = None
    if inputs.pooled_prompt_embeds is not None:
        pooled = inputs.pooled_prompt_embeds
        if cfg:
            pooled = torch.cat([inputs.negative_pooled_prompt_embeds, pooled])
        # original size, crop top-left, target size: the values' content does not change the time.
        pixels = _size(unet) * VAE_SCALE_FACTOR
        time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], device=device, dtype=case.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(pooled.shape[0], 1)}
    timestep = torch.tensor(500, device=device)

    def call() -> torch.Tensor:
        return unet(sample, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    return call


def new_sd_record(case: SDCase, impl: str) -> dict:
    """An ``sd`` record of one configuration and implementation, every figure still None."""
    config_cfg = {"eta": 0.0, "guidance_scale": case.guidance_scale, "output_type": "latent", "generator": None}
    return new_record(
        "sd",
        name=f"sd/{case.label}/{impl}",
        impl=impl,
        model=case.model,
        batch_size=case.batch_size,
        dtype=DTYPE_NAMES[case.dtype],
        num_inference_steps=case.num_inference_steps,
        guidance_scale=case.guidance_scale,
        config=config_cfg,
    )


def run_sd_impl(case: SDCase, impl: str, device: torch.device, plan: Plan) -> dict:
    """Checks, then times, whole text-to-image loops of one implementation on one configuration."""
    implementation = SD_IMPLEMENTATIONS[impl]
    record = new_sd_record(case, impl)
    steps = case.num_inference_steps
    loop = None
    try:
        unet = load_sd_unet(case.model, device, case.dtype)
        family = SD_MODELS[case.model][1]
        inputs = make_sd_inputs(case, unet, device)
        record["shape"] = list(inputs.latents.shape)
        record["config"]["weights"] = f"random ({case.model} architecture)"
        if implementation.limit:
            per_call_us, method = unet_call_us(unet_call(case, unet, inputs, device), device, plan)
            fill_limit_record(record, per_call_us, method, steps, case.batch_size)
            return record
        reference = None if impl == "diffusers" else reference_latents(case, device)
        loop = implementation.build(family, unet)
        arguments = call_arguments(case, inputs)
        first_latents = _time_sd_loop(record, loop, arguments, reference, implementation, device, plan)
        if impl == "diffusers":
            # diffusers eager's first call is the reference of this configuration's other implementations.
            _reference_cache.put((case, device), first_latents)
    except Exception as exc:  # (one failing implementation must not end the run)
        record["error"] = error_text(exc)
    finally:
        del loop
        free_memory(device)
    return record


def _time_sd_loop(
    record: dict,
    loop: SDLoopFn,
    arguments: dict[str, Any],
    reference: torch.Tensor | None,
    implementation: Implementation,
    device: torch.device,
    plan: Plan,
) -> torch.Tensor:
    """Checks the first call against ``reference`` (when given), times the others; returns the first call's latents."""
    steps, batch_size = arguments["num_inference_steps"], arguments["latents"].shape[0]
    skips_before = compat.cudagraph_skip_count()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings(record=True) as caught:
        # fastddim's pipelines warn and run eagerly when a capture fails: that must not pass as a graph figure.
        warnings.simplefilter("always", RuntimeWarning)
        first_s, latents = timed_call(lambda: loop(arguments), device)
        if reference is not None:
            record["check"] = check_latents(latents, reference, arguments["latents"].dtype)
        # A captured loop's output is a static buffer that the next replay overwrites.
        first_latents = latents.detach().clone()
        del latents
        for _ in range(plan.sd_warmup + (1 if implementation.compiles else 0)):
            loop(arguments)
        samples = [timed_call(lambda: loop(arguments), device)[0] * 1e6 for _ in range(plan.sd_rounds)]
    fallbacks = [str(w.message) for w in caught if "eager" in str(w.message)]
    if implementation.cuda_graph and fallbacks:
        record["check"] = {**(record["check"] or {}), "passed": False, "detail": f"fell back to eager: {fallbacks[0]}"}
    record["notes"].extend(str(w.message)[:300] for w in caught[:3])
    if implementation.compiles and (skipped := compat.cudagraph_skip_count() - skips_before):
        record["notes"].append(f"CUDAGraph Trees skipped cudagraphs {skipped} time(s) (inductor cudagraph_skips)")
    record.update(summarize(samples))
    median_s = record["median_us"] * 1e-6
    record["timing_method"] = "host wall per pipeline call, synchronized"
    record["images_per_s"] = batch_size / median_s
    record["ms_per_step"] = median_s * 1e3 / steps
    record["first_call_s"] = first_s
    if implementation.cuda_graph or implementation.compiles:
        record["capture_s"] = first_s - median_s
    if device.type == "cuda":
        record["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return first_latents


def _case_key(record: dict) -> tuple:
    return (record["model"], record["batch_size"], record["dtype"], record["num_inference_steps"])


def finalize_sd_records(records: list[dict]) -> None:
    """Fills speedups over diffusers eager and over compile-reduce-overhead, and loop time / limit, per
    configuration (model, batch, dtype, steps)."""
    timed = [r for r in records if r["benchmark"] == "sd" and r["median_us"] and r["impl"] != LIMIT_IMPL]
    for baseline_impl, field in (
        ("diffusers", "speedup_vs_diffusers"),
        ("compile-reduce-overhead", "speedup_vs_compile_reduce_overhead"),
    ):
        baselines = {_case_key(r): r for r in timed if r["impl"] == baseline_impl}
        for record in timed:
            if base := baselines.get(_case_key(record)):
                record[field] = base["median_us"] / record["median_us"]
    fill_vs_limit(records, "sd", _case_key)
