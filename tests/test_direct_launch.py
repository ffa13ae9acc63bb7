"""fastddim's direct launch of compiled kernels, checked against Triton's own dispatch without a GPU.

With the ``direct_launch`` fast path on (``fastddim.compat``; ``FASTDDIM_SAFE_LAUNCH=0`` forces it on while no GPU run
has verified it), after the first launch of a specialization ``fastddim.ops.launch_ddim_step`` and
``fastddim.threshold.launch_dynamic_threshold_scale`` skip Triton's dispatch and call the compiled kernel's launcher
themselves (on CUDA only). With ``FASTDDIM_SAFE_LAUNCH=1`` they never do. ``tests/direct_launch_probe.py`` runs the
real launchers in a subprocess (compiled kernels need ``TRITON_INTERPRET`` unset) over a recording stand-in for
Triton's CUDA driver.
"""

import pytest

from tests.helpers import run_compiled_probe

CASES = [
    "flat",
    "strided",
    "tensor-noise",
    "philox-threshold",
    "threshold-registers",
    "threshold-streamed",
    "threshold-int-timestep",
    "threshold-split",
]


@pytest.fixture(scope="module")
def probe() -> dict:
    return run_compiled_probe("tests.direct_launch_probe")


@pytest.fixture(scope="module")
def safe_probe() -> dict:
    return run_compiled_probe("tests.direct_launch_probe", "--safe-launch")


def test_safe_launch_never_launches_directly(safe_probe):
    """FASTDDIM_SAFE_LAUNCH=1: every launch of both kernels goes through Triton's dispatch, and the direct launch
    (``fastddim.compat._launch_compiled``) is never called."""
    assert not safe_probe["direct_launch_enabled"]
    assert safe_probe["direct_launch_calls"] == 0
    for case in CASES:
        result = safe_probe["convention"][case]
        assert result["launches"] == 2 and result["dispatches"] == 2, (case, result)
        assert result["same_arguments"], (case, result)


@pytest.mark.parametrize("case", CASES)
def test_direct_launch_passes_what_dispatch_passes(probe, case):
    """The second launch of a signature bypasses dispatch and hands the launcher the very same arguments (grid,
    stream, kernel handle, packed metadata, every tensor's dtype and layout, every scalar, the constexprs in order),
    except Triton's launch metadata and empty hook chains, which the direct launch leaves out (None). On Triton
    versions whose runner convention fastddim does not know, the fast path is unavailable: both launches dispatch."""
    result = probe["convention"][case]
    available = probe["direct_launch_available"]
    assert probe["direct_launch_enabled"] == available
    assert result["launches"] == 2 and result["dispatches"] == (1 if available else 2), result
    assert result["same_arguments"], result
    assert result["direct_skips_hooks"] == available, result


def test_direct_launch_keeps_registered_launch_hooks(probe):
    """With a launch hook registered (a profiler's), the direct launch goes through Triton's runner, which passes
    the hook chain and the launch metadata it reads."""
    assert probe["convention"]["hook-registered"]["hooks_passed"]


def test_launcher_key_separates_exactly_what_triton_specializes(probe):
    """Over input/output dtypes, 16-byte-aligned and unaligned pointers, timesteps 0/1/16/981 and 1000- or 1024-row
    tables: equal keys always meet the same compiled kernel, and the timestep never causes a recompile."""
    soundness = probe["soundness"]
    assert soundness["keys_with_several_kernels"] == 0, soundness
    # 2 input dtypes x 2 output dtypes x {aligned, unaligned}: timesteps and table sizes add no variants.
    assert soundness["compiled_kernels"] == soundness["keys"] == 8, soundness


def test_threshold_scale_launches_directly_on_its_grid(probe):
    """The scale kernel's plans: one program per row on a (B, 1) grid, or rows split over a cooperative (B, C) grid
    (2 rows of 27 648 elements on 132 SMs: 66 programs of up to 512 -> spans of 512, 54 programs per row)."""
    convention = probe["convention"]
    for case in ("threshold-registers", "threshold-streamed", "threshold-int-timestep"):
        assert convention[case]["grid"] == [2, 1, 1] and not convention[case]["cooperative"], case
    split = convention["threshold-split"]
    assert split["grid"] == [2, 54, 1] and split["cooperative"], split
    assert all(convention[case]["direct_launchers"] == 1 for case in convention if case.startswith("threshold"))


def test_threshold_launcher_key_separates_exactly_what_triton_specializes(probe):
    """Over input dtypes, aligned and unaligned pointers, timesteps, table sizes and ranks (do_not_specialize):
    equal keys always meet the same compiled scale kernel."""
    soundness = probe["threshold_soundness"]
    assert soundness["keys_with_several_kernels"] == 0, soundness
    # 3 input dtypes x {aligned, unaligned}: timesteps, table sizes and ranks add no variants.
    assert soundness["compiled_kernels"] == soundness["keys"] == 6, soundness
