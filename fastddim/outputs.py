"""Output files that are never half-written: atomic writes, per-seed image folders and per-rank manifests.

Every file is written to a temporary name in its destination folder, flushed and fsynced, then renamed over the
destination with ``os.replace`` (atomic on POSIX and Windows within one file system), and the folder is fsynced so
the rename survives a power cut. A crash, ``SIGKILL`` or a full disk therefore leaves either the previous file or
the new one, never a truncated one. Temporary names start with a dot and end with ``TEMP_SUFFIX``, so tools that read
image folders by extension (torch-fidelity, clean-fid, pytorch-fid) never see them; `remove_stale_temps` deletes
the ones a killed run left behind.

A manifest (``manifest-<rank>.jsonl``) has one JSON line per image. A line is appended with a single ``write`` of
the whole line, then fsynced; a line cut short by a crash has no trailing newline and is ignored by `read_manifest`
and cut off by `ManifestWriter` before it appends.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import IO, Any

__all__ = [
    "MANIFEST_GLOB",
    "TEMP_SUFFIX",
    "ManifestWriter",
    "atomic_write",
    "image_relpath",
    "is_temp",
    "manifest_path",
    "read_manifest",
    "remove_stale_temps",
    "sha256_bytes",
    "sha256_file",
    "write_bytes",
]

TEMP_SUFFIX = ".fastddim-tmp"
MANIFEST_GLOB = "manifest-*.jsonl"
# Per-seed images go into folders of this many seeds, so no folder grows past a thousand entries.
SEEDS_PER_FOLDER = 1000


def _temp_name(dest: pathlib.Path) -> pathlib.Path:
    # The pid says which process wrote it (see remove_stale_temps); the random part keeps threads apart.
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp(path: pathlib.Path) -> bool:
    """Whether ``path`` is a temporary file of `atomic_write` (finished or abandoned)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def fsync_folder(folder: pathlib.Path) -> None:
    """Makes the entries of ``folder`` (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(dest: str | os.PathLike, fsync_dir: bool = True) -> Iterator[IO[bytes]]:
    """Opens a temporary file beside ``dest`` for binary writing; on success renames it over ``dest``.

    If the block raises (a full disk included), the temporary file is removed and ``dest`` is left as it was.

    Args:
        dest (`str` or `os.PathLike`): the final path; its folder must exist.
        fsync_dir (`bool`, *optional*, defaults to `True`): fsync the folder after the rename. Callers writing many
            files into one folder may pass False and call `fsync_folder` once at the end.

    Returns:
        A context manager yielding the open binary file.
    """
    dest = pathlib.Path(dest)
    temp = _temp_name(dest)
    handle = open(temp, "xb")  # noqa: SIM115 - closed below, before the rename
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temp, dest)
    except BaseException:
        # Closing flushes what is still buffered, which fails again on a full disk: the file goes regardless.
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if fsync_dir:
        fsync_folder(dest.parent)


def write_bytes(dest: str | os.PathLike, data: bytes, fsync_dir: bool = True) -> None:
    """Writes ``data`` to ``dest`` atomically (see `atomic_write`)."""
    with atomic_write(dest, fsync_dir=fsync_dir) as handle:
        handle.write(data)


def remove_stale_temps(folder: pathlib.Path, recursive: bool, only_dead_writers: bool) -> int:
    """Deletes temporary files that `atomic_write` left in ``folder`` when its process was killed.

    Args:
        folder (`pathlib.Path`): the folder to clean; missing folders hold nothing.
        recursive (`bool`): also clean its subfolders (a per-seed image folder).
        only_dead_writers (`bool`): keep temporary files whose writing process (by pid, on this machine) still
            runs; pass False only when no other process can be writing into ``folder``.

    Returns:
        `int`: the number of files removed.
    """
    if not folder.is_dir():
        return 0
    candidates = folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}")
    removed = 0
    for path in candidates:
        if only_dead_writers and _writer_alive(path):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _writer_alive(temp: pathlib.Path) -> bool:
    try:
        pid = int(temp.name.removesuffix(TEMP_SUFFIX).rsplit(".", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_bytes(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: pathlib.Path) -> str | None:
    """The hex SHA-256 of a file's contents, or None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def image_relpath(seed: int, suffix: str = ".png") -> str:
    """The path of seed ``seed``'s image inside an output folder: ``<seed//1000*1000:06d>/<seed:06d><suffix>``."""
    return f"{seed // SEEDS_PER_FOLDER * SEEDS_PER_FOLDER:06d}/{seed:06d}{suffix}"


def manifest_path(folder: pathlib.Path, rank: int) -> pathlib.Path:
    """The manifest rank ``rank`` appends to: ``folder/manifest-<rank>.jsonl``."""
    return folder / f"manifest-{rank}.jsonl"


def read_manifest(path: pathlib.Path) -> list[dict[str, Any]]:
    """The complete entries of a manifest: lines that end with a newline and hold a JSON object.

    A last line without newline (cut short by a crash) is ignored, as is any line that does not parse.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    for line in data.split(b"\n")[:-1]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


class ManifestWriter:
    """Appends whole JSON lines to one manifest; only one process (its rank) writes a given manifest.

    Args:
        path (`pathlib.Path`): the manifest; created if missing. A torn last line is cut off first.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._cut_torn_tail()
            os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise

    def _cut_torn_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        # Read backwards to the last newline: the lines before it are whole.
        end = size
        while end > 0:
            start = max(0, end - (1 << 16))
            block = os.pread(self._fd, end - start, start)
            if end == size and block.endswith(b"\n"):
                return
            cut = block.rfind(b"\n")
            if cut >= 0:
                os.ftruncate(self._fd, start + cut + 1)
                os.fsync(self._fd)
                return
            end = start
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Appends one line per entry, each by one ``write`` call, and fsyncs once at the end.

        Raises:
            OSError: the disk is full (a line written in part stays torn, and is cut off by the next writer).
        """
        for entry in entries:
            line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def encode_image(pixels: Any, format: str = "PNG") -> bytes:
    """Encodes one H x W x C uint8 array (C = 1 or 3) as image file bytes (deterministic for PNG: no timestamps)."""
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()
