"""CPU tests of the users' CI plugin (`fastddim.testing`): the step callable, argument checks, and a pytest session
that saves and compares pytest-benchmark runs with the ``fastddim_perf`` fixture."""

import json

import pytest
import torch

from fastddim import testing, timing

pytest_plugins = ("pytester",)


def test_step_callable_runs_fastddims_step():
    fn, steps = testing.step_callable((1, 4, 8, 8), torch.float32, eta=1.0, device="cpu")
    prev, x0 = fn()
    assert steps == 1 and prev.shape == x0.shape == (1, 4, 8, 8) and prev.isfinite().all()
    with pytest.raises(ValueError, match="CUDA"):
        testing.step_callable((1, 4, 8, 8), torch.float32, device="cpu", cuda_graph=True)
    for shape in ((), (1, 0, 8), (1, 4.0, 8)):
        with pytest.raises(ValueError, match="shape"):
            testing.step_callable(shape, torch.float32, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rounds": 0}, "rounds"), ({"warmup_rounds": -1}, "warmup_rounds"), ({"steps_per_round": 0}, "steps_per_round")],
)
def test_perf_guard_rejects_bad_rounds(kwargs, message):
    guard = testing.PerfGuard(benchmark=None)
    with pytest.raises(ValueError, match=message):
        guard.step((1, 4, 8, 8), torch.float32, device="cpu", **kwargs)
    if "steps_per_round" not in kwargs:
        with pytest.raises(ValueError, match=message):
            guard.loop(lambda: None, device="cpu", **kwargs)


def test_fastddim_perf_fixture_saves_and_compares_pytest_benchmark_runs(pytester, monkeypatch):
    # pytest-benchmark disables itself in an xdist worker (it reads this variable), which an outer `pytest -n` sets.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    storage = pytester.path / "perf"
    pytester.makepyfile(
        test_downstream="""
        import torch

        def test_step_speed(fastddim_perf):
            info = fastddim_perf.step((1, 4, 8, 8), torch.float32, device="cpu", rounds=3, warmup_rounds=1)
            assert info["host_us_per_step"] > 0 and info["steps_per_round"] == 20

        def test_loop_speed(fastddim_perf):
            info = fastddim_perf.loop(lambda: sum(range(1000)), device="cpu", rounds=3)
            assert info["first_call_s"] > 0 and info["median_call_s"] > 0
        """
    )
    args = [
        "-p",
        "fastddim.testing",
        f"--benchmark-storage={storage}",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
    ]
    pytester.runpytest_inprocess(*args, "--benchmark-save=baseline").assert_outcomes(passed=2)
    [saved] = storage.glob("*/0001_baseline.json")
    data = json.loads(saved.read_text())
    assert data["machine_info"]["fastddim"]["device"] == timing.device_name("cpu")
    assert data["machine_info"]["fastddim"]["torch"] == torch.__version__
    by_name = {bench["name"]: bench for bench in data["benchmarks"]}
    assert set(by_name) == {"test_step_speed", "test_loop_speed"}
    assert by_name["test_step_speed"]["extra_info"]["shape"] == [1, 4, 8, 8]

    # A generous gate: this checks the plumbing, not the (noisy) speed of a shared CI machine.
    compare = [*args, "--benchmark-compare=0001"]
    passed = pytester.runpytest_inprocess(*compare, "--benchmark-compare-fail=median:100000%")
    assert passed.ret == 0, passed.outlines

    # A baseline far faster than any real run: a regression.
    for bench in data["benchmarks"]:
        bench["stats"]["median"] = 1e-12
    saved.write_text(json.dumps(data))
    regressed = pytester.runpytest_inprocess(*compare, "--benchmark-compare-fail=median:10%")
    assert regressed.ret != 0
    assert "Performance has regressed" in "\n".join(regressed.outlines + regressed.errlines)

    # A baseline from another device is refused, not compared.
    data["machine_info"]["fastddim"]["device"] = "NVIDIA H100 80GB HBM3"
    saved.write_text(json.dumps(data))
    # (pytest-benchmark's own hook only warns about the machine_info difference, before the plugin refuses.)
    quiet = ["-W", "ignore::pytest_benchmark.logger.PytestBenchmarkWarning"]
    refused = pytester.runpytest_inprocess(*compare, *quiet, "--benchmark-compare-fail=median:100000%")
    assert refused.ret != 0
    assert "refusing to compare benchmarks of 'NVIDIA H100 80GB HBM3'" in "\n".join(
        refused.outlines + refused.errlines
    )


@pytest.mark.gpu
def test_device_time_and_graph_replay_on_cuda():
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(1 << 20, device=device)
    y = torch.empty_like(x)
    stats = timing.device_time_us(lambda: y.copy_(x), device, warmup_ms=5, rep_ms=20)
    assert stats["n_samples"] > 1 and 0 < stats["p20_us"] <= stats["median_us"] <= stats["p80_us"]
    fn, steps = testing.step_callable((1, 4, 64, 64), torch.float16, cuda_graph=True)
    assert steps == timing.graph_unroll(4 * 64 * 64) > 1
    fn()
    torch.cuda.synchronize(device)
