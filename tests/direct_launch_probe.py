"""Checks, without a GPU, that fastddim's direct launch of compiled step kernels does what Triton's dispatch does.

``fastddim.ops.launch_ddim_step`` sends the first launch of each specialization through Triton's dispatch
(``JITFunction.run``) and later ones straight to the compiled kernel's launcher. This probe replaces Triton's driver
with a recording one (the compiled kernel's launcher records its arguments instead of calling the CUDA driver) and
lets CPU tensors stand in for CUDA ones, then checks:

- ``convention``: a direct launch passes the launcher exactly what dispatch passed it for the same signature;
- ``soundness``: launches with equal ``fastddim.ops._launcher_key`` get the same compiled kernel from Triton's own
  dispatch, over dtypes, pointer alignments, timesteps and table sizes.

Run as ``python -m tests.direct_launch_probe`` with ``TRITON_INTERPRET`` unset; prints JSON for
``tests/test_direct_launch.py``.
"""

import itertools
import json
import sys

import torch
import triton
from triton.runtime.driver import driver

from tests.codegen_probe import TARGETS, CompileOnlyDriver

RECORDED: list[tuple] = []


class RecordingLauncher:
    """Takes the place of a compiled kernel's CUDA launcher: records each call's arguments."""

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, *args):
        RECORDED.append((self.name, args))


class RecordingUtils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 2, 32, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class RecordingDriver(CompileOnlyDriver):
    """The compile-only driver plus what loading and launching a compiled kernel asks of a driver, all recorded."""

    launcher_cls = RecordingLauncher
    utils = RecordingUtils()

    def __init__(self):
        super().__init__(TARGETS["sm_90"])


def _normalize(value):
    """Launcher arguments in comparable form: tensors by dtype and layout (each call allocates new outputs)."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride())]
    if isinstance(value, (tuple, list)):
        return [_normalize(item) for item in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return type(value).__name__


def _convention(ops) -> dict:
    """Two launches per case, the first dispatched, the second direct: the recorded launcher calls must agree."""
    generator = torch.Generator().manual_seed(0)
    table = torch.zeros(1000, 8)
    x = torch.randn(2, 4, 16, 16, generator=generator).to(torch.float16)
    channels_last = x.to(memory_format=torch.channels_last)
    noise = torch.randn(1, 4, 1, 16, generator=generator).to(torch.float16)
    seed = torch.zeros(1, dtype=torch.int64)
    scale = torch.ones(2)
    ts = torch.tensor(981)
    cases = {
        "flat": (x, x, table, ts, 0, None, None, None, False, 0, True, 1.0, False, torch.float16),
        "strided": (x, channels_last, table, ts, 0, None, None, None, False, 0, True, 1.0, False, torch.float16),
        "tensor-noise": (x, x, table, None, 981, noise, None, None, True, 2, True, 1.0, True, torch.float16),
        "philox-threshold": (x, x, table, ts, 0, None, seed, scale, True, 1, False, 1.0, False, torch.float32),
    }
    dispatches = []
    run = triton.runtime.jit.JITFunction.run

    def counting_run(self, *args, **kwargs):
        dispatches.append(self.__name__)
        return run(self, *args, **kwargs)

    triton.runtime.jit.JITFunction.run = counting_run
    results = {}
    try:
        for name, args in cases.items():
            RECORDED.clear()
            dispatches.clear()
            ops.launch_ddim_step(*args, traceable=False)
            ops.launch_ddim_step(*args, traceable=False)
            results[name] = {
                "launches": len(RECORDED),
                "dispatches": len(dispatches),
                "same_arguments": len(RECORDED) == 2 and _normalize(RECORDED[0]) == _normalize(RECORDED[1]),
            }
    finally:
        triton.runtime.jit.JITFunction.run = run
    return results


def _soundness(ops) -> dict:
    """Equal launcher keys must mean the same compiled kernel, as Triton's dispatch picks it."""
    kernel = ops._ddim_step_flat_kernel
    meta = dict(
        PREDICTION_TYPE=0,
        CLIP_SAMPLE=True,
        THRESHOLD=True,
        USE_CLIPPED_MODEL_OUTPUT=False,
        NOISE_MODE=0,
        TIMESTEP_FROM_PTR=False,
        DIVIDE_BY_RECIPROCAL=True,
        BLOCK_SIZE=1024,
    )
    numel = 2 * 4 * 16 * 16
    compiled_by_key: dict[tuple, set[int]] = {}
    kernels = set()
    variations = itertools.product(
        (torch.float16, torch.float32),  # input dtype
        (torch.float16, torch.float32),  # output dtype
        (0, 1, 8),  # element offset of the inputs and of the scale: 16-byte aligned or not
        (0, 1, 16, 981),  # int timestep (do_not_specialize)
        (1000, 1024),  # num_train_timesteps (do_not_specialize)
    )
    for dtype, out_dtype, offset, timestep, num_train_timesteps in variations:
        buffer = torch.zeros(numel + 16, dtype=dtype)
        x = buffer[offset : offset + numel]
        outputs = torch.zeros(2 * numel + 16, dtype=out_dtype)
        prev, pred = outputs[offset : offset + numel], outputs[numel + 8 : 2 * numel + 8]
        table = torch.zeros(num_train_timesteps, 8)
        scale = torch.ones(4)[offset % 2 :]
        tensors = (x, x, table, prev, pred, table, table, table, scale)
        args = (*tensors, timestep, num_train_timesteps, 1.0, numel, numel // 2)
        compiled = kernel.warmup(*args, grid=(1,), **meta, num_warps=4, enable_fp_fusion=False)
        kernels.add(id(compiled))
        compiled_by_key.setdefault(ops._launcher_key(0, tensors), set()).add(id(compiled))
    return {
        "keys": len(compiled_by_key),
        "compiled_kernels": len(kernels),
        "keys_with_several_kernels": sum(len(ids) > 1 for ids in compiled_by_key.values()),
    }


def main() -> int:
    driver.set_active(RecordingDriver())
    from fastddim import ops

    if ops.interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels have no compiled launcher", file=sys.stderr)
        return 2
    ops._direct_launch_device = lambda sample: 0  # CPU tensors stand in for CUDA ones
    print(json.dumps({"convention": _convention(ops), "soundness": _soundness(ops)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
