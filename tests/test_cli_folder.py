"""``fastddim sample --out DIR``: one PNG per seed or npz shards, manifests, and ``--resume`` after a SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from fastddim import cli, outputs


def cli_env() -> dict:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def folder_files(root) -> dict:
    """Every file under ``root`` (relative path -> bytes)."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_png_folder_layout_and_manifest(tmp_path, capsys):
    out = tmp_path / "samples"
    seeds = [0, 1, 999, 1000, 2500]
    args = ["sample", "--steps", "2", "--seeds", "0-1,999-1000,2500", "--batch-size", "2", "--out", str(out)]
    assert cli.main(args) == 0
    assert f"wrote 5 images (png) to {out}/" in capsys.readouterr().out
    files = folder_files(out)
    assert sorted(files) == sorted(
        ["000000/000000.png", "000000/000001.png", "000000/000999.png", "001000/001000.png", "002000/002500.png"]
        + ["manifest-0.jsonl", "settings.json"]
    )
    settings = json.loads(files["settings.json"])
    entries = outputs.read_manifest(out / "manifest-0.jsonl")
    assert [entry["seed"] for entry in entries] == seeds
    for entry in entries:
        assert set(entry) == {"seed", "file", "sha256", "settings_hash"}
        assert entry["file"] == outputs.image_relpath(entry["seed"])
        assert entry["sha256"] == outputs.sha256_bytes(files[entry["file"]])
        assert entry["settings_hash"] == settings["settings_hash"]
        with PIL.Image.open(out / entry["file"]) as image:
            # The embedded digits model: 8x8 grayscale, at full size (no grid scaling).
            assert image.format == "PNG" and image.mode == "L" and image.size == (8, 8)
    assert settings["settings"]["steps"] == 2 and settings["settings"]["format"] == "png"


def test_npz_shards_hold_the_png_pixels(tmp_path):
    common = ["sample", "--steps", "2", "--seeds", "3-9", "--batch-size", "3", "--eta", "1"]
    assert cli.main([*common, "--out", str(tmp_path / "png")]) == 0
    assert cli.main([*common, "--format", "npz", "--out", str(tmp_path / "npz")]) == 0
    shards = sorted(path.name for path in (tmp_path / "npz").glob("*.npz"))
    assert shards == ["samples-000003-r0.npz", "samples-000006-r0.npz", "samples-000009-r0.npz"]
    entries = outputs.read_manifest(tmp_path / "npz" / "manifest-0.jsonl")
    assert [entry["seed"] for entry in entries] == list(range(3, 10))
    for shard in shards:
        with np.load(tmp_path / "npz" / shard) as data:
            images, seeds = data["images"], data["seeds"]
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1) and seeds.dtype == np.int64
        for index, (seed, image) in enumerate(zip(seeds.tolist(), images, strict=True)):
            with PIL.Image.open(tmp_path / "png" / outputs.image_relpath(seed)) as png:
                np.testing.assert_array_equal(np.asarray(png), image[..., 0])
            entry = next(e for e in entries if e["seed"] == seed)
            assert (entry["file"], entry["index"]) == (shard, index)
            assert entry["sha256"] == outputs.sha256_bytes(image.tobytes())


def test_resume_redraws_only_what_is_missing_or_changed(tmp_path, monkeypatch):
    out = tmp_path / "samples"
    args = ["sample", "--steps", "2", "--seeds", "0-5", "--batch-size", "2", "--out", str(out)]
    assert cli.main(args) == 0
    complete = folder_files(out)
    (out / "000000" / "000001.png").unlink()
    (out / "000000" / "000004.png").write_bytes(b"not the image")
    (out / "000000" / f".000002.png.1-abcd{outputs.TEMP_SUFFIX}").write_bytes(b"left by a kill")

    import fastddim

    drawn = []
    real_call = fastddim.DDIMPipeline.__call__

    def recording_call(self, *call_args, **kwargs):
        drawn.extend(kwargs["seeds"])
        return real_call(self, *call_args, **kwargs)

    monkeypatch.setattr(fastddim.DDIMPipeline, "__call__", recording_call)
    assert cli.main([*args, "--resume"]) == 0
    assert drawn == [1, 4]
    resumed = folder_files(out)
    assert {name: data for name, data in resumed.items() if not name.startswith("manifest")} == {
        name: data for name, data in complete.items() if not name.startswith("manifest")
    }
    entries = outputs.read_manifest(out / "manifest-0.jsonl")
    assert [entry["seed"] for entry in entries] == [0, 1, 2, 3, 4, 5, 1, 4]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(["--eta", "0.5"], "differing: eta"), (["--steps", "3"], "differing: steps"), (["--format", "npz"], "format")],
)
def test_resume_refuses_other_settings(tmp_path, capsys, extra, fragment):
    out = tmp_path / "samples"
    args = ["sample", "--seeds", "0-1", "--out", str(out)]
    assert cli.main([*args, "--steps", "2"]) == 0
    before = folder_files(out)
    capsys.readouterr()
    settings = [*extra, "--steps", "2"] if "--steps" not in extra else extra
    assert cli.main([*args, *settings, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and fragment in err[0], err
    assert folder_files(out) == before


def test_resume_of_an_absent_folder_starts_it(tmp_path):
    assert cli.main(["sample", "--steps", "2", "--seeds", "0-1", "--resume", "--out", str(tmp_path / "new")]) == 0
    assert len(outputs.read_manifest(tmp_path / "new" / "manifest-0.jsonl")) == 2


def test_resume_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"x")
    assert cli.main(["sample", "--steps", "2", "--resume", "--out", str(tmp_path / "photos")]) == 2
    assert "not a fastddim sample folder" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(tmp_path):
    """A run killed part way, then resumed, leaves the same folder as one uninterrupted run (manifests included)."""
    args = ["sample", "--steps", "10", "--seeds", "0-79", "--batch-size", "1"]

    def start(out, *extra):
        return subprocess.Popen(
            [sys.executable, "-m", "fastddim", *args, "--out", str(out), *extra],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    killed = tmp_path / "killed"
    process = start(killed)
    manifest = killed / "manifest-0.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = len(outputs.read_manifest(manifest))
    assert 3 <= done < 80
    # What a kill in the middle of a write leaves: a torn manifest line and a temporary file.
    with open(manifest, "ab") as handle:
        handle.write(b'{"file":"000000/000070.png","seed":7')
    (killed / "000000" / f".000070.png.999999999-0000{outputs.TEMP_SUFFIX}").write_bytes(b"\x89PNG half")

    resumed = start(killed, "--resume")
    reference = start(tmp_path / "reference")
    for run in (resumed, reference):
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    assert folder_files(killed) == folder_files(tmp_path / "reference")
    assert len(folder_files(killed)) == 80 + 2

    other = subprocess.run(
        [sys.executable, "-m", "fastddim", *args, "--eta", "1", "--out", str(killed), "--resume"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 2
    err = [line for line in other.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "other settings (differing: eta)" in err[0], err
