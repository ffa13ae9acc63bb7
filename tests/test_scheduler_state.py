"""Scheduler state that diffusers reads at call time, and usage errors with a clear remedy.

- ``alphas_cumprod`` / ``final_alpha_cumprod`` assigned (or changed in place) after construction: diffusers' step
  uses the new values, so fastddim's tables must follow them; diffusers' ``add_noise`` replacing alphas_cumprod by
  its copy on the samples' device must not trigger a rebuild (a host sync per call on a GPU).
- eta > 1: diffusers returns NaN where 1 - alpha_prev - sigma^2 < 0; fastddim keeps the finite result and warns once.
- ``TRITON_INTERPRET=1`` set after ``import fastddim``: a clear error naming the variable.
"""

import subprocess
import sys
import warnings

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler

from fastddim import DDIMInverseScheduler, DDIMScheduler, reference
from tests.helpers import BACKEND_DEVICES, REPO_ROOT, host_syncs_forbidden

pytestmark = pytest.mark.interpreter


def _pair_step(ours, theirs, device, t=501, **kwargs):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 4, generator=generator).to(device)
    model_output = torch.randn(2, 3, 4, generator=generator).to(device)
    return ours.step(model_output, t, sample, **kwargs), theirs.step(model_output, t, sample, **kwargs)


@pytest.mark.parametrize("change", ["assign", "in_place", "final"])
def test_assigned_alphas_cumprod_is_honoured(backend, change):
    device = BACKEND_DEVICES[backend]
    ours, theirs = DDIMScheduler(clip_sample=False), DiffusersDDIMScheduler(clip_sample=False)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    before, _ = _pair_step(ours, theirs, device, t=1)
    for scheduler in (ours, theirs):
        if change == "assign":
            scheduler.alphas_cumprod = scheduler.alphas_cumprod**1.5
        elif change == "in_place":
            scheduler.alphas_cumprod.mul_(0.9)
        else:
            scheduler.final_alpha_cumprod = torch.tensor(0.99995)
    after, expected = _pair_step(ours, theirs, device, t=1)
    assert not torch.equal(after.prev_sample, before.prev_sample)
    assert torch.equal(after.prev_sample, expected.prev_sample)
    assert torch.equal(after.pred_original_sample, expected.pred_original_sample)


def test_inverse_scheduler_follows_alphas_cumprod_too():
    scheduler = DDIMInverseScheduler()
    scheduler.set_timesteps(10)
    table = scheduler.coefficient_table("cpu")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod * 0.5
    assert not torch.equal(scheduler.coefficient_table("cpu"), table)
    assert scheduler.coefficient_table("cpu")[500, 2] == (scheduler.alphas_cumprod[500]) ** 0.5


def test_add_noise_moving_alphas_cumprod_does_not_rebuild_tables(monkeypatch):
    """diffusers' add_noise assigns ``alphas_cumprod.to(samples' device)``: the same values, so no rebuild (on a GPU,
    re-reading them would be a host sync). Simulated on the CPU by a move that returns a new tensor object."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    table = scheduler.coefficient_table("cpu", 0.0)
    real_add_noise = DiffusersDDIMScheduler.add_noise

    def moving_add_noise(self, original_samples, noise, timesteps):
        self.alphas_cumprod = self.alphas_cumprod.clone()  # what .to(other_device) does to the object
        return real_add_noise(self, original_samples, noise, timesteps)

    monkeypatch.setattr(DiffusersDDIMScheduler, "add_noise", moving_add_noise)
    builds = []
    real_build = reference.build_coefficient_table
    monkeypatch.setattr(reference, "build_coefficient_table", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    x = torch.randn(2, 3)
    moved = scheduler.add_noise(x, x, torch.tensor([10, 20]))
    assert torch.equal(moved, real_add_noise(DiffusersDDIMScheduler(), x, x, torch.tensor([10, 20])))
    assert scheduler.coefficient_table("cpu", 0.0) is table and builds == []
    # A real assignment afterwards still counts.
    scheduler.alphas_cumprod = scheduler.alphas_cumprod * 0.99
    assert scheduler.coefficient_table("cpu", 0.0) is not table and builds == [1]


def test_eta_above_one_is_finite_and_warns_once(backend):
    device = BACKEND_DEVICES[backend]
    ours, theirs = DDIMScheduler(), DiffusersDDIMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).to(device)
    with pytest.warns(UserWarning, match="eta = 2.0 > 1") as record:
        out, expected = _pair_step(ours, theirs, device, t=901, eta=2.0, variance_noise=noise)
    assert len(record) == 1 and record[0].filename == __file__  # stacklevel points at the caller
    assert expected.prev_sample.isnan().all() and torch.isfinite(out.prev_sample).all()
    # The direction term at its limit 0: x_{t-1} = sqrt(alpha_prev) x_0 + sigma z.
    row = ours.coefficient_table("cpu", 2.0)[901]
    assert row[4] == 0
    torch.testing.assert_close(out.prev_sample, row[2] * out.pred_original_sample + row[3] * noise)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.step(noise, 901, noise, eta=3.0, variance_noise=noise)  # once per scheduler
    with pytest.warns(UserWarning, match="eta"):  # and again for another scheduler
        fresh = DDIMScheduler()
        fresh.set_timesteps(10)
        fresh.step(noise, 901, noise, eta=1.5, variance_noise=noise)


def test_triton_interpret_set_after_import_says_what_to_do():
    """Setting TRITON_INTERPRET=1 after ``import fastddim`` used to reach Triton's "0 active drivers"."""
    script = (
        "import os, torch, fastddim\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "os.environ['FASTDDIM_BACKEND'] = 'triton'\n"
        "s = fastddim.DDIMScheduler(); s.set_timesteps(10); x = torch.zeros(1, 3)\n"
        "try:\n"
        "    s.step(x, 901, x)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "TRITON_INTERPRET=1 was set after fastddim was imported" in completed.stdout
    assert "before importing fastddim" in completed.stdout


@pytest.mark.gpu
def test_add_noise_on_cuda_keeps_the_step_sync_free():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10, device="cuda")
    table = scheduler.coefficient_table("cuda", 0.0)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    scheduler.add_noise(x, x, torch.tensor([10, 20], device="cuda"))
    assert scheduler.alphas_cumprod.is_cuda  # diffusers' move
    assert scheduler.coefficient_table("cuda", 0.0) is table
    with host_syncs_forbidden():
        scheduler.step(x, torch.tensor(901, device="cuda"), x)
