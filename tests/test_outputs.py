"""fastddim.outputs: atomic writes (crash, full disk), stale temporary files, and append-only manifests."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastddim import outputs


def leftovers(folder):
    return sorted(path.name for path in folder.rglob("*") if outputs.is_temp(path))


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "x.bin"
    dest.write_bytes(b"old")
    outputs.write_bytes(dest, b"new contents")
    assert dest.read_bytes() == b"new contents"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [b"previous result", None], ids=["over-a-file", "new-file"])
def test_a_failing_write_leaves_the_previous_file(tmp_path, existing):
    dest = tmp_path / "x.png"
    if existing is not None:
        dest.write_bytes(existing)
    with pytest.raises(RuntimeError, match="boom"), outputs.atomic_write(dest) as handle:
        handle.write(b"half of it")
        raise RuntimeError("boom")
    assert (dest.read_bytes() if dest.exists() else None) == existing
    assert leftovers(tmp_path) == []


def test_full_disk_in_a_child_keeps_the_previous_file(tmp_path):
    # RLIMIT_FSIZE stands in for a full disk: past it, write() fails with EFBIG once SIGXFSZ is ignored.
    dest = tmp_path / "big.bin"
    dest.write_bytes(b"earlier result")
    code = textwrap.dedent(
        f"""
        import errno, resource, signal, sys
        from fastddim import outputs
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            outputs.write_bytes({str(dest)!r}, b"x" * 100_000)
        except OSError as exc:
            sys.exit(0 if exc.errno == errno.EFBIG else 3)
        sys.exit(4)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == b"earlier result"
    assert leftovers(tmp_path) == []


def test_remove_stale_temps_keeps_live_writers(tmp_path):
    (tmp_path / "sub").mkdir()
    dead = tmp_path / "sub" / f".a.png.999999999-0000{outputs.TEMP_SUFFIX}"
    live = tmp_path / f".b.png.{os.getppid()}-0000{outputs.TEMP_SUFFIX}"
    keep = tmp_path / "c.png"
    for path in (dead, live, keep):
        path.write_bytes(b"x")
    assert outputs.remove_stale_temps(tmp_path, recursive=False, only_dead_writers=True) == 0
    assert outputs.remove_stale_temps(tmp_path, recursive=True, only_dead_writers=True) == 1
    assert not dead.exists() and live.exists() and keep.exists()
    assert outputs.remove_stale_temps(tmp_path, recursive=True, only_dead_writers=False) == 1
    assert not live.exists() and keep.exists()


@pytest.mark.parametrize(
    ("seed", "path"),
    [
        (0, "000000/000000.png"),
        (999, "000000/000999.png"),
        (1000, "001000/001000.png"),
        (123456, "123000/123456.png"),
        (12345678, "12345000/12345678.png"),
    ],
)
def test_image_relpath(seed, path):
    assert outputs.image_relpath(seed) == path


def test_manifest_appends_whole_lines_and_cuts_a_torn_tail(tmp_path):
    path = outputs.manifest_path(tmp_path, 3)
    assert path.name == "manifest-3.jsonl"
    with outputs.ManifestWriter(path) as writer:
        writer.append([{"seed": 1}, {"seed": 2}])
    # A kill in the middle of a write leaves a line without newline: readers skip it, the next writer cuts it.
    with open(path, "ab") as handle:
        handle.write(b'{"seed": 3, "fi')
    assert [entry["seed"] for entry in outputs.read_manifest(path)] == [1, 2]
    with outputs.ManifestWriter(path) as writer:
        writer.append([{"seed": 4}])
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(line)["seed"] for line in lines[:-1]] == [1, 2, 4]


def test_manifest_that_is_one_torn_line(tmp_path):
    path = tmp_path / "manifest-0.jsonl"
    path.write_bytes(b'{"seed": 1')
    assert outputs.read_manifest(path) == []
    with outputs.ManifestWriter(path) as writer:
        writer.append([{"seed": 5}])
    assert outputs.read_manifest(path) == [{"seed": 5}]


def test_missing_manifest_reads_empty(tmp_path):
    assert outputs.read_manifest(tmp_path / "manifest-0.jsonl") == []
