"""A folder of seed-addressed samples: its settings, its per-rank manifests, and which seeds it already holds.

Layout of ``DIR``:

- ``settings.json``: every setting that changes the pixels, and their hash (``settings_hash``); written once.
- PNG format: ``<seed//1000*1000:06d>/<seed:06d>.png``, one file per seed. npz format: one
  ``samples-<first seed:06d>-r<rank>.npz`` per rank and batch, holding ``images`` (uint8, NHWC) and ``seeds`` (int64)
  in the same order.
- ``manifest-<rank>.jsonl``: one JSON line per image this rank wrote: ``seed``, ``file`` (relative to ``DIR``),
  ``sha256`` (of the PNG file, or for npz of the image's uint8 bytes, with its ``index`` in the shard) and
  ``settings_hash``. Ranks never write the same file.

A seed counts as done when a manifest line with this run's settings hash names it and its file holds the image that
line hashed; anything else (no line, a missing or changed file, a torn line) is drawn again.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import numpy as np

from fastddim import outputs

__all__ = ["FORMATS", "SETTINGS_FILE", "FolderRefused", "SampleFolder", "settings_hash"]

FORMATS = ("png", "npz")
SETTINGS_FILE = "settings.json"


class FolderRefused(ValueError):
    """The folder cannot be used as asked (not empty without resume, other settings, not a sample folder)."""


def settings_hash(settings: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-able settings dict (sorted keys, so dict order does not matter)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SampleFolder:
    """One rank's view of an output folder.

    Args:
        root (`pathlib.Path`): the folder.
        fmt (`str`): ``"png"`` or ``"npz"``.
        settings (`dict`): every setting that changes the pixels (JSON-able); hashed into ``settings_hash``.
        about (`dict`): recorded in ``settings.json`` for people, not hashed (e.g. the model's path).
        rank (`int`): this process's rank; it appends to ``manifest-<rank>.jsonl`` only.
        resume (`bool`): complete a folder made with the same settings, instead of requiring an empty one.
    """

    def __init__(
        self, root: pathlib.Path, fmt: str, settings: dict[str, Any], about: dict[str, Any], rank: int, resume: bool
    ):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self.root = root
        self.fmt = fmt
        self.settings = {**settings, "format": fmt}
        self.hash = settings_hash(self.settings)
        self.about = about
        self.rank = rank
        self.resume = resume
        self._entries: dict[int, list[dict[str, Any]]] = {}
        self._manifest: outputs.ManifestWriter | None = None
        self._made_folders: set[pathlib.Path] = set()

    # ------------------------------------------------------------------------------------------------ before sampling

    def check(self) -> None:
        """Reads the folder and refuses it if it cannot be used; writes nothing.

        Raises:
            FolderRefused: not a folder; not empty without ``resume``; with ``resume``, not a sample folder or one
                made with other settings.
        """
        root = self.root
        if not root.exists():
            return
        if not root.is_dir():
            raise FolderRefused(f"{root} is not a folder")
        present = sorted(path.name for path in root.iterdir() if not outputs.is_temp(path))
        if not present:
            return
        if not self.resume:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise FolderRefused(
                f"{root} already holds {len(present)} entries ({shown}); pass --resume to complete a fastddim "
                "sample folder, or choose a new or empty folder"
            )
        recorded = self._read_settings()
        if recorded.get("settings_hash") != self.hash:
            theirs = recorded.get("settings", {})
            differing = sorted(
                key for key in set(theirs) | set(self.settings) if theirs.get(key) != self.settings.get(key)
            )
            raise FolderRefused(
                f"{root} was made with other settings (differing: {', '.join(differing) or 'unknown'}); resume it "
                "with the same settings or choose a new folder"
            )
        for manifest in sorted(root.glob(outputs.MANIFEST_GLOB)):
            try:
                entries = outputs.read_manifest(manifest)
            except OSError as exc:
                raise FolderRefused(f"cannot read {manifest}: {exc.strerror or exc}") from None
            for entry in entries:
                if entry.get("settings_hash") != self.hash:
                    raise FolderRefused(
                        f"{manifest} holds images made with other settings (settings_hash "
                        f"{entry.get('settings_hash')!r}, this run {self.hash!r})"
                    )
                seed = entry.get("seed")
                if isinstance(seed, int):
                    self._entries.setdefault(seed, []).append(entry)

    def _read_settings(self) -> dict[str, Any]:
        path = self.root / SETTINGS_FILE
        try:
            recorded = json.loads(path.read_text())
        except FileNotFoundError:
            raise FolderRefused(f"{self.root} is not a fastddim sample folder (no {SETTINGS_FILE})") from None
        except (OSError, ValueError) as exc:
            raise FolderRefused(f"cannot read {path}: {exc}") from None
        if not isinstance(recorded, dict):
            raise FolderRefused(f"{path} is not a fastddim settings file")
        return recorded

    def pending(self, seeds: np.ndarray) -> np.ndarray:
        """The seeds of ``seeds`` the folder does not hold yet (checked against their files' hashes), in order."""
        if not self._entries:
            return seeds
        shards: dict[str, np.lib.npyio.NpzFile | None] = {}
        keep = [
            not any(self._holds(int(seed), entry, shards) for entry in self._entries.get(int(seed), ()))
            for seed in seeds
        ]
        return seeds[np.asarray(keep, dtype=bool)]

    def _holds(self, seed: int, entry: dict[str, Any], shards: dict[str, Any]) -> bool:
        name = entry.get("file")
        if self.fmt == "png":
            if name != outputs.image_relpath(seed):
                return False
            return outputs.sha256_file(self.root / name) == entry.get("sha256")
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".npz"):
            return False
        if name not in shards:
            shards[name] = self._load_shard(self.root / name)
        shard = shards[name]
        index = entry.get("index")
        if shard is None or not isinstance(index, int) or not 0 <= index < len(shard[1]):
            return False
        images, seeds = shard
        return int(seeds[index]) == seed and outputs.sha256_bytes(images[index].tobytes()) == entry.get("sha256")

    @staticmethod
    def _load_shard(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(path) as data:
                images, seeds = data["images"], data["seeds"]
        except (OSError, ValueError, KeyError):
            return None
        return images, seeds

    def prepare(self, cleans: bool) -> None:
        """Creates the folder and ``settings.json`` and, if ``cleans``, deletes temporary files of killed runs.

        One rank prepares, after every rank has checked (so none sees its own run's files as someone else's).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        if cleans:
            outputs.remove_stale_temps(self.root, recursive=True, only_dead_writers=False)
        path = self.root / SETTINGS_FILE
        if not path.exists():
            record = {"settings_hash": self.hash, "settings": self.settings, "about": self.about}
            outputs.write_bytes(path, (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())

    # ------------------------------------------------------------------------------------------------ while sampling

    def open(self) -> None:
        """Opens this rank's manifest for appending (cutting off a line a killed run left torn)."""
        self._manifest = outputs.ManifestWriter(outputs.manifest_path(self.root, self.rank))

    def write(self, seeds: np.ndarray, pixels: np.ndarray) -> None:
        """Writes one batch: the images (atomically), then their manifest lines.

        Args:
            seeds (`np.ndarray`): the batch's seeds (int64).
            pixels (`np.ndarray`): N x H x W x C uint8 images, in the order of ``seeds``.

        Raises:
            OSError: a file could not be written (full disk, permissions); files written before are intact.
        """
        if self._manifest is None:
            raise RuntimeError("SampleFolder.open() must be called before write()")
        lines = []
        if self.fmt == "png":
            touched = set()
            for seed, image in zip(seeds.tolist(), pixels, strict=True):
                relpath = outputs.image_relpath(seed)
                dest = self.root / relpath
                if dest.parent not in self._made_folders:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self._made_folders.add(dest.parent)
                data = outputs.encode_image(image)
                try:
                    outputs.write_bytes(dest, data, fsync_dir=False)
                except OSError as exc:
                    # Name the image, not the temporary file the error was raised for.
                    raise OSError(exc.errno, exc.strerror, str(dest)) from None
                touched.add(dest.parent)
                lines.append({"seed": seed, "file": relpath, "sha256": outputs.sha256_bytes(data)})
            for folder in touched:
                outputs.fsync_folder(folder)
        else:
            name = f"samples-{int(seeds[0]):06d}-r{self.rank}.npz"
            try:
                with outputs.atomic_write(self.root / name) as handle:
                    np.savez(handle, images=pixels, seeds=seeds.astype(np.int64))
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.root / name)) from None
            for index, (seed, image) in enumerate(zip(seeds.tolist(), pixels, strict=True)):
                lines.append(
                    {"seed": seed, "file": name, "index": index, "sha256": outputs.sha256_bytes(image.tobytes())}
                )
        for line in lines:
            line["settings_hash"] = self.hash
        self._manifest.append(lines)

    def close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
