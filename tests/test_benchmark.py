"""CPU tests of the benchmark harness (``fastddim.benchmark``) and the CI helpers (``fastddim.testing``)."""

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastddim import benchmark as fb
from fastddim import testing as ft

pytest_plugins = ("pytester",)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    # On a loaded 2-core machine, torch's default intra-op threads spin against each other: a tiny UNet forward
    # took ~1 s with 2 threads and ~10 ms with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    fb.add_arguments(parser)
    return fb.run(parser.parse_args(argv))


def _assert_schema(record: dict) -> None:
    expected = fb.RECORD_KEYS + (fb.STEP_KEYS if record["benchmark"] == "step" else fb.LOOP_KEYS)
    assert set(record) == set(expected), record["name"]


# ------------------------------------------------------------------------------------------------ harness


def test_tiny_run_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _run(["--tiny", "--device", "cpu", "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == fb.SCHEMA_VERSION
    env = results["environment"]
    for key in ("device", "driver_version", "cuda_version", "torch", "triton", "diffusers", "fastddim", "date"):
        assert key in env
    assert env["device_type"] == "cpu"
    records = results["records"]
    for record in records:
        _assert_schema(record)

    steps = [r for r in records if r["benchmark"] == "step"]
    assert {r["impl"] for r in steps} == {"copy", "diffusers", "diffusers-int", "fastddim"}
    timed = [r for r in steps if r["error"] is None]
    assert timed, [r["error"] for r in steps]
    for record in timed:
        assert record["check"]["passed"], record
        assert record["p20_us"] <= record["median_us"] <= record["p80_us"]
        assert record["iqr_us"] >= 0 and record["gb_per_s"] > 0
        if record["impl"] != "copy":
            assert record["speedup_vs_diffusers"] > 0 and record["pct_of_copy_bw"] > 0
    eta1 = next(r for r in timed if r["impl"] == "diffusers" and r["config"]["eta"] == 1)
    assert "pre-drawn" in eta1["config"]["noise"]
    # The noise tensor read counts as traffic: 5 tensors of 2x4x16x16 fp32.
    assert eta1["bytes_per_step"] == 5 * 2048 * 4

    loops = [r for r in records if r["benchmark"] == "loop"]
    assert {r["impl"] for r in loops} >= {"diffusers"}
    diffusers_loop = next(r for r in loops if r["impl"] == "diffusers" and r["batch_size"] == 1)
    assert diffusers_loop["error"] is None, diffusers_loop["error"]
    assert diffusers_loop["images_per_s"] > 0 and diffusers_loop["ms_per_step"] > 0
    assert 0 < diffusers_loop["scheduler_share"] < 1

    table = (out / "results.md").read_text()
    assert "| fastddim |" in table and "## Loop" in table and "need a CUDA GPU" in table
    for name in ("step_us_vs_size.png", "step_latency_vs_size.png", "loop_images_per_s.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "need a CUDA GPU" in capsys.readouterr().out


def test_loop_plan_and_speedups_over_both_baselines():
    parser = argparse.ArgumentParser()
    fb.add_arguments(parser)
    args = parser.parse_args([])
    assert "fastddim-graph-compiled" in fb.make_plan(args, torch.device("cuda")).loop_impls
    cpu_impls = fb.make_plan(args, CPU).loop_impls
    assert not set(cpu_impls) & (set(fb.GRAPH_LOOP_IMPLS) | set(fb.COMPILE_IMPLS))

    def loop(impl: str, median_us: float) -> dict:
        return fb.new_record("loop", impl=impl, model="m", batch_size=1, dtype="fp16", median_us=median_us)

    records = [
        loop("diffusers", 1000.0),
        loop("compile-reduce-overhead", 300.0),
        loop("fastddim-graph-compiled", 200.0),
    ]
    fb.finalize_loop_records(records)
    assert records[2]["speedup_vs_diffusers"] == 5.0
    assert records[2]["speedup_vs_compile_reduce_overhead"] == 1.5
    assert records[1]["speedup_vs_compile_reduce_overhead"] == 1.0


def _step(impl: str, shape: list[int], median_us: float, thresholding: bool = False, **fields) -> dict:
    config = {"eta": 0.0, "thresholding": thresholding}
    numel = 1
    for size in shape:
        numel *= size
    return fb.new_record(
        "step", impl=impl, shape=shape, numel=numel, dtype="fp16", config=config, median_us=median_us, **fields
    )


def test_targets_met_not_met_and_not_measured():
    records = [
        _step("fastddim", [64, 4, 512, 512], 200.0, pct_of_copy_bw=95.0),
        _step("fastddim", [1, 4, 64, 64], 4.0, speedup_vs_diffusers=70.0, latency_speedup_vs_diffusers=6.0),
        _step("fastddim-graph", [4, 3, 256, 256], 30.0, thresholding=True),
        _step("fastddim-graph", [4, 3, 256, 256], 2.5),
        _step("fastddim-graph", [16, 3, 64, 64], 3.0, thresholding=True),  # no plain case: not compared
        # Failed or skipped records (no median) count as not measured, whatever their fields say.
        _step("fastddim", [32, 4, 1024, 512], None, pct_of_copy_bw=10.0),
    ]
    checks = fb.target_checks(records)
    # Bandwidth, device time, latency, thresholded/plain, then the three loop targets (no loop records).
    assert [check["met"] for check in checks] == [True, True, False, False, None, None, None], checks
    assert checks[0]["measured"] == "64x4x512x512 fp16 eta 0: 95.0%"
    assert checks[3]["measured"] == "4x3x256x256 fp16 eta 0: 12.00x"
    assert checks[6]["measured"] == "not measured"


def test_targets_of_the_committed_h100_run(capsys):
    """``--targets`` reads a results.json: the committed H100 run reads as its closing notes do."""
    path = Path(__file__).parent.parent / "bench/results/nvidia-h100-80gb-hbm3/results.json"
    assert _run(["--targets", str(path)]) == 0
    table = capsys.readouterr().out
    rows = {
        line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit(" | ", 1)[1]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| target |")
    }
    assert rows == {
        "step: >= 90 % of copy bandwidth at >= 2^26 elements": "yes",
        "step at 1x4x64x64 fp16: >= 10x diffusers eager, device time": "yes",
        "step at 1x4x64x64 fp16: >= 10x diffusers eager, latency": "**no**",
        "thresholded step: <= 2x a plain step (CUDA graph, device time)": "–",
        "loop at batch 1: >= 5x diffusers' DDIMPipeline (fastddim-graph)": "yes",
        "loop: >= 1.3x torch.compile reduce-overhead (best fastddim graph)": "**no**",
        "loop: scheduler share <= 3 % (largest, fastddim graphs)": "yes",
    }
    assert _run(["--targets", "no/such/results.json"]) == 2


def test_graph_compiled_loop_impl_on_stand_in_graphs(monkeypatch, stand_in_graphs):
    """The ``fastddim-graph-compiled`` loop through the harness: compiled UNet, captured loop, no eager fallback.

    On the CPU the capture is a stand-in (``stand_in_graphs``, tests/conftest.py) and torch.compile uses its ``eager``
    backend (Dynamo's wrapper, no C++ compiler needed); the scheduler-share probe, which captures a real CUDA graph,
    is stubbed."""

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(fb, "scheduler_step_us", lambda *args: 1.0)
    plan = _tiny_plan()
    plan.loop_warmup, plan.loop_rounds = 0, 2
    record = fb.run_loop_impl(fb.LoopCase("tiny", 1, torch.float32), "fastddim-graph-compiled", CPU, plan)
    assert record["error"] is None and record["skipped"] is None
    assert record["check"] == {"passed": True, "method": "no eager fallback warning"}
    assert record["images_per_s"] > 0 and record["capture_s"] is not None
    assert len(stand_in_graphs) == 1


def test_new_record_has_every_key_and_rejects_unknown_ones():
    record = fb.new_record("step", impl="fastddim", median_us=1.0)
    _assert_schema(record)
    assert record["gb_per_s"] is None and record["notes"] == []
    _assert_schema(fb.new_record("loop", impl="diffusers"))
    with pytest.raises(KeyError):
        fb.new_record("loop", gb_per_s=1.0)


def test_summarize_quantiles():
    stats = fb.summarize([float(v) for v in range(1, 101)])
    assert stats["median_us"] == pytest.approx(50.5)
    assert stats["p20_us"] < stats["p25_us"] < stats["median_us"] < stats["p75_us"] < stats["p80_us"]
    assert stats["iqr_us"] == pytest.approx(stats["p75_us"] - stats["p25_us"])
    assert stats["n_samples"] == 100


def _tiny_plan() -> fb.Plan:
    plan = fb.Plan([], (), [], (), num_inference_steps=10)
    plan.rounds, plan.target_round_s, plan.max_calls = 2, 0.001, 5
    return plan


def test_correctness_check_rejects_a_wrong_implementation():
    inputs = fb.make_step_inputs(fb.StepCase((2, 4, 8, 8), torch.float32), CPU, 10)
    good = fb.STEP_BUILDERS["fastddim"]

    def wrong(step_inputs: fb.StepInputs) -> fb.Prepared:
        prepared = good(step_inputs)
        # A subtly wrong kernel: prev_sample off by 1e-3.
        return fb.Prepared(fn=prepared.fn, outputs=lambda: (prepared.outputs()[0] + 1e-3, prepared.outputs()[1]))

    ok = fb.run_step_impl(inputs, "fastddim", _tiny_plan())
    assert ok["check"]["passed"] and ok["check"]["max_abs_err"] == 0.0
    bad = fb.run_step_impl(inputs, "fastddim", _tiny_plan(), builder=wrong)
    assert bad["error"] is None
    assert not bad["check"]["passed"] and "elements off" in bad["check"]["detail"]
    assert bad["check"]["max_abs_err"] == pytest.approx(1e-3, rel=1e-2)


def test_statistical_noise_check():
    torch.manual_seed(0)
    mean = torch.randn(4, 4096)
    x0 = torch.randn(4, 4096)
    sigma = 0.4
    good = (mean + sigma * torch.randn_like(mean), x0)
    check = fb.check_step_output(good, (mean, x0), torch.float32, noise_free_reference=mean, sigma=sigma)
    assert check["passed"], check
    # Noise at the wrong scale (e.g. sigma not applied) fails even though x0 matches.
    bad = (mean + torch.randn_like(mean), x0)
    check = fb.check_step_output(bad, (mean, x0), torch.float32, noise_free_reference=mean, sigma=sigma)
    assert not check["passed"] and "noise" in check["detail"]


def test_step_impl_error_is_recorded_not_raised():
    inputs = fb.make_step_inputs(fb.StepCase((1, 2, 4, 4), torch.float32), CPU, 10)

    def broken(step_inputs: fb.StepInputs) -> fb.Prepared:
        raise RuntimeError("compile failed: no C++ compiler")

    record = fb.run_step_impl(inputs, "torch.compile", _tiny_plan(), builder=broken)
    assert record["error"] == "RuntimeError: compile failed: no C++ compiler"
    assert record["median_us"] is None
    _assert_schema(record)


def test_compiled_step_impl_runs_and_passes_the_check(monkeypatch):
    """The ``torch.compile`` step case end to end (Dynamo's ``eager`` backend: no C++ compiler on CI), including the
    Inductor setting it compiles under; on a GPU the same code compiles with Inductor."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    inputs = fb.make_step_inputs(fb.StepCase((1, 2, 4, 4), torch.float32, eta=1.0), CPU, 10)
    record = fb.run_step_impl(inputs, "torch.compile", _tiny_plan())
    assert record["error"] is None, record["error"]
    assert record["check"]["passed"], record["check"]
    assert record["compile_s"] > 0


def test_bytes_per_step_and_cifar_config():
    case = fb.StepCase((64, 4, 512, 512), torch.float16)
    assert case.numel == 2**26
    assert fb.bytes_per_step(case, reads_noise=False) == 4 * 2**26 * 2
    assert fb.bytes_per_step(case, reads_noise=True) == 5 * 2**26 * 2
    from diffusers import UNet2DModel

    unet = UNet2DModel(**{**fb.CIFAR10_UNET_CONFIG, "block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8})
    assert unet.config.freq_shift == 1 and unet.config.flip_sin_to_cos is False and unet.config.downsample_padding == 0


def test_device_slug_and_environment():
    assert fb.device_slug("cpu") == "cpu"
    assert fb.device_name("cpu").startswith("cpu: ")
    env = fb.environment_info("cpu")
    assert env["torch"] == torch.__version__ and env["driver_version"] is None


@pytest.mark.slow
def test_module_entry_point_and_quick_step_run(tmp_path):
    slug = subprocess.run(
        [sys.executable, "-m", "fastddim.benchmark", "--print-device-slug", "--device", "cpu"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert slug.stdout.strip() == "cpu"
    assert _run(["--quick", "--device", "cpu", "--only", "step", "--out", str(tmp_path), "--no-plots"]) == 0
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    shapes = {tuple(r["shape"]) for r in records}
    assert (16, 4, 128, 128) in shapes and all(max(s) <= 128 for s in shapes)


# ------------------------------------------------------------------------------------------------ fastddim.testing


def _measurement(median_us: float, device: str = "cpu: test") -> dict:
    return {"key": "step/1x4x8x8/fp32/eta=0/eager", "device": device, "median_us": median_us, "environment": {}}


def test_check_within_baseline_pass_fail_and_record(tmp_path):
    path = tmp_path / "perf" / "baseline.json"
    first = ft.check_within_baseline(_measurement(100.0), path, margin=0.1)
    assert first["status"] == "recorded" and path.exists()
    stored = ft.load_baseline(path)
    assert stored["devices"]["cpu: test"]["step/1x4x8x8/fp32/eta=0/eager"]["median_us"] == 100.0

    assert ft.check_within_baseline(_measurement(109.0), path, margin=0.1)["status"] == "pass"
    with pytest.raises(ft.PerfRegressionError, match="performance regression"):
        ft.check_within_baseline(_measurement(111.0), path, margin=0.1)

    # Another device's baseline is never used: this one gets its own.
    other = ft.check_within_baseline(_measurement(1e6, device="NVIDIA H100 80GB HBM3"), path, margin=0.1)
    assert other["status"] == "recorded"
    assert set(ft.load_baseline(path)["devices"]) == {"cpu: test", "NVIDIA H100 80GB HBM3"}

    updated = ft.check_within_baseline(_measurement(500.0), path, update=True)
    assert updated["status"] == "updated"
    assert ft.load_baseline(path)["devices"]["cpu: test"]["step/1x4x8x8/fp32/eta=0/eager"]["median_us"] == 500.0


def test_check_within_baseline_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="margin"):
        ft.check_within_baseline(_measurement(1.0), {}, margin=-0.1)
    with pytest.raises(KeyError, match="median_us"):
        ft.check_within_baseline({"key": "k", "device": "d"}, {})
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a fastddim performance baseline"):
        ft.load_baseline(bad)


def test_measure_step_on_cpu():
    measurement = ft.measure_step((1, 4, 8, 8), torch.float32, device="cpu", rounds=3, target_round_s=0.002)
    assert measurement["key"] == "step/1x4x8x8/fp32/eta=0/eager"
    assert measurement["device"] == fb.device_name("cpu")
    assert 0 < measurement["median_us"] < 1e5 and measurement["n_samples"] == 3
    with pytest.raises(ValueError, match="CUDA"):
        ft.measure_step((1, 4, 8, 8), torch.float32, device="cpu", cuda_graph=True)


def test_assert_step_within_baseline_fake_baselines():
    shape, dtype = (1, 4, 8, 8), torch.float32
    key = ft.step_key(shape, dtype)
    device = fb.device_name("cpu")
    kwargs = {"shape": shape, "dtype": dtype, "device": "cpu", "rounds": 3, "target_round_s": 0.002}

    # Far faster than any real step: must fail, after one re-measurement.
    impossible = {"format": ft.BASELINE_FORMAT, "devices": {device: {key: {"median_us": 1e-3}}}}
    with pytest.raises(ft.PerfRegressionError):
        ft.assert_step_within_baseline(impossible, margin=0.1, **kwargs)

    generous = {"format": ft.BASELINE_FORMAT, "devices": {device: {key: {"median_us": 1e7}}}}
    result = ft.assert_step_within_baseline(generous, margin=0.1, **kwargs)
    assert result["check"]["status"] == "pass" and result["check"]["ratio"] < 1

    # A baseline for another device only: record one for this device, then skip.
    foreign = {"format": ft.BASELINE_FORMAT, "devices": {"NVIDIA H100 80GB HBM3": {key: {"median_us": 1e-3}}}}
    with pytest.raises(pytest.skip.Exception, match="recorded baseline"):
        ft.assert_step_within_baseline(foreign, margin=0.1, **kwargs)
    assert key in foreign["devices"][device]


def test_fastddim_perf_fixture_plugin(pytester, tmp_path):
    baseline = tmp_path / "perf.json"
    pytester.makepyfile(
        test_downstream="""
        import torch

        def test_step_speed(fastddim_perf):
            fastddim_perf.step((1, 4, 8, 8), torch.float32, device="cpu", rounds=3, target_round_s=0.002)

        def test_loop_speed(fastddim_perf):
            fastddim_perf.loop("sleepy-loop", lambda: sum(range(1000)), device="cpu", rounds=2)
        """
    )
    args = [
        "-p",
        "fastddim.testing",
        f"--fastddim-perf-baseline={baseline}",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
    ]
    first = pytester.runpytest_inprocess(*args, "-rs")
    first.assert_outcomes(skipped=2)
    first.stdout.fnmatch_lines(["*recorded baseline*"])
    assert baseline.exists()

    # A generous margin: this checks the plumbing, not the (noisy) speed of a shared CI machine.
    pytester.runpytest_inprocess(*args, "--fastddim-perf-margin=100").assert_outcomes(passed=2)

    data = json.loads(baseline.read_text())
    for entries in data["devices"].values():
        for entry in entries.values():
            entry["median_us"] = 1e-6
    baseline.write_text(json.dumps(data))
    failed = pytester.runpytest_inprocess(*args, "--fastddim-perf-margin=0.5")
    failed.assert_outcomes(failed=2)
    failed.stdout.fnmatch_lines(["*performance regression*"])
