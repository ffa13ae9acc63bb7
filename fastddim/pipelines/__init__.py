"""Stable Diffusion-family pipelines whose whole DDIM denoising loop runs as one CUDA graph."""

from fastddim.pipelines.img2img import StableDiffusionImg2ImgPipeline
from fastddim.pipelines.stable_diffusion import StableDiffusionPipeline
from fastddim.pipelines.stable_diffusion_xl import StableDiffusionXLPipeline
from fastddim.pipelines.stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline

__all__ = [
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLPipeline",
]
