"""``fastddim interpolate`` on Stable Diffusion / SDXL folders, end to end on the CPU with tiny saved folders.

The strip's frames are the fastddim pipeline called once with ``latents=`` the slerp of the two seeds' x_T (drawn by
``torch.Generator("cpu").manual_seed(seed)``, as ``fastddim sample --seeds`` draws them), so in fp32 on the CPU they
equal that call bit for bit; its ends are ``fastddim sample --seeds A`` / ``B``, whose batch of one changes only the
UNet's batch-size rounding (at most one uint8 level, as for the digits in tests/test_interpolate_cli.py).
"""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import fastddim
from fastddim import cli

pytest.importorskip("transformers")
from tests.sd_components import LATENT_SIZE, sd_components, sdxl_components  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 3
PROMPT = "a photo of a cat"
# The tiny VAE downsamples by 2.
VAE_SCALE = 2
SEEDS = (3, 7)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Saved tiny text-to-image folders: SD (DDIM scheduler) and SDXL; and a refiner folder's model index."""
    root = tmp_path_factory.mktemp("sd-interpolate")
    diffusers.StableDiffusionPipeline(**sd_components(root / "parts-sd")).save_pretrained(root / "sd")
    diffusers.StableDiffusionXLPipeline(**sdxl_components(root / "parts-sdxl")).save_pretrained(root / "sdxl")
    # An SDXL refiner needs an init image: refused from its model_index.json, before anything loads.
    (root / "refiner").mkdir()
    (root / "refiner" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline"}')
    return {"sd": root / "sd", "sdxl": root / "sdxl", "refiner": root / "refiner"}


def run(capsys, command: str, *args: str) -> tuple[int, str, list[str]]:
    status = cli.main([command, "--steps", str(STEPS), *args])
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def strip_frames(path, frames: int, height: int, width: int) -> np.ndarray:
    """The frames of a scale-1, padding-1 strip, left to right."""
    strip = np.asarray(Image.open(path))
    assert strip.shape == (height, frames * width + frames - 1, 3)
    return np.stack([strip[:, index * (width + 1) : index * (width + 1) + width] for index in range(frames)])


# kind: (the fastddim pipeline, the CLI's text options, the direct call's, (height, width) in pixels)
CASES = {
    "sd": (
        fastddim.StableDiffusionPipeline,
        ["--negative-prompt", "blurry", "--guidance-scale", "6", "--height", "24", "--width", "16"],
        dict(negative_prompt="blurry", guidance_scale=6.0, height=24, width=16),
        (24, 16),
    ),
    "sdxl": (
        fastddim.StableDiffusionXLPipeline,
        [],
        dict(guidance_scale=5.0),
        (LATENT_SIZE * VAE_SCALE, LATENT_SIZE * VAE_SCALE),
    ),
}


@pytest.mark.parametrize("kind", CASES.keys())
def test_strip_is_the_pipeline_on_slerped_latents_and_its_ends_are_the_seeds_images(kind, folders, tmp_path, capsys):
    pipeline_class, options, call_options, (height, width) = CASES[kind]
    frames = 4
    strip_path = tmp_path / "strip.png"
    status, out, err = run(capsys, "interpolate", "--model", str(folders[kind]), "--prompt", PROMPT, *options,
                           "--seeds", *map(str, SEEDS), "--frames", str(frames), "--out", str(strip_path))  # fmt: skip
    assert status == 0 and not err, err
    assert f"strip of {frames} frames from seed 3 to seed 7" in out
    drawn = strip_frames(strip_path, frames, height, width)

    pipe = pipeline_class.from_pretrained(folders[kind])
    pipe.set_progress_bar_config(disable=True)
    shape = (1, 4, height // VAE_SCALE, width // VAE_SCALE)
    ends = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed in SEEDS]
    latents = fastddim.slerp(ends[0], ends[1], torch.linspace(0, 1, frames, dtype=torch.float64))
    direct = pipe(
        PROMPT,
        latents=latents,
        num_images_per_prompt=frames,
        num_inference_steps=STEPS,
        output_type="np",
        **call_options,
    ).images
    expected = cli.to_uint8(direct)
    assert expected.std() > 0
    # The whole strip, interior frames included, is that call's batch.
    np.testing.assert_array_equal(drawn, expected)
    assert np.abs(drawn[1].astype(int) - drawn[0]).max() > 0 and np.abs(drawn[2].astype(int) - drawn[3]).max() > 0

    for seed, frame in zip(SEEDS, (drawn[0], drawn[-1]), strict=True):
        single_path = tmp_path / f"seed{seed}.png"
        status, _, err = run(capsys, "sample", "--model", str(folders[kind]), "--prompt", PROMPT, *options,
                             "--seeds", str(seed), "--out", str(single_path))  # fmt: skip
        assert status == 0, err
        single = np.asarray(Image.open(single_path)).astype(int)
        assert np.abs(single - frame).max() <= 1
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".") or ".tmp" in path.name]


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails a command that gets as far as the frames' latents (`fastddim.slerp`, just before the pipeline call)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the error should have been raised before sampling")

    monkeypatch.setattr("fastddim.interpolation.slerp", refuse)


ERROR_CASES = {
    "missing-prompt": (("sd",), "--prompt"),
    "missing-prompt-sdxl": (("sdxl", "--guidance-scale", "3"), "--prompt"),
    "prompt-for-default-model": ((None, "--prompt", PROMPT), "--prompt"),
    "prompt-for-unet2d-folder": (("DIGITS", "--prompt", PROMPT), "is unconditional"),
    "guidance-for-unet2d-folder": (("DIGITS", "--guidance-scale", "3"), "--guidance-scale"),
    "init-image": (("sd", "--prompt", PROMPT, "--init-image", "INIT"), "--init-image"),
    "strength": (("sd", "--prompt", PROMPT, "--strength", "0.5"), "--strength"),
    "init-image-for-unet2d-folder": (("DIGITS", "--init-image", "INIT"), "text-to-image"),
    "negative-prompt-without-guidance": (
        ("sd", "--prompt", PROMPT, "--negative-prompt", "x", "--guidance-scale", "1"),
        "--negative-prompt",
    ),
    "height-not-multiple-of-8": (("sd", "--prompt", PROMPT, "--height", "20"), "--height"),
    "sdxl-refiner-folder": (("refiner", "--prompt", PROMPT), "SDXL image-to-image (refiner) folder"),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_are_one_line_before_sampling(case, folders, tmp_path, capsys, no_sampling):
    from fastddim.models import default_model_dir

    (model, *options), fragment = case
    init_image = tmp_path / "init.png"
    Image.new("RGB", (16, 16)).save(init_image)
    args = [str(init_image) if option == "INIT" else option for option in options]
    if model is not None:
        folder = default_model_dir() if model == "DIGITS" else folders[model]
        args = ["--model", str(folder), *args]
    out = tmp_path / "strip.png"
    status, _, err = run(capsys, "interpolate", "--seeds", "1", "2", *args, "--out", str(out))
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and fragment in err[0], err[0]
    assert not out.exists()


def test_help_says_eta_0_and_lists_the_text_options_but_not_image_to_image(capsys):
    assert cli.main(["interpolate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "deterministic sampler (eta 0)" in text
    for flag in ("--prompt", "--negative-prompt", "--guidance-scale", "--height", "--width"):
        assert flag in text
    assert "--init-image" not in text and "--strength" not in text


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cuda_graph_strip_equals_eager_strip(kind, folders, tmp_path, capsys):
    """On CUDA the strip's frames come from the captured loop; the eager loop runs the same kernels."""
    _, options, _, _ = CASES[kind]
    common = ["--model", str(folders[kind]), "--prompt", PROMPT, *options, "--device", "cuda", "--dtype", "float32"]
    common += ["--seeds", *map(str, SEEDS), "--frames", "3"]
    status, _, err = run(capsys, "interpolate", *common, "--out", str(tmp_path / "graph.png"))
    assert status == 0, err
    status, _, err = run(capsys, "interpolate", *common, "--no-cuda-graph", "--out", str(tmp_path / "eager.png"))
    assert status == 0, err
    graphed, eager = (np.asarray(Image.open(tmp_path / name)) for name in ("graph.png", "eager.png"))
    assert graphed.std() > 0
    np.testing.assert_array_equal(graphed, eager)
