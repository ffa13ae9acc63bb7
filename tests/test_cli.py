"""The ``fastddim`` command line: ``python -m fastddim sample`` end to end, its user errors, and ``bench`` dispatch."""

import os
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

import fastddim
from fastddim import cli
from tests.helpers import make_unet


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The CLI must work without CUDA and without the test suite's interpreter setting.
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"  # see the single_cpu_thread fixture in conftest.py
    return subprocess.run(
        [sys.executable, "-m", "fastddim", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    """A tiny 3-channel UNet saved two ways: a plain UNet2DModel folder and a fastddim pipeline folder."""
    root = tmp_path_factory.mktemp("models")
    unet = make_unet()
    unet.save_pretrained(root / "unet")
    scheduler = fastddim.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    fastddim.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "pipeline")
    return {"unet": root / "unet", "pipeline": root / "pipeline"}


def grid_size(count: int, height: int = 8, width: int = 8, scale: int = cli.GRID_SCALE) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    return ((cols * width + cols - 1) * scale, (rows * height + rows - 1) * scale)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(message) == 1, result.stderr
    for fragment in fragments:
        assert fragment in message[0]


@pytest.mark.slow
def test_sample_png_with_default_model(tmp_path):
    out = tmp_path / "tmp" / "x.png"
    result = run_cli("sample", "--steps", "5", "--num-samples", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    with PIL.Image.open(out) as image:
        # The embedded digits model: 1-channel 8x8 images, 4 samples in a 2 x 2 grid.
        assert image.format == "PNG" and image.mode == "L"
        assert image.size == grid_size(4)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and " s" in lines[0]


@pytest.mark.slow
def test_sample_png_from_unet_folder(model_dirs, tmp_path):
    out = tmp_path / "grid.png"
    result = run_cli(
        "sample", "--model", str(model_dirs["unet"]), "--steps", "5", "--num-samples", "5", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    with PIL.Image.open(out) as image:
        assert image.mode == "RGB" and image.size == grid_size(5)
    assert str(out) in result.stdout


@pytest.mark.slow
def test_sample_npz_from_pipeline_folder(model_dirs, tmp_path):
    out = tmp_path / "arrays.npz"
    args = ["sample", "--model", str(model_dirs["pipeline"]), "--steps", "4", "--num-samples", "3", "--seed", "5"]
    result = run_cli(*args, "--eta", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with np.load(out) as data:
        images = data["images"]
        assert int(data["steps"]) == 4 and int(data["seed"]) == 5 and float(data["eta"]) == 1.0
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1

    # The same samples as the library call with one CPU generator per sample, seeded seed + i.
    pipe = fastddim.DDIMPipeline.from_pretrained(model_dirs["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    expected = pipe(batch_size=3, generator=generators, eta=1.0, num_inference_steps=4, output_type="np").images
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_bad_argument_exits_2_without_traceback():
    assert_user_error(run_cli("sample", "--steps", "0"), "--steps")


@pytest.mark.slow
def test_missing_model_folder_exits_2(tmp_path):
    assert_user_error(run_cli("sample", "--model", str(tmp_path / "nope"), "--steps", "2"), "no such folder")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["sample", "--steps", "five"], "--steps"),
        (["sample", "--eta", "-1"], "--eta"),
        (["sample", "--num-samples", "0"], "--num-samples"),
        (["sample", "--dtype", "int8"], "--dtype"),
        (["sample", "--device", "not-a-device"], "--device"),
        (["sample", "--threads", "0"], "--threads"),
        (["sample", "--no-such-flag"], "--no-such-flag"),
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
    ],
    ids=[
        "non-int-steps",
        "negative-eta",
        "zero-samples",
        "bad-dtype",
        "bad-device",
        "zero-threads",
        "unknown-flag",
        "unknown-command",
        "no-command",
    ],
)
def test_bad_arguments(capsys, args, fragment):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_batch_size_does_not_change_samples(model_dirs, tmp_path, capsys):
    common = ["sample", "--model", str(model_dirs["unet"]), "--steps", "3", "--num-samples", "3", "--eta", "1"]
    assert cli.main([*common, "--out", str(tmp_path / "all.npz")]) == 0
    assert cli.main([*common, "--batch-size", "2", "--out", str(tmp_path / "split.npz")]) == 0
    with np.load(tmp_path / "all.npz") as together, np.load(tmp_path / "split.npz") as split:
        # Equal up to the few ulps by which batched CPU kernels differ from smaller batches.
        np.testing.assert_allclose(together["images"], split["images"], atol=1e-5, rtol=0)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda tmp: ["--model", str(tmp / "missing")], "no such folder"),
        (lambda tmp: ["--model", str(tmp)], "not a diffusers pipeline folder"),
        (lambda tmp: ["--out", str(tmp / "a-file" / "x.png")], "not a folder"),
        (lambda tmp: ["--out", str(tmp)], "already holds 1 entries (a-file)"),
        (lambda tmp: ["--out", str(tmp / "x.unknownext")], "extension"),
    ],
    ids=["missing-model", "not-a-model", "output-under-a-file", "output-is-a-full-folder", "unknown-extension"],
)
def test_user_errors(model_dirs, tmp_path, capsys, setup, fragment):
    (tmp_path / "a-file").write_text("not a folder")
    args = setup(tmp_path)
    if "--model" not in args:
        args = [*args, "--model", str(model_dirs["unet"])]
    assert cli.main(["sample", "--steps", "2", "--num-samples", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_but_absent(capsys):
    assert cli.main(["sample", "--device", "cuda", "--steps", "2"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    assert "sample" in capsys.readouterr().out
    assert cli.main(["sample", "--help"]) == 0
    assert "--num-samples" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert fastddim.__version__ in capsys.readouterr().out


def test_bench_dispatches_to_benchmark_module(monkeypatch):
    seen = {}

    def add_arguments(parser):
        parser.add_argument("--rounds", type=int, default=1)

    def run(args):
        seen["rounds"] = args.rounds
        return 0

    fake = types.ModuleType("fastddim.benchmark")
    fake.add_arguments, fake.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "fastddim.benchmark", fake)
    monkeypatch.setattr(fastddim, "benchmark", fake, raising=False)
    assert cli.main(["bench", "--rounds", "3"]) == 0
    assert seen == {"rounds": 3}


def test_bench_without_a_working_benchmark_module(monkeypatch, capsys):
    # A None entry in sys.modules makes the import fail, as a missing or broken module would.
    monkeypatch.setitem(sys.modules, "fastddim.benchmark", None)
    monkeypatch.delattr(fastddim, "benchmark", raising=False)
    assert cli.main(["bench"]) == 2
    assert "fastddim.benchmark" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("count", "channels", "mode"), [(1, 1, "L"), (4, 1, "L"), (5, 3, "RGB"), (16, 3, "RGB")], ids=str
)
def test_make_grid(count, channels, mode):
    images = np.random.default_rng(0).random((count, 8, 8, channels), dtype=np.float32)
    grid = cli.make_grid(images)
    assert grid.mode == mode and grid.size == grid_size(count)
    pixels = np.asarray(grid)
    # Nearest-neighbour upscaling: the first tile's top-left block is one source pixel, repeated.
    block = pixels[: cli.GRID_SCALE, : cli.GRID_SCALE]
    expected = (images[0, 0, 0] * 255).round().astype(np.uint8)
    assert (block == (expected[0] if channels == 1 else expected)).all()
