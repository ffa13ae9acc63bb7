"""Compile fastddim's Triton kernels for NVIDIA GPUs on a machine without one, and report properties of the PTX.

Run as ``python -m tests.codegen_probe`` with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled);
``tests/test_kernel_codegen.py`` does so in a subprocess and checks the JSON this prints. For people,
``python -m tests.codegen_probe --report sm_90`` prints each variant's registers, local-memory (spill) bytes and SASS
instruction mix (from Triton's bundled ``cuobjdump``): a static view of the GPU code on a machine without a GPU. Each case goes through the
real launchers (``fastddim.ops.launch_ddim_step``, ``fastddim.threshold.launch_dynamic_threshold_scale``), whose
kernel launches are captured and replayed as ``JITFunction.warmup``: Triton then specializes the arguments exactly as
it would for a launch (dtypes, 16-byte alignment, integers equal to 1) and compiles, but launches nothing. A minimal
stand-in for Triton's driver supplies the target, so no CUDA driver is needed. Tensors are CPU tensors; the one
CUDA-only meta-parameter, ``DIVIDE_BY_RECIPROCAL``, is set as a CUDA launch would set it.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

# (compute capability, warp size) of the targets compiled for: A100 and H100.
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


class CompileOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.warmup``: a fixed target, device 0, stream 0."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class CapturedLaunch:
    """Stands in for a ``@triton.jit`` kernel in a launcher: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


def _step_cases() -> dict:
    """name -> (launch_ddim_step arguments, properties the case is meant to have)."""
    generator = torch.Generator().manual_seed(0)
    table = torch.zeros(1000, 8)
    timestep = torch.tensor(981)
    cases = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        x = torch.randn(2, 4, 32, 32, generator=generator).to(dtype)
        channels_last = x.to(memory_format=torch.channels_last)
        flags = (False, 0, True, 1.0, False, dtype)
        cases[f"flat-{name}"] = ((x, x, table, timestep, 0, None, None, None, *flags), {"flat": True})
        cases[f"flat-channels-last-{name}"] = (
            (channels_last, channels_last, table, timestep, 0, None, None, None, *flags),
            {"flat": True},
        )
        cases[f"strided-mixed-layouts-{name}"] = (
            (x, channels_last, table, timestep, 0, None, None, None, *flags),
            {"flat": False},
        )
    x = torch.randn(2, 4, 32, 32, generator=generator).to(torch.float16)
    seed = torch.zeros(1, dtype=torch.int64)
    scale = torch.ones(2)
    noise = torch.randn(1, 4, 1, 32, generator=generator).to(torch.float16)
    cases["flat-philox-v-prediction"] = (
        (x, x, table, timestep, 0, None, seed, None, True, 2, True, 1.0, False, torch.float16),
        {"flat": True, "philox": True},
    )
    cases["flat-threshold-sample-clipped-epsilon"] = (
        (x, x, table, None, 981, None, None, scale, False, 1, False, 1.0, True, torch.float16),
        {"flat": True},
    )
    cases["strided-broadcast-noise"] = (
        (x, x, table, timestep, 0, noise, None, None, True, 0, True, 1.0, False, torch.float16),
        {"flat": False},
    )
    per_sample = torch.tensor([981, 1])
    cases["flat-per-sample-timesteps"] = (
        (x, x, table, per_sample, 0, None, None, None, False, 0, True, 1.0, False, torch.float16),
        {"flat": True},
    )
    cases["strided-per-sample-threshold"] = (
        (
            x,
            x.to(memory_format=torch.channels_last),
            table,
            per_sample,
            0,
            None,
            None,
            scale,
            False,
            0,
            False,
            1.0,
            True,
            torch.float16,
        ),
        {"flat": False},
    )
    # Per-sample keyed noise (noise_seeds): grouped Philox calls (rows of 4096) and one call per element (rows of 105,
    # numel still a multiple of 16), and channels-last samples, which take the strided kernel.
    ragged = torch.randn(16, 3, 5, 7, generator=generator).to(torch.float16)
    flags = (None, None, None, True, 0, True, 1.0, False, torch.float16)
    cases["flat-per-sample-noise"] = (
        (x, x, table, timestep, 0, *flags, {"noise_seeds": seed.repeat(2)}),
        {"flat": True, "philox": True},
    )
    cases["flat-per-sample-noise-ragged-rows"] = (
        (ragged, ragged, table, timestep, 0, *flags, {"noise_seeds": seed.repeat(16)}),
        {"flat": True, "philox": True},
    )
    channels_last = x.to(memory_format=torch.channels_last)
    cases["strided-per-sample-noise-channels-last"] = (
        (channels_last, channels_last, table, timestep, 0, *flags, {"noise_seeds": seed.repeat(2)}),
        {"flat": False, "philox": True},
    )
    return cases


def _backward_cases() -> dict:
    """The step's backward kernel (fastddim.autograd): one flat kernel, every prediction/clamp mode compiles."""
    generator = torch.Generator().manual_seed(2)
    table = torch.zeros(1000, 8)
    x32 = torch.randn(2, 4, 32, 32, generator=generator)
    x16 = x32.to(torch.float16)
    scale = torch.ones(2)
    return {
        "backward-epsilon-clip-fp32": (
            (x32, x32, x32, x32, table, torch.tensor(981), 0, None, 0, True, 1.0, False),
            {},
        ),
        "backward-sample-use-clipped-fp32": ((x32, None, x32, x32, table, None, 981, None, 1, True, 1.0, True), {}),
        "backward-v-per-sample-threshold-fp16": (
            (x16, x16, x16, x16, table, torch.tensor([981, 1]), 0, scale, 2, False, 1.0, True),
            {},
        ),
    }


def _threshold_cases() -> dict:
    generator = torch.Generator().manual_seed(1)
    table = torch.zeros(1000, 8)
    small = torch.randn(4, 3, 32, 32, generator=generator).to(torch.float16)  # rows in registers
    large = torch.randn(2, 3, 128, 128, generator=generator)  # rows streamed in chunks
    args = (table, torch.tensor(981), 0, 0, 0.995, 1.5)
    huge = torch.randn(1, 4, 1024, 1024, generator=generator)  # split over 132 SMs: 32768-element streamed spans
    return {
        "threshold-registers": ((small, small, *args), {}),
        "threshold-per-sample-timesteps": ((small, small, table, torch.tensor([981, 1, 5, 7]), *args[2:]), {}),
        "threshold-streamed": ((large, large, *args), {}),
        "threshold-streamed-strided": ((large, large[:, :, ::1, :].transpose(2, 3), *args), {}),
        # As launched on an H100 (132 SMs): rows split over programs that share histograms.
        "threshold-split-registers": ((small, small, *args), {"split": True}),
        "threshold-split-streamed": ((huge, huge, *args), {"split": True}),
    }


def _capture(launcher_name: str, module, kernel_names: tuple[str, ...], args: tuple) -> list:
    launches: list = []
    originals = {name: getattr(module, name) for name in kernel_names}
    # Launch plans hold the kernel object they were planned with: plan afresh with the stand-ins.
    plans = {"step": "STEP_PLANS", "threshold": "THRESHOLD_PLANS", "backward": "BACKWARD_LAUNCHERS"}
    plans = getattr(module, plans[launcher_name])
    plans.clear()
    try:
        for name, kernel in originals.items():
            setattr(module, name, CapturedLaunch(kernel, launches))
        if launcher_name == "step":
            # A trailing dict holds keyword arguments (noise_seeds).
            *positional, keywords = args if isinstance(args[-1], dict) else (*args, {})
            module.launch_ddim_step(*positional, traceable=False, **keywords)
        elif launcher_name == "backward":
            module.launch_ddim_step_backward(*args, traceable=False)
        else:
            module.launch_dynamic_threshold_scale(*args, traceable=False)
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
        plans.clear()
    return launches


def _ptx_properties(ptx: str) -> dict:
    return {
        "fma": len(re.findall(r"\bfma\.rn", ptx)),
        "ld_global_v4": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4", ptx)),
        "st_global_v4": len(re.findall(r"\bst\.global(?:\.\w+)*\.v4", ptx)),
    }


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([tool, flag, file.name], capture_output=True, text=True, check=True).stdout


def _report_line(name: str, kwargs: dict, cubin: bytes) -> str:
    usage = dict(re.findall(r"(REG|LOCAL|SHARED):(\d+)", _cuobjdump(cubin, "-res-usage")))
    # SASS lines look like "/*0070*/  LDG.E.128 R4, desc[UR4][R2.64] ;": count the opcodes (predicates dropped).
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", _cuobjdump(cubin, "-sass"))
    top = ", ".join(f"{op} {count}" for op, count in collections.Counter(opcodes).most_common(6))
    block = f"{kwargs.get('BLOCK_SIZE')}/{kwargs.get('num_warps')}w"
    return (
        f"{name:40s} {block:>10s} {usage.get('REG', '?'):>4s} {usage.get('LOCAL', '?'):>6s} {len(opcodes):>6d}  {top}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", choices=sorted(TARGETS), help="print a resource/SASS table for this target")
    options = parser.parse_args(argv)
    from fastddim import autograd, ops, threshold

    if ops.interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    launches = {}
    for name, (args, expected) in _step_cases().items():
        launches[name] = (_capture("step", ops, ("ddim_step_kernel", "ddim_step_flat_kernel"), args), expected)
    resident_programs = threshold._max_resident_programs
    for name, (args, expected) in _threshold_cases().items():
        threshold._max_resident_programs = (lambda device: 132) if expected.get("split") else resident_programs
        launches[name] = (_capture("threshold", threshold, ("dynamic_threshold_scale_kernel",), args), expected)
    threshold._max_resident_programs = resident_programs
    for name, (args, expected) in _backward_cases().items():
        launches[name] = (_capture("backward", autograd, ("ddim_step_backward_kernel",), args), expected)

    if options.report:
        driver.set_active(CompileOnlyDriver(TARGETS[options.report]))
        print(f"{'case':40s} {'block':>10s} {'REG':>4s} {'LOCAL':>6s} {'SASS':>6s}  most frequent opcodes")
        for name, (captured, _) in launches.items():
            ((kernel, grid, launch_args, kwargs),) = captured
            compiled = kernel.warmup(*launch_args, grid=grid, **dict(kwargs, DIVIDE_BY_RECIPROCAL=True))
            print(_report_line(name, kwargs, compiled.asm["cubin"]))
        return 0

    report = {}
    for target_name, target in TARGETS.items():
        # Not reset afterwards: without a GPU, Triton's default driver cannot even be created.
        driver.set_active(CompileOnlyDriver(target))
        for name, (captured, expected) in launches.items():
            ((kernel, grid, args, kwargs),) = captured
            compiled = kernel.warmup(*args, grid=grid, **dict(kwargs, DIVIDE_BY_RECIPROCAL=True))
            entry = report.setdefault(name, {"kernel": kernel.__name__, **expected, "targets": {}})
            if entry["kernel"] == "dynamic_threshold_scale_kernel":
                entry["shared_histogram"] = bool(kwargs["SHARED_HISTOGRAM"])
                entry["cooperative"] = bool(compiled.metadata.launch_cooperative_grid)
            entry["targets"][target_name] = _ptx_properties(compiled.asm["ptx"])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
