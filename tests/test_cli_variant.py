"""``--variant``: weight variants (``diffusion_pytorch_model.fp16.safetensors``) of UNet2DModel and Stable Diffusion
folders, on the CPU with tiny folders saved by ``save_pretrained(variant="fp16")``.

The reference is diffusers loading the same folder with ``variant="fp16"`` (fp16 weights loaded as float32, as the
CLI does on the CPU), called with each seed's generator: with ``--batch-size 1`` the pixels are equal.
"""

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastddim
from fastddim import cli
from fastddim.weight_variants import variants_in
from tests.helpers import make_unet

pytest.importorskip("transformers")
from tests.sd_components import sd_components  # noqa: E402

STEPS = 3
PROMPT = "a photo of a cat"
KINDS = ("unet", "sd")


def save_sd(folder, parts, variant=None, dtype=torch.float32) -> None:
    diffusers.StableDiffusionPipeline(**sd_components(parts)).to(dtype).save_pretrained(folder, variant=variant)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Per kind: ``only`` holds fp16 variant weights alone; ``both`` holds plain float32 weights and, beside them,
    the same weights rounded to fp16 as the fp16 variant. ``unet-missing`` is an fp16 UNet with weights left out."""
    root = tmp_path_factory.mktemp("variant-folders")
    make_unet().to(torch.float16).save_pretrained(root / "unet-only", variant="fp16")
    make_unet().save_pretrained(root / "unet-both")
    make_unet().to(torch.float16).save_pretrained(root / "unet-both", variant="fp16")
    save_sd(root / "sd-only", root / "parts-only", "fp16", torch.float16)
    save_sd(root / "sd-both", root / "parts-both")
    save_sd(root / "sd-both", root / "parts-both-fp16", "fp16", torch.float16)
    shutil.copytree(root / "unet-only", root / "unet-missing")
    weights = root / "unet-missing" / "diffusion_pytorch_model.fp16.safetensors"
    state = load_file(weights)
    save_file({key: value for index, (key, value) in enumerate(state.items()) if index % 3}, weights)
    return {path.name: path for path in root.iterdir()}


def sample(capsys, kind: str, folder, *args: str) -> tuple[int, list[str]]:
    prompt = ["--prompt", PROMPT] if kind == "sd" else []
    status = cli.main(["sample", "--model", str(folder), "--steps", str(STEPS), *prompt, *args])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def diffusers_images(kind: str, folder, seeds) -> np.ndarray:
    """uint8 images of diffusers' pipeline on ``folder``'s fp16 variant, loaded as float32, one call per seed."""
    if kind == "sd":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
        kwargs = {"prompt": PROMPT}
    else:
        unet = diffusers.UNet2DModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
        kwargs = {}
    pipe.set_progress_bar_config(disable=True)
    images = [
        pipe(
            generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS, output_type="np", **kwargs
        ).images[0]
        for seed in seeds
    ]
    return cli.to_uint8(np.stack(images))


@pytest.mark.parametrize("kind", KINDS)
def test_variant_samples_the_images_diffusers_loads(kind, folders, tmp_path, capsys):
    out = tmp_path / "images.npz"
    status, err = sample(capsys, kind, folders[f"{kind}-only"], "--variant", "fp16", "--seeds", "0-1",
                         "--batch-size", "1", "--out", str(out))  # fmt: skip
    assert status == 0, err
    expected = diffusers_images(kind, folders[f"{kind}-only"], [0, 1])
    assert expected.std() > 0
    np.testing.assert_array_equal(cli.to_uint8(np.load(out)["images"]), expected)


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the error should have been raised before sampling")

    monkeypatch.setattr(fastddim.StableDiffusionPipeline, "__call__", refuse)
    monkeypatch.setattr(fastddim.DDIMPipeline, "__call__", refuse)


def assert_one_line_error(status: int, err: list[str], *fragments: str) -> None:
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: "), err[0]
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.mark.parametrize("kind", KINDS)
def test_variant_only_folder_without_variant_names_it(kind, folders, tmp_path, capsys, no_sampling):
    folder = folders[f"{kind}-only"]
    status, err = sample(capsys, kind, folder, "--out", str(tmp_path / "out.png"))
    assert_one_line_error(status, err, str(folder), "has only 'fp16' variant weights", "pass --variant fp16")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("holds", ["only", "both"])
def test_variant_no_component_has_names_what_there_is(kind, holds, folders, tmp_path, capsys, no_sampling):
    folder = folders[f"{kind}-{holds}"]
    status, err = sample(capsys, kind, folder, "--variant", "bf16", "--out", str(tmp_path / "out"))
    assert_one_line_error(status, err, "--variant bf16", str(folder), "no 'bf16' weights", "'fp16' variant weights")
    assert ("plain weights" in err[0]) == (holds == "both"), err[0]
    assert not any(tmp_path.iterdir())


def test_variant_weights_are_checked_against_the_config(folders, tmp_path, capsys, no_sampling):
    status, err = sample(
        capsys, "unet", folders["unet-missing"], "--variant", "fp16", "--out", str(tmp_path / "x.png")
    )
    assert_one_line_error(status, err, "weights do not match the UNet config", "weights missing")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", KINDS)
def test_resume_refuses_another_variant(kind, folders, tmp_path, capsys):
    out = str(tmp_path / "folder")
    status, err = sample(capsys, kind, folders[f"{kind}-both"], "--seeds", "0", "--out", out)
    assert status == 0, err
    status, err = sample(capsys, kind, folders[f"{kind}-both"], "--variant", "fp16", "--seeds", "0-1", "--out", out,
                         "--resume")  # fmt: skip
    assert_one_line_error(status, err, "differing: ")
    differing = err[0].split("differing: ")[1].split(")")[0].split(", ")
    assert "variant" in differing and "model" in differing, err[0]
    assert sorted(path.name for path in (tmp_path / "folder" / "000000").iterdir()) == ["000000.png"]


def test_settings_hash_the_variant_files_loaded(folders, tmp_path, capsys):
    """The plain weights beside the variant's are not read, so they are not hashed; the variant's are."""
    folder = tmp_path / "model"
    shutil.copytree(folders["unet-both"], folder)
    out = str(tmp_path / "folder")
    status, err = sample(capsys, "unet", folder, "--variant", "fp16", "--seeds", "0", "--out", out)
    assert status == 0, err
    plain = folder / "diffusion_pytorch_model.safetensors"
    save_file({key: torch.zeros_like(value) for key, value in load_file(plain).items()}, plain)
    status, err = sample(capsys, "unet", folder, "--variant", "fp16", "--seeds", "0-1", "--out", out, "--resume")
    assert status == 0, err
    variant_weights = folder / "diffusion_pytorch_model.fp16.safetensors"
    save_file({key: value + 1 for key, value in load_file(variant_weights).items()}, variant_weights)
    status, err = sample(capsys, "unet", folder, "--variant", "fp16", "--seeds", "0-2", "--out", out, "--resume")
    assert_one_line_error(status, err, "differing: model")
    settings = json.loads((tmp_path / "folder" / "settings.json").read_text())["settings"]
    assert settings["variant"] == "fp16"


def test_interpolate_takes_variant(folders, tmp_path, capsys):
    common = ["interpolate", "--model", str(folders["unet-only"]), "--seeds", "0", "1", "--frames", "2"]
    common += ["--steps", "2", "--out", str(tmp_path / "strip.png")]
    assert cli.main(common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --variant fp16" in err[0], err
    assert not any(tmp_path.iterdir())
    assert cli.main([*common, "--variant", "fp16"]) == 0
    assert (tmp_path / "strip.png").is_file()


@pytest.mark.parametrize("command", ["sample", "interpolate"])
def test_help_lists_variant(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert "--variant NAME" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("names", "variants"),
    [
        (["config.json", "diffusion_pytorch_model.safetensors"], {None}),
        (["config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"], {"fp16", None}),
        (["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"], {"fp16"}),
        (["model.safetensors.index.ema.json", "model.ema-00001-of-00001.safetensors"], {"ema"}),
        (["diffusion_pytorch_model-00001-of-00002.safetensors", "pytorch_model.bin.index.json"], {None}),
        (["diffusion_pytorch_model-00001-of-00002.fp16.safetensors", "config.json"], {"fp16"}),
        (["diffusion_pytorch_model.safetensors.ema.index.json"], {"ema"}),
        # transformers has no older naming: such a file is not taken for a variant it would not load.
        (["model.safetensors", "model-00001-of-00002.fp16.safetensors"], {None}),
        (["config.json", "vocab.json", "merges.txt"], set()),
    ],
    ids=[
        "plain",
        "variant-and-plain",
        "sharded-variant",
        "variant-index",
        "sharded-plain",
        "older-sharded-variant",
        "older-variant-index",
        "older-naming-in-transformers",
        "no-weights",
    ],
)
def test_variants_in_reads_diffusers_and_transformers_names(names, variants, tmp_path):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert variants_in(tmp_path) == variants


def to_legacy_shard_names(folder) -> None:
    """Renames a sharded variant save to the older naming diffusers still loads: shards ``<stem>-00001-of-00002
    .fp16.safetensors``, index ``<stem>.safetensors.fp16.index.json``."""
    index_path = folder / "diffusion_pytorch_model.safetensors.index.fp16.json"
    index = json.loads(index_path.read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        stem, rest = shard.split(".fp16-")
        renamed[shard] = f"{stem}-{rest.removesuffix('.safetensors')}.fp16.safetensors"
        (folder / shard).rename(folder / renamed[shard])
    index["weight_map"] = {key: renamed[shard] for key, shard in index["weight_map"].items()}
    (folder / "diffusion_pytorch_model.safetensors.fp16.index.json").write_text(json.dumps(index))
    index_path.unlink()


def test_older_sharded_variant_naming_is_a_variant(tmp_path, capsys):
    folder = tmp_path / "unet-legacy-shards"
    make_unet().to(torch.float16).save_pretrained(folder, variant="fp16", max_shard_size="4KB")
    to_legacy_shard_names(folder)
    shards = sorted(path.name for path in folder.glob("*.fp16.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("diffusion_pytorch_model-00001-of-")
    assert variants_in(folder) == {"fp16"}

    status, err = sample(capsys, "unet", folder)
    assert status == 2 and err == [f"error: --model {folder} has only 'fp16' variant weights: pass --variant fp16"]
    out = tmp_path / "images.npz"
    status, err = sample(
        capsys, "unet", folder, "--variant", "fp16", "--seeds", "0-1", "--batch-size", "1", "--out", str(out)
    )
    assert status == 0, err
    with np.load(out) as saved:
        np.testing.assert_array_equal(cli.to_uint8(saved["images"]), diffusers_images("unet", folder, [0, 1]))
