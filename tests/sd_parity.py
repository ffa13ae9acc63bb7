"""Helpers of the CPU parity tests between fastddim's Stable Diffusion pipelines and diffusers' (importable as
``tests.sd_parity``); the ``sd``, ``sdxl`` and ``path`` fixtures are in ``tests/conftest.py``."""

import diffusers
import torch

import fastddim
from tests.sd_components import ddim_scheduler

STEPS = 4
PROMPT = "a photo of a cat"


def pair(fast_class, diffusers_class, components, **scheduler_overrides):
    """(fastddim pipeline, diffusers pipeline with diffusers' DDIMScheduler) over the same modules."""
    scheduler = ddim_scheduler(**scheduler_overrides)
    ours = fast_class(**{**components, "scheduler": scheduler})
    theirs = diffusers_class(**{**components, "scheduler": scheduler})
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert type(ours.scheduler) is fastddim.DDIMScheduler and type(theirs.scheduler) is diffusers.DDIMScheduler
    return ours, theirs


def generators(seeds):
    if isinstance(seeds, int):
        return torch.Generator("cpu").manual_seed(seeds)
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def call_both(ours, theirs, path, seeds=0, **kwargs):
    cuda_graph = path == "graph"
    mine = ours(generator=generators(seeds), output_type="np", cuda_graph=cuda_graph, **kwargs).images
    reference = theirs(generator=generators(seeds), output_type="np", **kwargs).images
    if cuda_graph:
        assert ours.cuda_graph_cache_info().misses >= 1, "the graph path was not taken"
    return mine, reference


def init_image(channels_last: bool = False) -> torch.Tensor:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return image.to(memory_format=torch.channels_last) if channels_last else image
