"""Weight variants (``--variant``): which a model folder holds, which one each component loads, which files it reads.

diffusers and transformers name a variant's weights ``<stem>.<variant>.<format>`` (``diffusion_pytorch_model.fp16
.safetensors``, ``model.fp16-00001-of-00002.safetensors``, index ``model.safetensors.index.fp16.json``; the older
sharded naming of diffusers' models ``diffusion_pytorch_model-00001-of-00002.fp16.safetensors`` with index
``diffusion_pytorch_model.safetensors.fp16.index.json`` too). As diffusers' pipelines do, a component loads the asked
variant where it has one and its plain weights otherwise; a component with neither, or a variant no component has, is
a one-line error here rather than a loader's multi-line one.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

from fastddim import digest_cache
from fastddim.cli import UsageError

__all__ = ["component_variants", "loaded_files_sha256", "variants_in"]

_STEMS = "diffusion_pytorch_model|pytorch_model|model"
_FORMATS = "safetensors|bin"
_SHARD = r"-\d{5}-of-\d{5}"
_NAMES = (
    re.compile(rf"(?:{_STEMS})(?:\.(?P<variant>[^.]+?))?(?:{_SHARD})?\.(?P<format>{_FORMATS})"),
    re.compile(rf"(?:{_STEMS})\.(?P<format>{_FORMATS})\.index(?:\.(?P<variant>[^.]+))?\.json"),
    # The older sharded variant naming, which diffusers' models still load (with a deprecation warning) and
    # transformers' do not.
    re.compile(rf"diffusion_pytorch_model{_SHARD}\.(?P<variant>[^.]+)\.(?P<format>{_FORMATS})"),
    re.compile(rf"diffusion_pytorch_model\.(?P<format>{_FORMATS})\.(?P<variant>[^.]+)\.index\.json"),
)


def _weights_file(path: pathlib.Path) -> tuple[str | None, str] | None:
    """(variant or None for plain weights, format) of a weights or shard-index file; None for any other file."""
    for pattern in _NAMES:
        if match := pattern.fullmatch(path.name):
            return match["variant"], match["format"]
    return None


def variants_in(folder: pathlib.Path) -> set[str | None]:
    """The variants of the weights in ``folder`` (None: plain weights); empty when it holds no weights."""
    return {parsed[0] for path in folder.iterdir() if path.is_file() and (parsed := _weights_file(path))}


def _quoted(variants: set[str]) -> str:
    return ", ".join(repr(variant) for variant in sorted(variants))


def component_variants(
    model: pathlib.Path, components: dict[str, pathlib.Path], variant: str | None
) -> dict[str, str | None]:
    """The variant each component folder loads (None: its plain weights), checked before anything loads.

    Args:
        model (`pathlib.Path`): the ``--model`` folder, for the messages.
        components (`dict[str, pathlib.Path]`): each component's name and folder (a UNet2DModel folder: one).
        variant (`str`, *optional*): ``--variant``.

    Raises:
        UsageError: without ``variant``, a component has only variant weights; with it, no component has that
            variant, or one has neither it nor plain weights.
    """
    found = {name: variants_in(folder) for name, folder in components.items()}
    named = {name: variants - {None} for name, variants in found.items()}
    if variant is None:
        variant_only = [name for name, variants in found.items() if variants and None not in variants]
        if variant_only:
            offered = set().union(*(named[name] for name in variant_only))
            where = f" ({', '.join(variant_only)})" if len(components) > 1 else ""
            choices = " or ".join(f"--variant {name}" for name in sorted(offered))
            raise UsageError(f"--model {model} has only {_quoted(offered)} variant weights{where}: pass {choices}")
        return {name: None for name in components}
    if not any(variant in variants for variants in named.values()):
        offered = set().union(*named.values())
        held = [f"{_quoted(offered)} variant weights"] if offered else []
        if any(None in variants for variants in found.values()):
            held.append("plain weights (no --variant)")
        raise UsageError(
            f"--variant {variant}: --model {model} has no {variant!r} weights; it has "
            f"{' and '.join(held) or 'no weights files'}"
        )
    for name, variants in named.items():
        if variants and variant not in variants and None not in found[name]:
            raise UsageError(
                f"--variant {variant}: the {name} of --model {model} has only {_quoted(variants)} variant weights"
            )
    return {name: variant if variant in found[name] else None for name in components}


def loaded_files_sha256(folder: pathlib.Path, variant: str | None = None) -> str:
    """A hash of the files a load of ``folder`` with ``variant`` reads (names and contents): its configs and other
    files, and of its weights only those of that variant, in the format the loaders prefer (safetensors over bin).
    Remembered across runs while the files are unchanged (`fastddim.digest_cache`).
    """
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    weights = {path: parsed for path in files if (parsed := _weights_file(path))}
    chosen_formats = {fmt for found_variant, fmt in weights.values() if found_variant == variant}
    preferred = "safetensors" if "safetensors" in chosen_formats else "bin"
    read = [path for path in files if path not in weights or weights[path] == (variant, preferred)]

    def compute() -> str:
        digest = hashlib.sha256()
        for path in read:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
        return digest.hexdigest()

    return digest_cache.remembered_digest(f"{folder.resolve()}\0{variant}", read, compute)
