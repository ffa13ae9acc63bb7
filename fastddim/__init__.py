"""fastddim: a Triton-fused, CUDA-graph-ready DDIM sampler for diffusers."""

from typing import Any

from diffusers import SchedulerMixin

from fastddim.interpolation import slerp
from fastddim.inverse import DDIMInverseScheduler
from fastddim.pipeline import DDIMPipeline
from fastddim.scheduler import DDIMScheduler

__version__ = "0.1.0"

__all__ = [
    "DDIMInverseScheduler",
    "DDIMPipeline",
    "DDIMScheduler",
    "SchedulerMixin",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLPipeline",
    "__version__",
    "slerp",
]

# The Stable Diffusion pipelines import diffusers' (and so transformers, which only they need): loaded on first use.
_LAZY_PIPELINES = (
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLPipeline",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY_PIPELINES:
        try:
            import fastddim.pipelines
        except ImportError as exc:
            raise ImportError(
                f"fastddim.{name} needs diffusers' Stable Diffusion pipelines and transformers ({exc})"
            ) from exc
        return getattr(fastddim.pipelines, name)
    raise AttributeError(f"module 'fastddim' has no attribute {name!r}")
