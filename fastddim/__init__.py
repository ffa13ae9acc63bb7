"""fastddim: a Triton-fused, CUDA-graph-ready DDIM sampler for diffusers."""

__version__ = "0.1.0"
