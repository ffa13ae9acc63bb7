"""fastddim.seeds and DDIMPipeline(seeds=...): an image depends on its seed only, not on its batch."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

import fastddim
from fastddim import seeds as seed_lists
from tests.helpers import make_unet


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("0-2,20,30-31", [0, 1, 2, 20, 30, 31]),
        ("7,3,5-6", [7, 3, 5, 6]),
        (" 4 - 5 , 9", [4, 5, 9]),
        (f"{seed_lists.MAX_SEED}", [seed_lists.MAX_SEED]),
    ],
)
def test_parse_seeds(text, expected):
    seeds = seed_lists.parse_seeds(text)
    assert seeds.dtype == np.int64 and seeds.tolist() == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "is not a seed"),
        ("a-3", "is not a seed"),
        ("-1", "is not a seed"),
        ("3--1", "non-negative"),
        ("5-3", "A <= B"),
        ("0-9,5", "seed 5 is listed more than once"),
        ("0-3,3-4", "seed 3 is listed more than once"),
        (f"{seed_lists.MAX_SEED + 1}", "at most"),
        (f"0-{seed_lists.MAX_SEEDS}", "more than"),
        ("1,,2", "is not a seed"),
    ],
)
def test_parse_seeds_rejects(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        seed_lists.parse_seeds(text)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_cover_the_seeds_once(world_size):
    seeds = seed_lists.parse_seeds("0-9,100-103")
    shards = [seed_lists.shard(seeds, rank, world_size) for rank in range(world_size)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(seeds.tolist())
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank"):
        seed_lists.shard(seeds, world_size, world_size)


def test_batches():
    seeds = np.arange(7, dtype=np.int64)
    assert [b.tolist() for b in seed_lists.batches(seeds, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize(
    ("seeds", "error"),
    [
        ([], ValueError),
        ([1, 1], ValueError),
        ([-1], ValueError),
        ([1.0], TypeError),
        ("12", TypeError),
        ([True], TypeError),
    ],
)
def test_seed_generators_rejects(seeds, error):
    with pytest.raises(error):
        seed_lists.seed_generators(seeds)


class ElementwiseUNet(UNet2DModel):
    """A UNet whose output at each element depends on that element only: no batch-size rounding at all, so the
    images are a pure function of the noise and compare bit for bit."""

    def forward(self, sample, timestep, *args, **kwargs):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=torch.tanh(sample) * 0.5 + 0.001 * timestep)


@pytest.fixture(scope="module")
def elementwise_pipe():
    pipe = fastddim.DDIMPipeline(unet=make_unet(ElementwiseUNet), scheduler=fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_image_depends_on_its_seed_only(elementwise_pipe, eta):
    """The noise, bit for bit: seed s's image is the same alone, in any batch, at any position."""

    def draw(seeds):
        return elementwise_pipe(seeds=seeds, eta=eta, num_inference_steps=4, output_type="np").images

    together = draw([5, 9, 2, 7])
    for position, seed in enumerate([5, 9, 2, 7]):
        np.testing.assert_array_equal(draw([seed])[0], together[position])
    np.testing.assert_array_equal(draw([7, 2])[::-1], together[2:])
    # Different seeds, different images.
    assert not np.array_equal(together[0], together[1])


def test_seeds_match_a_generator_list(elementwise_pipe):
    """seeds=[...] is the generator-list mode with one CPU generator per seed (the existing mode keeps its meaning)."""
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = elementwise_pipe(batch_size=2, generator=generators, eta=1.0, num_inference_steps=3, output_type="np")
    got = elementwise_pipe(seeds=[3, 4], eta=1.0, num_inference_steps=3, output_type="np")
    np.testing.assert_array_equal(got.images, expected.images)


def test_seeds_with_the_real_unet_stay_within_batch_rounding():
    pipe = fastddim.DDIMPipeline(unet=make_unet(), scheduler=fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    together = pipe(seeds=[0, 1, 2], eta=1.0, num_inference_steps=3, output_type="np").images
    alone = pipe(seeds=[1], eta=1.0, num_inference_steps=3, output_type="np").images
    # fp32 convolutions of another batch size may round differently: a few ulps, far below one 8-bit level.
    np.testing.assert_allclose(alone[0], together[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        (dict(seeds=[1], generator=torch.Generator()), ValueError, "either generator or seeds"),
        (dict(seeds=[1, 2], batch_size=3), ValueError, "batch_size must be 1 or len"),
        (dict(seeds=[1, 1]), ValueError, "repeat"),
        (dict(seeds=7), TypeError, "list of ints"),
    ],
    ids=["with-generator", "other-batch-size", "duplicate", "not-a-list"],
)
def test_seeds_argument_errors(elementwise_pipe, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        elementwise_pipe(num_inference_steps=2, output_type="np", **kwargs)


def test_seeds_set_the_batch_size(elementwise_pipe):
    images = elementwise_pipe(seeds=[1, 2, 3], batch_size=3, num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seeds_through_the_graph_path_on_the_cpu(elementwise_pipe, stand_in_graphs, eta):
    """The captured loop's noise buffer is filled from the per-seed generators: batch 1, 7 and 64 agree bit for bit."""
    seeds = list(range(100, 164))

    def draw(chosen):
        return elementwise_pipe(seeds=chosen, eta=eta, num_inference_steps=3, output_type="np", cuda_graph=True).images

    full = draw(seeds)
    for size in (1, 7):
        np.testing.assert_array_equal(draw(seeds[-size:]), full[-size:])
    assert len(stand_in_graphs) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seeds_in_the_captured_loop_do_not_depend_on_the_batch(eta):
    """On CUDA x_T comes from the per-seed CPU generators and the step noise is keyed by seed in the kernel: bit for
    bit at batch 1, 7 and 64."""
    seeds = list(range(100, 164))
    exact = fastddim.DDIMPipeline(unet=make_unet(ElementwiseUNet), scheduler=fastddim.DDIMScheduler()).to("cuda")
    real = fastddim.DDIMPipeline(unet=make_unet(), scheduler=fastddim.DDIMScheduler()).to("cuda")
    for pipe in (exact, real):
        pipe.set_progress_bar_config(disable=True)

    def draw(pipe, chosen):
        return pipe(seeds=chosen, eta=eta, num_inference_steps=5, output_type="pt", cuda_graph=True).images

    full_exact, full_real = draw(exact, seeds), draw(real, seeds)
    for size in (1, 7):
        # Elementwise UNet: the image is a pure function of the noise, so equal images mean equal noise.
        torch.testing.assert_close(draw(exact, seeds[-size:]), full_exact[-size:], atol=0, rtol=0)
        # The real UNet: cuDNN may pick other algorithms at another batch size; stay within one 8-bit level.
        torch.testing.assert_close(draw(real, seeds[-size:]), full_real[-size:], atol=1 / 255, rtol=0)
    assert exact.cuda_graph_cache_info().misses >= 3
