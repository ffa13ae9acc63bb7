"""Performance guards for your own CI: keep fastddim's step (or your sampling loop) within a margin of a baseline.

Baselines are JSON files keyed by device name (``torch.cuda.get_device_name()``, or ``cpu: <model>``). A measurement
is only ever compared with a baseline recorded on a device of the same name; when the current device has none, the
measurement is recorded as its baseline and the check is skipped with a message (commit the updated file).

As a pytest plugin (``pytest -p fastddim.testing``, or ``pytest_plugins = ["fastddim.testing"]`` in your root
``conftest.py``), it provides the ``fastddim_perf`` fixture::

    import torch

    def test_fastddim_step_speed(fastddim_perf):
        fastddim_perf.step((2, 4, 64, 64), torch.float16)                 # eager step, device timestep
        fastddim_perf.step((2, 4, 64, 64), torch.float16, cuda_graph=True)  # the step replayed from a CUDA graph

    def test_my_loop_speed(fastddim_perf, my_pipe):
        fastddim_perf.loop("my-pipe/batch4", lambda: my_pipe(batch_size=4, output_type="pt"))

    # pytest -p fastddim.testing --fastddim-perf-baseline perf/fastddim.json [--fastddim-perf-margin 0.15]
    # pytest -p fastddim.testing --fastddim-perf-update     # re-record this device's baselines

Options: ``--fastddim-perf-baseline PATH`` (default ``fastddim-perf-baseline.json`` in pytest's rootdir),
``--fastddim-perf-margin`` (default 0.10: fail when the median is more than 10 % slower), ``--fastddim-perf-update``.

Without the plugin::

    from fastddim.testing import assert_step_within_baseline, measure_step

    assert_step_within_baseline("perf/fastddim.json", shape=(2, 4, 64, 64), dtype=torch.float16, margin=0.10)
    print(measure_step((2, 4, 64, 64), torch.float16)["median_us"])

Timing is host wall time of back-to-back calls with a synchronize per round (what a sampling loop feels), median
over rounds. A regression is re-measured once before it fails, so a single noisy round does not fail CI. Medians on
shared cloud GPUs vary by a few percent: margins below 5-10 % will flake.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fastddim import benchmark

try:
    import pytest
except ImportError:  # measuring and comparing work without pytest; only the plugin and skips need it
    pytest = None

BASELINE_FORMAT = "fastddim-perf-baseline"
BASELINE_VERSION = 1
DEFAULT_BASELINE_FILE = "fastddim-perf-baseline.json"
DEFAULT_MARGIN = 0.10

__all__ = [
    "PerfGuard",
    "PerfRegressionError",
    "assert_step_within_baseline",
    "assert_within_baseline",
    "check_within_baseline",
    "load_baseline",
    "measure_loop",
    "measure_step",
    "save_baseline",
    "step_key",
]


class PerfRegressionError(AssertionError):
    """A measurement is slower than its baseline by more than the margin."""


# ------------------------------------------------------------------------------------------------ measuring


def step_key(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    eta: float = 0.0,
    thresholding: bool = False,
    cuda_graph: bool = False,
) -> str:
    """The baseline key of a step measurement, e.g. ``step/2x4x64x64/fp16/eta=0/graph``."""
    dtype_name = benchmark.DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    parts = ["step", "x".join(map(str, shape)), dtype_name, f"eta={eta:g}"]
    if thresholding:
        parts.append("thresholding")
    parts.append("graph" if cuda_graph else "eager")
    return "/".join(parts)


def measure_step(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float16,
    *,
    eta: float = 0.0,
    thresholding: bool = False,
    cuda_graph: bool = False,
    device: str | torch.device | None = None,
    num_inference_steps: int = benchmark.NUM_INFERENCE_STEPS,
    rounds: int = 9,
    target_round_s: float = 0.02,
) -> dict[str, Any]:
    """Times ``fastddim.DDIMScheduler.step`` at one shape, as a sampling loop calls it.

    Args:
        shape (`tuple[int, ...]`): the sample shape, batch first.
        dtype (`torch.dtype`, defaults to `torch.float16`): sample and model-output dtype.
        eta (`float`, defaults to 0.0): DDIM eta; on CUDA, eta > 0 draws the noise in the kernel.
        thresholding (`bool`, defaults to `False`): dynamic thresholding (with ``clip_sample=False``).
        cuda_graph (`bool`, defaults to `False`): time replays of the step captured in a CUDA graph (CUDA only).
        device (`str` or `torch.device`, *optional*): defaults to CUDA when available, else CPU (torch backend).
        num_inference_steps (`int`, defaults to 50): the schedule the timestep is taken from (its middle).
        rounds (`int`, defaults to 9): timed rounds; the median of their per-call times is reported.
        target_round_s (`float`, defaults to 0.02): approximate duration of one round of back-to-back calls.

    Returns:
        `dict`: ``key``, ``device``, ``median_us``, ``p20_us``, ``p25_us``, ``p75_us``, ``p80_us``, ``iqr_us``,
        ``n_samples``, ``method``, ``environment``.
    """
    device = benchmark._resolve_device(device)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    case = benchmark.StepCase(tuple(int(s) for s in shape), dtype, float(eta), bool(thresholding))
    with torch.no_grad():
        inputs = benchmark.make_step_inputs(case, device, num_inference_steps)
        fn, _ = benchmark.fastddim_step_fn(inputs)
        unroll = 1
        if cuda_graph:
            unroll = benchmark.graph_unroll(case.numel)
            fn = benchmark.capture_graph(fn, device, unroll=unroll)[0].replay
        # Warm-up: Triton compilation, coefficient tables, allocator.
        for _ in range(3):
            fn()
        samples = benchmark.time_wall(fn, device, rounds=rounds, target_round_s=target_round_s)
    stats = benchmark.summarize([sample / unroll for sample in samples])
    return {
        "key": step_key(case.shape, dtype, eta=eta, thresholding=thresholding, cuda_graph=cuda_graph),
        "device": benchmark.device_name(device),
        **stats,
        "method": "host wall, back-to-back calls, synchronize per round; per step",
        "environment": _short_environment(device),
    }


def measure_loop(
    call: Callable[[], Any],
    *,
    key: str,
    device: str | torch.device | None = None,
    rounds: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Times whole calls of ``call`` (e.g. ``lambda: pipe(batch_size=4, output_type="pt")``), synchronized.

    The first call (capture, compilation) and ``warmup`` more are not timed; ``first_call_us`` reports the first.

    Returns:
        `dict`: as `measure_step`, plus ``first_call_us``.
    """
    device = benchmark._resolve_device(device)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    first = benchmark.time_wall(call, device, rounds=1, calls_per_round=1)[0]
    for _ in range(warmup):
        call()
    samples = benchmark.time_wall(call, device, rounds=rounds, calls_per_round=1)
    return {
        "key": key,
        "device": benchmark.device_name(device),
        **benchmark.summarize(samples),
        "first_call_us": first,
        "method": "host wall per call, synchronized",
        "environment": _short_environment(device),
    }


def _short_environment(device: torch.device) -> dict[str, Any]:
    env = benchmark.environment_info(device)
    keys = ("date", "driver_version", "cuda_version", "torch", "triton", "diffusers", "fastddim", "FASTDDIM_BACKEND")
    return {key: env.get(key) for key in keys}


# ------------------------------------------------------------------------------------------------ baselines


def _empty_baseline() -> dict[str, Any]:
    return {"format": BASELINE_FORMAT, "version": BASELINE_VERSION, "devices": {}}


def load_baseline(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a baseline file; a missing file is an empty baseline."""
    path = Path(path)
    if not path.exists():
        return _empty_baseline()
    data = json.loads(path.read_text())
    if (
        not isinstance(data, dict)
        or data.get("format") != BASELINE_FORMAT
        or not isinstance(data.get("devices"), dict)
    ):
        raise ValueError(f"{path} is not a fastddim performance baseline (format {BASELINE_FORMAT!r})")
    return data


def save_baseline(baseline: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes a baseline file (sorted keys, so diffs stay small), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _baseline_entry(measurement: Mapping[str, Any]) -> dict[str, Any]:
    entry = {k: measurement[k] for k in ("median_us", "p20_us", "p80_us", "iqr_us", "n_samples") if k in measurement}
    entry["recorded"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry["environment"] = dict(measurement.get("environment", {}))
    return entry


def check_within_baseline(
    measurement: Mapping[str, Any],
    baseline: str | os.PathLike[str] | dict[str, Any],
    *,
    margin: float = DEFAULT_MARGIN,
    record_missing: bool = True,
    update: bool = False,
) -> dict[str, Any]:
    """Compares a `measure_step`/`measure_loop` result with the baseline of the same key on the same device.

    Args:
        measurement (`dict`): with ``key``, ``device`` and ``median_us``.
        baseline (path or `dict`): a baseline file (created if missing) or its loaded dict (updated in place).
        margin (`float`, defaults to 0.10): allowed slowdown; fails when median > baseline median x (1 + margin).
        record_missing (`bool`, defaults to `True`): store the measurement when this device/key has no baseline.
        update (`bool`, defaults to `False`): overwrite the stored baseline instead of comparing.

    Returns:
        `dict`: ``status`` (``"pass"``, ``"recorded"``, ``"updated"`` or ``"missing"``), ``ratio`` (measured /
        baseline median, or None), ``limit_us``, ``baseline_us``, ``message``.

    Raises:
        PerfRegressionError: the measurement is slower than allowed.
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    for field in ("key", "device", "median_us"):
        if field not in measurement:
            raise KeyError(f"measurement lacks {field!r}: pass the dict returned by measure_step or measure_loop")
    path = None if isinstance(baseline, dict) else Path(baseline)
    data = load_baseline(path) if path is not None else baseline
    data.setdefault("format", BASELINE_FORMAT)
    data.setdefault("version", BASELINE_VERSION)
    devices = data.setdefault("devices", {})
    key, device, median = measurement["key"], measurement["device"], float(measurement["median_us"])
    # Only the exact device name counts: a baseline from another GPU (or CPU) says nothing about this one.
    stored = devices.get(device, {}).get(key)
    if stored is None or update:
        if not (record_missing or update):
            return {
                "status": "missing",
                "ratio": None,
                "limit_us": None,
                "baseline_us": None,
                "message": f"no baseline for {key!r} on {device!r}",
            }
        devices.setdefault(device, {})[key] = _baseline_entry(measurement)
        if path is not None:
            save_baseline(data, path)
        where = f" in {path}" if path is not None else ""
        status = "updated" if stored is not None else "recorded"
        return {
            "status": status,
            "ratio": None,
            "limit_us": None,
            "baseline_us": median,
            "message": f"{status} baseline {median:.2f} µs for {key!r} on {device!r}{where}",
        }
    baseline_us = float(stored["median_us"])
    limit = baseline_us * (1 + margin)
    ratio = median / baseline_us if baseline_us > 0 else math.inf
    message = (
        f"{key} on {device}: median {median:.2f} µs vs baseline {baseline_us:.2f} µs "
        f"({ratio:.2f}x, limit {limit:.2f} µs = +{margin:.0%})"
    )
    if median > limit:
        raise PerfRegressionError(f"performance regression: {message}")
    return {"status": "pass", "ratio": ratio, "limit_us": limit, "baseline_us": baseline_us, "message": message}


def assert_within_baseline(
    measure: Callable[[], Mapping[str, Any]],
    baseline: str | os.PathLike[str] | dict[str, Any],
    *,
    margin: float = DEFAULT_MARGIN,
    update: bool = False,
    retries: int = 1,
) -> dict[str, Any]:
    """Measures with ``measure()`` and checks against the baseline; re-measures up to ``retries`` times on a regression.

    The fastest median of the attempts is compared, so one noisy attempt does not fail. When no baseline exists for
    this device (or ``update``), the measurement is recorded and the calling test is skipped with a message
    (outside pytest, a warning is issued instead).

    Returns:
        `dict`: the measurement, with the check result under ``"check"``.

    Raises:
        PerfRegressionError: every attempt was slower than allowed.
    """
    measurement = dict(measure())
    for attempt in range(retries + 1):
        try:
            result = check_within_baseline(measurement, baseline, margin=margin, update=update)
            break
        except PerfRegressionError:
            if attempt == retries:
                raise
            again = measure()
            if again["median_us"] < measurement["median_us"]:
                measurement = dict(again)
    measurement["check"] = result
    if result["status"] in ("recorded", "updated"):
        message = f"fastddim perf: {result['message']}; nothing to compare against yet"
        if pytest is not None and os.environ.get("PYTEST_CURRENT_TEST"):
            pytest.skip(message)
        warnings.warn(message, stacklevel=2)
    return measurement


def assert_step_within_baseline(
    baseline: str | os.PathLike[str] | dict[str, Any],
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float16,
    margin: float = DEFAULT_MARGIN,
    update: bool = False,
    retries: int = 1,
    **measure_kwargs: Any,
) -> dict[str, Any]:
    """`measure_step` at ``shape``/``dtype`` (and ``measure_kwargs``), checked with `assert_within_baseline`.

    Example::

        assert_step_within_baseline("perf/fastddim.json", shape=(2, 4, 64, 64), dtype=torch.float16, margin=0.1)
    """
    return assert_within_baseline(
        lambda: measure_step(shape, dtype, **measure_kwargs), baseline, margin=margin, update=update, retries=retries
    )


# ------------------------------------------------------------------------------------------------ pytest plugin


class PerfGuard:
    """What the ``fastddim_perf`` fixture returns: measure-and-check methods bound to one baseline file and margin."""

    def __init__(
        self, baseline: str | os.PathLike[str] | dict[str, Any], margin: float = DEFAULT_MARGIN, update: bool = False
    ):
        self.baseline = baseline
        self.margin = margin
        self.update = update

    def step(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float16,
        *,
        margin: float | None = None,
        **measure_kwargs: Any,
    ) -> dict[str, Any]:
        """Checks fastddim's step at ``shape``/``dtype``; see `measure_step` for ``measure_kwargs``."""
        return assert_step_within_baseline(
            self.baseline,
            shape=shape,
            dtype=dtype,
            margin=self.margin if margin is None else margin,
            update=self.update,
            **measure_kwargs,
        )

    def loop(
        self, key: str, call: Callable[[], Any], *, margin: float | None = None, **measure_kwargs: Any
    ) -> dict[str, Any]:
        """Checks whole calls of ``call`` under the baseline key ``key``; see `measure_loop` for ``measure_kwargs``."""
        return assert_within_baseline(
            lambda: measure_loop(call, key=key, **measure_kwargs),
            self.baseline,
            margin=self.margin if margin is None else margin,
            update=self.update,
        )


if pytest is not None:

    def pytest_addoption(parser: pytest.Parser) -> None:
        """Registers the ``--fastddim-perf-*`` options."""
        group = parser.getgroup("fastddim", "fastddim performance baselines")
        group.addoption(
            "--fastddim-perf-baseline",
            default=None,
            help=f"baseline JSON for the fastddim_perf fixture (default: <rootdir>/{DEFAULT_BASELINE_FILE})",
        )
        group.addoption(
            "--fastddim-perf-margin",
            type=float,
            default=DEFAULT_MARGIN,
            help=f"allowed slowdown before fastddim_perf fails, as a fraction (default: {DEFAULT_MARGIN})",
        )
        group.addoption(
            "--fastddim-perf-update",
            action="store_true",
            help="re-record this device's baselines instead of comparing",
        )

    @pytest.fixture
    def fastddim_perf(request: pytest.FixtureRequest) -> PerfGuard:
        """Measure-and-compare helper bound to ``--fastddim-perf-baseline`` and ``--fastddim-perf-margin``."""
        config = request.config
        path = config.getoption("--fastddim-perf-baseline") or Path(config.rootpath) / DEFAULT_BASELINE_FILE
        return PerfGuard(path, config.getoption("--fastddim-perf-margin"), config.getoption("--fastddim-perf-update"))
