"""The kernels' GPU code, checked without a GPU: 26 variants (every dtype, layout path, noise mode, threshold path,
per-sample timesteps and the step's backward kernel) compile for A100 (sm_80) and H100 (sm_90), and the PTX has the properties the design relies on.
``tests/codegen_probe.py`` compiles through the real launchers in a subprocess (compilation needs
``TRITON_INTERPRET`` unset, which this process has set when CUDA is absent).

The interpreter tests check what the kernels compute; these check what the compiler makes of them, which the
interpreter never sees: no mul+add contraction into FMA in the step (fp32 bit-exactness with diffusers depends on
it), and 128-bit global loads and stores in the common all-dense layout (the flat kernel's reason to exist).
"""

import pytest

from tests.helpers import run_compiled_probe

TARGETS = ("sm_80", "sm_90")
FLAT_KERNEL, STRIDED_KERNEL = "ddim_step_flat_kernel", "ddim_step_kernel"
BACKWARD_KERNEL = "ddim_step_backward_kernel"


@pytest.fixture(scope="module")
def report() -> dict:
    return run_compiled_probe("tests.codegen_probe")


def _step_cases(report: dict) -> dict:
    return {name: entry for name, entry in report.items() if entry["kernel"] in (FLAT_KERNEL, STRIDED_KERNEL)}


def test_every_variant_compiles_for_a100_and_h100(report):
    assert len(_step_cases(report)) >= 10 and any(
        e["kernel"] == "dynamic_threshold_scale_kernel" for e in report.values()
    )
    for name, entry in report.items():
        assert set(entry["targets"]) == set(TARGETS), name


def test_launcher_picks_the_flat_kernel_exactly_for_one_shared_dense_layout(report):
    for name, entry in _step_cases(report).items():
        assert entry["kernel"] == (FLAT_KERNEL if entry["flat"] else STRIDED_KERNEL), name


def test_step_has_no_fma_contraction(report):
    """Each mul and add rounded separately, as diffusers' eager ops do. Philox's Box-Muller (libdevice log/sincos)
    may use FMAs: in-kernel noise is a different random stream from diffusers' anyway."""
    for name, entry in _step_cases(report).items():
        if entry.get("philox"):
            continue
        for target, ptx in entry["targets"].items():
            assert ptx["fma"] == 0, (name, target)


def test_backward_kernel_compiles_without_fma_contraction(report):
    """The backward kernel reproduces autograd's separately rounded products and sums, as the forward does."""
    backward = {name: entry for name, entry in report.items() if entry["kernel"] == BACKWARD_KERNEL}
    assert len(backward) == 3
    for name, entry in backward.items():
        for target, ptx in entry["targets"].items():
            assert ptx["fma"] == 0, (name, target)


def test_threshold_kernel_splits_rows_where_the_launch_would(report):
    """The split variants compile with the shared-histogram barrier and as cooperative launches."""
    split = {name: entry for name, entry in report.items() if entry.get("split")}
    assert len(split) == 2
    for name, entry in split.items():
        assert entry["shared_histogram"] and entry["cooperative"], name
    assert not any(e.get("shared_histogram") for e in report.values() if not e.get("split"))


def test_threshold_kernel_fmas_are_only_the_interpolation(report):
    """Two tl.fma calls in the lerp reproduce ATen's fused lerp (see fastddim/threshold.py); nothing else contracts."""
    for name, entry in report.items():
        if entry["kernel"] == "dynamic_threshold_scale_kernel":
            for target, ptx in entry["targets"].items():
                assert ptx["fma"] == 2, (name, target)


def test_flat_kernel_moves_16_bytes_per_access(report):
    """Two inputs read and two outputs written with 128-bit vector instructions (fp16/bf16: 8 elements each)."""
    for name, entry in _step_cases(report).items():
        if entry["flat"]:
            for target, ptx in entry["targets"].items():
                assert ptx["ld_global_v4"] >= 2 and ptx["st_global_v4"] >= 2, (name, target, ptx)
