"""Small shared test fixtures' building blocks (importable as ``tests.helpers``)."""

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import diffusers
import pytest
import torch
import triton

REPO_ROOT = Path(__file__).resolve().parents[1]

HAS_CUDA = torch.cuda.is_available()
# Where each scheduler backend runs in the tests (the `backend` fixture of tests/conftest.py): Triton on CUDA, or in
# its CPU interpreter without a GPU.
BACKEND_DEVICES = {"torch": "cpu", "triton": "cuda" if HAS_CUDA else "cpu"}

# Version skips, for what only an older Triton CPU interpreter (or torch's support for it) gets wrong: never on a GPU.
# Each names the version at fault; CI runs the suite on the pyproject.toml floors (.ci/floor-constraints.txt) too.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # conftest.py sets it before this import
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

interpreter_fma_rounds_twice = pytest.mark.skipif(
    INTERPRETED and TRITON_VERSION < (3, 9),
    reason=f"Triton {triton.__version__}'s CPU interpreter evaluates tl.fma as x * y + z, rounding twice "
    "(triton-lang/triton#11424, Triton 3.9 rounds once, as the GPU does): the quantile lerp is then 1 ulp off",
)

# diffusers' own DDIM pipeline test UNet (tests/pipelines/ddim/test_ddim.py): tiny, so CPU tests stay fast.
TINY_UNET_CONFIG = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=8,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


@contextlib.contextmanager
def host_syncs_forbidden() -> Iterator[None]:
    """Any host-device synchronization inside raises (``torch.cuda.set_sync_debug_mode("error")``): what a CUDA-graph
    capture and a sync-free eager loop need. The previous mode comes back after."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def make_unet(unet_class: type = diffusers.UNet2DModel, **overrides) -> diffusers.UNet2DModel:
    """The tiny test UNet, seeded (torch.manual_seed(0) before construction, as diffusers' tests do), in eval mode."""
    torch.manual_seed(0)
    return unet_class(**{**TINY_UNET_CONFIG, **overrides}).eval()


def run_compiled_probe(module: str, *args: str) -> dict:
    """Runs ``python -m module *args`` from the repository root with ``TRITON_INTERPRET`` unset; returns its JSON.

    The kernel probes (tests/codegen_probe.py, tests/direct_launch_probe.py) need compiled, not interpreted, kernels;
    this process has the interpreter on when CUDA is absent, and it is fixed at import.
    """
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout)
