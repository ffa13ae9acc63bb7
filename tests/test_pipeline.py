"""fastddim.DDIMPipeline on the CPU: parity with diffusers' DDIMPipeline, outputs, errors, scheduler handling and
save/load. The CUDA-graph path is covered by ``test_pipeline_gpu.py``."""

import json
import warnings

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import fastddim
import fastddim.graphs
from fastddim.pipeline import DEFAULT_CUDA_GRAPH_CACHE_SIZE, CudaGraphCacheInfo
from tests.helpers import make_unet

# diffusers' tests/pipelines/ddim/test_ddim.py::test_inference: 2 steps, CPU generator seed 0, image[0, -3:, -3:, -1].
DIFFUSERS_FAST_SLICE = [0.0, 9.979e-01, 0.0, 9.999e-01, 9.986e-01, 9.991e-01, 7.106e-04, 0.0, 0.0]


@pytest.fixture(scope="module")
def unet() -> diffusers.UNet2DModel:
    return make_unet()


def fast_pipe(unet: diffusers.UNet2DModel, scheduler=None) -> fastddim.DDIMPipeline:
    pipe = fastddim.DDIMPipeline(unet=unet, scheduler=scheduler if scheduler is not None else fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipe(unet: diffusers.UNet2DModel, config) -> diffusers.DDIMPipeline:
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds):
    if isinstance(seeds, int):
        return torch.Generator("cpu").manual_seed(seeds)
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def test_reproduces_diffusers_fast_test_slice(unet):
    pipe = fast_pipe(unet)
    image = pipe(generator=generators(0), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(image[0, -3:, -3:, -1].flatten(), DIFFUSERS_FAST_SLICE, atol=1e-3, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0], ids=lambda e: f"eta{e}")
@pytest.mark.parametrize("seeds", [0, (3, 4)], ids=["one-generator", "generator-list"])
@pytest.mark.parametrize("clipped", [None, True], ids=["plain", "clipped-model-output"])
def test_matches_diffusers_pipeline(unet, eta, seeds, clipped):
    config = dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.8)
    pipe = fast_pipe(unet, fastddim.DDIMScheduler(**config))
    reference = diffusers_pipe(unet, pipe.scheduler.config)
    batch_size = 2
    kwargs = dict(batch_size=batch_size, eta=eta, num_inference_steps=10, use_clipped_model_output=clipped)

    ours = pipe(generator=generators(seeds), output_type="np", **kwargs).images
    theirs = reference(generator=generators(seeds), output_type="np", **kwargs).images
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_generator_list_samples_match_single_runs(unet):
    pipe = fast_pipe(unet)
    batch = pipe(batch_size=2, generator=generators((5, 6)), eta=1.0, num_inference_steps=4, output_type="pt").images
    for i, seed in enumerate((5, 6)):
        single = pipe(batch_size=1, generator=generators(seed), eta=1.0, num_inference_steps=4, output_type="pt")
        torch.testing.assert_close(batch[i : i + 1], single.images, atol=1e-5, rtol=0)


def test_same_generator_same_images_different_generator_different_images(unet):
    pipe = fast_pipe(unet)
    kwargs = dict(batch_size=2, eta=1.0, num_inference_steps=3, output_type="pt")
    first = pipe(generator=generators(1), **kwargs).images
    again = pipe(generator=generators(1), **kwargs).images
    other = pipe(generator=generators(2), **kwargs).images
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3


def test_eta_without_generator_follows_torch_manual_seed(unet):
    pipe = fast_pipe(unet)
    kwargs = dict(eta=1.0, num_inference_steps=3, output_type="pt")
    torch.manual_seed(7)
    first = pipe(**kwargs).images
    second = pipe(**kwargs).images
    torch.manual_seed(7)
    replayed = pipe(**kwargs).images
    assert torch.equal(first, replayed)
    assert (first - second).abs().max() > 1e-3


def test_output_types(unet):
    pipe = fast_pipe(unet)
    kwargs = dict(batch_size=2, num_inference_steps=2)
    as_np = pipe(generator=generators(0), output_type="np", **kwargs).images
    as_pt = pipe(generator=generators(0), output_type="pt", **kwargs).images
    as_pil = pipe(generator=generators(0), output_type="pil", **kwargs).images
    default = pipe(generator=generators(0), **kwargs).images

    assert isinstance(as_np, np.ndarray) and as_np.shape == (2, 8, 8, 3)
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (2, 3, 8, 8)
    assert as_pt.min() >= 0 and as_pt.max() <= 1
    np.testing.assert_array_equal(as_pt.permute(0, 2, 3, 1).numpy(), as_np)
    for images in (as_pil, default):
        assert isinstance(images, list) and len(images) == 2
        assert all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) and im.mode == "RGB" for im in images)
    np.testing.assert_array_equal(np.asarray(as_pil[1]), (as_np[1] * 255).round().astype(np.uint8))

    as_tuple = pipe(generator=generators(0), output_type="np", return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    np.testing.assert_array_equal(as_tuple[0], as_np)


def test_non_square_single_channel_unet():
    unet = make_unet(sample_size=(8, 16), in_channels=1, out_channels=1)
    pipe = fast_pipe(unet)
    reference = diffusers_pipe(unet, pipe.scheduler.config)
    ours = pipe(batch_size=2, generator=generators(0), num_inference_steps=3, output_type="np").images
    theirs = reference(batch_size=2, generator=generators(0), num_inference_steps=3, output_type="np").images
    assert ours.shape == (2, 8, 16, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    images = pipe(generator=generators(0), num_inference_steps=2).images
    assert images[0].mode == "L" and images[0].size == (16, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_unet(dtype):
    half = make_unet().to(dtype)
    pipe = fast_pipe(half)
    as_np = pipe(generator=generators(0), num_inference_steps=2, output_type="np").images
    as_pt = pipe(generator=generators(0), num_inference_steps=2, output_type="pt").images
    assert as_pt.dtype == dtype
    # NumPy has no bfloat16: those arrays come back as float32; float16 stays float16, as in diffusers.
    assert as_np.dtype == (np.float16 if dtype == torch.float16 else np.float32)
    # Against diffusers' DDIM loop on the same half-precision UNet and noise, not against the fp32 UNet: torch < 2.13
    # draws CPU fp16/bf16 normals from another stream than fp32 ones. (diffusers' DDIMPipeline cannot return bf16.)
    reference = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(2)
    image = randn_tensor(as_pt.shape, generator=generators(0), dtype=dtype)
    with torch.no_grad():
        for t in reference.timesteps:
            image = reference.step(half(image, t).sample, t, image).prev_sample
    theirs = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    np.testing.assert_allclose(as_np.astype(np.float32), theirs, atol=0.02)


def test_cuda_graph_flag_on_cpu(unet):
    pipe = fast_pipe(unet)
    default = pipe(generator=generators(0), num_inference_steps=2, output_type="pt").images
    eager = pipe(generator=generators(0), num_inference_steps=2, output_type="pt", cuda_graph=False).images
    assert torch.equal(default, eager)
    with pytest.raises(ValueError, match="cuda_graph"):
        pipe(num_inference_steps=2, cuda_graph=True)
    assert pipe.cuda_graph_cache_info() == CudaGraphCacheInfo(0, 0, DEFAULT_CUDA_GRAPH_CACHE_SIZE, 0, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(output_type="latent"), ValueError, "output_type"),
        (dict(output_type=None), ValueError, "output_type"),
        (dict(batch_size=2, generator=[torch.Generator()]), ValueError, "list of generators of length 1"),
        (dict(batch_size=1, generator=[torch.Generator(), torch.Generator()]), ValueError, "length 2"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=1.5), TypeError, "batch_size"),
        (dict(eta=-0.1), ValueError, "eta"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(generator=0), TypeError, "generator"),
        (dict(cuda_graph="yes"), TypeError, "cuda_graph"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_invalid_arguments(unet, kwargs, error, match):
    with pytest.raises(error, match=match):
        fast_pipe(unet)(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_keeps_the_scheduler_it_is_given(unet):
    scheduler = fastddim.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    assert fast_pipe(unet, scheduler).scheduler is scheduler

    stock = diffusers.DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    converted = fast_pipe(unet, stock).scheduler
    assert type(converted) is fastddim.DDIMScheduler
    assert converted.config.beta_schedule == "scaled_linear" and converted.config.steps_offset == 1

    # What this pipeline fixes: diffusers' own constructor swaps any scheduler for a stock one.
    assert type(diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).scheduler) is diffusers.DDIMScheduler


def test_scheduler_assigned_after_construction_is_used(unet):
    pipe = fast_pipe(unet)
    pipe.scheduler = diffusers.DDIMScheduler()
    stock = pipe(generator=generators(0), eta=1.0, num_inference_steps=3, output_type="pt").images
    fused = fast_pipe(unet)(generator=generators(0), eta=1.0, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(stock, fused, atol=1e-5, rtol=0)


def test_save_and_load_keep_fastddim_scheduler(unet, tmp_path):
    scheduler = fastddim.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample_range=0.9)
    pipe = fast_pipe(unet, scheduler)
    pipe.save_pretrained(tmp_path)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline"
    assert index["scheduler"] == ["fastddim.scheduler", "DDIMScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]

    loaded = fastddim.DDIMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is fastddim.DDIMPipeline
    assert type(loaded.scheduler) is fastddim.DDIMScheduler
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(scheduler.config)

    kwargs = dict(batch_size=2, eta=0.5, num_inference_steps=4, output_type="pt")
    expected = pipe(generator=generators(0), **kwargs).images
    torch.testing.assert_close(loaded(generator=generators(0), **kwargs).images, expected, atol=0, rtol=0)


def test_loads_folders_written_by_diffusers(unet, tmp_path):
    diffusers.DDIMPipeline(
        unet=unet, scheduler=diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    ).save_pretrained(tmp_path / "pipeline")
    loaded = fastddim.DDIMPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(loaded.scheduler) is fastddim.DDIMScheduler
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"

    unet.save_pretrained(tmp_path / "unet")
    local_unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet")
    kwargs = dict(num_inference_steps=3, output_type="pt")
    expected = fast_pipe(unet)(generator=generators(0), **kwargs).images
    # Loaded weights sit in differently aligned memory, so CPU kernels may round differently (seen: 7e-7).
    images = fast_pipe(local_unet)(generator=generators(0), **kwargs).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_progress_bar_honours_config(unet, capfd):
    pipe = fastddim.DDIMPipeline(unet=unet, scheduler=fastddim.DDIMScheduler())
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" in capfd.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" not in capfd.readouterr().err


def test_cuda_graph_cache_settings(unet):
    pipe = fast_pipe(unet)
    pipe.set_cuda_graph_cache_size(2)
    assert pipe.cuda_graph_cache_info().maxsize == 2
    with pytest.raises(ValueError, match="size"):
        pipe.set_cuda_graph_cache_size(0)
    with pytest.raises(TypeError, match="size"):
        pipe.set_cuda_graph_cache_size(2.0)
    pipe.clear_cuda_graph_cache()
    assert pipe.cuda_graph_cache_info().currsize == 0


# ---------------------------------------------------------------------------------------------- graph cache logic
# The CUDA-graph bookkeeping (keys, LRU, invalidation, fallback, static buffers and per-call noise) runs on the CPU
# with the ``stand_in_graphs`` fixture (tests/conftest.py), whose "replay" reruns the captured loop.


@pytest.mark.parametrize("seeds", [0, (3, 4)], ids=["one-generator", "generator-list"])
def test_graph_path_exact_noise_matches_diffusers(unet, stand_in_graphs, seeds):
    pipe = fast_pipe(unet)
    reference = diffusers_pipe(unet, pipe.scheduler.config)
    kwargs = dict(batch_size=2, eta=1.0, num_inference_steps=5, output_type="np")
    for call in range(2):
        ours = pipe(generator=generators(seeds), cuda_graph=True, **kwargs).images
        theirs = reference(generator=generators(seeds), **kwargs).images
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=f"call {call}")
    assert stand_in_graphs == [dict(num_steps=5, uses_rng=False)]
    assert pipe.cuda_graph_cache_info() == CudaGraphCacheInfo(1, 1, DEFAULT_CUDA_GRAPH_CACHE_SIZE, 1, 0)


def test_graph_path_copies_inputs_and_outputs(unet, stand_in_graphs):
    pipe = fast_pipe(unet)
    kwargs = dict(batch_size=2, num_inference_steps=3, output_type="pt")
    first = pipe(generator=generators(1), cuda_graph=True, **kwargs).images
    kept = first.clone()
    second = pipe(generator=generators(2), cuda_graph=True, **kwargs).images
    assert torch.equal(first, kept), "a replay overwrote an earlier result"
    assert (first - second).abs().max() > 1e-3
    eager = pipe(generator=generators(2), cuda_graph=False, **kwargs).images
    assert torch.equal(second, eager)
    torch.manual_seed(0)
    pipe(eta=1.0, cuda_graph=True, **kwargs)
    assert [c["uses_rng"] for c in stand_in_graphs] == [False, True]


def test_graph_cache_is_a_bounded_lru(unet, stand_in_graphs):
    pipe = fast_pipe(unet)
    pipe.set_cuda_graph_cache_size(2)
    for steps in (2, 3, 4):
        pipe(num_inference_steps=steps, cuda_graph=True, output_type="pt")
    assert pipe.cuda_graph_cache_info() == CudaGraphCacheInfo(0, 3, 2, 2, 0)
    pipe(num_inference_steps=4, cuda_graph=True, output_type="pt")
    pipe(num_inference_steps=2, cuda_graph=True, output_type="pt")  # evicted: captured again
    assert pipe.cuda_graph_cache_info() == CudaGraphCacheInfo(1, 4, 2, 2, 0)
    pipe.set_cuda_graph_cache_size(1)
    assert pipe.cuda_graph_cache_info().currsize == 1
    pipe.clear_cuda_graph_cache()
    assert pipe.cuda_graph_cache_info().currsize == 0


def test_graph_cache_invalidation(stand_in_graphs):
    unet = make_unet()
    pipe = fast_pipe(unet)
    kwargs = dict(generator=None, num_inference_steps=3, output_type="pt", cuda_graph=True)
    before = pipe(**{**kwargs, "generator": generators(0)}).images
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(1e-3)
    after = pipe(**{**kwargs, "generator": generators(0)}).images
    info = pipe.cuda_graph_cache_info()
    assert (info.misses, info.currsize) == (2, 1), "a weight update must replace the stale graph"
    assert (before - after).abs().max() > 1e-4
    eager = pipe(generator=generators(0), num_inference_steps=3, output_type="pt", cuda_graph=False).images
    assert torch.equal(after, eager)

    pipe.scheduler.register_to_config(clip_sample=False)
    pipe(**{**kwargs, "generator": generators(0)})
    pipe.scheduler = fastddim.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    pipe(**{**kwargs, "generator": generators(0)})
    pipe(**{**kwargs, "generator": generators(0), "use_clipped_model_output": True})
    assert pipe.cuda_graph_cache_info().misses == 5


def test_failed_capture_falls_back_once_per_key(unet, monkeypatch, stand_in_graphs):
    attempts = []

    def failing_capture(run, num_steps, device, uses_rng):
        attempts.append(num_steps)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(fastddim.graphs, "capture_graph", failing_capture)
    pipe = fast_pipe(unet)
    kwargs = dict(generator=None, eta=1.0, num_inference_steps=3, output_type="pt")
    with pytest.warns(RuntimeWarning, match="capture of the sampling loop failed .*not permitted") as record:
        images = pipe(**{**kwargs, "generator": generators(0)}, cuda_graph=True).images
    assert len(record) == 1
    expected = pipe(**{**kwargs, "generator": generators(0)}, cuda_graph=False).images
    assert torch.equal(images, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(**{**kwargs, "generator": generators(0)}, cuda_graph=True)
    assert attempts == [3]
    assert pipe.cuda_graph_cache_info().fallbacks == 2


def test_foreign_scheduler_runs_eagerly_with_one_warning(unet, stand_in_graphs):
    pipe = fast_pipe(unet)
    pipe.scheduler = diffusers.DDIMScheduler()
    with pytest.warns(RuntimeWarning, match="need a fastddim.DDIMScheduler"):
        images = pipe(generator=generators(0), num_inference_steps=3, output_type="pt", cuda_graph=True).images
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(generator=generators(0), num_inference_steps=3, output_type="pt", cuda_graph=True)
    expected = fast_pipe(unet)(generator=generators(0), num_inference_steps=3, output_type="pt", cuda_graph=False)
    torch.testing.assert_close(images, expected.images, atol=1e-5, rtol=0)
    assert stand_in_graphs == []


def test_compiled_unet_runs_through_the_graph_path(unet, stand_in_graphs):
    """``DDIMPipeline(torch.compile(unet), ...)``: the way to put Inductor's fused UNet kernels inside the captured
    loop. The pipeline must see through the compiled wrapper (config, dtype, weight fingerprint) and never fall back.
    The ``eager`` backend gives the same wrapper as Inductor without needing a C++ compiler on the CI machine (on the
    GPU, test_pipeline_gpu.py captures real Inductor kernels); atol 1e-5 leaves room for Dynamo's graph to order ops
    differently from the module."""
    pipe = fast_pipe(torch.compile(unet, backend="eager"))
    reference = fast_pipe(unet)
    kwargs = dict(batch_size=2, num_inference_steps=3, output_type="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an eager fallback warns
        for _ in range(2):
            ours = pipe(generator=generators(0), cuda_graph=True, **kwargs).images
    theirs = reference(generator=generators(0), cuda_graph=False, **kwargs).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert pipe.cuda_graph_cache_info() == CudaGraphCacheInfo(1, 1, DEFAULT_CUDA_GRAPH_CACHE_SIZE, 1, 0)
