"""The ``fastddim`` command line.

``fastddim sample`` draws images with `fastddim.DDIMPipeline` from a diffusers model folder (the embedded digits model
by default) and writes a PNG grid or an ``.npz`` of the arrays. ``fastddim bench`` runs `fastddim.benchmark`.

User errors (bad arguments, a missing model, an unwritable output, an unavailable device) print one line on stderr
and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
from typing import TYPE_CHECKING, NoReturn

import numpy as np

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from fastddim.pipeline import DDIMPipeline

EXIT_USAGE = 2
DTYPES = ("float32", "float16", "bfloat16")
GRID_SCALE = 8
# Batches of at most this many input elements sample on one CPU thread by default (see _default_cpu_threads).
_SMALL_BATCH_ELEMENTS = 1 << 16


class UsageError(Exception):
    """A mistake in the command line or its environment, reported as one line and exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    # argparse prints the whole usage block and exits; one line is easier to read and keeps main() returning an int.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _int_at_least(minimum: int, meaning: str):
    """An argparse type: an int >= ``minimum``; ``meaning`` names it in the error message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {meaning} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``fastddim`` argument parser (``bench`` options are added by `fastddim.benchmark` on dispatch)."""
    parser = _ArgumentParser(prog="fastddim", description="Triton-fused, CUDA-graph-captured DDIM sampling.")
    from fastddim import __version__

    parser.add_argument("--version", action="version", version=f"fastddim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    commands.required = True

    sample = commands.add_parser(
        "sample",
        help="draw samples and write a PNG grid or an .npz",
        description="Draw samples with fastddim.DDIMPipeline and write a PNG grid (or arrays, for a .npz path).",
    )
    sample.add_argument(
        "--model",
        metavar="DIR",
        help="a diffusers pipeline folder (model_index.json, unet/, scheduler/) or a UNet2DModel folder "
        "(config.json + weights); default: the embedded digits model",
    )
    sample.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: 50)")
    sample.add_argument(
        "--eta", type=_non_negative_float, default=0.0, help="DDIM eta, 0 = deterministic (default: 0)"
    )
    sample.add_argument("--num-samples", type=_positive_int, default=16, help="images to draw (default: 16)")
    sample.add_argument("--batch-size", type=_positive_int, help="images per pipeline call (default: --num-samples)")
    sample.add_argument(
        "--seed", type=_non_negative_int, default=0, help="sample i uses a CPU generator seeded seed + i (default: 0)"
    )
    sample.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    sample.add_argument("--dtype", choices=DTYPES, help="UNet dtype (default: float32 on cpu, float16 on cuda)")
    sample.add_argument("--no-cuda-graph", action="store_true", help="run the loop eagerly on CUDA")
    sample.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: 1 for small images such as the digits, else torch's default)",
    )
    sample.add_argument(
        "--scale",
        type=_positive_int,
        default=GRID_SCALE,
        help=f"nearest-neighbour upscaling of the PNG grid (default: {GRID_SCALE})",
    )
    sample.add_argument(
        "--out",
        default="samples.png",
        help="output path: an image grid (PNG by default), or arrays if it ends with .npz (default: samples.png)",
    )

    commands.add_parser("bench", help="run the fastddim benchmarks (fastddim bench --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the ``fastddim`` command line.

    Args:
        argv (`list[str]`, *optional*): the arguments after the program name; `sys.argv[1:]` if None.

    Returns:
        `int`: the exit status: 0 on success, 2 on a user error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # bench options belong to fastddim.benchmark, imported only here so that `sample` works without it.
        if argv and argv[0] == "bench":
            return _run_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return _run_sample(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:
        # --help and --version exit through argparse.
        return exc.code if isinstance(exc.code, int) else 0


def _run_bench(argv: list[str]) -> int:
    try:
        from fastddim import benchmark
    except Exception as exc:  # noqa: BLE001 - a missing or broken module is reported, not raised
        raise UsageError(f"fastddim bench is unavailable: cannot import fastddim.benchmark ({exc})") from None
    parser = _ArgumentParser(prog="fastddim bench", description="Run the fastddim benchmarks.")
    benchmark.add_arguments(parser)
    return int(benchmark.run(parser.parse_args(argv)))


def _run_sample(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import torch

    device = _resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    out = _check_output_path(args.out)
    batch_size = args.batch_size or args.num_samples

    pipe = _load_pipeline(args.model, device, dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or _default_cpu_threads(pipe.unet, batch_size))

    sampling_started = time.perf_counter()
    chunks = []
    for first in range(0, args.num_samples, batch_size):
        count = min(batch_size, args.num_samples - first)
        # One CPU generator per sample: sample i is the same for any batch size and on any device.
        generators = [torch.Generator("cpu").manual_seed(args.seed + first + i) for i in range(count)]
        images = pipe(
            batch_size=count,
            generator=generators,
            eta=args.eta,
            num_inference_steps=args.steps,
            output_type="np",
            cuda_graph=False if args.no_cuda_graph else None,
        ).images
        chunks.append(images.astype(np.float32))
    images = np.concatenate(chunks)
    sampling_seconds = time.perf_counter() - sampling_started

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".npz":
            _save_npz(out, images, args, device, dtype)
            what = f"{len(images)} samples of {_shape_text(images)} as arrays"
        else:
            grid = make_grid(images, scale=args.scale)
            grid.save(out)
            what = f"a {grid.width}x{grid.height} grid of {len(images)} samples"
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot write {out}: {exc}") from None
    total_seconds = time.perf_counter() - started
    print(
        f"wrote {what} to {out} in {total_seconds:.2f} s ({args.steps} steps on {device}, "
        f"sampling {sampling_seconds:.2f} s)"
    )
    return 0


def _default_cpu_threads(unet: torch.nn.Module, batch_size: int) -> int:
    """One thread for small batches of small images, else torch's default.

    The convolutions of such batches are too small to gain from intra-op threads, and on a busy machine (CI, a
    training job next door) OpenMP's barriers make several threads 20-30x slower than one: measured on 2 shared cores,
    16 digits x 50 steps took 25 s with 2 threads and 0.9 s with 1.
    """
    import torch

    sample_size = unet.config.sample_size
    pixels = sample_size * sample_size if isinstance(sample_size, int) else math.prod(sample_size)
    if batch_size * unet.config.in_channels * pixels <= _SMALL_BATCH_ELEMENTS:
        return 1
    return torch.get_num_threads()


def _resolve_device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: not a torch device: {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def _check_output_path(text: str) -> pathlib.Path:
    """Fails before sampling if the output cannot be written; missing folders are created only when writing."""
    out = pathlib.Path(text)
    if out.is_dir():
        raise UsageError(f"--out {text}: is a directory")
    if out.suffix.lower() != ".npz":
        from PIL import Image

        if out.suffix.lower() not in Image.registered_extensions():
            raise UsageError(f"--out {text}: unknown image extension {out.suffix!r} (use .png, or .npz for arrays)")
    if out.exists():
        if not os.access(out, os.W_OK):
            raise UsageError(f"--out {text}: not writable")
        return out
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--out {text}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {text}: {ancestor} is not writable")
    return out


def _load_pipeline(model: str | None, device: torch.device, dtype: torch.dtype) -> DDIMPipeline:
    from diffusers import UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    from fastddim import DDIMPipeline, DDIMScheduler

    # Loading notices (e.g. "accelerate not installed") are noise for a command-line user.
    diffusers_logging.set_verbosity_error()
    if model is None:
        from fastddim.models import default_model_dir

        try:
            folder = default_model_dir()
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    else:
        folder = pathlib.Path(model)
        if not folder.is_dir():
            raise UsageError(f"--model {model}: no such folder")

    try:
        if (folder / "model_index.json").is_file():
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
            if (folder / "scheduler" / "scheduler_config.json").is_file():
                scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
            else:
                scheduler = DDIMScheduler()
        elif (folder / "config.json").is_file():
            unet = UNet2DModel.from_pretrained(folder, torch_dtype=dtype)
            scheduler = DDIMScheduler()
        else:
            raise UsageError(
                f"--model {folder}: not a diffusers pipeline folder (model_index.json) or UNet2DModel folder "
                "(config.json)"
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--model {folder}: cannot load it ({_first_line(exc)})") from None

    pipe = DDIMPipeline(unet=unet, scheduler=scheduler).to(device)
    pipe.unet.eval()
    pipe.set_progress_bar_config(desc="sampling", leave=False)
    return pipe


def make_grid(images: np.ndarray, scale: int = GRID_SCALE, padding: int = 1) -> PIL.Image.Image:
    """Tiles NHWC images in [0, 1] into a near-square grid, upscaled with nearest neighbour.

    Args:
        images (`np.ndarray`): N x H x W x C floats in [0, 1], C = 1 (grayscale) or 3 (RGB).
        scale (`int`, *optional*, defaults to 8): the upscaling factor, so 8x8 digits are visible.
        padding (`int`, *optional*, defaults to 1): gray gap between tiles, in image pixels (before scaling).

    Returns:
        `PIL.Image.Image`: mode ``L`` for one channel, ``RGB`` for three.
    """
    from PIL import Image

    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be N x H x W x C with C in (1, 3), got shape {images.shape}")
    count, height, width, channels = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    grid = np.full(
        (rows * height + (rows - 1) * padding, cols * width + (cols - 1) * padding, channels), 128, dtype=np.uint8
    )
    for index in range(count):
        row, col = divmod(index, cols)
        top, left = row * (height + padding), col * (width + padding)
        grid[top : top + height, left : left + width] = pixels[index]
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    # uint8 H x W becomes mode L, H x W x 3 becomes RGB.
    return Image.fromarray(grid[..., 0] if channels == 1 else grid)


def _save_npz(
    out: pathlib.Path, images: np.ndarray, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> None:
    # np.savez on an open file keeps the exact name (it appends .npz to bare paths otherwise).
    with open(out, "wb") as handle:
        np.savez(
            handle,
            images=images,
            seed=np.int64(args.seed),
            steps=np.int64(args.steps),
            eta=np.float64(args.eta),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
        )


def _shape_text(images: np.ndarray) -> str:
    return "x".join(str(size) for size in images.shape[1:])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
