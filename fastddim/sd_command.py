"""``fastddim sample`` on Stable Diffusion and SDXL folders: text-to-image, and image-to-image with ``--init-image``;
``fastddim interpolate`` (`fastddim.interpolate_command`) on them too, text-to-image from given latents.

`fastddim.sample_command` runs the job (seeds, outputs, manifests, ``--resume``, torchrun ranks); this module adds
what a text-conditioned model needs: its options (``--prompt``, ``--negative-prompt``, ``--guidance-scale``,
``--height``/``--width``, ``--init-image``/``--strength``), checked before sampling; loading the folder as
`fastddim.StableDiffusionPipeline`, `fastddim.StableDiffusionXLPipeline` or, for an SDXL refiner folder (which needs
``--init-image``), `fastddim.StableDiffusionXLImg2ImgPipeline`, with every weight accounted for (with ``--init-image``
a text-to-image folder runs its family's image-to-image pipeline on the same modules); and
`PromptedSampler`, which draws a batch of seeds as `fastddim.DDIMPipeline` does.

Seeds: image ``s`` comes from ``torch.Generator("cpu").manual_seed(s)`` alone, the generator of a direct pipeline
call with ``generator=`` that seed: it draws the initial latents (img2img: the VAE's latent sample, then the noise
``add_noise`` mixes in), then each step's noise for eta > 0. The prompt is encoded once per batch and repeated, so an
image does not depend on the batch size beyond the UNet's batch-size rounding.

Sampler: `fastddim sample` samples with DDIM. A folder whose scheduler is DDIM (diffusers' or fastddim's) runs it as
configured. A folder with another scheduler of the same discrete noise schedule (SD 1.5's PNDM, SDXL's Euler...)
runs `fastddim.DDIMScheduler.from_config` of that scheduler's config (the recipe of diffusers' docs), and the run
says so in one ``note:`` line on stderr; a scheduler without such a schedule (no ``beta_schedule`` or
``trained_betas``) is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import pathlib
import sys
from typing import TYPE_CHECKING, Any

from fastddim import compat
from fastddim.cli import UsageError
from fastddim.utils import first_line
from fastddim.weight_variants import component_variants, loaded_files_sha256

if TYPE_CHECKING:
    import PIL.Image
    import torch

__all__ = ["PromptedSampler", "add_arguments", "load_if_prompted", "model_kind"]

# model_index.json class names and the kind they load as.
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
# Folders of these pipelines hold UNets that only image-to-image can drive (SDXL's refiner conditions on an aesthetic
# score, which text-to-image does not give): they need --init-image, and load as this fastddim pipeline.
IMAGE_TO_IMAGE_PIPELINES = {"StableDiffusionXLImg2ImgPipeline": "an SDXL image-to-image (refiner) folder"}
# diffusers' defaults for the two families.
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0}
# The options that only a text-conditioned folder takes (argparse dest, flag).
PROMPTED_OPTIONS = (
    ("prompt", "--prompt"),
    ("negative_prompt", "--negative-prompt"),
    ("guidance_scale", "--guidance-scale"),
    ("height", "--height"),
    ("width", "--width"),
    ("init_image", "--init-image"),
    ("strength", "--strength"),
)
# The components whose weights make the pixels: each is loaded with its library's loading report.
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Full-size images: a grid of them is not upscaled unless --scale says so.
GRID_SCALE = 1


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _multiple_of_8(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 8, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, image_to_image: bool = True) -> None:
    """Adds the Stable Diffusion options to a command's parser (all default to None: "not given").

    Without ``image_to_image`` (``fastddim interpolate``) ``--init-image`` and ``--strength`` are still parsed, but
    hidden from ``--help``, so that the command can refuse them in one line of its own.
    """
    folders = "a StableDiffusionPipeline or StableDiffusionXLPipeline folder"
    if image_to_image:
        folders = (
            "a StableDiffusionPipeline, StableDiffusionXLPipeline or StableDiffusionXLImg2ImgPipeline (refiner, needs "
            "--init-image) folder"
        )
    group = parser.add_argument_group(
        "Stable Diffusion / SDXL folders",
        f"with --model {folders}; a scheduler other than DDIM is replaced by fastddim.DDIMScheduler on its noise "
        "schedule (a note says so)",
    )
    group.add_argument("--prompt", metavar="TEXT", help="the text prompt (required for these folders)")
    group.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (needs guidance > 1)")
    group.add_argument(
        "--guidance-scale",
        type=_guidance,
        metavar="G",
        help="classifier-free guidance weight, 1 or less: none (default: 7.5 for SD, 5.0 for SDXL)",
    )
    group.add_argument(
        "--height",
        type=_multiple_of_8,
        help="image height in pixels, a multiple of 8 (default: the model's"
        + ("; img2img: the init image's)" if image_to_image else ")"),
    )
    group.add_argument("--width", type=_multiple_of_8, help="image width in pixels, a multiple of 8 (as --height)")
    group.add_argument(
        "--init-image",
        metavar="PATH",
        help="image-to-image from this picture (resized to --height/--width when given)"
        if image_to_image
        else argparse.SUPPRESS,
    )
    group.add_argument(
        "--strength",
        type=_strength,
        metavar="S",
        help="with --init-image: how much of the schedule reruns, in (0, 1] (default: 0.8)"
        if image_to_image
        else argparse.SUPPRESS,
    )


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def model_kind(model: str | None) -> str | None:
    """``"sd"`` or ``"sdxl"`` for a Stable Diffusion-family folder, None for anything else (left to `load_pipeline`).

    A folder counts when its model_index.json names a Stable Diffusion / SDXL pipeline, or when its UNet is a
    ``UNet2DConditionModel`` (then SDXL if it has a second text encoder).
    """
    if model is None:
        return None
    folder = pathlib.Path(model)
    index = _read_json(folder / "model_index.json")
    if index is None:
        return None
    kind = PIPELINE_KINDS.get(index.get("_class_name"))
    if kind is not None:
        return kind
    unet_config = _read_json(folder / "unet" / "config.json") or {}
    if unet_config.get("_class_name") == "UNet2DConditionModel":
        return "sdxl" if _component(index, "text_encoder_2") else "sd"
    return None


def _component(index: dict, name: str) -> tuple[str, str] | None:
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry):
        return entry[0], entry[1]
    return None


def load_if_prompted(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rank: int = 0
) -> tuple[PromptedSampler, dict] | None:
    """The hook of `fastddim.sample_command` and `fastddim.interpolate_command`: loads a Stable Diffusion-family
    ``--model`` and checks its options.

    Args:
        args (`argparse.Namespace`): the command's arguments (``args.command`` names it in messages; default
            ``sample``).
        device (`torch.device`), dtype (`torch.dtype`): where and in what the pipeline runs.
        rank (`int`, *optional*): this process's rank; only rank 0 prints the scheduler note (when sampling starts,
            so that an error found before stays the only line on stderr).

    Returns:
        `tuple[PromptedSampler, dict] | None`: the sampler and what identifies the model (``path``,
        ``unet_files_sha256``), or None for a model that is not a Stable Diffusion folder, after refusing the
        options only those take.

    Raises:
        UsageError: a missing or misplaced option, an unreadable init image, a folder that does not load.
    """
    program = f"fastddim {getattr(args, 'command', None) or 'sample'}"
    if args.model is not None and not pathlib.Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such folder")
    if args.model is not None and program != "fastddim sample":
        index = _read_json(pathlib.Path(args.model) / "model_index.json") or {}
        image_to_image_only = IMAGE_TO_IMAGE_PIPELINES.get(index.get("_class_name"))
        if image_to_image_only is not None:
            raise UsageError(
                f"--model {args.model}: {image_to_image_only}; {program} runs Stable Diffusion and SDXL text-to-image "
                "folders"
            )
    kind = model_kind(args.model)
    if kind is None:
        given = [flag for dest, flag in PROMPTED_OPTIONS if getattr(args, dest, None) is not None]
        if given:
            what = f"--model {args.model}" if args.model else "the default digits model"
            raise UsageError(f"{given[0]}: {what} is unconditional; {given[0]} applies to Stable Diffusion folders")
        return None
    options = _check_options(args, kind)
    init_image = _read_init_image(args) if args.init_image is not None else None
    folder = pathlib.Path(args.model)
    components = {
        child.name: child for child in sorted(folder.iterdir()) if child.is_dir() and not child.name.startswith(".")
    }
    variants = component_variants(folder, components, args.variant)
    pipe, original_scheduler = _load(folder, kind, device, dtype, variants, args.variant)
    latent_channels = pipe.vae.config.latent_channels
    if pipe.unet.config.in_channels != latent_channels:
        raise UsageError(
            f"--model {args.model}: its UNet takes {pipe.unet.config.in_channels} input channels, not the VAE's "
            f"{latent_channels} latent channels (an inpainting or depth model?); {program} runs text-to-image "
            + ("and image-to-image UNets" if program == "fastddim sample" else "UNets")
        )
    if init_image is not None:
        import fastddim

        if not isinstance(pipe, fastddim.StableDiffusionXLImg2ImgPipeline):
            # A text-to-image folder's modules, shared, in its family's image-to-image pipeline (diffusers' from_pipe).
            image_to_image = {
                "sd": fastddim.StableDiffusionImg2ImgPipeline,
                "sdxl": fastddim.StableDiffusionXLImg2ImgPipeline,
            }
            pipe = image_to_image[kind].from_pipe(pipe)
    sampler = PromptedSampler(pipe, kind, options, init_image, folder, variants, original_scheduler)
    if original_scheduler is not None and rank == 0:
        sampler.note = (
            f"note: {args.model}'s scheduler is {original_scheduler}; {program} runs DDIM on its noise "
            "schedule (fastddim.DDIMScheduler.from_config)"
        )
    if args.scale is None:
        args.scale = GRID_SCALE
    return sampler, {"path": str(folder.resolve()), "unet_files_sha256": sampler.unet_sha256()}


def _check_options(args: argparse.Namespace, kind: str) -> dict:
    """The pixel-changing options with their defaults, or the first one-line error."""
    if args.prompt is None:
        raise UsageError(f"--prompt: --model {args.model} is a text-to-image model; pass --prompt TEXT")
    guidance = DEFAULT_GUIDANCE[kind] if args.guidance_scale is None else args.guidance_scale
    if args.negative_prompt is not None and guidance <= 1:
        raise UsageError(
            f"--negative-prompt: has no effect with --guidance-scale {guidance:g} (classifier-free guidance needs > 1)"
        )
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength: applies to image-to-image; pass --init-image PATH")
    index = _read_json(pathlib.Path(args.model) / "model_index.json") or {}
    image_to_image_only = IMAGE_TO_IMAGE_PIPELINES.get(index.get("_class_name"))
    if image_to_image_only is not None and args.init_image is None:
        raise UsageError(f"--init-image: --model {args.model} is {image_to_image_only}; pass --init-image PATH")
    strength = None if args.init_image is None else (0.8 if args.strength is None else args.strength)
    # diffusers' get_timesteps reruns int(steps * strength) steps; with none, the noised init image would come back.
    if strength is not None and int(args.steps * strength) < 1:
        raise UsageError(
            f"--strength {strength:g}: with --steps {args.steps} no denoising step runs (int(steps x strength) = 0); "
            "raise --strength or --steps"
        )
    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "guidance_scale": guidance,
        "height": args.height,
        "width": args.width,
        "strength": strength,
    }


def _read_init_image(args: argparse.Namespace) -> PIL.Image.Image:
    """The init image as RGB, decoded now (so a broken file fails before sampling), resized to --height/--width."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(args.init_image)
    if not path.is_file():
        raise UsageError(f"--init-image {args.init_image}: no such file")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UsageError(f"--init-image {args.init_image}: cannot read it as an image ({first_line(exc)})") from None
    if image.width < 8 or image.height < 8:
        raise UsageError(f"--init-image {args.init_image}: {image.width}x{image.height} is smaller than 8x8 pixels")
    if args.height is not None or args.width is not None:
        size = (args.width or image.width, args.height or image.height)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _load(
    folder: pathlib.Path,
    kind: str,
    device: torch.device,
    dtype: torch.dtype,
    variants: dict[str, str | None],
    variant: str | None,
) -> tuple[Any, str | None]:
    """The fastddim pipeline of ``folder`` and the name of the scheduler it replaced (None: the folder's is DDIM).

    The weighted components load the variant ``variants`` names for each; the pipeline's other components (a safety
    checker, say) load ``variant`` as diffusers' pipeline loader resolves it.
    """
    from diffusers.utils import logging as diffusers_logging

    import fastddim

    # Loading notices and progress bars are noise for a command-line user (errors are reported as one line).
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        import transformers
    except ImportError:
        raise UsageError(
            f"--model {folder}: Stable Diffusion folders need transformers (pip install transformers)"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    index = _read_json(folder / "model_index.json") or {}
    if index.get("_class_name") in IMAGE_TO_IMAGE_PIPELINES:
        pipeline_class = getattr(fastddim, index["_class_name"])
    else:
        pipeline_class = fastddim.StableDiffusionXLPipeline if kind == "sdxl" else fastddim.StableDiffusionPipeline
    try:
        components = {
            name: _load_component(folder, name, index, dtype, variants.get(name)) for name in WEIGHTED_COMPONENTS
        }
        components = {name: module for name, module in components.items() if module is not None}
        pipe = pipeline_class.from_pretrained(folder, variant=variant, **{compat.dtype_keyword(): dtype}, **components)
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        from fastddim.sample_command import load_error_text

        raise UsageError(f"--model {folder}: cannot load it ({load_error_text(exc)})") from None
    original = None
    if not isinstance(pipe.scheduler, fastddim.DDIMScheduler):
        config = dict(pipe.scheduler.config)
        if "num_train_timesteps" not in config or (
            config.get("beta_schedule") is None and config.get("trained_betas") is None
        ):
            raise UsageError(
                f"--model {folder}: its scheduler {type(pipe.scheduler).__name__} has no discrete noise schedule "
                "(beta_schedule or trained_betas) for DDIM to sample"
            )
        original = type(pipe.scheduler).__name__
        pipe.scheduler = fastddim.DDIMScheduler.from_config(config)
    return pipe.to(device), original


def _load_component(folder: pathlib.Path, name: str, index: dict, dtype: torch.dtype, variant: str | None) -> Any:
    """Loads one weighted component (its ``variant`` weights, if any) with its library's loading report; refuses
    missing or unexpected weights.

    diffusers' pipeline loader would fill weights missing from a file with random values and only log it.
    """
    entry = _component(index, name)
    if entry is None or entry[0] not in ("diffusers", "transformers"):
        return None
    library, class_name = entry
    model_class = getattr(importlib.import_module(library), class_name, None)
    if model_class is None:
        raise UsageError(f"--model {folder}: {name} is a {library}.{class_name}, which {library} does not have")
    if library == "diffusers":
        # low_cpu_mem_usage=False: every weight goes through load_state_dict, so missing ones are listed.
        module, loading = model_class.from_pretrained(
            folder,
            subfolder=name,
            variant=variant,
            **{compat.dtype_keyword(): dtype},
            low_cpu_mem_usage=False,
            output_loading_info=True,
        )
    else:
        # Loaded as stored, then cast: the same values as loading in dtype, without the dtype keyword's
        # version-dependent name.
        module, loading = model_class.from_pretrained(folder / name, variant=variant, output_loading_info=True)
        module = module.to(dtype)
    from fastddim.sample_command import loading_problems

    problems = loading_problems(loading)
    if problems:
        raise UsageError(f"--model {folder}: the {name} weights do not match its config: {'; '.join(problems)}")
    return module


@dataclasses.dataclass
class PromptedSampler:
    """A Stable Diffusion pipeline behind `fastddim.DDIMPipeline`'s ``seeds`` call, as ``fastddim sample`` uses it,
    and its ``latents`` call, as ``fastddim interpolate`` does.

    Attributes:
        pipe: the fastddim pipeline (`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`,
            `StableDiffusionXLPipeline` or `StableDiffusionXLImg2ImgPipeline`).
        kind (`str`): ``"sd"`` or ``"sdxl"``.
        options (`dict`): prompt, negative prompt, guidance scale, height, width, strength (None where unused).
        init_image (`PIL.Image.Image`, *optional*): img2img's input, already resized.
        folder (`pathlib.Path`): the model folder.
        variants (`dict`): the weight variant each component folder loaded (None: its plain weights).
        replaced_scheduler (`str`, *optional*): the folder's scheduler class where DDIM replaced it.
        note (`str`, *optional*): a line printed on stderr at the first call.
        component_hashes (`dict`): the files' hash of each component folder read so far.
    """

    pipe: Any
    kind: str
    options: dict
    init_image: PIL.Image.Image | None
    folder: pathlib.Path
    variants: dict[str, str | None]
    replaced_scheduler: str | None = None
    note: str | None = None
    component_hashes: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images, as the pipeline resolves them."""
        factor = self.pipe.vae_scale_factor
        if self.init_image is not None:
            # diffusers' image processor rounds the image down to a multiple of the VAE's factor.
            return self.init_image.height // factor * factor, self.init_image.width // factor * factor
        sample_size = self.pipe.unet.config.sample_size
        default = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        return (
            self.options["height"] or default[0] * factor,
            self.options["width"] or default[1] * factor,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one text-to-image x_T, as diffusers' ``prepare_latents`` draws it."""
        height, width = self.image_size
        factor = self.pipe.vae_scale_factor
        return self.pipe.unet.config.in_channels, height // factor, width // factor

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(
        self,
        seeds: list[int] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        output_type: str = "np",
        cuda_graph: bool | None = None,
        latents: torch.Tensor | None = None,
    ) -> Any:
        """Draws one image per seed (see the module docstring), or per row of text-to-image ``latents`` (x_T, as
        `fastddim.DDIMPipeline` takes them; no generator then), and returns the pipeline's output."""
        from fastddim.seeds import seed_generators

        if (seeds is None) == (latents is None):
            raise ValueError("pass either seeds or latents")
        if latents is not None and self.init_image is not None:
            raise ValueError("latents are x_T of text-to-image; image-to-image draws its own from the init image")
        if self.note is not None:
            print(self.note, file=sys.stderr)
            self.note = None
        kwargs = dict(
            prompt=self.options["prompt"],
            negative_prompt=self.options["negative_prompt"],
            guidance_scale=self.options["guidance_scale"],
            num_images_per_prompt=len(seeds) if latents is None else len(latents),
            generator=None if seeds is None else seed_generators(seeds),
            eta=eta,
            num_inference_steps=num_inference_steps,
            output_type=output_type,
            cuda_graph=cuda_graph,
        )
        if self.init_image is not None:
            kwargs.update(image=self.init_image, strength=self.options["strength"])
        else:
            height, width = self.image_size
            kwargs.update(height=height, width=width, latents=latents)
        return self.pipe(**kwargs)

    def unet_sha256(self) -> str:
        """The hash of the UNet files read (what `fastddim.sample_command` calls the model's identity)."""
        return self._component_sha256("unet")

    def _component_sha256(self, name: str) -> str:
        # Each component folder is read once: a Stable Diffusion UNet alone is gigabytes.
        if name not in self.component_hashes:
            self.component_hashes[name] = loaded_files_sha256(self.folder / name, self.variants.get(name))
        return self.component_hashes[name]

    def pixel_settings(self) -> dict:
        """The settings beyond `fastddim.sample_command`'s that change the pixels (for the folder's settings hash).

        The model is every component's files read (text encoders, tokenizers and VAE change the pixels too; of the
        weights, only the variant loaded); the init image is its decoded, resized pixels, so a re-encoded copy of the
        same picture resumes.
        """
        digest = hashlib.sha256((self.folder / "model_index.json").read_bytes())
        for child in sorted(self.folder.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                digest.update(f"\0{child.name}\0{self._component_sha256(child.name)}".encode())
        height, width = self.image_size
        settings = {
            "stable_diffusion": {
                "pipeline": type(self.pipe).__name__,
                "model_files_sha256": digest.hexdigest(),
                "replaced_scheduler": self.replaced_scheduler,
            },
            "prompt": self.options["prompt"],
            "negative_prompt": self.options["negative_prompt"],
            "guidance_scale": self.options["guidance_scale"],
            "height": height,
            "width": width,
        }
        if self.init_image is not None:
            pixels = hashlib.sha256(self.init_image.tobytes()).hexdigest()
            settings.update(init_image_pixels_sha256=pixels, strength=self.options["strength"])
        return settings
