"""Gradients through ``DDIMScheduler.step`` / ``DDIMInverseScheduler.step`` w.r.t. ``model_output`` and ``sample``.

Oracles: ``torch.autograd.gradcheck`` in fp64 on the PyTorch twin, and diffusers' own autograd gradients through its
``step``. Tolerances: fp32 gradients are bit-identical to diffusers' wherever autograd adds at most two terms into
one gradient (the kernel and the twin apply each backward op in diffusers' order; two-term sums commute exactly).
Three terms meet when both outputs are used and x_0 feeds epsilon too (``use_clipped_model_output``, or sample
prediction without clipping, where x_0 *is* model_output): autograd's accumulation order then decides the last bit,
so those compare within 4 fp32 ulps of the largest term (``THREE_TERM_TOLERANCE``). Thresholded steps back-propagate
through the per-row quantile; the reductions there (the scale's gradient sums over a row) are ordered differently
from ``torch.quantile``'s, so they compare with rtol 1e-5. fp16/bf16 gradients follow the forward rule against a
float64 run of diffusers (computed in fp32 and rounded once, they are at least as accurate as diffusers' own).
"""

import pytest
import torch
from diffusers import DDIMInverseScheduler as DiffusersDDIMInverseScheduler
from diffusers import DDIMScheduler as DiffusersDDIMScheduler

from fastddim import DDIMInverseScheduler, DDIMScheduler
from tests.helpers import BACKEND_DEVICES

pytestmark = pytest.mark.interpreter

THREE_TERM_TOLERANCE = dict(rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)


def _leaves(shape, device, dtype=torch.float32, seed=0, count=2):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * 1.5).to(device, dtype).requires_grad_() for _ in range(count)]


def _grads(scheduler, model_output, timestep, sample, weights, use_x0, **kwargs):
    out = scheduler.step(model_output, timestep, sample, **kwargs)
    loss = (out.prev_sample.float() * weights[0]).sum()
    if use_x0:
        loss = loss + (out.pred_original_sample.float() * weights[1]).sum()
    inputs = [model_output, sample] + ([kwargs["variance_noise"]] if "variance_noise" in kwargs else [])
    return torch.autograd.grad(loss, inputs)


CONFIGS = [
    dict(prediction_type="epsilon", clip_sample=True),
    dict(prediction_type="epsilon", clip_sample=False),
    dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.8),
    dict(prediction_type="sample", clip_sample=False),
    dict(prediction_type="v_prediction", clip_sample=True),
    dict(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("use_x0", [False, True])
def test_gradients_match_diffusers(backend, config, use_clipped, use_x0):
    device = BACKEND_DEVICES[backend]
    ours_scheduler, theirs_scheduler = DDIMScheduler(**config), DiffusersDDIMScheduler(**config)
    ours_scheduler.set_timesteps(10)
    theirs_scheduler.set_timesteps(10)
    model_output, sample = _leaves((2, 3, 4, 5), device)
    weights = [w.detach() for w in _leaves((2, 3, 4, 5), device, seed=1)]
    for t in (901, 501, 1):
        kwargs = dict(use_clipped_model_output=use_clipped)
        ours = _grads(ours_scheduler, model_output, t, sample, weights, use_x0, **kwargs)
        theirs = _grads(theirs_scheduler, model_output, t, sample, weights, use_x0, **kwargs)
        three_terms = use_x0 and (use_clipped or (config["prediction_type"] == "sample" and not config["clip_sample"]))
        for a, b in zip(ours, theirs, strict=True):
            if three_terms:
                torch.testing.assert_close(a, b, **THREE_TERM_TOLERANCE)
            else:
                assert torch.equal(a, b), (t, (a - b).abs().max())


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_gradients_with_noise_match_diffusers(backend, eta):
    device = BACKEND_DEVICES[backend]
    ours_scheduler, theirs_scheduler = DDIMScheduler(), DiffusersDDIMScheduler()
    ours_scheduler.set_timesteps(20)
    theirs_scheduler.set_timesteps(20)
    model_output, sample, noise = _leaves((2, 3, 4), device, count=3)
    weights = [w.detach() for w in _leaves((2, 3, 4), device, seed=1)]
    kwargs = dict(eta=eta, variance_noise=noise)
    ours = _grads(ours_scheduler, model_output, 451, sample, weights, True, **kwargs)
    theirs = _grads(theirs_scheduler, model_output, 451, sample, weights, True, **kwargs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_broadcast_noise_gradient_matches_diffusers(backend):
    """variance_noise of shape (1, C, 1) broadcast over the batch: its gradient is summed as autograd's expand is."""
    device = BACKEND_DEVICES[backend]
    ours_scheduler, theirs_scheduler = DDIMScheduler(), DiffusersDDIMScheduler()
    ours_scheduler.set_timesteps(20)
    theirs_scheduler.set_timesteps(20)
    model_output, sample = _leaves((2, 3, 4), device)
    (noise,) = _leaves((1, 3, 1), device, seed=2, count=1)
    weights = [w.detach() for w in _leaves((2, 3, 4), device, seed=1)]
    kwargs = dict(eta=1.0, variance_noise=noise)
    ours = _grads(ours_scheduler, model_output, 451, sample, weights, False, **kwargs)
    theirs = _grads(theirs_scheduler, model_output, 451, sample, weights, False, **kwargs)
    assert ours[2].shape == (1, 3, 1)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


def test_thresholded_gradients_match_diffusers(backend):
    """Through the per-sample quantile scale (torch.quantile's gradient), as diffusers differentiates it."""
    device = BACKEND_DEVICES[backend]
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    ours_scheduler, theirs_scheduler = DDIMScheduler(**config), DiffusersDDIMScheduler(**config)
    ours_scheduler.set_timesteps(10)
    theirs_scheduler.set_timesteps(10)
    model_output, sample = _leaves((2, 3, 4, 4), device)
    weights = [w.detach() for w in _leaves((2, 3, 4, 4), device, seed=1)]
    ours = _grads(ours_scheduler, model_output, 901, sample, weights, True)
    theirs = _grads(theirs_scheduler, model_output, 901, sample, weights, True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_are_as_accurate_as_diffusers(backend, dtype):
    device = BACKEND_DEVICES[backend]
    ours_scheduler, theirs_scheduler = DDIMScheduler(clip_sample=False), DiffusersDDIMScheduler(clip_sample=False)
    ours_scheduler.set_timesteps(10)
    theirs_scheduler.set_timesteps(10)
    model_output, sample = _leaves((2, 3, 4, 4), device, dtype)
    model64, sample64 = (t.detach().double().requires_grad_() for t in (model_output, sample))
    weights = [w.detach() for w in _leaves((2, 3, 4, 4), device, seed=1)]
    ours = _grads(ours_scheduler, model_output, 501, sample, weights, True)
    theirs = _grads(theirs_scheduler, model_output, 501, sample, weights, True)
    exact = _grads(theirs_scheduler, model64, 501, sample64, [w.double() for w in weights], True)
    for a, b, c in zip(ours, theirs, exact, strict=True):
        assert a.dtype == dtype
        error, their_error = (a.double() - c).abs().max(), (b.double() - c).abs().max()
        assert error <= 2 * their_error + torch.finfo(dtype).eps * c.abs().max(), (error, their_error)


def test_per_sample_gradients_equal_each_sample_alone(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    model_output, sample = _leaves((3, 2, 4), device)
    weights = [w.detach() for w in _leaves((3, 2, 4), device, seed=1)]
    timesteps = torch.tensor([901, 1, 451])
    batched = _grads(scheduler, model_output, timesteps.to(device), sample, weights, True)
    for b, t in enumerate(timesteps.tolist()):
        alone = _grads(
            scheduler,
            model_output,
            t,
            sample,
            [w * (torch.arange(3) == b).to(device)[:, None, None] for w in weights],
            True,
        )
        for a, e in zip(batched, alone, strict=True):
            assert torch.equal(a[b], e[b])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_inverse_gradients_match_diffusers(backend, prediction_type):
    device = BACKEND_DEVICES[backend]
    config = dict(prediction_type=prediction_type, set_alpha_to_one=False)
    ours_scheduler, theirs_scheduler = DDIMInverseScheduler(**config), DiffusersDDIMInverseScheduler(**config)
    ours_scheduler.set_timesteps(10)
    theirs_scheduler.set_timesteps(10)
    model_output, sample = _leaves((2, 3, 4), device)
    weights = [w.detach() for w in _leaves((2, 3, 4), device, seed=1)]
    for t in (0, 500, 900):
        ours = _grads(ours_scheduler, model_output, t, sample, weights, False)
        theirs = _grads(theirs_scheduler, model_output, t, sample, weights, False)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


def test_outputs_track_gradients_only_when_asked(backend):
    device = BACKEND_DEVICES[backend]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    model_output, sample = _leaves((2, 3), device)
    out = scheduler.step(model_output, 901, sample)
    assert out.prev_sample.requires_grad and out.pred_original_sample.grad_fn is not None
    with torch.no_grad():
        assert not scheduler.step(model_output, 901, sample).prev_sample.requires_grad
    detached = scheduler.step(model_output.detach(), 901, sample.detach())
    assert not detached.prev_sample.requires_grad
    assert torch.equal(detached.prev_sample, out.prev_sample.detach())


@pytest.mark.parametrize(
    "config",
    [
        dict(prediction_type="epsilon", clip_sample=True),
        dict(prediction_type="sample", clip_sample=False),
        dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.5),
        dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.2),
    ],
    ids=["epsilon-clip", "sample", "v-clip", "threshold"],
)
@pytest.mark.parametrize("use_clipped", [False, True])
def test_gradcheck_fp64_twin(monkeypatch, config, use_clipped):
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 3, 3, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(3)]

    def step(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = scheduler.step(
            model_output, 501, sample, eta=0.8, variance_noise=noise, use_clipped_model_output=use_clipped
        )
        return out.to_tuple()

    assert torch.autograd.gradcheck(step, inputs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_classifier_gradient_guidance_matches_diffusers(backend, prediction_type):
    """A few guided steps: each step's x_0 is pulled toward a target through d loss(x_0(x_t)) / d x_t, the gradient
    flowing through the step into both the sample and the (differentiable) model."""
    device = BACKEND_DEVICES[backend]
    config = dict(prediction_type=prediction_type, timestep_spacing="trailing")
    ours_scheduler, theirs_scheduler = DDIMScheduler(**config), DiffusersDDIMScheduler(**config)
    ours_scheduler.set_timesteps(5)
    theirs_scheduler.set_timesteps(5)
    generator = torch.Generator().manual_seed(7)
    start = torch.randn(2, 3, 4, 4, generator=generator).to(device)
    target = torch.randn(2, 3, 4, 4, generator=generator).to(device)
    weight = torch.randn(3, 3, generator=generator).to(device)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x) + float(t) / 1000)

    def guided(scheduler) -> torch.Tensor:
        x = start
        for t in scheduler.timesteps:
            x = x.detach().requires_grad_()
            out = scheduler.step(model(x, t), t, x)
            loss = ((out.pred_original_sample - target) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, x)
            x = out.prev_sample.detach() - 0.05 * grad
        return x

    assert torch.equal(guided(ours_scheduler), guided(theirs_scheduler))


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS[:5], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_backward_kernel_on_cuda_matches_diffusers(config):
    ours_scheduler, theirs_scheduler = DDIMScheduler(**config), DiffusersDDIMScheduler(**config)
    ours_scheduler.set_timesteps(10)
    theirs_scheduler.set_timesteps(10)
    model_output, sample = _leaves((2, 4, 16, 16), "cuda")
    weights = [w.detach() for w in _leaves((2, 4, 16, 16), "cuda", seed=1)]
    ours = _grads(ours_scheduler, model_output, 901, sample, weights, False)
    theirs = _grads(theirs_scheduler, model_output, 901, sample, weights, False)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_compiled_twin_step_is_differentiable(monkeypatch):
    """torch.compile(fullgraph=True) traces the PyTorch backend's step (the scheduler's alphas bookkeeping stays out
    of the graph) and its gradients equal eager ones. Dynamo's ``eager`` backend: no C++ compiler on CI."""
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    model_output, sample = _leaves((2, 3, 4), "cpu")

    def step(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scheduler.step(m, 901, x, return_dict=False)[0]

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    ours = torch.autograd.grad(compiled(model_output, sample).sum(), (model_output, sample))
    eager = torch.autograd.grad(step(model_output, sample).sum(), (model_output, sample))
    for a, b in zip(ours, eager, strict=True):
        assert torch.equal(a, b)
