"""Model-file digests remembered across runs (``fastddim.digest_cache``) and the folder hash built on them."""

import hashlib
import json
import os
import time

import pytest

from fastddim import digest_cache
from fastddim.weight_variants import loaded_files_sha256


@pytest.fixture(autouse=True)
def files_written_long_ago(monkeypatch):
    """The files these tests write are seconds old: seen from an hour later, none of them is racily clean."""
    monkeypatch.setattr(digest_cache, "_now_ns", lambda: time.time_ns() + 3600 * 10**9)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(digest_cache.CACHE_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    paths = [folder / "config.json", folder / "weights.bin"]
    paths[0].write_text("{}")
    paths[1].write_bytes(b"\1" * 1000)
    return paths


def counting(digest: str):
    calls = []

    def compute():
        calls.append(1)
        return digest

    return compute, calls


def test_a_digest_is_computed_once_while_the_files_are_unchanged(cache_dir, files):
    compute, calls = counting("a" * 64)
    assert digest_cache.remembered_digest("key", files, compute) == "a" * 64
    assert digest_cache.remembered_digest("key", files, compute) == "a" * 64
    assert len(calls) == 1
    assert (cache_dir / "digests.json").is_file()
    other, other_calls = counting("b" * 64)
    assert digest_cache.remembered_digest("other key", files, other) == "b" * 64
    assert len(other_calls) == 1


@pytest.mark.parametrize("change", ["rewrite-same-size", "restore-mtime", "replace-by-copy", "remove", "add"])
def test_any_change_to_the_files_computes_again(cache_dir, files, change):
    compute, calls = counting("a" * 64)
    digest_cache.remembered_digest("key", files, compute)
    weights = files[1]
    stat = weights.stat()
    if change == "rewrite-same-size":
        weights.write_bytes(b"\2" * 1000)
    elif change == "restore-mtime":
        # A tool that writes and then sets the old modification time back cannot set the change time back.
        weights.write_bytes(b"\2" * 1000)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif change == "replace-by-copy":
        copy = weights.with_name("copy")
        copy.write_bytes(weights.read_bytes())
        os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        copy.replace(weights)
    elif change == "remove":
        files = files[:1]
    else:
        extra = weights.with_name("extra.json")
        extra.write_text("[]")
        files = [*files, extra]
    digest_cache.remembered_digest("key", files, compute)
    assert len(calls) == 2


def test_files_changed_just_before_are_not_remembered(cache_dir, files, monkeypatch):
    # A file system's clock may be coarser than its ns fields: a write within the same tick could keep every stamp.
    newest = max(max(path.stat().st_mtime_ns, path.stat().st_ctime_ns) for path in files)
    monkeypatch.setattr(digest_cache, "_now_ns", lambda: newest + (digest_cache.RACY_SECONDS - 1) * 10**9)
    compute, calls = counting("a" * 64)
    for _ in range(2):
        assert digest_cache.remembered_digest("key", files, compute) == "a" * 64
    assert len(calls) == 2 and not (cache_dir / "digests.json").exists()
    monkeypatch.setattr(digest_cache, "_now_ns", lambda: newest + (digest_cache.RACY_SECONDS + 1) * 10**9)
    for _ in range(2):
        digest_cache.remembered_digest("key", files, compute)
    assert len(calls) == 3


def test_a_file_removed_while_it_was_read_is_not_remembered(cache_dir, files):
    def compute():
        files[1].unlink()
        return "a" * 64

    assert digest_cache.remembered_digest("key", files, compute) == "a" * 64
    assert not (cache_dir / "digests.json").exists()


def test_empty_cache_dir_turns_remembering_off(tmp_path, files, monkeypatch):
    monkeypatch.setenv(digest_cache.CACHE_DIR_ENV, "")
    monkeypatch.chdir(tmp_path)
    assert digest_cache.cache_file() is None
    compute, calls = counting("a" * 64)
    for _ in range(2):
        digest_cache.remembered_digest("key", files, compute)
    assert len(calls) == 2


def test_default_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(digest_cache.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert digest_cache.cache_file() == tmp_path / "fastddim" / "digests.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert digest_cache.cache_file() == tmp_path / "home" / ".cache" / "fastddim" / "digests.json"
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # no home folder: "~" stays "~"
    assert digest_cache.cache_file() is None


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"key": {"files": [], "digest": 3}}', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000],
    ids=["not-json", "not-a-dict", "bad-entry", "not-utf8", "too-deep"],
)
def test_an_unreadable_cache_is_ignored_and_replaced(cache_dir, files, content):
    cache_dir.mkdir()
    (cache_dir / "digests.json").write_bytes(content)
    compute, calls = counting("a" * 64)
    assert digest_cache.remembered_digest("key", files, compute) == "a" * 64
    assert digest_cache.remembered_digest("key", files, compute) == "a" * 64
    assert len(calls) == 1


def test_an_unwritable_cache_still_gives_the_digest(tmp_path, files, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(digest_cache.CACHE_DIR_ENV, str(blocker / "cache"))  # its parent is a file
    compute, calls = counting("a" * 64)
    assert digest_cache.remembered_digest("key", files, compute) == "a" * 64
    assert len(calls) == 1


def test_the_cache_keeps_the_newest_entries(cache_dir, files, monkeypatch):
    monkeypatch.setattr(digest_cache, "MAX_ENTRIES", 3)
    for index in range(5):
        digest_cache.remembered_digest(f"key {index}", files, lambda: "a" * 64)
    entries = json.loads((cache_dir / "digests.json").read_text())
    assert list(entries) == ["key 2", "key 3", "key 4"]
    assert not [path for path in cache_dir.iterdir() if path.name != "digests.json"], "temporary files left behind"


def test_loaded_files_sha256_is_the_hash_of_names_and_contents_and_is_remembered(cache_dir, tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"plain")
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"half")
    (folder / ".hidden").write_text("ignored")

    def expected(names):
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
        return digest.hexdigest()

    assert loaded_files_sha256(folder) == expected(["config.json", "diffusion_pytorch_model.safetensors"])
    assert loaded_files_sha256(folder, "fp16") == expected(["config.json", "diffusion_pytorch_model.fp16.safetensors"])
    # Served from the cache from now on: a digest planted there is what comes back.
    path = cache_dir / "digests.json"
    entries = json.loads(path.read_text())
    assert len(entries) == 2
    for entry in entries.values():
        entry["digest"] = "f" * 64
    path.write_text(json.dumps(entries))
    assert loaded_files_sha256(folder) == loaded_files_sha256(folder, "fp16") == "f" * 64
    (folder / "config.json").write_text('{"a": 2}')
    assert loaded_files_sha256(folder) == expected(["config.json", "diffusion_pytorch_model.safetensors"])
