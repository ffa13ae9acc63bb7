"""Small shared test fixtures' building blocks (importable as ``tests.helpers``)."""

import diffusers
import torch

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
