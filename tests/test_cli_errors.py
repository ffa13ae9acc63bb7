"""``fastddim sample``'s user errors: one line on stderr, exit status 2, found before sampling where they can be.

"Before sampling" is checked by making the pipeline call fail the test: these errors must never reach it.
"""

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastddim
from fastddim import cli, outputs
from tests.helpers import make_unet


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict:
    """UNet folders whose weights do not fit their config."""
    root = tmp_path_factory.mktemp("broken")
    unet = make_unet()
    for name in ("good", "missing", "mismatch", "unexpected"):
        unet.save_pretrained(root / name)
    weights = root / "missing" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({key: value for index, (key, value) in enumerate(state.items()) if index % 3}, weights)
    config_path = root / "mismatch" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [8, 16]
    config_path.write_text(json.dumps(config))
    weights = root / "unexpected" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "extra.weight": torch.zeros(2)}, weights)
    return {name: root / name for name in ("good", "missing", "mismatch", "unexpected")}


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the error should have been raised before sampling")

    monkeypatch.setattr(fastddim.DDIMPipeline, "__call__", refuse)


def run_main(capsys, *args: str) -> tuple[int, list[str]]:
    status = cli.main(["sample", *args])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line_error(capsys, args, *fragments, status=2):
    code, err = run_main(capsys, *args)
    assert code == status and len(err) == 1, err
    assert err[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        ("missing", ["weights do not match the UNet config", "weights missing"]),
        ("mismatch", ["cannot load it", "size mismatch"]),
        ("unexpected", ["weights the config has no place for", "extra.weight"]),
    ],
)
def test_model_whose_weights_do_not_fit(broken_models, capsys, no_sampling, tmp_path, model, fragments):
    args = ["--model", str(broken_models[model]), "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert_one_line_error(capsys, args, *fragments)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--steps", "1001"], ["--steps 1001", "trained with 1000 timesteps"]),
        (["--out", "{tmp}/x.psd"], ["cannot write them"]),
        (["--scale", "1000000"], ["--scale 1000000", "above the limit"]),
        (["--seeds", "0-3,3"], ["--seeds", "listed more than once"]),
        (["--seeds", "4-2"], ["A <= B"]),
        (["--seeds", "0-3", "--num-samples", "4"], ["--seeds", "without --num-samples"]),
        (["--format", "npz", "--out", "{tmp}/x.png"], ["--format"]),
        (["--resume", "--out", "{tmp}/x.png"], ["--resume"]),
        (["--scale", "2", "--out", "{tmp}/folder"], ["--scale"]),
        (["--num-samples", "3", "--seed", str(2**63 - 2)], ["--seed"]),
    ],
    ids=[
        "steps-above-training",
        "read-only-format",
        "huge-grid",
        "duplicate-seed",
        "descending-range",
        "seeds-and-num-samples",
        "format-for-a-file",
        "resume-a-file",
        "scale-for-a-folder",
        "seed-overflow",
    ],
)
def test_errors_before_sampling(capsys, no_sampling, tmp_path, args, fragments):
    args = [arg.format(tmp=tmp_path) for arg in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.png")]
    assert_one_line_error(capsys, [*args, "--steps", "2"] if "--steps" not in args else args, *fragments)
    assert not any(tmp_path.iterdir())


def test_too_many_threads_warns_once(capsys, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    args = ["--threads", "4096", "--steps", "2", "--num-samples", "1", "--out", str(tmp_path / "x.png")]
    code, err = run_main(capsys, *args)
    assert code == 0 and seen == [4096]
    assert len(err) == 1 and err[0].startswith("warning: --threads 4096 is more than")


def run_cli_limited(args, file_size_limit: int) -> subprocess.CompletedProcess:
    """Runs the CLI with a file-size limit, the stand-in for a full disk."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "fastddim", "sample", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=limit,
    )


@pytest.mark.slow
def test_full_disk_keeps_the_previous_grid(tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous grid" * 100)
    result = run_cli_limited(["--steps", "2", "--num-samples", "16", "--out", str(out)], file_size_limit=1024)
    assert result.returncode == 2, result.stderr
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot write" in err[0] and "File too large" in err[0], err
    assert out.read_bytes() == b"the previous grid" * 100
    assert [path.name for path in tmp_path.iterdir()] == ["grid.png"]
    assert result.returncode != -signal.SIGXFSZ


@pytest.mark.slow
def test_full_disk_in_a_folder_keeps_earlier_images_and_resumes(tmp_path):
    out = tmp_path / "samples"
    args = ["--steps", "2", "--seeds", "0-39", "--batch-size", "8", "--out", str(out)]
    result = run_cli_limited(args, file_size_limit=4096)
    assert result.returncode == 2, result.stderr
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "File too large" in err[0] and "intact" in err[0], err
    entries = outputs.read_manifest(out / "manifest-0.jsonl")
    assert 0 < len(entries) < 40
    for entry in entries:
        assert outputs.sha256_file(out / entry["file"]) == entry["sha256"]

    # Without the limit, --resume completes the folder.
    assert cli.main(["sample", *args, "--resume"]) == 0
    entries = outputs.read_manifest(out / "manifest-0.jsonl")
    assert sorted(entry["seed"] for entry in entries) == list(range(40))
    assert not [path for path in out.rglob("*") if outputs.is_temp(path)]
    pngs = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png"))
    assert pngs == [outputs.image_relpath(seed) for seed in range(40)]
    assert np.all([outputs.sha256_file(out / e["file"]) == e["sha256"] for e in entries])
