"""``fastddim sample`` on Stable Diffusion / SDXL folders, end to end on the CPU with tiny saved folders.

The reference is diffusers' own pipeline loaded from the same folder (with diffusers' DDIMScheduler), called
directly with ``generator=torch.Generator("cpu").manual_seed(seed)``: fastddim's pipelines equal it bit for bit in
fp32 on the CPU, and with ``--batch-size 1`` the CLI runs the same batch of one, so the PNG pixels are equal. A
larger batch changes only the UNet's batch-size rounding (at most one uint8 level).
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import fastddim
from fastddim import cli

pytest.importorskip("transformers")
from tests.sd_components import sd_components, sdxl_components, sdxl_refiner_components  # noqa: E402

STEPS = 3
PROMPT = "a photo of a cat"
# The tiny VAE downsamples by 2: 8x8 latents are 16x16 images.
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Saved tiny folders: SD (DDIM scheduler), SD with SD 1.5's PNDM scheduler, SDXL, SD with text-encoder or UNet
    weights missing, SD with an inpainting-style UNet (9 input channels), SD with a flow-matching scheduler, and an
    SDXL refiner (image-to-image only, one text encoder, aesthetic-score UNet)."""
    root = tmp_path_factory.mktemp("sd-folders")
    sd = diffusers.StableDiffusionPipeline(**sd_components(root / "parts-sd"))
    sd.save_pretrained(root / "sd")
    sdxl = diffusers.StableDiffusionXLPipeline(**sdxl_components(root / "parts-sdxl"))
    sdxl.save_pretrained(root / "sdxl")

    shutil.copytree(root / "sd", root / "pndm")
    pndm = diffusers.PNDMScheduler.from_config({**sd.scheduler.config, "skip_prk_steps": True})
    shutil.rmtree(root / "pndm" / "scheduler")
    pndm.save_pretrained(root / "pndm" / "scheduler")
    index_path = root / "pndm" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    index_path.write_text(json.dumps(index))

    shutil.copytree(root / "sd", root / "missing")
    weights = root / "missing" / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({key: value for index, (key, value) in enumerate(state.items()) if index % 4}, weights)

    shutil.copytree(root / "sd", root / "missing-unet")
    weights = root / "missing-unet" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({key: value for index, (key, value) in enumerate(state.items()) if index % 5}, weights)

    shutil.copytree(root / "sd", root / "inpaint")
    shutil.rmtree(root / "inpaint" / "unet")
    inpaint_unet = diffusers.UNet2DConditionModel.from_config({**sd.unet.config, "in_channels": 9})
    inpaint_unet.save_pretrained(root / "inpaint" / "unet")

    shutil.copytree(root / "sd", root / "flow")
    shutil.rmtree(root / "flow" / "scheduler")
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(root / "flow" / "scheduler")
    index_path = root / "flow" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    index_path.write_text(json.dumps(index))

    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(**sdxl_refiner_components(root / "parts-refiner"))
    refiner.save_pretrained(root / "refiner")
    names = ("sd", "pndm", "sdxl", "missing", "missing-unet", "inpaint", "flow", "refiner")
    return {name: root / name for name in names}


@pytest.fixture(scope="module")
def init_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def sample(capsys, *args: str) -> tuple[int, list[str]]:
    status = cli.main(["sample", "--steps", str(STEPS), *args])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def reference(pipe, seeds, **kwargs) -> np.ndarray:
    """uint8 images of ``pipe`` called once per seed with that seed's generator."""
    pipe.set_progress_bar_config(disable=True)
    images = [
        pipe(
            generator=torch.Generator("cpu").manual_seed(seed),
            num_inference_steps=STEPS,
            output_type="np",
            **kwargs,
        ).images[0]
        for seed in seeds
    ]
    return cli.to_uint8(np.stack(images))


def grid_tiles(path, count: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The tiles of a scale-1, padding-1 grid, in seed order."""
    grid = np.asarray(Image.open(path))
    columns = int(np.ceil(np.sqrt(count)))
    tiles = []
    for index in range(count):
        row, col = divmod(index, columns)
        top, left = row * (size + 1), col * (size + 1)
        tiles.append(grid[top : top + size, left : left + size])
    return np.stack(tiles)


def folder_images(root, seeds) -> np.ndarray:
    return np.stack([np.asarray(Image.open(root / "000000" / f"{seed:06d}.png")) for seed in seeds])


def test_text2img_grid_and_folder_equal_diffusers(folders, tmp_path, capsys):
    seeds = [0, 1, 5]
    options = ["--prompt", PROMPT, "--negative-prompt", "blurry", "--guidance-scale", "6", "--eta", "0.5"]
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "0-1,5", "--batch-size", "1",
                         *options, "--out", str(tmp_path / "grid.png"))  # fmt: skip
    assert status == 0, err
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "0-1,5", "--batch-size", "2",
                         *options, "--out", str(tmp_path / "folder"))  # fmt: skip
    assert status == 0, err

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd"])
    assert type(pipe.scheduler) is diffusers.DDIMScheduler
    expected = reference(pipe, seeds, prompt=PROMPT, negative_prompt="blurry", guidance_scale=6.0, eta=0.5)
    assert expected.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and expected.std() > 0
    np.testing.assert_array_equal(grid_tiles(tmp_path / "grid.png", 3), expected)
    # Batches of two: the same images up to the UNet's batch-size rounding.
    drawn = folder_images(tmp_path / "folder", seeds).astype(int)
    assert np.abs(drawn - expected).max() <= 1
    settings = json.loads((tmp_path / "folder" / "settings.json").read_text())["settings"]
    assert settings["prompt"] == PROMPT and settings["negative_prompt"] == "blurry"
    assert settings["guidance_scale"] == 6.0 and (settings["height"], settings["width"]) == (16, 16)


def test_loading_raises_no_deprecation_of_torch_dtype(folders, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, err = sample(capsys, "--model", str(folders["sd"]), "--prompt", PROMPT, "--steps", "1",
                             "--out", str(tmp_path / "one.png"))  # fmt: skip
    assert status == 0, err
    assert not [str(w.message) for w in caught if "torch_dtype" in str(w.message)]


def test_default_guidance_and_size_options(folders, tmp_path, capsys):
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "3", "--prompt", PROMPT,
                         "--height", "24", "--width", "32", "--out", str(tmp_path / "one.png"))  # fmt: skip
    assert status == 0, err
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd"])
    expected = reference(pipe, [3], prompt=PROMPT, guidance_scale=7.5, height=24, width=32)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png"))[None], expected)


@pytest.mark.parametrize(
    ("model", "diffusers_class", "guidance_scale"),
    [
        ("sd", diffusers.StableDiffusionImg2ImgPipeline, 7.5),
        ("refiner", diffusers.StableDiffusionXLImg2ImgPipeline, 5.0),
        # A text-to-image folder loaded in its family's image-to-image pipeline, as diffusers loads it.
        ("sdxl", diffusers.StableDiffusionXLImg2ImgPipeline, 5.0),
    ],
    ids=["sd", "sdxl-refiner", "sdxl-base"],
)
def test_img2img_equals_diffusers(folders, init_image, tmp_path, capsys, model, diffusers_class, guidance_scale):
    status, err = sample(capsys, "--model", str(folders[model]), "--seeds", "2,4", "--batch-size", "1",
                         "--prompt", PROMPT, "--init-image", str(init_image), "--strength", "0.7", "--eta", "1",
                         "--out", str(tmp_path / "img2img.png"))  # fmt: skip
    assert status == 0, err
    pipe = diffusers_class.from_pretrained(folders[model])
    image = Image.open(init_image).convert("RGB")
    expected = reference(
        pipe, [2, 4], prompt=PROMPT, image=image, strength=0.7, eta=1.0, guidance_scale=guidance_scale
    )
    np.testing.assert_array_equal(grid_tiles(tmp_path / "img2img.png", 2), expected)


def test_img2img_resizes_the_init_image_to_height_and_width(folders, init_image, tmp_path, capsys):
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "7", "--prompt", PROMPT,
                         "--init-image", str(init_image), "--height", "24", "--width", "8",
                         "--out", str(tmp_path / "resized.png"))  # fmt: skip
    assert status == 0, err
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folders["sd"])
    resized = Image.open(init_image).convert("RGB").resize((8, 24), Image.Resampling.LANCZOS)
    expected = reference(pipe, [7], prompt=PROMPT, image=resized, strength=0.8)
    assert expected.shape == (1, 24, 8, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "resized.png"))[None], expected)


def test_sdxl_equals_diffusers(folders, tmp_path, capsys):
    status, err = sample(capsys, "--model", str(folders["sdxl"]), "--seeds", "0-1", "--batch-size", "1",
                         "--prompt", PROMPT, "--out", str(tmp_path / "sdxl.npz"))  # fmt: skip
    assert status == 0, err
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    expected = reference(pipe, [0, 1], prompt=PROMPT, guidance_scale=5.0)
    np.testing.assert_array_equal(cli.to_uint8(np.load(tmp_path / "sdxl.npz")["images"]), expected)


def test_non_ddim_scheduler_runs_ddim_on_its_schedule_and_says_so(folders, tmp_path, capsys):
    status, err = sample(capsys, "--model", str(folders["pndm"]), "--seeds", "0", "--prompt", PROMPT,
                         "--out", str(tmp_path / "pndm.png"))  # fmt: skip
    assert status == 0, err
    assert len(err) == 1 and err[0].startswith("note: ") and "PNDMScheduler" in err[0], err
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["pndm"])
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    expected = reference(pipe, [0], prompt=PROMPT)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pndm.png"))[None], expected)


def test_resume_refuses_another_prompt(folders, tmp_path, capsys):
    out = str(tmp_path / "folder")
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "0", "--prompt", PROMPT, "--out", out)
    assert status == 0, err
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "0-1", "--prompt", "a dog",
                         "--out", out, "--resume")  # fmt: skip
    assert status == 2 and len(err) == 1 and "differing: prompt" in err[0], err
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "0-1", "--prompt", PROMPT,
                         "--out", out, "--resume")  # fmt: skip
    assert status == 0, err
    assert sorted(path.name for path in (tmp_path / "folder" / "000000").iterdir()) == ["000000.png", "000001.png"]


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the error should have been raised before sampling")

    for pipeline in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline"):
        monkeypatch.setattr(getattr(fastddim, pipeline), "__call__", refuse)
    monkeypatch.setattr(fastddim.DDIMPipeline, "__call__", refuse)


ERROR_CASES = {
    "missing-prompt": (("sd",), "--prompt"),
    "missing-model-folder": (("ABSENT_MODEL", "--prompt", PROMPT), "no such folder"),
    "prompt-for-unconditional-model": ((None, "--prompt", PROMPT), "--prompt"),
    "guidance-for-unconditional-model": ((None, "--guidance-scale", "3"), "--guidance-scale"),
    "strength-zero": (("sd", "--prompt", PROMPT, "--init-image", "INIT", "--strength", "0"), "--strength"),
    "strength-above-one": (("sd", "--prompt", PROMPT, "--init-image", "INIT", "--strength", "1.5"), "--strength"),
    "strength-not-a-number": (("sd", "--prompt", PROMPT, "--init-image", "INIT", "--strength", "x"), "--strength"),
    "strength-without-init-image": (("sd", "--prompt", PROMPT, "--strength", "0.5"), "--init-image"),
    "strength-leaves-no-step": (
        ("sd", "--prompt", PROMPT, "--init-image", "INIT", "--strength", "0.2"),
        "no denoising",
    ),
    "missing-init-image": (("sd", "--prompt", PROMPT, "--init-image", "ABSENT"), "no such file"),
    "unreadable-init-image": (("sd", "--prompt", PROMPT, "--init-image", "NOT_AN_IMAGE"), "cannot read it"),
    "negative-guidance": (("sd", "--prompt", PROMPT, "--guidance-scale", "-1"), "--guidance-scale"),
    "nan-guidance": (("sd", "--prompt", PROMPT, "--guidance-scale", "nan"), "--guidance-scale"),
    "negative-prompt-without-guidance": (
        ("sd", "--prompt", PROMPT, "--negative-prompt", "x", "--guidance-scale", "1"),
        "--negative-prompt",
    ),
    "height-not-multiple-of-8": (("sd", "--prompt", PROMPT, "--height", "20"), "--height"),
    "width-zero": (("sd", "--prompt", PROMPT, "--width", "0"), "--width"),
    "missing-text-encoder-weights": (("missing", "--prompt", PROMPT), "text_encoder weights"),
    "missing-unet-weights": (("missing-unet", "--prompt", PROMPT), "unet weights"),
    "inpainting-unet": (("inpaint", "--prompt", PROMPT), "9 input channels"),
    "sdxl-refiner-without-init-image": (("refiner", "--prompt", PROMPT), "--init-image"),
    "scheduler-without-noise-schedule": (("flow", "--prompt", PROMPT), "FlowMatchEulerDiscreteScheduler"),
    # The replaced-scheduler note is printed when sampling starts: an error found before stays the only line.
    "too-many-steps-after-scheduler-note": (("pndm", "--prompt", PROMPT, "--steps", "5000"), "--steps 5000"),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_are_one_line_before_sampling(case, folders, init_image, tmp_path, capsys, no_sampling):
    (model, *options), fragment = case
    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_text("hello")
    paths = {"INIT": str(init_image), "ABSENT": str(tmp_path / "absent.png"), "NOT_AN_IMAGE": str(not_an_image)}
    args = [paths.get(option, option) for option in options]
    if model is not None:
        args = ["--model", str(folders.get(model, tmp_path / "absent-model")), *args]
    status, err = sample(capsys, *args, "--out", str(tmp_path / "out.png"))
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and fragment in err[0], err[0]
    assert not (tmp_path / "out.png").exists()


def test_help_lists_the_stable_diffusion_options(capsys):
    assert cli.main(["sample", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--prompt", "--negative-prompt", "--guidance-scale", "--init-image", "--strength", "--height"):
        assert flag in text


def run_cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """``fastddim sample`` in a child process (under torchrun for ``processes`` > 1), compiled kernels if on CUDA."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "fastddim"]
    if processes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--master-port", str(port), "-m", "fastddim"]
    command = [*launcher, "sample", "--steps", str(STEPS), "--prompt", PROMPT, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_ranks_write_the_images_of_one_process(folders, tmp_path):
    """Strided shares: ranks draw seeds [0, 2] and [1, 3], the batches of one process given 0,2,1,3."""
    common = ["--model", str(folders["sd"]), "--device", "cpu", "--eta", "1", "--batch-size", "2"]
    two = run_cli(*common, "--seeds", "0-3", "--out", str(tmp_path / "two"), processes=2)
    assert two.returncode == 0, two.stderr
    one = run_cli(*common, "--seeds", "0,2,1,3", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    for seed in range(4):
        relpath = pathlib.Path("000000") / f"{seed:06d}.png"
        assert (tmp_path / "two" / relpath).read_bytes() == (tmp_path / "one" / relpath).read_bytes()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graph_equals_eager_loop(folders, tmp_path, dtype):
    """On CUDA the CLI's captured loop gives the eager loop's images (the same kernels, replayed)."""
    common = ["--model", str(folders["sd"]), "--device", "cuda", "--dtype", dtype, "--seeds", "0-3", "--eta", "1"]
    graphed = run_cli(*common, "--out", str(tmp_path / "graph.npz"))
    eager = run_cli(*common, "--no-cuda-graph", "--out", str(tmp_path / "eager.npz"))
    assert graphed.returncode == 0, graphed.stderr
    assert eager.returncode == 0, eager.stderr
    graph_images = np.load(tmp_path / "graph.npz")["images"]
    eager_images = np.load(tmp_path / "eager.npz")["images"]
    assert np.isfinite(graph_images).all() and graph_images.std() > 0
    np.testing.assert_array_equal(graph_images, eager_images)


@pytest.fixture(scope="module")
def other_init_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("other-init") / "other.png"
    pixels = np.random.default_rng(1).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


RESUME_CHANGES = {
    "negative-prompt": (["--negative-prompt", "y"], "negative_prompt"),
    "guidance": (["--guidance-scale", "7"], "guidance_scale"),
    "strength": (["--strength", "0.9"], "strength"),
    "init-image": (["--init-image", "OTHER"], "init_image_pixels_sha256"),
    "size": (["--height", "24"], "height"),
}


@pytest.mark.parametrize("change", RESUME_CHANGES.values(), ids=RESUME_CHANGES.keys())
def test_every_pixel_setting_is_in_the_settings_hash(change, folders, init_image, other_init_image, tmp_path, capsys):
    changed, key = change
    out = str(tmp_path / "folder")
    base = {"--prompt": PROMPT, "--negative-prompt": "x", "--guidance-scale": "6", "--init-image": str(init_image)}
    base["--strength"] = "0.5"
    flat = [item for pair in base.items() for item in pair]
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "0", *flat, "--out", out)
    assert status == 0, err
    changed = [str(other_init_image) if item == "OTHER" else item for item in changed]
    status, err = sample(capsys, "--model", str(folders["sd"]), "--seeds", "0", *flat, *changed, "--out", out,
                         "--resume")  # fmt: skip
    assert status == 2 and len(err) == 1 and "differing: " in err[0], err
    assert key in err[0].split("differing: ")[1].split(")")[0], err[0]
