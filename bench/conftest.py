"""pytest-benchmark regression suite for fastddim (``pytest bench/``).

GPU cases (marker ``gpu``) are skipped without CUDA; a few CPU cases (torch backend, tiny shapes) always run, so the
suite does something in CPU CI. GPU callables synchronize before returning (pytest-benchmark's timer is host wall
time); device-time medians (triton.testing.do_bench, L2 flushed) and graph-replay medians go into each benchmark's ``extra_info``.

Regression workflow (one storage folder per device, so runs are only compared on the same GPU)::

    DEV=$(python -m fastddim.benchmark --print-device-slug)       # e.g. nvidia-h100-80gb-hbm3
    # 1. save a baseline (on main, or on the commit to compare against)
    pytest bench/ --benchmark-only --benchmark-storage=bench/results/$DEV --benchmark-save=baseline
    # 2. on the candidate: compare with the latest saved run and fail if a median regressed by more than 10 %
    pytest bench/ --benchmark-only --benchmark-storage=bench/results/$DEV \\
        --benchmark-compare --benchmark-compare-fail=median:10%
    #    (or --benchmark-compare=0001 for a specific saved run; --benchmark-autosave saves every run)
    pytest-benchmark --storage bench/results/$DEV compare --group-by=name    # tables of saved runs

``--benchmark-only`` skips tests without the ``benchmark`` fixture. Saved runs carry the GPU, driver, CUDA, torch,
triton, diffusers and fastddim versions in ``machine_info["fastddim"]``; comparing runs from two different devices is
refused (a usage error) rather than reported as a regression.
"""

import os

import torch

# The Triton interpreter flag is read when @triton.jit decorates, i.e. when fastddim is first imported: set it before.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Keys of fastddim.benchmark.environment_info() stored with every saved run. No date: pytest-benchmark warns on any
# machine_info difference, and a date would make every comparison warn.
MACHINE_INFO_KEYS = (
    "device",
    "device_slug",
    "driver_version",
    "cuda_version",
    "compute_capability",
    "torch",
    "triton",
    "diffusers",
    "fastddim",
    "FASTDDIM_BACKEND",
)


def pytest_configure(config: pytest.Config) -> None:
    # bench/ is run by path, so pyproject's markers may not apply when it is used from another rootdir.
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "bench: pytest-benchmark timing cases (bench/)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(bench_dir):
            item.add_marker(pytest.mark.bench)
            if not HAS_CUDA and item.get_closest_marker("gpu") is not None:
                item.add_marker(skip_gpu)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    from fastddim.benchmark.environment import environment_info

    env = environment_info()
    machine_info["fastddim"] = {key: env.get(key) for key in MACHINE_INFO_KEYS}
    machine_info["gpu"] = env["device"] if HAS_CUDA else None


def pytest_benchmark_compare_machine_info(
    config: pytest.Config, benchmarksession: object, machine_info: dict, compared_benchmark: dict
) -> None:
    saved = (compared_benchmark.get("machine_info") or {}).get("fastddim") or {}
    current = machine_info.get("fastddim") or {}
    if saved.get("device") and current.get("device") and saved["device"] != current["device"]:
        raise pytest.UsageError(
            f"refusing to compare benchmarks of {saved['device']!r} with this {current['device']!r}: use one "
            "--benchmark-storage folder per device (bench/results/<device-slug>)"
        )
