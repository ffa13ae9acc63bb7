"""The interleaved eager-loop benchmark (`fastddim.benchmark.eager`) and its target in bench/targets.py (CPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from fastddim.benchmark import command, eager, records, runner
from fastddim.benchmark.cases import LoopCase, Plan, SDCase

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


def _plan(rounds: int) -> Plan:
    plan = Plan([], (), [], (), num_inference_steps=2)
    plan.eager_rounds = rounds
    return plan


@pytest.mark.parametrize("case", [LoopCase("tiny", 2, torch.float32), SDCase("tiny-sd", 1, torch.float32, 2)])
def test_eager_case_checks_then_times_both_loops(case):
    recs = eager.run_eager_case(case, CPU, _plan(3))
    assert [r["impl"] for r in recs] == list(eager.EAGER_IMPLS)
    diffusers_record, fastddim_record = recs
    for record in recs:
        assert record["error"] is None, record["error"]
        assert set(record) == set(records.RECORD_KEYS + records.EAGER_KEYS)
        assert record["n_samples"] == 3 and record["ms_per_step"] > 0 and record["images_per_s"] > 0
        assert record["num_inference_steps"] == 2 and record["shape"][0] == case.batch_size
    # Same components and initial noise on the CPU in fp32: the two loops agree bit for bit.
    assert fastddim_record["check"]["passed"] and fastddim_record["check"]["rel_l2_err"] == 0.0
    assert diffusers_record["check"] is None and diffusers_record["speedup_vs_diffusers"] == 1.0
    paired = fastddim_record["paired_speedup_vs_diffusers"]
    assert fastddim_record["paired_speedup_p20"] <= paired <= fastddim_record["paired_speedup_p80"]
    assert fastddim_record["speedup_vs_diffusers"] == pytest.approx(
        diffusers_record["median_us"] / fastddim_record["median_us"]
    )


def test_rounds_alternate_the_order(monkeypatch):
    calls = []

    def fake_calls(case, device, steps):
        def call(impl):
            def run():
                calls.append(impl)
                return torch.ones(1, 1, 2, 2)

            return run

        return {impl: call(impl) for impl in eager.EAGER_IMPLS}

    monkeypatch.setattr(eager, "_loop_calls", fake_calls)
    recs = eager.run_eager_case(LoopCase("tiny", 1, torch.float32), CPU, _plan(4))
    assert all(r["error"] is None for r in recs)
    d, f = eager.EAGER_IMPLS
    # The checked first call of each, then AB, BA, AB, BA.
    assert calls == [d, f, d, f, f, d, d, f, f, d]


def test_a_wrong_eager_loop_fails_its_check(monkeypatch):
    def fake_calls(case, device, steps):
        outputs = {"diffusers": torch.ones(1, 1, 2, 2), "fastddim-eager": torch.full((1, 1, 2, 2), 2.0)}
        return {impl: (lambda out=out: out) for impl, out in outputs.items()}

    monkeypatch.setattr(eager, "_loop_calls", fake_calls)
    fastddim_record = eager.run_eager_case(LoopCase("tiny", 1, torch.float32), CPU, _plan(2))[1]
    assert fastddim_record["check"]["passed"] is False and records.outcome(fastddim_record) == "failed"


def test_a_failing_case_is_an_error_in_both_records(monkeypatch):
    def broken(case, device, steps):
        raise RuntimeError("no UNet")

    monkeypatch.setattr(eager, "_loop_calls", broken)
    recs = eager.run_eager_case(LoopCase("tiny", 1, torch.float32), CPU, _plan(2))
    assert [r["error"] for r in recs] == ["RuntimeError: no UNet"] * 2


def test_paired_speedup_is_the_median_of_per_round_ratios():
    record = eager.new_eager_record(LoopCase("tiny", 1, torch.float32), "fastddim-eager")
    # Round 3 ran while the machine was slow for both: per round, fastddim is 1.25x faster throughout.
    eager.fill_paired_speedup(record, [100.0, 100.0, 500.0, 100.0, 100.0], [80.0, 80.0, 400.0, 80.0, 80.0])
    assert record["paired_speedup_vs_diffusers"] == pytest.approx(1.25)
    assert record["paired_speedup_p20"] == pytest.approx(1.25) and record["paired_speedup_p80"] == pytest.approx(1.25)
    assert record["speedup_vs_diffusers"] == pytest.approx(100.0 / 80.0)


def test_plan_and_command_line():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    plan = runner.make_plan(parser.parse_args(["--tiny", "--only", "eager", "--steps", "3"]), CPU)
    assert not (plan.step_cases or plan.loop_cases or plan.sd_cases or plan.seeds_cases)
    assert [case.label for case in plan.eager_cases] == ["tiny batch=1 fp32", "tiny-sd batch=1 fp32 steps=3 cfg=7.5"]
    jobs = runner.plan_jobs(plan)
    assert [(benchmark, impl) for benchmark, _, impl in jobs] == [("eager", runner.EAGER_JOB)] * 2
    # Every other benchmark leaves the eager cases out.
    assert not runner.make_plan(parser.parse_args(["--tiny", "--only", "loop"]), CPU).eager_cases


def _eager_record(pipeline: str, paired: float, p80: float) -> dict:
    return records.new_record(
        "eager",
        impl="fastddim-eager",
        model="digits",
        batch_size=1,
        dtype="fp32",
        num_inference_steps=50,
        config={"eta": 0.0, "pipeline": pipeline},
        median_us=1000.0,
        paired_speedup_vs_diffusers=paired,
        paired_speedup_p80=p80,
    )


@pytest.mark.parametrize(
    ("paired", "p80", "met"),
    [(1.02, 1.05, True), (0.99, 1.01, True), (0.99, 0.995, False), (0.95, 1.10, False)],
)
def test_eager_target_reads_the_paired_records(targets, paired, p80, met):
    loop_record = records.new_record(
        "loop", impl="fastddim-eager", model="digits", batch_size=1, dtype="fp32", median_us=1.0
    )
    loop_record.update(config={}, speedup_vs_diffusers=0.5)
    checks = targets.target_checks([_eager_record("unconditional", paired, p80), loop_record])
    check = next(c for c in checks if c["target"].startswith("fastddim-eager never slower"))
    # The interleaved records decide; the loop table's ratio of medians (0.5x here) is not read beside them.
    assert check["met"] is met
    assert check["measured"] == f"unconditional digits b1 fp32 50 steps: {paired:.2f}x"


@pytest.mark.gpu
def test_tiny_eager_run_on_cuda(tmp_path):
    """Both tiny eager cases on CUDA: fastddim's eager loop (the Triton step) within the fp32 bound of diffusers'."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "eager"
    args = parser.parse_args(["--tiny", "--only", "eager", "--device", "cuda", "--no-plots", "--out", str(out)])
    assert command.run(args) == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert len(recs) == 4 and all(records.outcome(r) == "ok" for r in recs), recs
