"""The harness's inverse, per-sample-timestep and forward + backward step cases, thresholded loops, and the per-seed
noise benchmark (CPU; the CUDA-graph variants run in test_benchmark.py's gpu-marked tiny run)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import diffusers
import pytest
import torch

from fastddim.benchmark import command, loop, per_seed, records, runner, step, step_kinds
from fastddim.benchmark.cases import TINY_STEP_CASES, LoopCase, Plan, SeedsCase, StepCase

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent
NEW_KINDS = ("inverse", "per-sample", "backward")


def _tiny_plan() -> Plan:
    plan = Plan([], (), [], (), num_inference_steps=10)
    plan.rounds, plan.target_round_s, plan.max_calls = 2, 0.001, 5
    plan.loop_rounds = 1
    return plan


def _assert_schema(record: dict) -> None:
    assert set(record) == set(records.RECORD_KEYS + records.BENCHMARK_KEYS[record["benchmark"]]), record["name"]


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", ["diffusers", "diffusers-int", "fastddim"])
def test_new_step_kinds_pass_their_check_and_are_timed(kind, dtype, impl):
    """fp32 is checked bit for bit against diffusers (the scheduler issue's promise), fp16 within its bound."""
    inputs = step.make_step_inputs(StepCase((2, 4, 8, 8), dtype, kind=kind), CPU, 10)
    record = step.run_step_impl(inputs, impl, _tiny_plan())
    assert record["error"] is None, record["error"]
    assert record["check"]["passed"], record["check"]
    assert record["check"]["method"] == ("equal" if dtype == torch.float32 else "allclose")
    assert record["config"]["kind"] == kind
    assert record["median_us"] > 0
    itemsize = 4 if dtype == torch.float32 else 2
    assert record["bytes_per_step"] == (8 if kind == "backward" else 4) * 2 * 4 * 8 * 8 * itemsize
    _assert_schema(record)


def test_inverse_reference_is_diffusers_inverse_scheduler():
    inputs = step.make_step_inputs(StepCase((2, 4, 8, 8), torch.float32, kind="inverse"), CPU, 10)
    inverse = diffusers.DDIMInverseScheduler()
    inverse.set_timesteps(10)
    assert inputs.timestep == int(inverse.timesteps[5])
    expected = inverse.step(inputs.model_output, inputs.timestep, inputs.sample, return_dict=False)
    forward = diffusers.DDIMScheduler()
    forward.set_timesteps(10)
    not_expected = forward.step(inputs.model_output, inputs.timestep, inputs.sample, return_dict=False)
    reference = step.reference_step(inputs)
    assert torch.equal(reference[0], expected[0]) and torch.equal(reference[1], expected[1])
    assert not torch.equal(reference[0], not_expected[0])


def test_per_sample_reference_steps_each_sample_from_its_own_timestep():
    inputs = step.make_step_inputs(StepCase((4, 2, 4, 4), torch.float32, kind="per-sample"), CPU, 10)
    timesteps = inputs.timesteps.tolist()
    assert timesteps == [900, 700, 400, 200] and inputs.timesteps.dtype == torch.int64
    prev, x0 = step.reference_step(inputs)
    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(10)
    for i, t in enumerate(timesteps):
        alone = scheduler.step(inputs.model_output[i : i + 1], t, inputs.sample[i : i + 1], return_dict=False)
        assert torch.equal(prev[i : i + 1], alone[0]) and torch.equal(x0[i : i + 1], alone[1])
    # fastddim's side is one call with the (B,) tensor.
    record = step.run_step_impl(inputs, "fastddim", _tiny_plan())
    assert record["config"]["timestep"] == timesteps
    assert record["config"]["timestep_kind"] == step_kinds.PER_SAMPLE_TIMESTEP_KINDS["fastddim"]


def test_backward_reference_is_the_vector_jacobian_product():
    """eta 0, epsilon prediction, clipping at +-1: prev = a x0_c + b eps, x0 = (x - s eps) / r; the gradients of
    <g_prev, prev> + <g_x0, x0> have a closed form to check the reference (and so every implementation) against."""
    case = StepCase((2, 3, 4, 4), torch.float32, kind="backward")
    inputs = step.make_step_inputs(case, CPU, 10)
    grad_mo, grad_sample = step.reference_step(inputs)
    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(10)
    t = inputs.timestep
    alpha_t = scheduler.alphas_cumprod[t].double()
    alpha_prev = scheduler.alphas_cumprod[t - 100].double()
    eps, x = inputs.model_output.double(), inputs.sample.double()
    g_prev, g_x0 = (g.double() for g in inputs.grad_outputs)
    x0 = (x - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    inside = (x0.abs() < 1).double()  # clamp's gradient: 1 strictly inside the range
    # x0 returned is the clipped one; prev uses the clipped x0 and the model output as epsilon (diffusers re-derives
    # epsilon only with use_clipped_model_output).
    g_x0_total = g_x0 * inside + g_prev * alpha_prev.sqrt() * inside
    expected_mo = g_x0_total * (-(1 - alpha_t).sqrt() / alpha_t.sqrt()) + g_prev * (1 - alpha_prev).sqrt()
    expected_sample = g_x0_total / alpha_t.sqrt()
    torch.testing.assert_close(grad_mo.double(), expected_mo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_sample.double(), expected_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_exact_check_rejects_one_ulp(kind):
    """An implementation off by one ulp in fp32 fails the bit-exact check of the new kinds."""
    inputs = step.make_step_inputs(StepCase((2, 4, 8, 8), torch.float32, kind=kind), CPU, 10)
    good = step.STEP_IMPLEMENTATIONS["fastddim"].build

    def off_by_one_ulp(step_inputs: step.StepInputs) -> step.Prepared:
        prepared = good(step_inputs)

        def outputs() -> tuple[torch.Tensor, torch.Tensor]:
            first, second = prepared.outputs()
            return torch.nextafter(first, torch.full_like(first, float("inf"))), second

        return step.Prepared(fn=prepared.fn, outputs=outputs)

    record = step.run_step_impl(inputs, "fastddim", _tiny_plan(), builder=off_by_one_ulp)
    assert record["error"] is None
    assert not record["check"]["passed"] and "elements off" in record["check"]["detail"]


def test_backward_check_rejects_dropped_gradients():
    inputs = step.make_step_inputs(StepCase((2, 4, 8, 8), torch.float16, kind="backward"), CPU, 10)

    def no_gradients(step_inputs: step.StepInputs) -> step.Prepared:
        zeros = (torch.zeros_like(step_inputs.model_output), torch.zeros_like(step_inputs.sample))
        return step.Prepared(fn=lambda: zeros, outputs=lambda: zeros)

    record = step.run_step_impl(inputs, "fastddim", _tiny_plan(), builder=no_gradients)
    assert not record["check"]["passed"]


def test_step_case_rejects_kinds_it_cannot_run():
    with pytest.raises(ValueError, match="kind must be one of"):
        StepCase((1, 4, 8, 8), torch.float32, kind="reverse")
    with pytest.raises(ValueError, match="eta 0"):
        StepCase((1, 4, 8, 8), torch.float32, eta=1.0, kind="per-sample")
    with pytest.raises(ValueError, match="cannot threshold"):
        StepCase((1, 4, 8, 8), torch.float32, thresholding=True, kind="inverse")
    assert StepCase((2, 4, 8, 8), torch.float16, kind="backward").label == "2x4x8x8 fp16 eta=0 backward"


def test_plan_jobs_leave_torch_compile_to_the_forward_step():
    cases = [StepCase((2, 4, 8, 8), torch.float32), StepCase((2, 4, 8, 8), torch.float32, kind="inverse")]
    plan = Plan(cases, ("copy", "diffusers", "torch.compile", "fastddim"), [], ())
    jobs = [(case.kind, impl) for _, case, impl in runner.plan_jobs(plan)]
    assert ("step", "torch.compile") in jobs and ("inverse", "torch.compile") not in jobs
    assert ("inverse", "diffusers") in jobs and ("inverse", "fastddim") in jobs
    # The copy ceiling once per shape and dtype, whatever the kind.
    assert jobs.count(("step", "copy")) == 1 and ("inverse", "copy") not in jobs


def test_speedups_compare_within_a_kind():
    def rec(impl: str, kind: str, median_us: float) -> dict:
        return records.new_record(
            "step",
            impl=impl,
            shape=[2, 4, 8, 8],
            numel=512,
            dtype="fp32",
            config={"kind": kind, "eta": 0.0, "thresholding": False},
            median_us=median_us,
        )

    recs = [rec("diffusers", "step", 10.0), rec("diffusers", "backward", 100.0), rec("fastddim", "backward", 20.0)]
    step.finalize_step_records(recs)
    assert recs[2]["speedup_vs_diffusers"] == pytest.approx(5.0)
    # A record without a kind (results written before kinds existed) reads as a forward step.
    old = records.new_record("step", impl="fastddim", shape=[2, 4, 8, 8], numel=512, dtype="fp32")
    old.update(config={"eta": 0.0, "thresholding": False}, median_us=5.0)
    step.finalize_step_records([recs[0], old])
    assert old["speedup_vs_diffusers"] == pytest.approx(2.0)


def test_tiny_step_cases_cover_every_kind():
    assert {case.kind for case in TINY_STEP_CASES} == {"step", *NEW_KINDS}


# ------------------------------------------------------------------------------------------------ thresholded loops


def test_thresholded_loop_uses_a_thresholded_scheduler_and_its_own_share(monkeypatch):
    seen_configs, share_steps = [], []
    build = loop.LOOP_IMPLEMENTATIONS["diffusers"].build

    def spy(unet, scheduler_config, **kwargs):
        seen_configs.append(dict(scheduler_config))
        return build(unet, scheduler_config, **kwargs)

    def step_us(kind, shape, dtype, device, plan, *, thresholding=False):
        share_steps.append((kind, thresholding))
        return 50.0 if thresholding else 10.0

    monkeypatch.setitem(
        loop.LOOP_IMPLEMENTATIONS, "diffusers", dataclasses.replace(loop.LOOP_IMPLEMENTATIONS["diffusers"], build=spy)
    )
    monkeypatch.setattr(loop, "scheduler_step_us", step_us)
    plan = _tiny_plan()
    plan.num_inference_steps = 2
    thresholded = loop.run_loop_impl(LoopCase("tiny", 2, torch.float32, thresholding=True), "diffusers", CPU, plan)
    plain = loop.run_loop_impl(LoopCase("tiny", 2, torch.float32), "diffusers", CPU, plan)
    assert thresholded["error"] is None and plain["error"] is None
    assert seen_configs[0]["thresholding"] is True and seen_configs[0]["clip_sample"] is False
    assert "thresholding" not in seen_configs[1]
    assert thresholded["config"]["thresholding"] is True and thresholded["name"].endswith("thresholding/diffusers")
    # The share divides the thresholded step's own time (not a plain step's) by the loop time.
    assert share_steps == [("diffusers", True), ("diffusers", False)]
    assert thresholded["scheduler_share"] == pytest.approx(2 * 50.0 / thresholded["median_us"])
    assert loop.loop_key(thresholded) != loop.loop_key(plain)
    _assert_schema(thresholded)


def test_loop_cases_option_filters_by_label(tmp_path):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--only", "loop", "--loop-cases", "thresholding"])
    plan = runner.make_plan(args, CPU)
    assert [case.label for case in plan.loop_cases] == ["tiny batch=2 fp32 thresholding"]


# ------------------------------------------------------------------------------------------------ per-seed noise


def test_seeds_case_times_three_interleaved_modes(monkeypatch):
    calls = []
    pipeline_class, _ = loop.fastddim_pipeline_class()

    class Recording(pipeline_class):
        def __call__(self, *args, seeds=None, **kwargs):
            if seeds is not None:
                kwargs["seeds"] = seeds
            calls.append({k: v for k, v in kwargs.items() if k in ("seeds", "generator", "batch_size", "eta")})
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(loop, "fastddim_pipeline_class", lambda: (Recording, None))
    monkeypatch.setattr(per_seed, "fastddim_pipeline_class", lambda: (Recording, None))
    plan = _tiny_plan()
    plan.seeds_images = 4
    case = SeedsCase("tiny", 2, torch.float32, 2, 1.0)
    recs = per_seed.run_seeds_case(case, tuple(per_seed.SEEDS_MODES), CPU, plan)
    assert [r["impl"] for r in recs] == ["no-generator", "generator", "seeds"]
    for r in recs:
        assert r["error"] is None and r["skipped"] is None, r
        assert r["images"] == 4 and r["n_samples"] == 2 and r["images_per_s"] > 0
        assert r["config"]["eta"] == 1.0 and r["config"]["files_written"] is False
        _assert_schema(r)
    generator, seeds = recs[1], recs[2]
    assert generator["cost_vs_generator"] == pytest.approx(0.0)
    assert seeds["cost_vs_generator"] == pytest.approx(generator["images_per_s"] / seeds["images_per_s"] - 1)
    # One untimed call per mode, then each batch in every mode, the order rotated batch by batch.
    seeded = [c["seeds"] for c in calls if "seeds" in c]
    assert seeded == [[0, 1], [0, 1], [2, 3]]
    assert all(isinstance(c["generator"], torch.Generator) for c in calls if "generator" in c)
    modes = ["seeds" if "seeds" in c else "generator" if "generator" in c else "none" for c in calls]
    assert modes[3:6] == ["none", "generator", "seeds"] and modes[6:9] == ["generator", "seeds", "none"]


def test_seeds_case_skips_without_a_seeds_argument(monkeypatch):
    class NoSeeds:
        def __init__(self, unet, scheduler):
            pass

        def __call__(self, batch_size=1, generator=None, eta=0.0, num_inference_steps=50, output_type="pil"):
            raise AssertionError("not called")

    monkeypatch.setattr(per_seed, "fastddim_pipeline_class", lambda: (NoSeeds, None))
    recs = per_seed.run_seeds_case(
        SeedsCase("tiny", 2, torch.float32, 2, 0.0), ("generator", "seeds"), CPU, Plan([], (), [], ())
    )
    assert [records.outcome(r) for r in recs] == ["skipped", "skipped"]
    assert "no seeds argument" in recs[0]["skipped"]


def test_tiny_seeds_run_writes_its_table(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "bench"
    assert (
        command.run(
            parser.parse_args(["--tiny", "--only", "seeds", "--device", "cpu", "--no-plots", "--out", str(out)])
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert {r["benchmark"] for r in results["records"]} == {"seeds"}
    assert len(results["records"]) == 6 and results["settings"]["seeds_images"] == 4
    table = (out / "results.md").read_text()
    assert "## Per-seed noise" in table and "| tiny | 2 | fp32 | 2 | 1 | seeds | ok | 4 |" in table


# ------------------------------------------------------------------------------------------------ targets


def _by_target(checks: list[dict]) -> dict[str, dict]:
    return {check["target"]: check for check in checks}


def test_threshold_and_seeds_targets(targets):
    def graph_step(shape, dtype, thresholding, median_us, speedup=None, kind="step"):
        return records.new_record(
            "step",
            impl="fastddim-graph",
            shape=shape,
            numel=1,
            dtype=dtype,
            config={"kind": kind, "eta": 0.0, "thresholding": thresholding},
            median_us=median_us,
            speedup_vs_diffusers=speedup,
        )

    def seeds(cost, steps=10, eta=1.0):
        return records.new_record(
            "seeds",
            impl="seeds",
            model="cifar10-32",
            batch_size=256,
            dtype="fp16",
            num_inference_steps=steps,
            config={"eta": eta},
            median_us=1.0,
            cost_vs_generator=cost,
        )

    loop_record = records.new_record(
        "loop",
        impl="fastddim-graph",
        model="digits",
        batch_size=16,
        dtype="fp16",
        config={"eta": 0.0, "thresholding": True},
        median_us=1000.0,
        scheduler_share=0.004,
    )
    recs = [
        graph_step([16, 3, 64, 64], "fp32", True, 12.0, speedup=45.0),
        graph_step([16, 3, 64, 64], "fp32", False, 4.0),
        graph_step([4, 3, 256, 256], "fp16", True, 50.0, speedup=39.0),
        graph_step([4, 3, 256, 256], "fp16", False, 10.0),
        # Another kind at the same shape is not the plain step.
        graph_step([4, 3, 256, 256], "fp16", False, 1.0, kind="inverse"),
        loop_record,
        seeds(0.01),
        seeds(0.035, steps=50),
    ]
    checks = _by_target(targets.target_checks(recs))
    ratio = checks["thresholded step (CUDA graph) <= 4x a plain captured step at 16x3x64x64 fp32 and 4x3x256x256 fp16"]
    assert ratio["met"] is False and ratio["measured"] == "16x3x64x64 fp32: 3.00x; 4x3x256x256 fp16: 5.00x"
    vs_diffusers = checks[
        "thresholded step (CUDA graph) >= 40x diffusers' thresholded step at the same shapes, device time"
    ]
    assert vs_diffusers["met"] is False and "39.00x" in vs_diffusers["measured"]
    share = checks["pixel-space loop with thresholding: scheduler share <= 1 % (fastddim-graph)"]
    assert share["met"] is True and share["measured"] == "digits b16 fp16 thresholding: 0.4%"
    cost = checks["sampling at scale: per-seed noise costs <= 2 % of images/s against one generator (same loop)"]
    assert cost["met"] is False
    assert cost["measured"] == "cifar10-32 b256 fp16 10 steps eta 1: 1.0%; cifar10-32 b256 fp16 50 steps eta 1: 3.5%"
    # The older thresholded-step target compares plain forward steps only.
    older = checks["thresholded step: <= 2x a plain step (CUDA graph, device time)"]
    assert "4x3x256x256 fp16 eta 0: 5.00x" in older["measured"]


@pytest.mark.gpu
def test_tiny_seeds_and_thresholded_loop_runs_on_cuda(tmp_path):
    """The per-seed modes through the captured loop (eta 1: the pre-drawn step noises), and the thresholded tiny loop
    with its graph, eager and diffusers implementations."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    for only, extra in (("seeds", []), ("loop", ["--loop-cases", "thresholding", "--no-compile"])):
        out = tmp_path / only
        args = ["--tiny", "--only", only, *extra, "--device", "cuda", "--no-plots", "--out", str(out)]
        assert command.run(parser.parse_args(args)) == 0
        recs = json.loads((out / "results.json").read_text())["records"]
        assert recs and all(records.outcome(r) == "ok" for r in recs), recs
        if only == "loop":
            graph = next(r for r in recs if r["impl"] == "fastddim-graph")
            assert graph["config"]["thresholding"] and 0 < graph["scheduler_share"] < 1
