"""fastddim: a Triton-fused, CUDA-graph-ready DDIM sampler for diffusers."""

from diffusers import SchedulerMixin

from fastddim.interpolation import slerp
from fastddim.inverse import DDIMInverseScheduler
from fastddim.pipeline import DDIMPipeline
from fastddim.scheduler import DDIMScheduler

__version__ = "0.1.0"

__all__ = ["DDIMInverseScheduler", "DDIMPipeline", "DDIMScheduler", "SchedulerMixin", "__version__", "slerp"]
