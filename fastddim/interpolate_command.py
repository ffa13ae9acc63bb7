"""``fastddim interpolate``: a strip of images along the great circle between two seeds' initial noise.

DDIM's deterministic sampler (eta 0) maps x_T to an image, so images between two seeds come from latents between
their x_T; the DDIM paper interpolates them spherically (section 5.3, `fastddim.slerp`). Seed s's x_T is drawn exactly
as ``fastddim sample --seeds s`` draws it, so the strip's first and last frames are those seeds' images.

A Stable Diffusion / SDXL folder takes ``fastddim sample``'s text options (`fastddim.sd_command` checks them and
loads the folder): the initial latents are interpolated and the prompt embeddings stay fixed, so every frame is the
text-to-image pipeline called with ``latents=`` its interpolant. The frames sample in pipeline calls of
``--batch-size`` frames (default: all in one call, a UNet batch of ``--frames`` images, twice that under
classifier-free guidance).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import time

import numpy as np
import torch

from fastddim.cli import GRID_SCALE, MAX_GRID_PIXELS, UsageError, grid_size, make_grid
from fastddim.outputs import write_bytes

MAX_FRAMES = 1000
# `fastddim.sd_command`'s image-to-image options (argparse dest, flag): parsed, then refused.
IMAGE_TO_IMAGE_OPTIONS = (("init_image", "--init-image"), ("strength", "--strength"))


def run(args: argparse.Namespace) -> int:
    """Checks the arguments, samples the frames, writes the strip atomically; returns the exit status (0)."""
    from diffusers.utils.torch_utils import randn_tensor

    from fastddim import sd_command
    from fastddim.interpolation import slerp
    from fastddim.sample_command import default_cpu_threads, load_pipeline, resolve_device

    started = time.perf_counter()
    seed_a, seed_b = args.seeds
    if args.frames < 2 or args.frames > MAX_FRAMES:
        raise UsageError(f"--frames {args.frames}: expected between 2 and {MAX_FRAMES} frames")
    for dest, flag in IMAGE_TO_IMAGE_OPTIONS:
        if getattr(args, dest) is not None:
            raise UsageError(
                f"{flag}: fastddim interpolate interpolates the initial latents of text-to-image; image-to-image "
                "starts from the init image instead"
            )
    out = _check_image_path(args.out)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    # A Stable Diffusion folder loads there (with its prompt options); None for every other model.
    loaded = sd_command.load_if_prompted(args, device, dtype)
    pipe, _ = loaded or load_pipeline(args.model, device, dtype, args.variant)
    pipe.set_progress_bar_config(disable=True)
    train_steps = pipe.scheduler.config.num_train_timesteps
    if args.steps > train_steps:
        raise UsageError(f"--steps {args.steps}: the model was trained with {train_steps} timesteps, at most that")
    if loaded is not None:
        height, width = pipe.image_size
        latent_shape = pipe.latent_shape
    else:
        sample_size = pipe.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        latent_shape = (pipe.unet.config.in_channels, height, width)
    scale = args.scale or GRID_SCALE
    strip_width, strip_height = grid_size(args.frames, height, width, scale, columns=args.frames)
    if strip_width * strip_height > MAX_GRID_PIXELS:
        raise UsageError(
            f"--scale {scale}: a strip of {args.frames} frames would be {strip_width}x{strip_height} pixels, above "
            f"the limit of {MAX_GRID_PIXELS} (PIL's image-size limit); use a smaller --scale or fewer --frames"
        )
    if device.type == "cpu":
        torch.set_num_threads(args.threads or default_cpu_threads(pipe.unet, args.frames))

    # One CPU generator per seed, as `fastddim sample --seeds` draws each image's x_T (Stable Diffusion: in the
    # prompt embeddings' dtype, which is the loaded dtype).
    ends = [
        randn_tensor(
            (1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed), device=device, dtype=dtype
        )
        for seed in (seed_a, seed_b)
    ]
    latents = slerp(ends[0], ends[1], torch.linspace(0, 1, args.frames, dtype=torch.float64))
    sampling_started = time.perf_counter()
    batch_size = args.batch_size or args.frames
    images = np.concatenate(
        [
            pipe(
                latents=latents[start : start + batch_size],
                num_inference_steps=args.steps,
                output_type="np",
                cuda_graph=False if args.no_cuda_graph else None,
            ).images
            for start in range(0, args.frames, batch_size)
        ]
    )
    sampling_seconds = time.perf_counter() - sampling_started
    strip = make_grid(images.astype("float32"), scale=scale, columns=args.frames)
    encoded = io.BytesIO()
    strip.save(encoded, format=_image_format(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(out, encoded.getvalue())
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(
        f"wrote a {strip.width}x{strip.height} strip of {args.frames} frames from seed {seed_a} to seed {seed_b} to "
        f"{out} in {time.perf_counter() - started:.2f} s ({args.steps} steps on {device}, sampling "
        f"{sampling_seconds:.2f} s)",
        file=sys.stdout,
    )
    return 0


def _image_format(path: pathlib.Path) -> str:
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def _check_image_path(text: str) -> pathlib.Path:
    """An image path PIL can write, in a folder that exists or can be made: checked before any model is loaded."""
    from PIL import Image

    out = pathlib.Path(text)
    if out.is_dir():
        raise UsageError(f"--out {text}: is a folder; give an image path such as strip.png")
    extension = out.suffix.lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.SAVE:
        raise UsageError(f"--out {text}: PIL cannot write {extension or 'files without an extension'} (use .png)")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--out {text}: {ancestor} is not a folder")
    return out
