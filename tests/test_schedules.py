"""Custom and quadratic schedules, and the previous timestep taken from the schedule (``fastddim.schedules``).

The oracle for the schedule-following step is a plain float64 PyTorch rendering of the DDIM paper's update, eq. (12)
with sigma from eq. (16), over the sub-sequence tau of section 4.2:
x_{tau_{i+1}} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z, a_prev = alpha_{tau_{i+1}} (the final
alpha past the last entry). fastddim computes in fp32 from fp32 alphas: compared with a relative tolerance of a few
fp32 ulps of the values (1e-5 on O(1) samples; each coefficient is a handful of correctly rounded fp32 operations).
With ``prev_timestep_from_schedule=False`` a custom schedule must do exactly what diffusers' formula t - T // N does:
compared bit for bit with diffusers stepping the same timesteps with the same N.
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler

from fastddim import DDIMScheduler, reference, schedules
from tests.helpers import BACKEND_DEVICES, host_syncs_forbidden

pytestmark = pytest.mark.interpreter


def paper_step(
    x: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_prev: float, eta: float, z: torch.Tensor
) -> torch.Tensor:
    """DDIM eq. (12) with sigma of eq. (16), in float64, epsilon prediction, no clipping."""
    x, eps, z = x.double(), eps.double(), z.double()
    x0 = (x - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    sigma = eta * ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5 * (1 - alpha_t / alpha_prev) ** 0.5
    return alpha_prev**0.5 * x0 + max(1 - alpha_prev - sigma**2, 0.0) ** 0.5 * eps + sigma * z


def model(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.sin(2.0 * x + t / 50.0)


# ----------------------------------------------------------------------------------------------- quad


def test_quad_is_the_papers_quadratic_skip_without_repeats():
    for num_train_timesteps, n in [(1000, 10), (1000, 50), (1000, 100), (1000, 500), (500, 7)]:
        paper = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), n) ** 2).astype(int)  # ermongroup/ddim
        ours = schedules.spaced_timesteps("quad", num_train_timesteps, n, 0)
        assert ours.tolist() == sorted(set(paper.tolist()), reverse=True)
        assert (np.diff(ours) < 0).all() and ours[-1] == 0 and ours[0] == paper[-1]
        assert len(ours) == n if len(set(paper.tolist())) == n else len(ours) < n


def test_quad_set_timesteps_reports_the_number_of_distinct_steps():
    scheduler = DDIMScheduler(timestep_spacing="quad")
    scheduler.set_timesteps(100)
    assert scheduler.num_inference_steps == len(scheduler.timesteps) < 100
    assert len(set(scheduler.timesteps.tolist())) == len(scheduler.timesteps)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [0]


# ----------------------------------------------------------------------------------------------- custom


def test_custom_timesteps():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(timesteps=[900, 451, 20, 3])
    assert scheduler.timesteps.dtype == torch.int64 and scheduler.timesteps.tolist() == [900, 451, 20, 3]
    assert scheduler.num_inference_steps == 4
    scheduler.set_timesteps(timesteps=torch.tensor([5, 0], dtype=torch.int32))
    assert scheduler.timesteps.tolist() == [5, 0]
    scheduler.set_timesteps(timesteps=np.array([999]))
    assert scheduler.num_inference_steps == 1


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"timesteps": [10, 20]}, ValueError, "strictly descending"),
        ({"timesteps": [20, 20, 10]}, ValueError, "strictly descending"),
        ({"timesteps": [1000, 10]}, ValueError, r"timesteps must lie in \[0, num_train_timesteps"),
        ({"timesteps": [10, -1]}, ValueError, "timesteps must lie"),
        ({"timesteps": []}, ValueError, "timesteps must be a non-empty"),
        ({"timesteps": [10.0, 5.0]}, TypeError, "timesteps must be a sequence of ints"),
        ({"timesteps": torch.tensor([10.0])}, TypeError, "timesteps must hold integers"),
        ({"timesteps": "900"}, TypeError, "timesteps must be a sequence of ints"),
        ({"timesteps": [900, 10], "num_inference_steps": 2}, ValueError, "either num_inference_steps or timesteps"),
        ({}, ValueError, "needs num_inference_steps or timesteps"),
    ],
)
def test_custom_timesteps_errors_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        DDIMScheduler().set_timesteps(**kwargs)


def _retrieve_timesteps(scheduler, num_inference_steps=None, device=None, timesteps=None):
    """What diffusers' ``retrieve_timesteps`` (Stable Diffusion pipelines, 0.42) does, for when transformers, which
    its module imports, is not installed: it checks ``set_timesteps``' signature for ``timesteps``."""
    if timesteps is not None:
        if "timesteps" not in set(inspect.signature(scheduler.set_timesteps).parameters.keys()):
            raise ValueError("does not support custom timestep schedules")
        scheduler.set_timesteps(timesteps=timesteps, device=device)
        return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, num_inference_steps


def test_retrieve_timesteps_accepts_custom_schedules():
    """Stable Diffusion pipelines' ``retrieve_timesteps(timesteps=...)`` checks the signature for ``timesteps``."""
    scheduler = DDIMScheduler()
    assert "timesteps" in inspect.signature(scheduler.set_timesteps).parameters
    with pytest.raises(ValueError, match="custom timestep"):
        _retrieve_timesteps(DiffusersDDIMScheduler(), timesteps=[999, 1])
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
    except ImportError:  # transformers absent: the replica above
        retrieve_timesteps = _retrieve_timesteps
    timesteps, num_inference_steps = retrieve_timesteps(scheduler, timesteps=[999, 700, 300, 1], device="cpu")
    assert timesteps.tolist() == [999, 700, 300, 1] and num_inference_steps == 4
    timesteps, num_inference_steps = retrieve_timesteps(scheduler, 5, "cpu")
    assert num_inference_steps == 5 and timesteps.tolist() == [800, 600, 400, 200, 0]


@pytest.mark.parametrize("custom", [[999, 700, 300, 1], [950, 949, 400, 50, 10], "quad"])
def test_custom_and_quad_with_diffusers_formula_match_diffusers(backend, custom):
    """prev_timestep_from_schedule=False: t - T // N, exactly what diffusers' step computes for the same t and N."""
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler(timestep_spacing="quad" if custom == "quad" else "leading")
    if custom == "quad":
        scheduler.set_timesteps(20)
    else:
        scheduler.set_timesteps(timesteps=custom)
    reference_scheduler = DiffusersDDIMScheduler()
    reference_scheduler.set_timesteps(scheduler.num_inference_steps)  # diffusers' step reads only N
    x = y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)
    noises = torch.randn(len(scheduler.timesteps), 2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for t, noise in zip(scheduler.timesteps.tolist(), noises, strict=True):
        x = scheduler.step(model(x, t), t, x, eta=0.5, variance_noise=noise.to(device)).prev_sample
        y = reference_scheduler.step(model(y, t), t, y, eta=0.5, variance_noise=noise.to(device)).prev_sample
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------- prev from schedule


@pytest.mark.parametrize(
    "spacing, schedule",
    [("linspace", 10), ("trailing", 7), ("quad", 25), ("leading", 10), ("custom", [990, 720, 719, 300, 42, 1])],
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_prev_timestep_from_schedule_follows_the_paper(backend, spacing, schedule, eta):
    device = BACKEND_DEVICES[backend]
    config = dict(prev_timestep_from_schedule=True, clip_sample=False, set_alpha_to_one=False)
    scheduler = DDIMScheduler(**config, timestep_spacing="leading" if spacing == "custom" else spacing)
    if spacing == "custom":
        scheduler.set_timesteps(timesteps=schedule)
    else:
        scheduler.set_timesteps(schedule)
    alphas = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    timesteps = scheduler.timesteps.tolist()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=generator)
    ours = x.to(device)
    for i, t in enumerate(timesteps):
        z = torch.randn(x.shape, generator=generator)
        alpha_prev = float(alphas[timesteps[i + 1]]) if i + 1 < len(timesteps) else final
        eps = model(ours, t)
        expected = paper_step(ours.cpu(), eps.cpu(), float(alphas[t]), alpha_prev, eta, z)
        ours = scheduler.step(eps, t, ours, eta=eta, variance_noise=z.to(device)).prev_sample
        torch.testing.assert_close(ours.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_prev_from_schedule_equals_diffusers_for_leading_spacing():
    """For leading spacing the schedule's next entry is t - T // N: the flag changes nothing, bit for bit."""
    flagged, plain = DDIMScheduler(prev_timestep_from_schedule=True), DDIMScheduler()
    for n in (1, 7, 10, 50):
        flagged.set_timesteps(n)
        plain.set_timesteps(n)
        assert torch.equal(flagged.coefficient_table("cpu", 0.3), plain.coefficient_table("cpu", 0.3))


def test_table_rows_of_the_schedule_step_to_the_next_entry():
    scheduler = DDIMScheduler(timestep_spacing="linspace", prev_timestep_from_schedule=True)
    scheduler.set_timesteps(10)  # 999, 888, 777, ..., 0: diffusers' stride 100 lands between entries
    table = scheduler.coefficient_table("cpu")
    alphas = scheduler.alphas_cumprod
    for t, prev in zip(scheduler.timesteps[:-1].tolist(), scheduler.timesteps[1:].tolist(), strict=True):
        assert table[t, 2] == alphas[prev] ** 0.5
    assert table[0, 2] == scheduler.final_alpha_cumprod**0.5
    # Rows off the schedule keep diffusers' formula.
    plain = reference.build_coefficient_table(alphas, scheduler.final_alpha_cumprod, 10, 0.0)
    assert torch.equal(table[500], plain[500])
    # A new schedule makes a new table (cached by schedule, not only by N).
    scheduler.set_timesteps(timesteps=[999, 500, 0])
    scheduler.set_timesteps(10)
    assert torch.equal(scheduler.coefficient_table("cpu"), table)
    scheduler.set_timesteps(timesteps=[999, 500, 0, 1][:3])
    assert scheduler.coefficient_table("cpu")[999, 2] == alphas[500] ** 0.5


def test_config_round_trip_of_the_new_options(tmp_path):
    scheduler = DDIMScheduler(timestep_spacing="quad", prev_timestep_from_schedule=True)
    scheduler.save_config(tmp_path)
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    assert loaded.config.timestep_spacing == "quad" and loaded.config.prev_timestep_from_schedule is True
    assert DDIMScheduler().config.prev_timestep_from_schedule is False


@pytest.mark.gpu
def test_schedule_following_loop_is_sync_free_and_capturable():
    scheduler = DDIMScheduler(timestep_spacing="quad", prev_timestep_from_schedule=True)
    scheduler.set_timesteps(20, device="cuda")
    start = torch.randn(2, 4, 16, 16, device="cuda")

    def loop(x: torch.Tensor) -> torch.Tensor:
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, 0), t, x).prev_sample
        return x

    eager = loop(start)
    with host_syncs_forbidden():
        loop(start)
    static = start.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = loop(static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
