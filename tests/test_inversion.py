"""DDIMPipeline.invert and sampling from given latents, on the embedded digits model and the tiny test UNet (CPU).

Parity: fastddim's inversion must equal an inversion built by hand from diffusers' own DDIMInverseScheduler with the
same UNet, bit for bit in fp32 (the inverse step is bit-identical to diffusers' and the UNet is the same module).
Quality: the DDIM paper's Table 2 trend, reconstruction error falling from S = 10 to S = 50 on real digits.
"""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import fastddim
from fastddim.models import default_model_dir
from fastddim.train_digits import load_digits_tensor
from tests.helpers import host_syncs_forbidden, make_unet


@pytest.fixture(scope="module")
def digits_pipe() -> fastddim.DDIMPipeline:
    folder = default_model_dir()
    unet = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = fastddim.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = fastddim.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def real_digits() -> torch.Tensor:
    images, _ = load_digits_tensor()
    return (images[:32] + 1) / 2  # [0, 1], as the pipeline outputs images


@torch.no_grad()
def diffusers_inversion(pipe: fastddim.DDIMPipeline, images: torch.Tensor, steps: int) -> torch.Tensor:
    """Inversion built by hand from diffusers' DDIMInverseScheduler (what diffusers' editing pipelines do)."""
    inverse = diffusers.DDIMInverseScheduler.from_config(
        {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_") and "threshold" not in k}
    )
    inverse.set_timesteps(steps)
    sample = images * 2 - 1
    for t in inverse.timesteps:
        sample = inverse.step(pipe.unet(sample, t).sample, t, sample).prev_sample
    return sample


@torch.no_grad()
def diffusers_reconstruction(pipe: fastddim.DDIMPipeline, latents: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    sample = latents
    for t in scheduler.timesteps:
        sample = scheduler.step(pipe.unet(sample, t).sample, t, sample).prev_sample
    return (sample / 2 + 0.5).clamp(0, 1)


def reconstruction_mse(pipe: fastddim.DDIMPipeline, images: torch.Tensor, steps: int) -> float:
    latents = pipe.invert(images, num_inference_steps=steps)
    again = pipe(latents=latents, num_inference_steps=steps, output_type="pt").images
    return float(((again - images) ** 2).mean())


@pytest.mark.parametrize("steps", [10, 50])
def test_inversion_equals_diffusers_inverse_scheduler(digits_pipe, real_digits, steps):
    ours = digits_pipe.invert(real_digits[:4], num_inference_steps=steps)
    theirs = diffusers_inversion(digits_pipe, real_digits[:4], steps)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_reconstruction_error_falls_with_steps_and_matches_diffusers(digits_pipe, real_digits):
    """Per-dimension MSE of invert -> reconstruct on 32 real digits: lower at S = 50 than at S = 10 (the paper's
    Table 2 trend), and no worse than the same round trip built from diffusers' two schedulers (equal, in fact)."""
    errors = {steps: reconstruction_mse(digits_pipe, real_digits, steps) for steps in (10, 50)}
    assert errors[50] < errors[10], errors
    for steps, error in errors.items():
        reference = diffusers_reconstruction(digits_pipe, diffusers_inversion(digits_pipe, real_digits, steps), steps)
        reference_error = float(((reference - real_digits) ** 2).mean())
        assert error <= 3 * reference_error + 1e-6, (steps, error, reference_error)


def test_image_forms_give_the_same_latents(digits_pipe, real_digits):
    as_pt = real_digits[:2]
    as_np = as_pt.permute(0, 2, 3, 1).numpy()
    as_pil = fastddim.DDIMPipeline.numpy_to_pil(as_np)
    expected = digits_pipe.invert(as_pt, num_inference_steps=5)
    assert torch.equal(digits_pipe.invert(as_np, num_inference_steps=5), expected)
    # PIL rounds to 8 bits: compare with the rounded tensor.
    rounded = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in as_pil]))[:, None]
    assert torch.equal(digits_pipe.invert(as_pil, num_inference_steps=5), digits_pipe.invert(rounded, 5))
    # One CHW image is a batch of one (compared with a batch of one: the UNet's CPU kernels round by batch size).
    assert torch.equal(digits_pipe.invert(as_pt[0], num_inference_steps=5), digits_pipe.invert(as_pt[:1], 5))


@pytest.mark.parametrize(
    "image, error, match",
    [
        (torch.zeros(1, 3, 8, 8), ValueError, r"\(C, H, W\)"),
        (torch.full((1, 1, 8, 8), 2.0), ValueError, r"\[0, 1\]"),
        (torch.zeros(8, 8), ValueError, "NCHW"),
        ("digits.png", TypeError, "image must be"),
        ([PIL.Image.new("L", (8, 8)), "x"], TypeError, "image must be"),
    ],
)
def test_bad_images_name_the_argument(digits_pipe, image, error, match):
    with pytest.raises(error, match=match):
        digits_pipe.invert(image, num_inference_steps=2)


def test_inputs_are_not_modified(digits_pipe, real_digits):
    images = real_digits[:2].clone()
    latents = digits_pipe.invert(images, num_inference_steps=3)
    assert torch.equal(images, real_digits[:2])
    kept = latents.clone()
    digits_pipe(latents=latents, num_inference_steps=3, output_type="pt")
    assert torch.equal(latents, kept)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_given_latents_equal_drawn_ones(eta):
    """``pipe(latents=x)`` with the x a generator would draw gives that generator's images (the step noises drawn
    from a second generator in the same state as after the initial draw)."""
    pipe = fastddim.DDIMPipeline(unet=make_unet(), scheduler=fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    drawn = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(5), eta=eta, num_inference_steps=4, output_type="pt"
    )
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 3, 8, 8, generator=generator)
    given = pipe(latents=latents, generator=generator, eta=eta, num_inference_steps=4, output_type="pt")
    assert given.images.shape == (2, 3, 8, 8)
    assert torch.equal(given.images, drawn.images)


@pytest.mark.parametrize(
    "latents, batch_size, match",
    [(torch.zeros(2, 3, 4, 4), 1, "shape"), (torch.zeros(2, 3, 8, 8), 3, "shape"), ("noise", 1, "latents")],
)
def test_bad_latents_name_the_argument(latents, batch_size, match):
    pipe = fastddim.DDIMPipeline(unet=make_unet(), scheduler=fastddim.DDIMScheduler())
    with pytest.raises((TypeError, ValueError), match=match):
        pipe(latents=latents, batch_size=batch_size, num_inference_steps=2)


def test_captured_inversion_equals_eager_and_reuses_the_graph(digits_pipe, real_digits, stand_in_graphs):
    eager = digits_pipe.invert(real_digits[:2], num_inference_steps=4, cuda_graph=False)
    first = digits_pipe.invert(real_digits[:2], num_inference_steps=4)
    second = digits_pipe.invert(real_digits[2:4], num_inference_steps=4)
    assert torch.equal(first, eager)
    assert torch.equal(second, digits_pipe.invert(real_digits[2:4], num_inference_steps=4, cuda_graph=False))
    info = digits_pipe.cuda_graph_cache_info()
    assert len(stand_in_graphs) == 1 and info.hits >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_captured_inversion_equals_eager_and_never_syncs(dtype):
    """On CUDA the inversion loop is captured: replays equal the eager loop (the same kernels on the same inputs),
    a second batch reuses the graph, and a replay never synchronizes with the host."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    pipe = fastddim.DDIMPipeline(unet=make_unet().to("cuda", dtype), scheduler=fastddim.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
    eager = pipe.invert(images, num_inference_steps=10, cuda_graph=False)
    graphed = pipe.invert(images, num_inference_steps=10)
    assert torch.equal(graphed, eager)
    with host_syncs_forbidden():
        # CUDA images in, CUDA latents out: input conversion, replay and output copy stay on the device.
        again = pipe.invert(images, num_inference_steps=10)
    assert torch.equal(again, eager)
    assert pipe.cuda_graph_cache_info().hits >= 1
