"""``fastddim.compat``: the switch between private fast paths and public paths, and what each side produces.

The direct launch itself is checked against Triton's dispatch in ``tests/test_direct_launch.py`` (both settings of
the switch); here: the switch's meaning, the step output built both ways, and the kernel and scheduler tests run
with ``FASTDDIM_SAFE_LAUNCH=1``.
"""

import os
import subprocess
import sys

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from fastddim import compat
from tests.helpers import INTERPRETED, REPO_ROOT


@pytest.fixture
def switch(monkeypatch):
    """Sets FASTDDIM_SAFE_LAUNCH (None: unset) and re-reads it; the import-time decision is restored afterwards."""

    def set_switch(value: str | None) -> dict[str, bool]:
        if value is None:
            monkeypatch.delenv(compat.SAFE_LAUNCH_ENV, raising=False)
        else:
            monkeypatch.setenv(compat.SAFE_LAUNCH_ENV, value)
        return compat.refresh()

    yield set_switch
    monkeypatch.undo()
    compat.refresh()


def test_unset_switch_uses_only_fast_paths_verified_here(switch):
    enabled = switch(None)
    for name, path in compat.FAST_PATHS.items():
        assert enabled[name] == (path.available and path.verified), name


def test_safe_launch_uses_public_paths_only(switch):
    assert not any(switch("1").values())


def test_zero_turns_on_every_available_fast_path(switch):
    enabled = switch("0")
    assert enabled == {name: path.available for name, path in compat.FAST_PATHS.items()}


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_bad_switch_value_names_the_variable(switch, value):
    with pytest.raises(ValueError, match=compat.SAFE_LAUNCH_ENV):
        switch(value)


def test_unverified_launch_paths_are_off_by_default(switch):
    """No GPU run has verified the current direct launch, device guard or raw-stream query: off unless forced."""
    enabled = switch(None)
    assert not enabled["direct_launch"] and not enabled["device_guard"] and not enabled["raw_stream"]


@pytest.mark.parametrize("value", ["0", "1"])
def test_step_output_is_what_diffusers_constructs(switch, value):
    """Built directly (fast path) or by the constructor: the same object state as ``DDIMSchedulerOutput(...)``:
    type, items in order, attributes, tuple conversion, indexing, repr."""
    enabled = switch(value)
    assert enabled["step_output"] == (value == "0" and compat.FAST_PATHS["step_output"].available)
    prev, x0 = torch.randn(2, 3), torch.randn(2, 3)
    ours = compat.ddim_scheduler_output(prev, x0)
    theirs = DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
    assert type(ours) is type(theirs)
    assert list(ours.items()) == list(theirs.items())
    assert ours.__dict__ == theirs.__dict__
    assert ours.to_tuple() == theirs.to_tuple() == (prev, x0)
    assert ours[0] is prev and ours["pred_original_sample"] is x0 and ours.prev_sample is prev
    assert repr(ours) == repr(theirs)


def test_device_guard_is_a_no_op_off_cuda(switch):
    for value in ("0", "1"):
        switch(value)
        with compat.device_guard(torch.zeros(1)):
            pass


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="needs Triton's CPU interpreter (no CUDA device)")
def test_interpreted_kernels_bypass_wrap_triton_where_torch_rejects_them(monkeypatch):
    """On torch < 2.13 ``wrap_triton`` rejects interpreted kernels: the registered op's launch then takes Triton's
    dispatch, with the same results (forced here on any torch; the floor run of CI meets it for real)."""
    from fastddim import ops, reference

    generator = torch.Generator().manual_seed(0)
    model_output, sample = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(2))
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    table = reference.build_coefficient_table(alphas_cumprod, torch.tensor(1.0), 50, 0.0)
    arguments = (model_output, sample, table, None, 500, None, None, None, False, 0, True, 1.0, False, torch.float32)
    through_wrap_triton = ops.ddim_step(*arguments)

    def rejecting_wrap_triton(kernel):
        raise RuntimeError("wrap_triton called on an interpreted kernel")

    monkeypatch.setattr(compat, "_WRAP_TRITON_REJECTS_INTERPRETED", True)
    monkeypatch.setattr(torch.library, "wrap_triton", rejecting_wrap_triton)
    for expected, actual in zip(through_wrap_triton, ops.ddim_step(*arguments), strict=True):
        assert torch.equal(actual, expected)


@pytest.mark.slow
def test_kernel_and_scheduler_tests_pass_with_safe_launch():
    """The suite's kernel tests (fused step, thresholding scale) and the scheduler's parity tests, in a fresh process
    with FASTDDIM_SAFE_LAUNCH=1 (read at import)."""
    env = dict(os.environ, FASTDDIM_SAFE_LAUNCH="1")
    selection = ["tests/test_ops.py", "tests/test_scheduler.py", "tests/test_threshold.py"]
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *selection],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout


@pytest.mark.parametrize(("version", "keyword"), [("0.35.2", "torch_dtype"), ("0.41.0", "torch_dtype"),
                                                  ("0.42.1", "dtype"), ("1.0.0", "dtype")])  # fmt: skip
def test_dtype_keyword_follows_the_diffusers_version(monkeypatch, version, keyword):
    monkeypatch.setattr(diffusers, "__version__", version)
    assert compat.dtype_keyword() == keyword
