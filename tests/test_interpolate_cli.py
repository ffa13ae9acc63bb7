"""``fastddim interpolate`` end to end on the CPU with the embedded digits model: the strip, its ends, its errors."""

import numpy as np
import PIL.Image
import pytest

from fastddim.cli import main

pytestmark = pytest.mark.slow

STEPS = "5"


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["interpolate", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_writes_one_strip_whose_ends_are_the_seeds_images(tmp_path, capsys):
    strip_path = tmp_path / "strip.png"
    status, out, err = run(capsys, "--seeds", "3", "7", "--frames", "4", "--steps", STEPS, "--out", str(strip_path))
    assert status == 0, err
    assert "strip of 4 frames from seed 3 to seed 7" in out
    strip = np.asarray(PIL.Image.open(strip_path))
    scale, size, padding = 8, 8, 1
    assert strip.shape == (size * scale, (4 * size + 3 * padding) * scale)
    frames = [strip[:, i * (size + padding) * scale : (i * (size + padding) + size) * scale] for i in range(4)]
    # The ends are `fastddim sample --seeds 3` and `--seeds 7` (up to the UNet's batch-size rounding: one level).
    for seed, frame in ((3, frames[0]), (7, frames[-1])):
        grid_path = tmp_path / f"seed{seed}.png"
        assert main(["sample", "--seeds", str(seed), "--steps", STEPS, "--out", str(grid_path)]) == 0
        single = np.asarray(PIL.Image.open(grid_path)).astype(int)
        assert np.abs(single - frame.astype(int)).max() <= 1
    # The middle frames differ from both ends: the strip interpolates.
    assert np.abs(frames[1].astype(int) - frames[0]).max() > 0 and np.abs(frames[2].astype(int) - frames[3]).max() > 0
    assert not list(tmp_path.glob("*.tmp*")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_batch_size_splits_the_frames_without_changing_them_beyond_rounding(tmp_path, capsys):
    strips = {}
    for batch_size in (None, 2, 3):
        path = tmp_path / f"strip-{batch_size}.png"
        extra = [] if batch_size is None else ["--batch-size", str(batch_size)]
        status, _, err = run(
            capsys, "--seeds", "3", "7", "--frames", "5", "--steps", STEPS, *extra, "--out", str(path)
        )
        assert status == 0, err
        strips[batch_size] = np.asarray(PIL.Image.open(path)).astype(int)
    for batch_size in (2, 3):
        assert strips[batch_size].shape == strips[None].shape
        assert np.abs(strips[batch_size] - strips[None]).max() <= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "1"], "--seeds"),
        (["--seeds", "1", "x"], "--seeds"),
        (["--seeds", "1", "2", "--frames", "1"], "--frames 1"),
        (["--seeds", "1", "2", "--out", "strip.psd"], "PIL cannot write .psd"),
        (["--seeds", "1", "2", "--device", "cuda:9"], "--device"),
        (["--seeds", "1", "2", "--steps", "5000"], "--steps 5000"),
        (["--seeds", "1", "2", "--scale", "100000"], "--scale 100000"),
        (["--seeds", "1", "2", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_user_errors_are_one_line_before_sampling(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, *args)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not any(tmp_path.iterdir())
