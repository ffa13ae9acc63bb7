"""CPU tests of the benchmark harness (`fastddim.benchmark`), ``fastddim bench`` as a CI step, the timing module, the
targets script (``bench/targets.py``); the users' CI plugin (`fastddim.testing`) is in test_testing.py."""

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastddim import cli, timing
from fastddim.benchmark import command, loop, records, runner, step
from fastddim.benchmark.cases import LoopCase, Plan, StepCase
from fastddim.benchmark.environment import environment_info

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def _assert_schema(record: dict) -> None:
    expected = records.RECORD_KEYS + records.BENCHMARK_KEYS[record["benchmark"]]
    assert set(record) == set(expected), record["name"]


def _tiny_plan() -> Plan:
    plan = Plan([], (), [], (), num_inference_steps=10)
    plan.rounds, plan.target_round_s, plan.max_calls = 2, 0.001, 5
    return plan


# ------------------------------------------------------------------------------------------------ harness


def test_tiny_run_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _run(["--tiny", "--device", "cpu", "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == records.SCHEMA_VERSION
    assert "written" not in results
    env = results["environment"]
    for key in ("device", "driver_version", "cuda_version", "torch", "triton", "diffusers", "fastddim", "date"):
        assert key in env
    assert env["device_type"] == "cpu"
    for record in results["records"]:
        _assert_schema(record)

    steps = [r for r in results["records"] if r["benchmark"] == "step"]
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
    assert eta1["config"]["timestep_kind"].startswith("0-dim device tensor")
    # The noise tensor read counts as traffic: 5 tensors of 2x4x16x16 fp32.
    assert eta1["bytes_per_step"] == 5 * 2048 * 4

    loops = [r for r in results["records"] if r["benchmark"] == "loop"]
    assert {r["impl"] for r in loops} >= {"diffusers"}
    diffusers_loop = next(r for r in loops if r["impl"] == "diffusers" and r["batch_size"] == 1)
    assert diffusers_loop["error"] is None, diffusers_loop["error"]
    assert diffusers_loop["images_per_s"] > 0 and diffusers_loop["ms_per_step"] > 0
    assert 0 < diffusers_loop["scheduler_share"] < 1
    # The limit row of the same case: N x one UNet call alone; the loop's time over it.
    limit_row = next(r for r in loops if r["impl"] == "unet-limit" and r["batch_size"] == 1)
    assert limit_row["vs_limit"] == 1.0 and limit_row["check"] is None
    assert diffusers_loop["vs_limit"] == pytest.approx(diffusers_loop["median_us"] / limit_row["median_us"])

    # The eager loops timed alternately: fastddim's checked against diffusers' (bit-identical on the CPU in fp32).
    eager_records = [r for r in results["records"] if r["benchmark"] == "eager"]
    assert {(r["model"], r["impl"]) for r in eager_records} == {
        (model, impl) for model in ("tiny", "tiny-sd") for impl in ("diffusers", "fastddim-eager")
    }
    for record in eager_records:
        if record["impl"] == "fastddim-eager":
            assert record["check"]["rel_l2_err"] == 0.0 and record["paired_speedup_vs_diffusers"] > 0

    table = (out / "results.md").read_text()
    assert "| fastddim |" in table and "## Loop" in table and "need a CUDA GPU" in table
    assert "## Eager loops, interleaved" in table
    assert "| ÷ limit |" in table and "| unet-limit |" in table and "## Text-to-image loop" in table
    plots = ("step_us_vs_size.png", "step_latency_vs_size.png", "loop_images_per_s.png")
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "need a CUDA GPU" in stdout
    wrote = next(line for line in stdout.splitlines() if line.startswith("Wrote "))
    for name in ("results.json", "results.md", *plots):
        assert str(out / name) in wrote
    n = len(results["records"])
    assert f"{n} cases: {n} ok, 0 skipped (not errors), 0 failed the correctness check, 0 errored." in stdout


def test_plan_filters_implementations_by_device_and_compile():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    cuda_plan = runner.make_plan(parser.parse_args([]), torch.device("cuda", 0))
    assert "fastddim-graph-compiled" in cuda_plan.loop_impls and "torch.compile" in cuda_plan.step_impls
    assert "fastddim-graph" in cuda_plan.step_impls
    cpu_plan = runner.make_plan(parser.parse_args(["--quick"]), CPU)
    for name in cpu_plan.step_impls:
        assert not (step.STEP_IMPLEMENTATIONS[name].cuda_graph or step.STEP_IMPLEMENTATIONS[name].compiles)
    for name in cpu_plan.loop_impls:
        assert not (loop.LOOP_IMPLEMENTATIONS[name].cuda_graph or loop.LOOP_IMPLEMENTATIONS[name].compiles)
    assert "fastddim" in cpu_plan.step_impls and "fastddim-eager" in cpu_plan.loop_impls
    no_compile = runner.make_plan(parser.parse_args(["--no-compile"]), torch.device("cuda", 0))
    assert not set(no_compile.step_impls + no_compile.loop_impls) & runner.compiled_impls()

    # Compiled jobs run last; compiled loops in fp16 only, batch 1 first.
    jobs = runner.plan_jobs(cuda_plan)
    compiled = [i for i, job in enumerate(jobs) if job[2] in runner.compiled_impls()]
    assert compiled == list(range(len(jobs) - len(compiled), len(jobs)))
    compiled_loops = [job for job in jobs if job[0] == "loop" and job[2] in runner.compiled_impls()]
    assert all(job[1].dtype == torch.float16 for job in compiled_loops)
    assert [job[1].batch_size for job in compiled_loops] == sorted(job[1].batch_size for job in compiled_loops)
    # The copy ceiling is measured once per shape and dtype.
    copies = [(job[1].shape, job[1].dtype) for job in jobs if job[2] == "copy"]
    assert len(copies) == len(set(copies))


def test_loop_speedups_over_both_baselines():
    def loop_record(impl: str, median_us: float) -> dict:
        return records.new_record("loop", impl=impl, model="m", batch_size=1, dtype="fp16", median_us=median_us)

    recs = [
        loop_record("diffusers", 1000.0),
        loop_record("compile-reduce-overhead", 300.0),
        loop_record("fastddim-graph-compiled", 200.0),
    ]
    loop.finalize_loop_records(recs)
    assert recs[2]["speedup_vs_diffusers"] == 5.0
    assert recs[2]["speedup_vs_compile_reduce_overhead"] == 1.5
    assert recs[1]["speedup_vs_compile_reduce_overhead"] == 1.0


def test_graph_compiled_loop_impl_on_stand_in_graphs(monkeypatch, stand_in_graphs):
    """The ``fastddim-graph-compiled`` loop through the harness: compiled UNet, captured loop, no eager fallback.

    On the CPU the capture is a stand-in (``stand_in_graphs``, tests/conftest.py) and torch.compile uses its ``eager``
    backend (Dynamo's wrapper, no C++ compiler needed); the scheduler-share probe, which captures a real CUDA graph,
    is stubbed."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(loop, "scheduler_step_us", lambda *args, **kwargs: 1.0)
    plan = _tiny_plan()
    plan.loop_warmup, plan.loop_rounds = 0, 2
    record = loop.run_loop_impl(LoopCase("tiny", 1, torch.float32), "fastddim-graph-compiled", CPU, plan)
    assert record["error"] is None and record["skipped"] is None
    assert record["check"] == {"passed": True, "method": "no eager fallback warning"}
    assert record["images_per_s"] > 0 and record["capture_s"] is not None
    assert len(stand_in_graphs) == 1


def test_new_record_has_every_key_and_rejects_unknown_ones():
    record = records.new_record("step", impl="fastddim", median_us=1.0)
    _assert_schema(record)
    assert record["gb_per_s"] is None and record["notes"] == []
    _assert_schema(records.new_record("loop", impl="diffusers"))
    with pytest.raises(KeyError):
        records.new_record("loop", gb_per_s=1.0)


def test_outcome_tells_skips_from_errors_and_failed_checks():
    base = {"impl": "fastddim", "median_us": 1.0}
    assert records.outcome(records.new_record("step", **base)) == "ok"
    assert records.outcome(records.new_record("step", **base, check={"passed": True})) == "ok"
    assert records.outcome(records.new_record("step", **base, check={"passed": False})) == "failed"
    assert records.outcome(records.new_record("step", **base, error="RuntimeError: x")) == "error"
    assert records.outcome(records.new_record("loop", impl="fastddim-graph", skipped="time budget")) == "skipped"


def test_summarize_quantiles():
    stats = timing.summarize([float(v) for v in range(1, 101)])
    assert stats["median_us"] == pytest.approx(50.5)
    assert stats["p20_us"] < stats["p25_us"] < stats["median_us"] < stats["p75_us"] < stats["p80_us"]
    assert stats["iqr_us"] == pytest.approx(stats["p75_us"] - stats["p25_us"])
    assert stats["n_samples"] == 100


def test_time_wall_counts_calls_and_device_time_needs_cuda():
    calls = []
    samples = timing.time_wall(lambda: calls.append(1), CPU, rounds=3, calls_per_round=4)
    assert len(samples) == 3 and len(calls) == 12 and all(sample > 0 for sample in samples)
    with pytest.raises(ValueError, match="CUDA"):
        timing.device_time_us(lambda: None, CPU)
    assert timing.graph_unroll(1 << 10) > 1 and timing.graph_unroll(1 << 22) == 1


def test_correctness_check_rejects_a_wrong_implementation():
    inputs = step.make_step_inputs(StepCase((2, 4, 8, 8), torch.float32), CPU, 10)
    good = step.STEP_IMPLEMENTATIONS["fastddim"].build

    def wrong(step_inputs: step.StepInputs) -> step.Prepared:
        prepared = good(step_inputs)
        # A subtly wrong kernel: prev_sample off by 1e-3.
        return step.Prepared(fn=prepared.fn, outputs=lambda: (prepared.outputs()[0] + 1e-3, prepared.outputs()[1]))

    ok = step.run_step_impl(inputs, "fastddim", _tiny_plan())
    assert ok["check"]["passed"] and ok["check"]["max_abs_err"] == 0.0
    bad = step.run_step_impl(inputs, "fastddim", _tiny_plan(), builder=wrong)
    assert bad["error"] is None
    assert not bad["check"]["passed"] and "elements off" in bad["check"]["detail"]
    assert bad["check"]["max_abs_err"] == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.parametrize("num_inference_steps", [10, 50, 1000])
@pytest.mark.parametrize("position", ["middle", "last"])
def test_step_sigma_matches_diffusers(num_inference_steps, position):
    inputs = step.make_step_inputs(StepCase((1, 1, 2, 2), torch.float32, eta=0.7), CPU, num_inference_steps)
    scheduler = step.diffusers_scheduler(inputs)
    if position == "last":
        # The final step, where the previous alpha is final_alpha_cumprod.
        inputs = dataclasses.replace(inputs, timestep=int(scheduler.timesteps[-1]))
    prev = inputs.timestep - scheduler.config.num_train_timesteps // num_inference_steps
    expected = 0.7 * float(scheduler._get_variance(inputs.timestep, prev)) ** 0.5
    assert step.step_sigma(inputs) == pytest.approx(expected, rel=1e-6)


def test_statistical_noise_check():
    torch.manual_seed(0)
    mean = torch.randn(4, 4096)
    x0 = torch.randn(4, 4096)
    sigma = 0.4
    good = (mean + sigma * torch.randn_like(mean), x0)
    check = records.check_step_output(good, (mean, x0), torch.float32, noise_free_reference=mean, sigma=sigma)
    assert check["passed"], check
    # Noise at the wrong scale (e.g. sigma not applied) fails even though x0 matches.
    bad = (mean + torch.randn_like(mean), x0)
    check = records.check_step_output(bad, (mean, x0), torch.float32, noise_free_reference=mean, sigma=sigma)
    assert not check["passed"] and "noise" in check["detail"]


def test_step_impl_error_is_recorded_not_raised():
    inputs = step.make_step_inputs(StepCase((1, 2, 4, 4), torch.float32), CPU, 10)

    def broken(step_inputs: step.StepInputs) -> step.Prepared:
        raise RuntimeError("compile failed: no C++ compiler\nlong traceback text")

    record = step.run_step_impl(inputs, "torch.compile", _tiny_plan(), builder=broken)
    assert record["error"] == "RuntimeError: compile failed: no C++ compiler"
    assert record["median_us"] is None
    _assert_schema(record)


def test_compiled_step_impl_runs_and_passes_the_check(monkeypatch):
    """The ``torch.compile`` step case end to end (Dynamo's ``eager`` backend: no C++ compiler on CI), including the
    Inductor setting it compiles under; on a GPU the same code compiles with Inductor."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    inputs = step.make_step_inputs(StepCase((1, 2, 4, 4), torch.float32, eta=1.0), CPU, 10)
    record = step.run_step_impl(inputs, "torch.compile", _tiny_plan())
    assert record["error"] is None, record["error"]
    assert record["check"]["passed"], record["check"]
    assert record["compile_s"] > 0


def test_bytes_per_step_and_cifar_config():
    case = StepCase((64, 4, 512, 512), torch.float16)
    assert case.numel == 2**26
    assert step.bytes_per_step(case, reads_noise=False) == 4 * 2**26 * 2
    assert step.bytes_per_step(case, reads_noise=True) == 5 * 2**26 * 2
    from diffusers import UNet2DModel

    config = {**loop.CIFAR10_UNET_CONFIG, "block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8}
    unet = UNet2DModel(**config)
    assert unet.config.freq_shift == 1 and unet.config.flip_sin_to_cos is False and unet.config.downsample_padding == 0


def test_device_slug_and_environment():
    assert timing.device_slug("cpu") == "cpu"
    assert timing.device_name("cpu").startswith("cpu: ")
    env = environment_info("cpu")
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
    recs = json.loads((tmp_path / "results.json").read_text())["records"]
    shapes = {tuple(r["shape"]) for r in recs}
    assert (16, 4, 128, 128) in shapes and all(max(s) <= 128 for s in shapes)


@pytest.mark.gpu
def test_tiny_step_run_on_cuda(tmp_path):
    assert _run(["--tiny", "--only", "step", "--device", "cuda", "--no-plots", "--out", str(tmp_path)]) == 0
    recs = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {r["impl"] for r in recs} == {"copy", "diffusers", "diffusers-int", "fastddim", "fastddim-graph"}
    for record in recs:
        assert records.outcome(record) == "ok", record
        assert record["timing_method"].startswith("triton.testing.do_bench") and record["n_samples"] > 1
        assert record["p20_us"] <= record["median_us"] <= record["p80_us"] and record["latency_us"] > 0


# ------------------------------------------------------------------------------------------------ fastddim bench in CI


def _bench(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["bench", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _replace_step_impl(monkeypatch, name: str, build) -> None:
    impl = dataclasses.replace(step.STEP_IMPLEMENTATIONS[name], build=build)
    monkeypatch.setitem(step.STEP_IMPLEMENTATIONS, name, impl)


def test_bench_fails_when_cases_error(tmp_path, monkeypatch, capsys):
    def broken(step_inputs: step.StepInputs) -> step.Prepared:
        raise RuntimeError("kernel launch failed")

    _replace_step_impl(monkeypatch, "fastddim", broken)
    out = tmp_path / "out"
    code, stdout, stderr = _bench(
        ["--tiny", "--only", "step", "--device", "cpu", "--no-plots", "--out", str(out)], capsys
    )
    assert code == command.EXIT_FAILED
    n = len(json.loads((out / "results.json").read_text())["records"])
    # fastddim runs every tiny step case: three forward, one inverse, one per-sample and two backward.
    assert f"{n} cases: {n - 7} ok, 0 skipped (not errors), 0 failed the correctness check, 7 errored." in stdout
    assert "FAILED: 7 case(s) errored, 0 failed the correctness check" in stderr
    assert "error step/2x4x16x16 fp32 eta=0/fastddim: RuntimeError: kernel launch failed" in stderr
    # --no-plots: the closing line names what was written, and nothing else.
    wrote = next(line for line in stdout.splitlines() if line.startswith("Wrote "))
    assert wrote.startswith(f"Wrote {out / 'results.json'}, {out / 'results.md'} in ")
    assert "plot" not in wrote and not list(out.glob("*.png"))


def test_bench_fails_when_a_correctness_check_fails(tmp_path, monkeypatch, capsys):
    good = step.STEP_IMPLEMENTATIONS["diffusers-int"].build

    def wrong(step_inputs: step.StepInputs) -> step.Prepared:
        prepared = good(step_inputs)
        return dataclasses.replace(prepared, outputs=lambda: [t * 2 for t in prepared.outputs()])

    _replace_step_impl(monkeypatch, "diffusers-int", wrong)
    out = tmp_path / "out"
    code, stdout, stderr = _bench(
        ["--tiny", "--only", "step", "--device", "cpu", "--no-plots", "--out", str(out)], capsys
    )
    assert code == command.EXIT_FAILED
    # Every tiny step case runs diffusers-int: the three forward ones and the inverse, per-sample and backward ones.
    assert "7 failed the correctness check, 0 errored." in stdout
    assert "check failed step/2x4x16x16 fp32 eta=0/diffusers-int: output 1: 2048 of 2048 elements off" in stderr


def test_bench_skips_are_not_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "fastddim_pipeline_class", lambda: (None, "fastddim.DDIMPipeline is not available"))
    monkeypatch.setattr(loop, "scheduler_step_us", lambda *args, **kwargs: 1.0)
    out = tmp_path / "out"
    code, stdout, stderr = _bench(
        ["--tiny", "--only", "loop", "--device", "cpu", "--no-plots", "--out", str(out)], capsys
    )
    assert code == 0, stderr
    # diffusers and the limit run for the three tiny cases (two plain, one thresholded); fastddim's loops are skipped.
    assert "9 cases: 6 ok, 3 skipped (not errors), 0 failed the correctness check, 0 errored." in stdout
    assert "skipped loop/tiny batch=1 fp32/fastddim-eager: fastddim.DDIMPipeline is not available" in stdout
    assert "FAILED" not in stderr


def test_compile_cases_past_the_budget_are_skipped_not_errors(tmp_path):
    plan = _tiny_plan()
    plan.step_cases, plan.step_impls, plan.budget_s = [StepCase((1, 2, 4, 4), torch.float32)], ("torch.compile",), -1.0
    results = runner.run_benchmarks(plan, CPU, tmp_path, plots=False)
    [record] = results["records"]
    assert record["skipped"] == "time budget of -1 s spent (--budget-s)" and record["error"] is None
    assert records.outcome(record) == "skipped"
    assert [len(v) for v in runner.summarize_outcomes(results["records"]).values()] == [0, 1, 0, 0]


def test_bench_without_matplotlib_says_so_and_lists_no_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(step, "STEP_IMPLEMENTATIONS", {"copy": step.STEP_IMPLEMENTATIONS["copy"]})
    out = tmp_path / "out"
    code, stdout, stderr = _bench(["--tiny", "--only", "step", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "plots skipped" in stderr and "matplotlib" in stderr
    wrote = next(line for line in stdout.splitlines() if line.startswith("Wrote "))
    assert ".png" not in wrote and "plots" not in wrote


def _unwritable_under_a_file(tmp_path: Path) -> list[str]:
    # Tests may run as root, which os.access and permission bits do not stop: a folder under a file cannot exist.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return ["--out", str(blocker / "results")]


def _existing_file(tmp_path: Path) -> list[str]:
    path = tmp_path / "results.json"
    path.write_text("{}")
    return ["--out", str(path)]


@pytest.mark.parametrize(
    ("make_args", "cuda", "message"),
    [
        (_existing_file, None, "is a file, not a folder"),
        (_unwritable_under_a_file, None, "a-file is a file, not a folder"),
        (lambda tmp_path: ["--device", "cuda"], (False, 0), "--device cuda: CUDA is not available on this machine"),
        (lambda tmp_path: ["--device", "cuda:7"], (True, 1), "--device cuda:7: only 1 CUDA device(s) present"),
        (lambda tmp_path: ["--device", "nonsense"], None, "--device nonsense: not a torch device"),
        (lambda tmp_path: ["--device", "meta"], None, "--device meta: only cpu and cuda devices are supported"),
        (
            lambda tmp_path: ["--device", "nonsense", "--print-device-slug"],
            None,
            "--device nonsense: not a torch device",
        ),
    ],
    ids=["out-is-a-file", "out-under-a-file", "cuda-without-cuda", "cuda-bad-index", "bogus-name", "meta", "slug"],
)
def test_bench_usage_errors_are_one_line_before_any_case(tmp_path, monkeypatch, capsys, make_args, cuda, message):
    if cuda is not None:
        available, count = cuda
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    started = []
    monkeypatch.setattr(command, "run_benchmarks", lambda *args, **kwargs: started.append(args))
    args = make_args(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "never")]
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = _bench(["--tiny", *args], capsys)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr
    assert not started and stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_bench_option_types_are_usage_errors(capsys):
    for argv in (["--steps", "0"], ["--threads", "-1"], ["--budget-s", "nan"], ["--targets", "x.json"]):
        code, _, stderr = _bench(argv, capsys)
        assert code == 2 and stderr.startswith("error: fastddim bench: ") and stderr.count("\n") == 1, (argv, stderr)


# ------------------------------------------------------------------------------------------------ bench/targets.py


def _step(impl: str, shape: list[int], median_us: float | None, thresholding: bool = False, **fields) -> dict:
    config = {"eta": 0.0, "thresholding": thresholding}
    numel = 1
    for size in shape:
        numel *= size
    return records.new_record(
        "step", impl=impl, shape=shape, numel=numel, dtype="fp16", config=config, median_us=median_us, **fields
    )


def test_targets_met_not_met_and_not_measured(targets):
    recs = [
        _step("fastddim", [64, 4, 512, 512], 200.0, pct_of_copy_bw=95.0),
        _step("fastddim", [1, 4, 64, 64], 4.0, speedup_vs_diffusers=70.0, latency_speedup_vs_diffusers=6.0),
        _step("fastddim-graph", [4, 3, 256, 256], 30.0, thresholding=True),
        _step("fastddim-graph", [4, 3, 256, 256], 2.5),
        _step("fastddim-graph", [16, 3, 64, 64], 3.0, thresholding=True),  # no plain case: not compared
        # Failed or skipped records (no median) count as not measured, whatever their fields say.
        _step("fastddim", [32, 4, 1024, 512], None, pct_of_copy_bw=10.0),
    ]
    checks = targets.target_checks(recs)
    # Bandwidth, device time, latency, thresholded/plain, the seven loop targets (no loop records), then the scheduler
    # issue's thresholding targets (4x3x256x256: 12x a plain step; no diffusers figure; no loop) and the per-seed one.
    assert [check["met"] for check in checks] == [True, True, False, False] + [None] * 7 + [False, None, None, None]
    assert checks[0]["measured"] == "64x4x512x512 fp16 eta 0: 95.0%"
    assert checks[3]["measured"] == "4x3x256x256 fp16 eta 0: 12.00x"
    assert checks[6]["measured"] == "not measured"


def test_targets_of_the_committed_h100_run(targets, capsys):
    """bench/targets.py reads a results.json: the committed H100 run reads as its closing notes do."""
    path = REPO / "bench/results/nvidia-h100-80gb-hbm3/results.json"
    assert targets.main([str(path)]) == 0
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
        "sd: >= 1.3x diffusers + torch.compile reduce-overhead at batch 1, SD1.5 architecture (best fastddim graph)": "–",
        "loop time <= 1.05x the limit (fastddim-graph; limit: N x captured UNet call alone, device time)": "–",
        "never slower than the best other implementation (best other / best fastddim graph)": "yes",
        # The eager loop at fp32 batch 1: 0.64x diffusers' (the pipelines issue's finding).
        "fastddim-eager never slower than diffusers eager (loop tables: ratio of medians, cases timed one after the "
        "other)": "**no**",
        "thresholded step (CUDA graph) <= 4x a plain captured step at 16x3x64x64 fp32 and 4x3x256x256 fp16": "–",
        # 42.5x at 16x3x64x64 fp32 but 26.8x at 4x3x256x256 fp16.
        "thresholded step (CUDA graph) >= 40x diffusers' thresholded step at the same shapes, device time": "**no**",
        "pixel-space loop with thresholding: scheduler share <= 1 % (fastddim-graph)": "–",
        "sampling at scale: per-seed noise costs <= 2 % of images/s against one generator (same loop)": "–",
    }
    assert targets.main(["no/such/results.json"]) == 2
    assert capsys.readouterr().err.startswith("error: no/such/results.json: not a readable results.json")


def test_whole_loop_targets_over_sd_and_loop_records(targets):
    def sd(impl: str, median_us: float, batch: int = 1, model: str = "sd15", **fields) -> dict:
        return records.new_record(
            "sd",
            impl=impl,
            model=model,
            batch_size=batch,
            dtype="fp16",
            num_inference_steps=30,
            median_us=median_us,
            **fields,
        )

    recs = [
        sd("compile-reduce-overhead", 1400.0),
        sd("diffusers", 2000.0),
        sd("fastddim-graph", 1000.0, speedup_vs_compile_reduce_overhead=1.4, vs_limit=1.02),
        sd("fastddim-eager", 1900.0, speedup_vs_diffusers=2000 / 1900),
        # Batch 4: the graph is slower than reduce-overhead there, and 1.1x its limit; the eager loop is slower.
        sd("compile-reduce-overhead", 3000.0, batch=4),
        sd("fastddim-graph", 3300.0, batch=4, speedup_vs_compile_reduce_overhead=3000 / 3300, vs_limit=1.1),
        sd("fastddim-eager", 5000.0, batch=4, speedup_vs_diffusers=0.9),
        # Batch 1 of SDXL: not the 1.3x target's architecture.
        sd("fastddim-graph-compiled", 900.0, model="sdxl", speedup_vs_compile_reduce_overhead=1.1),
        # The limit row is never "another implementation".
        sd("unet-limit", 100.0, batch=4),
    ]
    checks = {check["target"].split(" (")[0]: check for check in targets.target_checks(recs)}
    ratio = checks["sd: >= 1.3x diffusers + torch.compile reduce-overhead at batch 1, SD1.5 architecture"]
    assert ratio["met"] is True and ratio["measured"] == "sd15 b1 fp16 30 steps: 1.40x"
    limit_check = checks["loop time <= 1.05x the limit"]
    assert limit_check["met"] is False and "sd sd15 b4 fp16 30 steps: 1.10x" in limit_check["measured"]
    never_slower = checks["never slower than the best other implementation"]
    assert never_slower["met"] is False
    assert never_slower["measured"] == "sd sd15 b1 fp16 30 steps: 1.40x; sd sd15 b4 fp16 30 steps: 0.91x"
    eager = checks["fastddim-eager never slower than diffusers eager"]
    assert eager["met"] is False and "sd sd15 b4 fp16 30 steps: 0.90x" in eager["measured"]
    assert checks["loop at batch 1: >= 5x diffusers' DDIMPipeline"]["met"] is None


def test_reconstruction_record_and_table():
    """The reconstruction benchmark inverts and reconstructs real digits: a finite error, below that of an image
    reconstructed from pure noise, and a row in results.md."""
    from fastddim.benchmark import reconstruction
    from fastddim.benchmark.cases import Plan
    from fastddim.benchmark.report import markdown_tables

    plan = Plan([], (), [], (), reconstruction_steps=(3,), reconstruction_images=4)
    record = reconstruction.reconstruction_record(3, plan, torch.device("cpu"))
    assert record["benchmark"] == "reconstruction" and record["batch_size"] == 4
    assert 0 <= record["mse"] < 0.05, record
    environment = {"device": "cpu", "device_type": "cpu", "torch": "t", "triton": "t", "diffusers": "d"}
    environment.update(fastddim="f", date="today")
    table = markdown_tables({"environment": environment, "records": [record]})
    assert "## Reconstruction" in table and f"| 3 | 4 | {record['mse']:.5f} |" in table
