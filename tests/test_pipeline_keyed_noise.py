"""DDIMPipeline(seeds=...) with eta > 0 on the Triton backend: step noise keyed by (seed, timestep) in the fused kernel.

On the CPU the Triton backend runs in Triton's interpreter (``FASTDDIM_BACKEND=triton``); the captured-loop engine
runs through the ``stand_in_graphs`` fixture. The GPU side (real capture, batches 1/7/64) is in
``test_pipeline_keyed_noise_gpu.py``.
"""

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor

import fastddim
from fastddim.seeds import seed_generators
from tests.helpers import make_unet

pytestmark = pytest.mark.interpreter

STEPS = 3


class ElementwiseUNet(UNet2DModel):
    """Output at each element depends on that element only: no batch-size rounding, so images compare bit for bit."""

    def forward(self, sample, timestep, *args, **kwargs):
        return UNet2DOutput(sample=torch.tanh(sample) * 0.5 + 0.001 * timestep)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")


@pytest.fixture(scope="module")
def pipe() -> fastddim.DDIMPipeline:
    pipe = fastddim.DDIMPipeline(unet=make_unet(ElementwiseUNet), scheduler=fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: fastddim.DDIMPipeline, seeds: list[int], **kwargs) -> np.ndarray:
    kwargs = {"eta": 1.0, "num_inference_steps": STEPS, "output_type": "np", "cuda_graph": False, **kwargs}
    return pipe(seeds=seeds, **kwargs).images


def test_pipeline_steps_with_keyed_noise(pipe):
    """x_T from each seed's CPU generator, then every step with noise_seeds: the pipeline's images, bit for bit."""
    seeds = [4, 11]
    x = randn_tensor((2, 3, 8, 8), generator=seed_generators(seeds), device=torch.device("cpu"))
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    noise_seeds = torch.tensor(seeds, dtype=torch.int64)
    for t in scheduler.timesteps:
        x = scheduler.step(pipe.unet(x, t).sample, t, x, eta=1.0, noise_seeds=noise_seeds).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(draw(pipe, seeds), expected)


def test_image_depends_on_its_seed_only(pipe):
    together = draw(pipe, [5, 9, 2, 7])
    for position, seed in enumerate([5, 9, 2, 7]):
        np.testing.assert_array_equal(draw(pipe, [seed])[0], together[position])
    np.testing.assert_array_equal(draw(pipe, [7, 2])[::-1], together[2:])
    assert not np.array_equal(together[0], together[1])


def test_keyed_noise_is_not_the_generators_noise(pipe, monkeypatch):
    """The documented difference: the torch backend draws step noise from the seeds' generators, the Triton backend
    from Philox keyed by the seed. Same x_T, so at eta = 0 both give one image."""
    keyed = draw(pipe, [3])
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    generated = draw(pipe, [3])
    assert not np.allclose(keyed, generated, atol=1e-3)
    deterministic_torch = draw(pipe, [3], eta=0.0)
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    np.testing.assert_allclose(draw(pipe, [3], eta=0.0), deterministic_torch, atol=1e-6, rtol=0)


def test_captured_loop_takes_the_seeds_per_call(pipe, stand_in_graphs):
    """The seed tensor is a per-call input: new seeds replay the one captured graph, which draws no host RNG."""
    pipe.clear_cuda_graph_cache()
    first = draw(pipe, [1, 2], cuda_graph=True)
    second = draw(pipe, [3, 4], cuda_graph=True)
    again = draw(pipe, [1, 2], cuda_graph=True)
    assert stand_in_graphs == [dict(num_steps=STEPS, uses_rng=False)]
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.hits) == (1, 2)
    np.testing.assert_array_equal(first, draw(pipe, [1, 2]))
    np.testing.assert_array_equal(second, draw(pipe, [3, 4]))
    np.testing.assert_array_equal(again, first)


def test_generator_mode_keeps_its_meaning(pipe, monkeypatch):
    """generator= draws the step noise from the generators on the Triton backend too, as diffusers does."""

    def with_generators() -> np.ndarray:
        generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
        kwargs = dict(eta=1.0, num_inference_steps=STEPS, output_type="np", cuda_graph=False)
        return pipe(batch_size=2, generator=generators, **kwargs).images

    triton = with_generators()
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    np.testing.assert_allclose(triton, with_generators(), atol=1e-6, rtol=0)
