"""``fastddim.slerp`` against the closed form evaluated in float64, and its edge cases.

Tolerances: fp32 results come from fp32 arithmetic over ~d = 1024 elements (norms and dot products), so they agree with
the float64 evaluation to a few ulps of the values' magnitude (~1e-5 absolute for unit-variance inputs); fp64 to 1e-12.
"""

import math

import pytest
import torch

from fastddim import slerp

TOLERANCES = {torch.float32: 2e-5, torch.float64: 1e-12}


def closed_form(x0: torch.Tensor, x1: torch.Tensor, alpha: float) -> torch.Tensor:
    a, b = x0.double().flatten(), x1.double().flatten()
    theta = math.acos(float((a @ b) / (a.norm() * b.norm())))
    return (math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0, 1.5])
def test_matches_the_closed_form_per_sample(dtype, alpha):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 16, 16, generator=generator, dtype=dtype)
    x1 = torch.randn(3, 4, 16, 16, generator=generator, dtype=dtype)
    out = slerp(x0, x1, alpha)
    assert out.shape == x0.shape and out.dtype == dtype
    for b in range(3):
        expected = closed_form(x0[b], x1[b], alpha).reshape(x0[b].shape)
        torch.testing.assert_close(out[b].double(), expected, atol=TOLERANCES[dtype], rtol=0)


def test_endpoints_and_norm_are_kept():
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 1024, generator=generator), torch.randn(2, 1024, generator=generator)
    torch.testing.assert_close(slerp(x0, x1, 0.0), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(x0, x1, 1.0), x1, atol=1e-5, rtol=0)
    # Between two vectors of (nearly) equal norm, the arc keeps the norm; the straight line shrinks it by ~sqrt(2).
    middle = slerp(x0, x1, 0.5)
    assert torch.allclose(middle.norm(dim=1), (x0.norm(dim=1) + x1.norm(dim=1)) / 2, rtol=0.05)
    assert ((x0 + x1) / 2).norm(dim=1).max() < 0.8 * middle.norm(dim=1).min()


def test_per_sample_alpha_equals_per_sample_calls():
    generator = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(3, 2, 8, 8, generator=generator), torch.randn(3, 2, 8, 8, generator=generator)
    alphas = torch.tensor([0.0, 0.25, 0.75])
    batched = slerp(x0, x1, alphas)
    for b, alpha in enumerate(alphas.tolist()):
        assert torch.equal(batched[b : b + 1], slerp(x0[b : b + 1], x1[b : b + 1], alpha))


def test_parallel_inputs_fall_back_to_linear_interpolation():
    x0 = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    out = slerp(x0, 2 * x0, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 1.5 * x0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_keep_their_dtype(dtype):
    generator = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(2, 256, generator=generator), torch.randn(2, 256, generator=generator)
    out = slerp(x0.to(dtype), x1.to(dtype), 0.3)
    assert out.dtype == dtype
    # Computed in fp32 from the rounded inputs, rounded once: within a rounding of the fp32 result.
    torch.testing.assert_close(
        out.float(), slerp(x0.to(dtype).float(), x1.to(dtype).float(), 0.3), atol=0.02, rtol=0.01
    )


def test_inputs_are_not_modified():
    x0, x1 = torch.randn(2, 32), torch.randn(2, 32)
    before = (x0.clone(), x1.clone())
    slerp(x0, x1, 0.4)
    assert torch.equal(x0, before[0]) and torch.equal(x1, before[1])


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4), 0.5), ValueError, "same shape"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), 0.5), ValueError, "same shape, dtype"),
        ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64), 0.5), TypeError, "x0"),
        (([1.0], torch.zeros(1), 0.5), TypeError, "x0"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), "half"), TypeError, "alpha"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3)), ValueError, r"shape \(2,\)"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), float("nan")), ValueError, "finite"),
        ((torch.zeros(()), torch.zeros(()), 0.5), ValueError, "at least one dimension"),
    ],
)
def test_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        slerp(*args)
