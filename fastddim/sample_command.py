"""``fastddim sample``: seeds to images, on one process or on every rank of a torchrun job.

The steps, each able to fail before any rank writes: the seed list (`fastddim.seeds`), the output target, the
device, the torchrun job (`fastddim.distributed`), the model, the settings and the output folder's state
(`fastddim.sample_folder`). Then every rank draws its share of the seeds in batches, writing each batch atomically
(`fastddim.outputs`) and meeting the other ranks after it to add up progress and hear of failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from fastddim.cli import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_SAMPLES,
    GRID_SCALE,
    MAX_GRID_PIXELS,
    UsageError,
    grid_size,
    make_grid,
    to_uint8,
)
from fastddim.distributed import RankFailed
from fastddim.utils import first_line

if TYPE_CHECKING:
    import torch

    from fastddim.distributed import Team
    from fastddim.pipeline import DDIMPipeline
    from fastddim.sample_folder import SampleFolder

__all__ = ["OutputTarget", "default_cpu_threads", "load_pipeline", "resolve_device", "run"]

# Batches of at most this many input elements sample on one CPU thread by default (see default_cpu_threads).
_SMALL_BATCH_ELEMENTS = 1 << 16
# ... on UNets of at most this many parameters (the digits model has 0.46M; Stable Diffusion's has 860M).
_SMALL_UNET_PARAMETERS = 10_000_000


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import torch

    from fastddim import distributed

    # Past a file-size limit (RLIMIT_FSIZE, e.g. a quota) a write raises SIGXFSZ, which kills the process without a
    # word; ignored, the write fails with EFBIG and is reported like a full disk.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    seeds = _seed_list(args)
    target = _output_target(args)
    torchrun = distributed.launched_by_torchrun()
    device = resolve_device(args.device, torchrun)
    try:
        team = distributed.join(device.type, args.dist_timeout)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot join the torchrun job: {first_line(exc)}") from None
    try:
        if team.distributed and device.type == "cuda":
            device = torch.device("cuda", team.local_rank)
        if team.world_size > 1 and target.kind != "folder":
            raise UsageError(
                f"--out {args.out}: one file cannot be written by {team.world_size} processes; use --out DIR "
                "(one PNG per seed, or --format npz)"
            )
        return _sample(args, team, seeds, target, device, started)
    finally:
        team.close()


def _sample(
    args: argparse.Namespace,
    team: Team,
    seeds: np.ndarray,
    target: OutputTarget,
    device: torch.device,
    started: float,
) -> int:
    import torch
    from tqdm.auto import tqdm

    from fastddim import seeds as seed_lists

    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    rank_seeds = seed_lists.shard(seeds, team.rank, team.world_size)

    # Every rank checks before any rank writes, and all stop if one cannot go on.
    error, job = None, None
    try:
        job = _prepare(args, team, seeds, rank_seeds, target, device, dtype)
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised again
        error = exc
    pending_counts = _settle(team, error, None if job is None else len(job.pending))
    pipe, folder = job.pipe, job.folder

    error = None
    try:
        if folder is not None:
            if team.rank == 0:
                folder.prepare(cleans=True)
            folder.open()
    except OSError as exc:
        error = UsageError(f"cannot write to {target.path}: {exc.strerror or first_line(exc)}")
    _settle(team, error)

    batch_size = args.batch_size or min(DEFAULT_BATCH_SIZE, max(1, max(pending_counts)))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or default_cpu_threads(pipe.unet, batch_size))
    my_batches = seed_lists.batches(job.pending, batch_size)
    rounds = max(math.ceil(count / batch_size) for count in pending_counts)
    sampling_started = time.perf_counter()
    chunks: list[np.ndarray] = []
    bar = tqdm(total=sum(pending_counts), unit="image", desc="sampling", disable=True if team.rank else None)
    # A folder's files (encoding, fsync per file) are written on a thread while the next batch samples; one batch
    # at most is in flight, and its errors surface at the next meeting of the ranks.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastddim-writer") if folder is not None else None
    in_flight: Future | None = None
    try:
        for index in range(rounds):
            batch = my_batches[index] if index < len(my_batches) else None
            error = None
            try:
                if batch is not None:
                    images = pipe(
                        seeds=batch.tolist(),
                        eta=args.eta,
                        num_inference_steps=args.steps,
                        output_type="np",
                        cuda_graph=False if args.no_cuda_graph else None,
                    ).images.astype(np.float32)
                    if folder is None:
                        chunks.append(images)
                if in_flight is not None:
                    in_flight, previous = None, in_flight
                    previous.result()
                if batch is not None and writer is not None:
                    in_flight = writer.submit(_write_batch, folder, batch, to_uint8(images))
            except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised again
                error = exc
            done = _settle(team, error, 0 if batch is None else len(batch))
            bar.update(sum(done))
        sampling_seconds = time.perf_counter() - sampling_started

        error, what = None, ""
        try:
            if in_flight is not None:
                in_flight, previous = None, in_flight
                previous.result()
            if folder is None:
                what = _write_file(target, np.concatenate(chunks), seeds, args, device, dtype)
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised again
            error = exc
        _settle(team, error)
    finally:
        bar.close()
        if writer is not None:
            writer.shutdown(wait=True)
        if folder is not None:
            folder.close()
    if team.rank == 0:
        if folder is not None:
            drawn, total = sum(pending_counts), len(seeds)
            kept = f", {total - drawn} of them already there" if drawn < total else ""
            what = f"{total} image{'s' if total != 1 else ''}{kept} ({target.fmt}) to {target.path}/"
            if team.world_size > 1:
                what += f" from {team.world_size} processes"
        print(
            f"wrote {what} in {time.perf_counter() - started:.2f} s ({args.steps} steps on {device}, "
            f"sampling {sampling_seconds:.2f} s)"
        )
    return 0


def _settle(team: Team, error: BaseException | None, payload: Any = None) -> list[Any]:
    """`Team.settle`, reporting this rank's failure first: torchrun stops the other ranks as soon as one exits, so a
    message printed after the teardown could be cut off."""
    if team.distributed and isinstance(error, UsageError):
        _report(error)
    try:
        return team.settle(error, payload)
    except RankFailed as exc:
        if team.distributed:
            _report(exc)
        raise


def _report(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    error.reported = True


@dataclasses.dataclass
class OutputTarget:
    """Where ``fastddim sample`` writes: ``kind`` is ``"grid"`` (an image), ``"arrays"`` (.npz) or ``"folder"``."""

    kind: str
    path: pathlib.Path
    fmt: str | None = None
    image_format: str | None = None


@dataclasses.dataclass
class _Job:
    pipe: DDIMPipeline
    pending: np.ndarray
    folder: SampleFolder | None


def _prepare(
    args: argparse.Namespace,
    team: Team,
    seeds: np.ndarray,
    rank_seeds: np.ndarray,
    target: OutputTarget,
    device: torch.device,
    dtype: torch.dtype,
) -> _Job:
    """Everything that can fail before sampling: the model, the settings, the output folder's state."""
    from fastddim import sd_command
    from fastddim.sample_folder import FolderRefused, SampleFolder

    # A Stable Diffusion folder loads there (with its prompt options); None for every other model.
    loaded = sd_command.load_if_prompted(args, device, dtype, team.rank)
    pipe, model_about = loaded or load_pipeline(args.model, device, dtype, args.variant)
    pipe.set_progress_bar_config(disable=True)
    train_steps = pipe.scheduler.config.num_train_timesteps
    if args.steps > train_steps:
        raise UsageError(f"--steps {args.steps}: the model was trained with {train_steps} timesteps; use at most that")
    if target.kind == "grid":
        _check_grid_size(len(seeds), pipe, args.scale or GRID_SCALE)
    if args.threads is not None and team.rank == 0:
        cores = _available_cores()
        if args.threads > cores:
            print(
                f"warning: --threads {args.threads} is more than the {cores} CPU cores this process may use; "
                "the extra threads only wait on each other",
                file=sys.stderr,
            )
    if target.kind != "folder":
        return _Job(pipe=pipe, pending=rank_seeds, folder=None)
    settings = _pixel_settings(args, pipe, model_about, device, dtype)
    folder = SampleFolder(
        target.path,
        target.fmt,
        settings,
        about={"model_path": model_about["path"]},
        rank=team.rank,
        resume=args.resume,
    )
    try:
        folder.check()
    except FolderRefused as exc:
        raise UsageError(f"--out {args.out}: {exc}") from None
    return _Job(pipe=pipe, pending=folder.pending(rank_seeds), folder=folder)


def _pixel_settings(
    args: argparse.Namespace, pipe: DDIMPipeline, model_about: dict, device: torch.device, dtype: torch.dtype
) -> dict:
    """Every setting that changes the pixels (hashed into the folder's settings_hash).

    The model is identified by the contents of the UNet files it reads (config and the weights of the variant
    loaded), not by its path: a copied or moved model folder resumes, a retrained one is refused. Versions are included because a new torch or diffusers
    may change the UNet's rounding. Seeds, batch size and process count are not settings: they never change an
    image beyond the UNet's batch-size rounding.
    """
    import diffusers
    import torch

    from fastddim import __version__

    def public(config: Any) -> dict:
        return {key: value for key, value in dict(config).items() if not key.startswith("_")}

    return {
        "model": {"unet_files_sha256": model_about["unet_files_sha256"], "unet_config": public(pipe.unet.config)},
        "scheduler": public(pipe.scheduler.config),
        "steps": args.steps,
        "eta": args.eta,
        "dtype": str(dtype).removeprefix("torch."),
        "device_type": device.type,
        "cuda_graph": device.type == "cuda" and not args.no_cuda_graph,
        # Where eta > 0 step noise comes from: drawn in the kernel, keyed by (seed, timestep), on CUDA; from each seed's
        # CPU generator on the CPU (fastddim.seeds). A folder sampled with another scheme must not resume.
        "step_noise": "keyed-philox" if device.type == "cuda" else "per-seed-generator",
        "versions": {"fastddim": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        # Only when given, so that a folder sampled from plain weights before --variant existed still resumes.
        **({"variant": args.variant} if args.variant is not None else {}),
        # A Stable Diffusion sampler's prompt, guidance, size, init image and whole-model hash.
        **(pipe.pixel_settings() if hasattr(pipe, "pixel_settings") else {}),
    }


def _write_batch(folder: SampleFolder, batch: np.ndarray, pixels: np.ndarray) -> None:
    try:
        folder.write(batch, pixels)
    except OSError as exc:
        where = exc.filename or folder.root
        raise UsageError(
            f"cannot write {where}: {exc.strerror or first_line(exc)} (the images written before are intact)"
        ) from None


def _write_file(
    target: OutputTarget,
    images: np.ndarray,
    seeds: np.ndarray,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> str:
    """Writes the grid or the .npz atomically; returns what was written, for the summary line."""
    from fastddim import outputs

    out = target.path
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        outputs.remove_stale_temps(out.parent, recursive=False, only_dead_writers=True)
        with outputs.atomic_write(out) as handle:
            if target.kind == "arrays":
                _save_npz(handle, images, seeds, args, device, dtype)
                what = f"{len(images)} samples of {_shape_text(images)} as arrays"
            else:
                grid = make_grid(images, scale=args.scale or GRID_SCALE)
                grid.save(handle, format=target.image_format)
                what = f"a {grid.width}x{grid.height} grid of {len(images)} samples"
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise UsageError(f"cannot write {out}: {reason} (an existing {out.name} is left as it was)") from None
    return f"{what} to {out}"


def default_cpu_threads(unet: torch.nn.Module, batch_size: int) -> int:
    """One thread for small batches of small images on a small UNet, else torch's default.

    The convolutions of such batches are too small to gain from intra-op threads, and on a busy machine (CI, a
    training job next door) OpenMP's barriers make several threads 20-30x slower than one: measured on 2 shared cores,
    16 digits x 50 steps took 25 s with 2 threads and 0.9 s with 1.
    """
    import torch

    sample_size = unet.config.sample_size
    pixels = sample_size * sample_size if isinstance(sample_size, int) else math.prod(sample_size)
    # A large UNet's wide convolutions gain from threads even on a small input (Stable Diffusion's 64x64 latents).
    small_unet = sum(parameter.numel() for parameter in unet.parameters()) <= _SMALL_UNET_PARAMETERS
    if small_unet and batch_size * unet.config.in_channels * pixels <= _SMALL_BATCH_ELEMENTS:
        return 1
    return torch.get_num_threads()


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _seed_list(args: argparse.Namespace) -> np.ndarray:
    """The seeds to draw: ``--seeds``, or ``--num-samples N --seed S`` as seeds S..S+N-1."""
    from fastddim import seeds as seed_lists

    if args.seeds is not None:
        if args.num_samples is not None or args.seed is not None:
            raise UsageError("--seeds names every image; pass it without --num-samples and --seed")
        try:
            return seed_lists.parse_seeds(args.seeds)
        except ValueError as exc:
            raise UsageError(f"--seeds {args.seeds}: {exc}") from None
    count = DEFAULT_NUM_SAMPLES if args.num_samples is None else args.num_samples
    first = args.seed or 0
    if count > seed_lists.MAX_SEEDS:
        raise UsageError(f"--num-samples {count}: at most {seed_lists.MAX_SEEDS} a run")
    if first + count - 1 > seed_lists.MAX_SEED:
        raise UsageError(f"--seed {first}: seeds must stay at most {seed_lists.MAX_SEED}")
    return np.arange(first, first + count, dtype=np.int64)


def resolve_device(name: str | None, torchrun: bool = False) -> torch.device:
    """The device to sample on; under torchrun only its type counts (each rank takes cuda:LOCAL_RANK)."""
    import torch

    from fastddim.utils import parse_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parse_device(name)
    except ValueError as exc:
        raise UsageError(f"--device {name}: {exc}") from None
    device = torch.device(name)
    if torchrun and device.type == "cuda" and device.index is not None:
        raise UsageError(f"--device {name}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    return device


def _output_target(args: argparse.Namespace) -> OutputTarget:
    """Decides what ``--out`` names and fails before sampling if it cannot be written."""
    text = args.out
    out = pathlib.Path(text)
    suffix = out.suffix.lower()
    if out.is_dir() or not suffix:
        if args.scale is not None:
            raise UsageError(f"--scale: applies to an image grid; --out {text} is a folder of full-size images")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {text}: exists and is not a folder")
        _check_writable(out, text)
        return OutputTarget(kind="folder", path=out, fmt=args.format or "png")
    if args.format is not None:
        raise UsageError(f"--format: applies to a folder; --out {text} is a file (use a path without extension)")
    if args.resume:
        raise UsageError(f"--resume: completes a folder; --out {text} is a file (use a path without extension)")
    if suffix == ".npz":
        target = OutputTarget(kind="arrays", path=out)
    else:
        from PIL import Image

        image_format = Image.registered_extensions().get(suffix)
        if image_format is None:
            raise UsageError(
                f"--out {text}: unknown image extension {out.suffix!r} (use .png, .npz for arrays, or a path "
                "without extension for a folder)"
            )
        if image_format not in Image.SAVE:
            raise UsageError(f"--out {text}: PIL reads {image_format} files but cannot write them (use .png)")
        target = OutputTarget(kind="grid", path=out, image_format=image_format)
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"--out {text}: not writable")
    _check_writable(out.parent, text)
    return target


def _check_writable(folder: pathlib.Path, text: str) -> None:
    """Fails unless files can be created in ``folder`` (or in the nearest existing folder above it)."""
    ancestor = folder.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--out {text}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {text}: {ancestor} is not writable")


def load_pipeline(
    model: str | None, device: torch.device, dtype: torch.dtype, variant: str | None = None
) -> tuple[DDIMPipeline, dict]:
    """Loads ``--model`` (its ``--variant`` weights, if given) and returns the pipeline and what identifies the model
    (its path and the hash of the UNet files read).

    Refuses a model whose weights do not fill the UNet the config describes (diffusers would otherwise fill missing
    weights with random values, and its warning is muted here).
    """
    from diffusers import UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    from fastddim import DDIMPipeline, DDIMScheduler, compat
    from fastddim.weight_variants import component_variants, loaded_files_sha256

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

    if (folder / "model_index.json").is_file():
        unet_folder, subfolder = folder / "unet", "unet"
    elif (folder / "config.json").is_file():
        unet_folder, subfolder = folder, None
    else:
        raise UsageError(
            f"--model {folder}: not a diffusers pipeline folder (model_index.json) or UNet2DModel folder (config.json)"
        )
    unet_variant = component_variants(folder, {"unet": unet_folder}, variant)["unet"]
    try:
        # low_cpu_mem_usage=False: every weight goes through load_state_dict, so missing ones are listed, not left
        # on the meta device or silently random.
        unet, loading = UNet2DModel.from_pretrained(
            folder,
            subfolder=subfolder,
            variant=unet_variant,
            **{compat.dtype_keyword(): dtype},
            low_cpu_mem_usage=False,
            output_loading_info=True,
        )
        if subfolder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
            scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        else:
            scheduler = DDIMScheduler()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UsageError(f"--model {folder}: cannot load it ({load_error_text(exc)})") from None
    problems = loading_problems(loading)
    if problems:
        raise UsageError(f"--model {folder}: the weights do not match the UNet config: {'; '.join(problems)}")

    pipe = DDIMPipeline(unet=unet, scheduler=scheduler).to(device)
    pipe.unet.eval()
    about = {"path": str(folder.resolve()), "unet_files_sha256": loaded_files_sha256(unet_folder, unet_variant)}
    return pipe, about


def loading_problems(loading: dict) -> list[str]:
    """What a ``from_pretrained(..., output_loading_info=True)`` report says is wrong with the weights, one phrase
    per kind (missing, of another shape, unexpected); empty when every weight fits."""
    return [
        f"{len(loading[key])} {what} (e.g. {sorted(loading[key])[0]!r})"
        for key, what in (
            ("missing_keys", "weights missing"),
            ("mismatched_keys", "weights of another shape"),
            ("unexpected_keys", "weights the config has no place for"),
        )
        if loading.get(key)
    ]


def load_error_text(exc: BaseException) -> str:
    # load_state_dict lists every mismatch after a heading line: the first mismatch says more than the heading.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "mismatch" in line or "Missing key" in line or "Unexpected key" in line:
            return line if len(lines) <= 2 else f"{line} and {len(lines) - 2} more"
    return first_line(exc)


def _check_grid_size(count: int, pipe: Any, scale: int) -> None:
    sample_size = pipe.unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    # A Stable Diffusion sampler knows its image size (the UNet's is in latents).
    height, width = getattr(pipe, "image_size", (height, width))
    grid_width, grid_height = grid_size(count, height, width, scale)
    if grid_width * grid_height > MAX_GRID_PIXELS:
        raise UsageError(
            f"--scale {scale}: a grid of {count} images would be {grid_width}x{grid_height} pixels, above the "
            f"limit of {MAX_GRID_PIXELS} (PIL's image-size limit); use a smaller --scale, or --out DIR for one file "
            "per image"
        )


def _save_npz(
    handle: IO[bytes],
    images: np.ndarray,
    seeds: np.ndarray,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    from fastddim import outputs

    arrays = {
        "images": images,
        "seeds": seeds.astype(np.int64),
        "seed": np.int64(seeds[0]),
        "steps": np.int64(args.steps),
        "eta": np.float64(args.eta),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    outputs.write_npz(handle, arrays)


def _shape_text(images: np.ndarray) -> str:
    return "x".join(str(size) for size in images.shape[1:])
