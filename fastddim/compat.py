"""Every private or version-specific API of Triton, torch and diffusers that fastddim uses, in one place."""

import contextlib

import torch

__all__ = ["module_execution_device", "repair_default_generator", "tensor_version"]


# ------------------------------------------------------------------------------------------------ needed private APIs


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (``Tensor._version``, torch >= 1.0; no public equivalent): it changes on
    every in-place write through autograd-visible ops (``copy_``, ``add_``, ``load_state_dict``)."""
    return tensor._version


def repair_default_generator(device: torch.device) -> None:
    """Makes the default CUDA generator usable again after a failed CUDA-graph capture.

    PyTorch versions that mark a generator as capturing in ``capture_begin`` and unmark it only at the end of a
    successful ``capture_end`` leave it "capturing" when a capture fails, and every later random op on the device then
    raises. A probe detects that; a fresh copy of the state (same seed and offset, ``Generator.graphsafe_set_state`` /
    ``clone_state``, public since torch 2.4) replaces the stuck one. Healthy generators are left as they were.
    """
    if device.type != "cuda":
        return
    # Best effort on a path that already failed: never let the repair itself raise.
    try:
        generator = torch.cuda.default_generators[device.index]
        state = generator.get_state()
    except Exception:  # noqa: BLE001
        return
    try:
        torch.empty(1, device=device).normal_()
    except RuntimeError:
        with contextlib.suppress(Exception):
            generator.graphsafe_set_state(generator.clone_state())
    with contextlib.suppress(Exception):
        generator.set_state(state)


# ------------------------------------------------------------------------------------------------ diffusers versions


def module_execution_device(module: torch.nn.Module) -> torch.device | None:
    """Where diffusers runs ``module`` (``diffusers.utils.torch_utils.get_module_execution_device``: the offload
    hook's device, else the parameters'); None on diffusers versions without it (0.32 has none), whose SDXL pipeline
    decodes without moving the latents first."""
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:
        return None
    return get_module_execution_device(module)
