"""The machine a run measured: device, driver, library versions, commit; the header of every results file."""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from fastddim.timing import cpu_model, default_device, device_name, device_slug
from fastddim.utils import normalize_device


def driver_version() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``, else ``/proc/driver/nvidia/version``), or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    with contextlib.suppress(OSError):
        match = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        if match:
            return match.group(1)
    return None


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when the working tree differs from it (as a copied tree can)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device, driver and library versions, date: the header of every results file and saved benchmark run.

    Args:
        device (`torch.device` or `str`, *optional*): defaults to the current CUDA device, else the CPU.

    Returns:
        `dict`: ``date``, ``device``, ``device_slug``, ``device_type``, versions, ``git_commit``, the backend
        environment variables and, on CUDA, ``compute_capability``, ``sm_count`` and ``total_memory_gib``.
    """
    device = default_device() if device is None else normalize_device(device)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_type": device.type,
        "driver_version": None,
        "cuda_version": torch.version.cuda,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "fastddim": package_version("fastddim"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "FASTDDIM_BACKEND": os.environ.get("FASTDDIM_BACKEND", "auto"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["driver_version"] = driver_version()
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
        info["total_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def free_memory(device: torch.device) -> None:
    """Collects garbage and returns cached CUDA blocks: between cases, so one case's tensors never crowd the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
