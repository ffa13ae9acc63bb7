"""Stable Diffusion-family pipelines whose whole DDIM denoising loop runs as one CUDA graph."""

from fastddim.pipelines.img2img import StableDiffusionImg2ImgPipeline
from fastddim.pipelines.stable_diffusion import StableDiffusionPipeline
from fastddim.pipelines.stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["StableDiffusionImg2ImgPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline"]
