"""The ``fastddim`` command line.

``fastddim sample`` draws images with `fastddim.DDIMPipeline` from a diffusers model folder (the embedded digits model
by default): image ``s`` from seed ``s`` alone (see `fastddim.seeds`), so ``--seeds 0-49999`` names 50k images
whatever the batch size or number of processes. It writes a PNG grid, an ``.npz`` of the arrays, or a folder with one
PNG per seed (or npz shards) and manifests that ``--resume`` completes (see `fastddim.sample_folder`). Under
``torchrun`` every rank draws its share of the seeds (see `fastddim.distributed`). Every file is written atomically
(see `fastddim.outputs`). A Stable Diffusion / SDXL folder samples with fastddim's pipelines for them, with
``--prompt`` and image-to-image options (see `fastddim.sd_command`); ``--variant`` picks a folder's weight variant
(see `fastddim.weight_variants`). ``fastddim bench`` runs `fastddim.benchmark`.

User errors (bad arguments, a missing or broken model, an unwritable output, an unavailable device, a full disk)
print one line on stderr and exit with status 2, before sampling whenever they can be known then; a job stopped by
another rank's failure exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from fastddim.distributed import DEFAULT_TIMEOUT_S, RankFailed
from fastddim.sample_folder import FORMATS

if TYPE_CHECKING:
    import PIL.Image


EXIT_USAGE = 2
EXIT_OTHER_RANK_FAILED = 1
DTYPES = ("float32", "float16", "bfloat16")
GRID_SCALE = 8
# A grid larger than PIL's decompression-bomb limit cannot be opened by PIL-based viewers without a warning.
MAX_GRID_PIXELS = 89_478_485
DEFAULT_NUM_SAMPLES = 16
DEFAULT_BATCH_SIZE = 64


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _add_variant_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant",
        metavar="NAME",
        help="load the weights of this variant, as diffusers' from_pretrained(variant=NAME) does: files named like "
        "diffusion_pytorch_model.NAME.safetensors (e.g. fp16; independent of --dtype). A component without them "
        "loads its plain weights (default: the plain weights)",
    )


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how the sampling loop runs: the options ``sample`` and ``interpolate`` share."""
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="UNet dtype (default: float32 on cpu, float16 on cuda)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run the loop eagerly on CUDA")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: 1 for small images such as the digits, else torch's default)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``fastddim`` argument parser (``bench`` options are added by `fastddim.benchmark` on dispatch)."""
    parser = _ArgumentParser(prog="fastddim", description="Triton-fused, CUDA-graph-captured DDIM sampling.")
    from fastddim import __version__

    parser.add_argument("--version", action="version", version=f"fastddim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    commands.required = True

    sample = commands.add_parser(
        "sample",
        help="draw samples and write a PNG grid, an .npz, or one PNG per seed",
        description="Draw samples with fastddim.DDIMPipeline (fastddim.StableDiffusionPipeline and friends for a "
        "Stable Diffusion folder), image s from seed s alone, and write a PNG grid, "
        "arrays (.npz), or a folder of one PNG per seed with manifests. Under torchrun every rank draws its share.",
    )
    sample.add_argument(
        "--model",
        metavar="DIR",
        help="a diffusers pipeline folder (model_index.json, unet/, scheduler/), a UNet2DModel folder "
        "(config.json + weights), or a Stable Diffusion / SDXL folder (with --prompt); default: the embedded "
        "digits model",
    )
    _add_variant_argument(sample)
    sample.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: 50)")
    sample.add_argument(
        "--eta", type=_non_negative_float, default=0.0, help="DDIM eta, 0 = deterministic (default: 0)"
    )
    sample.add_argument(
        "--seeds",
        metavar="LIST",
        help="the seeds to draw, one image each: inclusive ranges and single seeds, e.g. 0-49999 or 0-9,20,30-31",
    )
    sample.add_argument(
        "--num-samples",
        type=_positive_int,
        help=f"shorthand for --seeds SEED..SEED+N-1 (default: {DEFAULT_NUM_SAMPLES})",
    )
    sample.add_argument("--seed", type=_non_negative_int, help="the first seed of --num-samples (default: 0)")
    sample.add_argument(
        "--batch-size",
        type=_positive_int,
        help=f"images per pipeline call (default: the seeds of this process, at most {DEFAULT_BATCH_SIZE}); "
        "never changes an image beyond the UNet's batch-size rounding",
    )
    _add_runtime_arguments(sample)
    sample.add_argument(
        "--scale",
        type=_positive_int,
        help=f"nearest-neighbour upscaling of an image grid (default: {GRID_SCALE}; 1 for Stable Diffusion images)",
    )
    sample.add_argument(
        "--out",
        default="samples.png",
        help="an image path (a grid), a .npz path (the arrays), or a folder (a path without extension, or an "
        "existing folder): one PNG per seed, DIR/<seed//1000*1000:06d>/<seed:06d>.png, and manifests "
        "(default: samples.png)",
    )
    sample.add_argument(
        "--format", choices=FORMATS, help="what a folder holds: one PNG per seed (png, default) or npz shards"
    )
    sample.add_argument(
        "--resume",
        action="store_true",
        help="complete a folder made by an interrupted run with the same settings: skip the seeds it holds",
    )
    sample.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"under torchrun, how long a rank waits for the others before the job fails (default: {DEFAULT_TIMEOUT_S:g})",
    )
    from fastddim import sd_command

    sd_command.add_arguments(sample)

    interpolate = commands.add_parser(
        "interpolate",
        help="a PNG strip of images between two seeds (spherical interpolation of x_T, DDIM section 5.3)",
        description="Sample frames along the great circle between the initial noise of two seeds (drawn as "
        "`fastddim sample --seeds` draws it) and write them as one strip. Every frame samples with DDIM's "
        "deterministic sampler (eta 0), where an image is a function of its initial noise alone, which is what "
        "makes the frames between two seeds an interpolation. A Stable Diffusion / SDXL folder interpolates the "
        "initial latents with the prompt fixed (text-to-image only).",
    )
    interpolate.add_argument(
        "--seeds", nargs=2, type=_non_negative_int, required=True, metavar=("A", "B"), help="the two seeds"
    )
    interpolate.add_argument("--frames", type=_positive_int, default=9, help="frames, both ends included (default: 9)")
    interpolate.add_argument(
        "--batch-size",
        type=_positive_int,
        help="frames per pipeline call, to bound memory (default: all frames in one call); never changes a frame "
        "beyond the UNet's batch-size rounding",
    )
    interpolate.add_argument(
        "--model",
        metavar="DIR",
        help="as for sample: a diffusers pipeline or UNet2DModel folder, or a Stable Diffusion / SDXL folder (with "
        "--prompt); default: the embedded digits model",
    )
    _add_variant_argument(interpolate)
    interpolate.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: 50)")
    _add_runtime_arguments(interpolate)
    interpolate.add_argument(
        "--scale",
        type=_positive_int,
        help=f"nearest-neighbour upscaling of the strip (default: {GRID_SCALE}; 1 for Stable Diffusion images)",
    )
    interpolate.add_argument(
        "--out", default="interpolation.png", help="the strip's image path (default: interpolation.png)"
    )
    sd_command.add_arguments(interpolate, image_to_image=False)

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
        if args.command == "interpolate":
            from fastddim.interpolate_command import run

            return run(args)
        return _run_sample(args)
    except UsageError as exc:
        # A rank of a torchrun job reports before the ranks tear down (see fastddim.sample_command).
        if not getattr(exc, "reported", False):
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RankFailed as exc:
        if not getattr(exc, "reported", False):
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_OTHER_RANK_FAILED
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
    from fastddim.sample_command import run

    return run(args)


def grid_size(
    count: int, height: int, width: int, scale: int = GRID_SCALE, padding: int = 1, columns: int | None = None
) -> tuple[int, int]:
    """The (width, height) in pixels of `make_grid`'s grid of ``count`` images of ``height`` x ``width``."""
    cols = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    return (cols * width + (cols - 1) * padding) * scale, (rows * height + (rows - 1) * padding) * scale


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as uint8 pixels, rounded to the nearest level (the grid, PNG files and npz shards agree)."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def make_grid(
    images: np.ndarray, scale: int = GRID_SCALE, padding: int = 1, columns: int | None = None
) -> PIL.Image.Image:
    """Tiles NHWC images in [0, 1] into a near-square grid, upscaled with nearest neighbour.

    Args:
        images (`np.ndarray`): N x H x W x C floats in [0, 1], C = 1 (grayscale) or 3 (RGB).
        scale (`int`, *optional*, defaults to 8): the upscaling factor, so 8x8 digits are visible.
        padding (`int`, *optional*, defaults to 1): gray gap between tiles, in image pixels (before scaling).
        columns (`int`, *optional*): images per row; a near-square grid if None (``columns=len(images)``: a strip).

    Returns:
        `PIL.Image.Image`: mode ``L`` for one channel, ``RGB`` for three.
    """
    from PIL import Image

    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be N x H x W x C with C in (1, 3), got shape {images.shape}")
    count, height, width, channels = images.shape
    cols = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    pixels = to_uint8(images)
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
