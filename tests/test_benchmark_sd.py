"""CPU tests of the text-to-image loop benchmark (`fastddim.benchmark.sd`) and the physical-limit rows
(`fastddim.benchmark.limit`) of both loop benchmarks; speed is never asserted."""

import argparse
import functools
import json
import types

import pytest
import torch

from fastddim.benchmark import command, limit, loop, records, runner, sd
from fastddim.benchmark.cases import GPU_SD_CASES, Implementation, LoopCase, Plan, SDCase

CPU = torch.device("cpu")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def _tiny_plan() -> Plan:
    plan = Plan([], (), [], ())
    plan.rounds, plan.target_round_s, plan.max_calls = 2, 0.001, 5
    plan.sd_rounds = 1
    return plan


def test_tiny_sd_run_checks_times_and_tabulates(tmp_path):
    """``--tiny --only sd`` on the CPU: diffusers, fastddim's eager loop (bit-identical in fp32) and the limit, for an
    SD-like and an SDXL-like tiny UNet."""
    assert _run(["--tiny", "--only", "sd", "--device", "cpu", "--no-plots", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    recs = results["records"]
    assert {r["benchmark"] for r in recs} == {"sd"}
    assert results["settings"]["sd_impls"] == ["diffusers", "fastddim-eager", "unet-limit"]
    assert {(r["model"], r["batch_size"]) for r in recs} == {("tiny-sd", 2), ("tiny-sdxl", 1)}
    for record in recs:
        assert set(record) == set(records.RECORD_KEYS + records.SD_KEYS), record["name"]
        assert records.outcome(record) == "ok", record
        assert record["images_per_s"] > 0 and record["ms_per_step"] > 0
        assert record["limit_us"] > 0 and record["vs_limit"] == pytest.approx(record["median_us"] / record["limit_us"])
        assert record["guidance_scale"] == 7.5 and record["config"]["eta"] == 0.0
    for record in (r for r in recs if r["impl"] == "fastddim-eager"):
        # Same components, same inputs, fp32 on the CPU: diffusers' latents, bit for bit.
        assert record["check"]["passed"] and record["check"]["rel_l2_err"] == 0.0, record["check"]
        assert record["speedup_vs_diffusers"] > 0
    limits = [r for r in recs if r["impl"] == "unet-limit"]
    assert len(limits) == 2 and all(r["vs_limit"] == 1.0 for r in limits)
    assert all(r["timing_method"] == limit.LIMIT_METHOD_CPU for r in limits)
    xl = next(r for r in recs if r["model"] == "tiny-sdxl" and r["impl"] == "diffusers")
    assert xl["shape"] == [1, 4, 8, 8] and xl["check"] is None
    table = (tmp_path / "results.md").read_text()
    assert (
        "## Text-to-image loop" in table and "| tiny-sdxl | 1 | fp32 | 2 | fastddim-eager | pass | 0.0e+00 |" in table
    )


@pytest.mark.parametrize(
    ("model", "impl"),
    [("tiny-sd", "fastddim-graph"), ("tiny-sd", "fastddim-graph-compiled"), ("tiny-sdxl", "fastddim-graph")],
)
def test_sd_graph_impls_on_stand_in_graphs(monkeypatch, stand_in_graphs, model, impl):
    """The captured text-to-image loops through the harness on the CPU stand-in for capture (tests/conftest.py),
    torch.compile on its ``eager`` backend: one capture, diffusers' latents, no eager fallback, a capture time."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    record = sd.run_sd_impl(SDCase(model, 1, torch.float32, 2), impl, CPU, _tiny_plan())
    assert record["error"] is None and record["skipped"] is None, record["error"]
    assert record["check"]["passed"] and record["check"]["rel_l2_err"] < 1e-6, record["check"]
    assert record["capture_s"] is not None and record["images_per_s"] > 0
    assert len(stand_in_graphs) == 1


def test_sd_impl_error_is_recorded_not_raised(monkeypatch):
    def broken(family, unet):
        raise RuntimeError("no pipeline")

    monkeypatch.setitem(sd.SD_IMPLEMENTATIONS, "fastddim-eager", Implementation("fastddim-eager", broken))
    record = sd.run_sd_impl(SDCase("tiny-sd", 1, torch.float32, 2), "fastddim-eager", CPU, _tiny_plan())
    assert record["error"] == "RuntimeError: no pipeline" and records.outcome(record) == "error"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_check_latents_bound(dtype):
    torch.manual_seed(0)
    reference = torch.randn(2, 4, 8, 8).to(dtype)
    bound = sd.SD_CHECK_BOUNDS[dtype]
    close = reference + (0.2 * bound) * reference.std() * torch.randn_like(reference.float()).to(dtype)
    assert sd.check_latents(close, reference, dtype)["passed"]
    wrong = sd.check_latents(reference * (1 + 3 * bound), reference, dtype)
    assert not wrong["passed"] and wrong["detail"].startswith("relative L2 error")
    assert wrong["rel_l2_err"] == pytest.approx(3 * bound, rel=0.05)
    nan = reference.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not sd.check_latents(nan, reference, dtype)["passed"]
    assert not sd.check_latents(reference[:1], reference, dtype)["passed"]


def test_sd_architectures_are_the_real_ones():
    """The configs build the SD1.5 and SDXL base UNets: their parameter counts (on the meta device, no memory)."""
    from diffusers import UNet2DConditionModel

    counts = {}
    for model in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**sd.SD_MODELS[model][0])
        counts[model] = sum(p.numel() for p in unet.parameters())
    assert counts == {"sd15": 859_520_964, "sdxl": 2_567_463_684}


def test_sd_inputs_and_unet_call_shapes():
    case = SDCase("tiny-sdxl", 2, torch.float32, 2)
    unet = sd.load_sd_unet("tiny-sdxl", CPU, torch.float32)
    inputs = sd.make_sd_inputs(case, unet, CPU)
    assert inputs.latents.shape == (2, 4, 8, 8) and inputs.prompt_embeds.shape == (2, sd.PROMPT_TOKENS, 64)
    assert inputs.pooled_prompt_embeds.shape == (2, 32)
    assert not torch.equal(inputs.prompt_embeds, inputs.negative_prompt_embeds)
    # The CFG batch: twice the images.
    assert sd.unet_call(case, unet, inputs, CPU)().shape == (4, 4, 8, 8)
    arguments = sd.call_arguments(case, inputs)
    assert arguments["height"] == arguments["width"] == 8 * sd.VAE_SCALE_FACTOR
    assert arguments["output_type"] == "latent" and "negative_pooled_prompt_embeds" in arguments
    # The full SDXL architecture's pooled embedding: 2816 - 6 x 256 = 1280, as CLIP-G's projection.
    config = types.SimpleNamespace(
        sample_size=128,
        in_channels=4,
        cross_attention_dim=2048,
        **{
            k: sd.SDXL_UNET_CONFIG[k]
            for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
        },
    )
    full = sd.make_sd_inputs(SDCase("sdxl", 1, torch.float16, 2), types.SimpleNamespace(config=config), CPU)
    assert full.pooled_prompt_embeds.shape == (1, 1280) and full.latents.shape == (1, 4, 128, 128)
    with pytest.raises(ValueError, match="model: expected one of"):
        sd.load_sd_unet("sd3", CPU, torch.float32)


def test_sd_plan_order_and_filters():
    cuda = torch.device("cuda", 0)
    full = runner.make_plan(_parse([]), cuda)
    assert full.sd_cases == GPU_SD_CASES
    assert set(full.sd_impls) == set(sd.SD_IMPLEMENTATIONS)
    assert {(c.model, c.batch_size, c.num_inference_steps) for c in full.sd_cases} >= {
        ("sd15", 1, 30),
        ("sd15", 1, 50),
        ("sd15", 4, 30),
        ("sd15", 4, 50),
        ("sdxl", 1, 30),
    }
    jobs = runner.plan_jobs(runner.make_plan(_parse(["--only", "sd"]), cuda))
    compiles = runner.compiled_impls()
    assert {"compile-reduce-overhead", "fastddim-graph-compiled"} <= compiles
    compiled = [job for job in jobs if job[2] in compiles]
    assert jobs[-len(compiled) :] == compiled and all(job[1].dtype == torch.float16 for job in compiled)
    # Batch 1 first, the SD1.5 architecture before SDXL, each case's two compiled loops together.
    assert [job[1].batch_size for job in compiled] == sorted(job[1].batch_size for job in compiled)
    assert compiled[0][1] == compiled[1][1] == SDCase("sd15", 1, torch.float16, 30)
    assert {job[0] for job in jobs} == {"sd"}
    # Off CUDA: no graphs, no compile; --quick on a CPU has no SD1.5-sized case; --steps replaces the steps.
    assert runner.make_plan(_parse(["--quick"]), CPU).sd_cases == []
    tiny = runner.make_plan(_parse(["--tiny", "--steps", "3"]), CPU)
    assert tiny.sd_impls == ("diffusers", "fastddim-eager", "unet-limit")
    assert {case.num_inference_steps for case in tiny.sd_cases} == {3}
    assert runner.make_plan(_parse(["--only", "loop"]), cuda).sd_cases == []
    picked = runner.make_plan(_parse(["--only", "sd", "--sd-cases", "sdxl|fp32"]), cuda).sd_cases
    assert picked == [SDCase("sdxl", 1, torch.float16, 30), SDCase("sd15", 1, torch.float32, 30)]
    assert [c.batch_size for c in runner.make_plan(_parse(["--sd-cases", "sd15 .* fp16"]), cuda).sd_cases] == [
        1,
        1,
        4,
        4,
    ]
    with pytest.raises(SystemExit):
        _parse(["--sd-cases", "("])


def test_compiled_sd_cases_past_the_budget_are_skipped(tmp_path):
    plan = _tiny_plan()
    plan.sd_cases, plan.sd_impls, plan.budget_s = (
        [SDCase("tiny-sd", 1, torch.float16, 2)],
        ("fastddim-graph-compiled",),
        -1.0,
    )
    [record] = runner.run_benchmarks(plan, CPU, tmp_path, plots=False)["records"]
    assert record["benchmark"] == "sd" and record["skipped"].startswith("time budget")
    assert set(record) == set(records.RECORD_KEYS + records.SD_KEYS)


def test_sd_speedups_and_limit_ratio():
    def sd_record(impl: str, median_us: float, steps: int = 30) -> dict:
        return records.new_record(
            "sd", impl=impl, model="sd15", batch_size=1, dtype="fp16", num_inference_steps=steps, median_us=median_us
        )

    recs = [
        sd_record("diffusers", 3000.0),
        sd_record("compile-reduce-overhead", 1500.0),
        sd_record("fastddim-graph", 1050.0),
        sd_record("unet-limit", 1000.0),
        sd_record("fastddim-graph", 2000.0, steps=50),  # another configuration: no baselines, no limit
    ]
    sd.finalize_sd_records(recs)
    assert recs[2]["speedup_vs_diffusers"] == pytest.approx(3000 / 1050)
    assert recs[2]["speedup_vs_compile_reduce_overhead"] == pytest.approx(1500 / 1050)
    assert recs[2]["vs_limit"] == pytest.approx(1.05) and recs[2]["limit_us"] == 1000.0
    assert recs[3]["speedup_vs_diffusers"] is None
    assert recs[4]["speedup_vs_diffusers"] is None and recs[4]["vs_limit"] is None


def test_unconditional_loop_limit_row():
    """The limit of the unconditional loop: N x one UNet call on the batch; loop records get loop time / limit."""
    plan = _tiny_plan()
    plan.num_inference_steps = 4
    case = LoopCase("tiny", 2, torch.float32)
    record = loop.run_loop_impl(case, "unet-limit", CPU, plan)
    assert records.outcome(record) == "ok", record["error"]
    assert record["shape"] == [2, 1, 8, 8] and record["timing_method"] == limit.LIMIT_METHOD_CPU
    assert record["ms_per_step"] == pytest.approx(record["median_us"] * 1e-3 / 4)
    other = records.new_record("loop", impl="diffusers", model="tiny", batch_size=2, dtype="fp32", median_us=1.0)
    other["median_us"] = 3 * record["median_us"]
    loop.finalize_loop_records([record, other])
    assert other["vs_limit"] == pytest.approx(3.0) and record["vs_limit"] == 1.0


def test_captured_call_device_time_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        limit.captured_call_device_us(lambda: None, CPU)


@pytest.mark.gpu
def test_tiny_sd_run_on_cuda(tmp_path):
    """Every text-to-image implementation but torch.compile's on CUDA: checks pass, the graph does not fall back, the
    limit is device time of a captured UNet call."""
    argv = ["--tiny", "--only", "sd", "--device", "cuda", "--no-plots", "--no-compile", "--out", str(tmp_path)]
    assert _run(argv) == 0
    recs = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {r["impl"] for r in recs} == {"diffusers", "fastddim-eager", "fastddim-graph", "unet-limit"}
    for record in recs:
        assert records.outcome(record) == "ok", record
        assert record["peak_mem_mib"] is not None or record["impl"] == "unet-limit"
    assert all(r["timing_method"] == limit.LIMIT_METHOD_CUDA for r in recs if r["impl"] == "unet-limit")


@pytest.mark.gpu
def test_captured_call_device_time_on_cuda():
    x = torch.randn(1 << 20, device="cuda")
    samples = limit.captured_call_device_us(lambda: x * 2, torch.device("cuda", torch.cuda.current_device()), rounds=3)
    assert len(samples) == 3 and all(sample > 0 for sample in samples)
