"""Checks, without a GPU, that fastddim's direct launch of compiled kernels does what Triton's dispatch does.

With the ``direct_launch`` fast path on (``FASTDDIM_SAFE_LAUNCH=0``), ``fastddim.ops.launch_ddim_step`` and
``fastddim.threshold.launch_dynamic_threshold_scale`` send the first launch of each specialization through Triton's
dispatch (``JITFunction.run``) and later ones straight to the compiled kernel's launcher
(``fastddim.compat._launch_compiled``); with ``--safe-launch`` (``FASTDDIM_SAFE_LAUNCH=1``) every launch must go
through the dispatch and the direct launch must never run. This probe replaces Triton's driver
with a recording one (the compiled kernel's launcher records its arguments instead of calling the CUDA driver) and
lets CPU tensors stand in for CUDA ones, then checks:

- ``convention``: a direct launch passes the launcher exactly what dispatch passed it for the same signature;
- ``soundness``: launches with equal ``fastddim.compat.launcher_key`` get the same compiled kernel from Triton's own
  dispatch, over dtypes, pointer alignments, timesteps and table sizes.

Run as ``python -m tests.direct_launch_probe [--safe-launch]`` with ``TRITON_INTERPRET`` unset; prints JSON for
``tests/test_direct_launch.py``.
"""

import contextlib
import itertools
import json
import os
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


# Where a compiled kernel's launcher takes the launch metadata and the enter and exit hooks: after the grid, the
# stream, the kernel handle and the packed metadata.
_HOOK_ARGUMENTS = slice(6, 9)


def _no_hooks(hooks: tuple) -> bool:
    """Whether the hook arguments call nothing: each hook None or an empty HookChain (the metadata is only theirs)."""
    return all(hook is None or getattr(hook, "calls", True) == [] for hook in hooks[1:])


def _normalize_launch(args: tuple, tensors: tuple | None = None) -> list:
    """A launcher call in comparable form. Triton's runner passes launch metadata and its (empty) hook chains,
    fastddim's direct launch passes None for all three while no hook is registered: the launcher then calls
    nothing either way, so both read "no hooks". Triton's dispatch passes tensors, the direct launch their data
    pointers: given the ``tensors`` of a direct launch, each pointer must be that tensor's, and reads as it."""
    hooks = args[_HOOK_ARGUMENTS]
    args = list(args)
    if tensors is not None:
        start = _HOOK_ARGUMENTS.stop
        for index, tensor in enumerate(tensors, start):
            if isinstance(args[index], int):  # (through Triton's runner the launch passes the tensor itself)
                args[index] = tensor if args[index] == tensor.data_ptr() else "wrong pointer"
    normalized = _normalize(args)
    if _no_hooks(hooks):
        normalized[_HOOK_ARGUMENTS] = ["no hooks"] * len(hooks)
    return normalized


def _normalize(value):
    """Launcher arguments in comparable form: tensors by dtype and layout (each call allocates new outputs)."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride())]
    if isinstance(value, (tuple, list)):
        return [_normalize(item) for item in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return type(value).__name__


@contextlib.contextmanager
def _counting_dispatches(dispatches: list[str]):
    """Appends the kernel's name to ``dispatches`` on every pass through Triton's dispatch (``JITFunction.run``)."""
    run = triton.runtime.jit.JITFunction.run

    def counting_run(self, *args, **kwargs):
        dispatches.append(self.__name__)
        return run(self, *args, **kwargs)

    triton.runtime.jit.JITFunction.run = counting_run
    try:
        yield
    finally:
        triton.runtime.jit.JITFunction.run = run


def _convention(ops) -> dict:
    """Two launches per case, the first dispatched, the second direct: the recorded launcher calls must agree
    (the direct one passing data pointers for tensors, and no hooks while none is registered)."""
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
    dispatches: list[str] = []
    results = {}
    with _counting_dispatches(dispatches):
        for name, args in cases.items():
            RECORDED.clear()
            dispatches.clear()
            ops.launch_ddim_step(*args, traceable=False)
            ops.launch_ddim_step(*args, traceable=False)
            results[name] = {
                "launches": len(RECORDED),
                "dispatches": len(dispatches),
                "same_arguments": len(RECORDED) == 2 and _same_launch(RECORDED[0], RECORDED[1]),
                "direct_skips_hooks": len(RECORDED) == 2 and RECORDED[1][1][_HOOK_ARGUMENTS] == (None, None, None),
            }
        # With a launch hook registered (as a profiler registers one), on entry or on exit, the direct launch must
        # call it: it goes through Triton's runner, which passes the hook chains and the launch metadata they read.
        runtime = triton.knobs.runtime
        for position, hook in enumerate((runtime.launch_enter_hook, runtime.launch_exit_hook), 1):
            hook.add(_hook_stand_in)
            try:
                RECORDED.clear()
                ops.launch_ddim_step(*cases["flat"], traceable=False)
            finally:
                hook.remove(_hook_stand_in)
            ((_, launch),) = RECORDED
            passed = launch[_HOOK_ARGUMENTS.start + position] is hook and launch[_HOOK_ARGUMENTS.start] is not None
            results.setdefault("hook-registered", {"hooks_passed": True})["hooks_passed"] &= passed
    return results


def _hook_stand_in(metadata) -> None:
    """A launch hook for the probe (the recording launcher never calls it)."""


def _same_launch(first: tuple, second: tuple) -> bool:
    """Whether a dispatched launch and the direct launch after it hand the launcher the same arguments."""
    (first_name, first_args), (second_name, second_args) = first, second
    second_tensors = LAUNCHED_TENSORS[-1] if LAUNCHED_TENSORS else None
    return first_name == second_name and _normalize_launch(first_args) == _normalize_launch(
        second_args, second_tensors
    )


# The tensors of each fastddim.compat._launch_compiled call, which the direct launch passes as data pointers.
LAUNCHED_TENSORS: list[tuple] = []


def _recording_tensors(launch_compiled):
    def launch(kernel, grid, tensors, *args, **kwargs):
        LAUNCHED_TENSORS.append(tensors)
        return launch_compiled(kernel, grid, tensors, *args, **kwargs)

    return launch


def _threshold_convention(threshold) -> dict:
    """As ``_convention``, for the dynamic-thresholding scale kernel: one program per row, streamed rows, a timestep
    given as an int, and rows split over programs (cooperative 2-D grid, shared-histogram scratch) as on an H100."""
    generator = torch.Generator().manual_seed(1)
    table = torch.zeros(1000, 8)
    small = torch.randn(2, 3, 16, 16, generator=generator).to(torch.float16)
    large = torch.randn(2, 3, 96, 96, generator=generator)
    ts = torch.tensor(981)
    cases = {
        "threshold-registers": ((small, small, table, ts, 0, 0, 0.995, 1.5), 1),
        "threshold-streamed": ((large, large, table, ts, 0, 2, 0.9, 1.5), 1),
        "threshold-int-timestep": ((small, small, table, None, 981, 1, 0.995, 1.5), 1),
        "threshold-split": ((large, large, table, ts, 0, 0, 0.995, 1.5), 132),
    }
    resident_programs = threshold._max_resident_programs
    dispatches: list[str] = []
    results = {}
    with _counting_dispatches(dispatches):
        for name, (args, programs) in cases.items():
            threshold._max_resident_programs = lambda device, programs=programs: programs
            threshold.THRESHOLD_PLANS.clear()
            RECORDED.clear()
            dispatches.clear()
            threshold.launch_dynamic_threshold_scale(*args, traceable=False)
            threshold.launch_dynamic_threshold_scale(*args, traceable=False)
            (plan,) = threshold.THRESHOLD_PLANS.values()
            results[name] = {
                "launches": len(RECORDED),
                "dispatches": len(dispatches),
                "same_arguments": len(RECORDED) == 2 and _same_launch(RECORDED[0], RECORDED[1]),
                "direct_skips_hooks": len(RECORDED) == 2 and RECORDED[1][1][_HOOK_ARGUMENTS] == (None, None, None),
                "grid": list(RECORDED[0][1][:3]) if RECORDED else None,
                "cooperative": bool(plan.meta.get("launch_cooperative_grid")),
                "direct_launchers": len(plan.launchers),
            }
    threshold._max_resident_programs = resident_programs
    return results


def _key_report(compiled_by_key: dict[tuple, set[int]], kernels: set[int]) -> dict:
    return {
        "keys": len(compiled_by_key),
        "compiled_kernels": len(kernels),
        "keys_with_several_kernels": sum(len(ids) > 1 for ids in compiled_by_key.values()),
    }


def _threshold_soundness(threshold) -> dict:
    """Equal launcher keys must mean the same compiled scale kernel, as Triton's dispatch picks it."""
    from fastddim import compat

    kernel = threshold.dynamic_threshold_scale_kernel
    meta = dict(
        PREDICTION_TYPE=0,
        DENSE_ROW=True,
        TIMESTEP_FROM_PTR=False,
        DIVIDE_BY_RECIPROCAL=True,
        SHARED_HISTOGRAM=True,
        SINGLE_BLOCK=True,
        BLOCK_SIZE=256,
        num_warps=4,
        enable_fp_fusion=False,
        launch_cooperative_grid=True,
    )
    row_numel = 3 * 16 * 16
    compiled_by_key: dict[tuple, set[int]] = {}
    kernels = set()
    variations = itertools.product(
        (torch.float16, torch.bfloat16, torch.float32),  # input dtype
        (0, 1, 8),  # element offset of the inputs: 16-byte aligned or not
        (0, 1, 16, 981),  # int timestep (do_not_specialize)
        (1000, 1024),  # num_train_timesteps (do_not_specialize)
        (0, 1, 16, 763),  # rank_lo (do_not_specialize)
    )
    for dtype, offset, timestep, num_train_timesteps, rank_lo in variations:
        buffer = torch.zeros(2 * row_numel + 16, dtype=dtype)
        x = buffer[offset : offset + 2 * row_numel]
        table = torch.zeros(num_train_timesteps, 8)
        scale = torch.empty(2)
        histograms, barriers = torch.zeros(2, 4, 512, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
        tensors = (x, x, table, table, scale, histograms, barriers)
        scalars = (timestep, num_train_timesteps, row_numel, 3, 256, rank_lo, 0.25, 256, 1.5, 1, 1, row_numel)
        strides = (row_numel, 0, 0, 1, row_numel, 0, 0, 1)
        compiled = kernel.warmup(*tensors, *scalars, *strides, grid=(2, 3), **meta)
        kernels.add(id(compiled))
        compiled_by_key.setdefault(compat.launcher_key(0, tensors), set()).add(id(compiled))
    return _key_report(compiled_by_key, kernels)


def _soundness(ops) -> dict:
    """Equal launcher keys must mean the same compiled kernel, as Triton's dispatch picks it."""
    from fastddim import compat

    kernel = ops.ddim_step_flat_kernel
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
        compiled_by_key.setdefault(compat.launcher_key(0, tensors), set()).add(id(compiled))
    return _key_report(compiled_by_key, kernels)


def main(argv: list[str]) -> int:
    safe_launch = "--safe-launch" in argv
    os.environ["FASTDDIM_SAFE_LAUNCH"] = "1" if safe_launch else "0"
    driver.set_active(RecordingDriver())
    from fastddim import compat, ops

    compat.refresh()
    if ops.interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels have no compiled launcher", file=sys.stderr)
        return 2
    from fastddim import threshold

    compat._direct_launch_device = lambda tensor: 0  # CPU tensors stand in for CUDA ones
    compat._launch_compiled = _recording_tensors(compat._launch_compiled)
    report = {
        "direct_launch_enabled": compat.fast_path_enabled("direct_launch"),
        "direct_launch_available": compat.FAST_PATHS["direct_launch"].available,
        "convention": {**_convention(ops), **_threshold_convention(threshold)},
        "direct_launch_calls": len(LAUNCHED_TENSORS),
    }
    if not safe_launch:
        report["soundness"] = _soundness(ops)
        report["threshold_soundness"] = _threshold_soundness(threshold)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
