"""The reconstruction benchmark: DDIM inversion then sampling back, on real digits (the DDIM paper's Table 2 measure).

``DDIMPipeline.invert`` maps each of the first ``plan.reconstruction_images`` of scikit-learn's handwritten digits to
its x_T with S inversion steps, the pipeline samples from those latents with S steps (eta 0), and the record holds the
per-dimension mean squared error against the originals in [0, 1], for each S of ``plan.reconstruction_steps``. The
embedded digits model was trained on these same digits, so this measures how exactly the deterministic sampler
inverts, not generalisation. Quality, not speed: the timings are for information.
"""

from __future__ import annotations

import time

import torch

from fastddim.benchmark.cases import Plan
from fastddim.benchmark.records import new_record

DIGITS_MODEL = "digits"


def reconstruction_record(steps: int, plan: Plan, device: torch.device) -> dict:
    """Inverts and reconstructs ``plan.reconstruction_images`` real digits with ``steps`` steps (fp32)."""
    images = real_digits(plan.reconstruction_images).to(device)
    pipe = digits_pipeline(device)
    record = new_record(
        "reconstruction",
        name=f"reconstruction/{DIGITS_MODEL}/S={steps}",
        impl="fastddim",
        dtype="fp32",
        model=DIGITS_MODEL,
        batch_size=images.shape[0],
        num_inference_steps=steps,
        config={"eta": 0.0, "clip_sample": bool(pipe.scheduler.config.clip_sample)},
        timing_method="host wall per whole call, synchronized",
    )
    started = time.perf_counter()
    latents = pipe.invert(images, num_inference_steps=steps)
    reconstructed = pipe(latents=latents, num_inference_steps=steps, output_type="pt").images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    record["first_call_s"] = time.perf_counter() - started
    record["mse"] = float(((reconstructed.float() - images) ** 2).mean())
    record["latent_std"] = float(latents.float().std())
    return record


def real_digits(count: int) -> torch.Tensor:
    """The first ``count`` of scikit-learn's 1797 digits as (count, 1, 8, 8) fp32 in [0, 1]."""
    from fastddim.train_digits import load_digits_tensor

    images, _ = load_digits_tensor()
    return (images[:count] + 1) / 2


def digits_pipeline(device: torch.device) -> object:
    """The embedded digits model in fp32 on ``device``, as `fastddim.DDIMPipeline`."""
    from diffusers import UNet2DModel

    import fastddim
    from fastddim.models import default_model_dir

    folder = default_model_dir()
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").to(device).eval()
    scheduler = fastddim.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = fastddim.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
