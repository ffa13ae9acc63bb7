"""Small shared test fixtures' building blocks (importable as ``tests.helpers``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

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
