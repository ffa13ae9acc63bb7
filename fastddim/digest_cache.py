"""Digests of model files remembered across runs, so that ``fastddim sample`` reads gigabytes of weights once.

A resumable sample folder names its model by a hash of the files the model loads (`fastddim.weight_variants`):
seconds of reading for a Stable Diffusion folder, on every run. A digest is remembered with the stat of every file it
covers (name, size, modification and change times in ns, inode), as git's index remembers a file's stat: while all of
them match, the files are taken as unchanged. Any write to a file changes its change time, which no tool can set
back, and a copy is a new inode, so either hashes the files again. As in git, a digest is not remembered while a file
is "racily clean": changed within `RACY_SECONDS` of the stat, where a file system's coarse clock (one kernel tick,
FAT's two seconds) could give a later write the same times.

The digests live in one small JSON file, ``$FASTDDIM_CACHE_DIR/digests.json`` (by default
``$XDG_CACHE_HOME/fastddim``, else ``~/.cache/fastddim``); ``FASTDDIM_CACHE_DIR=`` (empty) turns remembering off. The
file is replaced atomically and keeps the `MAX_ENTRIES` most recently computed digests; one that cannot be read or
written is ignored: the digest is then computed, as without a cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence

from fastddim import outputs

__all__ = ["CACHE_DIR_ENV", "MAX_ENTRIES", "RACY_SECONDS", "cache_file", "file_stamps", "remembered_digest"]

CACHE_DIR_ENV = "FASTDDIM_CACHE_DIR"
MAX_ENTRIES = 256
RACY_SECONDS = 3


def cache_file() -> pathlib.Path | None:
    """Where digests are remembered; None when ``FASTDDIM_CACHE_DIR`` is set empty."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        # Without a home folder expanduser leaves "~": nothing is remembered rather than a "~" folder made here.
        folder = os.path.join(base, "fastddim") if os.path.isabs(base) else ""
    return pathlib.Path(folder) / "digests.json" if folder else None


def file_stamps(files: Sequence[pathlib.Path]) -> list[list]:
    """Each file's name, size, mtime_ns, ctime_ns and inode: what must match for its remembered digest to hold."""
    stamps = []
    for path in files:
        stat = path.stat()
        stamps.append([path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])
    return stamps


def remembered_digest(key: str, files: Sequence[pathlib.Path], compute: Callable[[], str]) -> str:
    """The digest of ``files`` under ``key``: remembered if none of them changed since, else ``compute()`` (then
    remembered).

    Args:
        key (`str`): what the digest is of (a folder's resolved path and variant).
        files (`Sequence[pathlib.Path]`): every file the digest reads.
        compute (`Callable[[], str]`): computes the digest.
    """
    path = cache_file()
    stamps = file_stamps(files)
    entries = _read(path) if path is not None else {}
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("files") == stamps and isinstance(entry.get("digest"), str):
        return entry["digest"]
    digest = compute()
    if path is not None and _settled(files, stamps):
        entries.pop(key, None)
        entries[key] = {"files": stamps, "digest": digest}
        _write(path, dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest


def _settled(files: Sequence[pathlib.Path], stamps: list[list]) -> bool:
    """Whether ``stamps`` may be remembered: the files were not changed while they were read, nor shortly before."""
    try:
        unchanged = file_stamps(files) == stamps
    except OSError:  # one was removed meanwhile
        return False
    newest = max((max(stamp[2], stamp[3]) for stamp in stamps), default=0)
    return unchanged and _now_ns() - newest > RACY_SECONDS * 10**9


def _now_ns() -> int:
    return time.time_ns()


def _read(path: pathlib.Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write(path: pathlib.Path, entries: dict) -> None:
    # Runs that write at once each replace the whole file: one's entry may be lost, never the file.
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_bytes(path, json.dumps(entries).encode(), fsync_dir=False)
