"""DDIMPipeline(seeds=...) on CUDA with eta > 0: per-sample Philox noise keyed by (seed, timestep) inside the captured
loop. The noise is the same bit for bit at batch 1, 7 and 64, and so is the image up to the UNet's batch-size rounding;
new seeds replay the same graph without a host sync.
"""

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

import fastddim
from tests.helpers import host_syncs_forbidden, make_unet

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_float32_math")]

STEPS = 10
SEEDS = list(range(1000, 1064))
# Seed SEEDS[3] sits at position 3 of the batch of 7 and of 64, and alone in the batch of 1.
BATCHES = {1: [SEEDS[3]], 7: SEEDS[:7], 64: SEEDS}


class ElementwiseUNet(UNet2DModel):
    """Output at each element depends on that element only: the image is a per-element function of x_T and the step
    noises, so equal images mean equal noise, bit for bit."""

    def forward(self, sample, timestep, *args, **kwargs):
        return UNet2DOutput(sample=torch.tanh(sample) * 0.5 + 0.001 * timestep)


def make_pipe(unet_class=UNet2DModel) -> fastddim.DDIMPipeline:
    pipe = fastddim.DDIMPipeline(unet=make_unet(unet_class).to("cuda"), scheduler=fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images_by_seed(pipe: fastddim.DDIMPipeline, **kwargs) -> dict[int, dict[int, torch.Tensor]]:
    """{batch size: {seed: image}} from the captured loop, for each batch of BATCHES."""
    result = {}
    for size, seeds in BATCHES.items():
        images = pipe(seeds=seeds, eta=1.0, num_inference_steps=STEPS, output_type="pt", **kwargs).images
        result[size] = dict(zip(seeds, images, strict=True))
    return result


def test_keyed_noise_is_bit_identical_at_batch_1_7_and_64_in_the_captured_loop():
    pipe = make_pipe(ElementwiseUNet)
    graphed = images_by_seed(pipe)
    assert pipe.cuda_graph_cache_info().misses == 3  # one graph per batch size, each captured
    for seed in BATCHES[1]:
        assert torch.equal(graphed[7][seed], graphed[1][seed])
        assert torch.equal(graphed[64][seed], graphed[1][seed])
    for seed in BATCHES[7]:
        assert torch.equal(graphed[64][seed], graphed[7][seed])
    # The captured loop draws what the eager loop draws.
    eager = images_by_seed(pipe, cuda_graph=False)
    for size in BATCHES:
        for seed, image in graphed[size].items():
            assert torch.equal(image, eager[size][seed])
    assert not torch.equal(graphed[64][SEEDS[0]], graphed[64][SEEDS[1]])


def test_images_agree_up_to_the_unets_batch_size_rounding():
    """A real UNet convolves each batch size with its own kernels: a few fp32 ulps per step, below one 8-bit level."""
    pipe = make_pipe()
    graphed = images_by_seed(pipe)
    for size in (7, 64):
        for seed, image in graphed[1].items():
            assert (graphed[size][seed] - image).abs().max().item() < 1 / 255
        for seed in BATCHES[7]:
            assert (graphed[64][seed] - graphed[7][seed]).abs().max().item() < 1 / 255


def test_new_seeds_replay_the_same_graph_without_a_host_sync():
    pipe = make_pipe()
    latents = torch.randn(4, 3, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(latents=latents, eta=1.0, num_inference_steps=STEPS, output_type="pt")
    first = pipe(seeds=[0, 1, 2, 3], **kwargs).images  # captures
    torch.cuda.synchronize()
    with host_syncs_forbidden():
        other = pipe(seeds=[4, 5, 6, 7], **kwargs).images
        again = pipe(seeds=[0, 1, 2, 3], **kwargs).images
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert torch.equal(again, first)
    assert not torch.equal(other, first)
    assert torch.isfinite(other).all()
