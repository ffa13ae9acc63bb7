"""``fastddim.slerp``: spherical interpolation of Gaussian latents (DDIM paper, section 5.3).

Oracle: the paper code's ``slerp`` (ermongroup/ddim, written out below), applied to one
row at a time in float64. fp32 results match it to fp32 rounding of a few operations (rtol 1e-5).
"""

import math

import pytest
import torch

import fastddim


def paper_slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: float) -> torch.Tensor:
    z1, z2 = z1.double(), z2.double()
    theta = torch.acos(torch.sum(z1 * z2) / (torch.norm(z1) * torch.norm(z2)))
    return torch.sin((1 - alpha) * theta) / torch.sin(theta) * z1 + torch.sin(alpha * theta) / torch.sin(theta) * z2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_matches_the_papers_slerp_row_by_row(dtype):
    generator = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(3, 4, 8, 8, generator=generator).to(dtype) for _ in range(2))
    alphas = torch.tensor([0.1, 0.5, 0.93])
    out = fastddim.slerp(x0, x1, alphas)
    assert out.shape == x0.shape and out.dtype == dtype
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for row, alpha in enumerate(alphas.tolist()):
        expected = paper_slerp(x0[row], x1[row], alpha)
        torch.testing.assert_close(out[row].double(), expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(fastddim.slerp(x0, x1, 0.5)[1], out[1])


def test_endpoints_are_exact_and_norms_follow_the_circle():
    generator = torch.Generator().manual_seed(1)
    x0, x1 = (torch.randn(2, 1000, generator=generator) for _ in range(2))
    assert torch.equal(fastddim.slerp(x0, x1, 0.0), x0) and torch.equal(fastddim.slerp(x0, x1, 1.0), x1)
    # Equal norms: every interpolant keeps the norm (a straight line would shrink it by about 1/sqrt(2) midway).
    x1 = x1 * (x0.norm(dim=1, keepdim=True) / x1.norm(dim=1, keepdim=True))
    middle = fastddim.slerp(x0, x1, 0.5)
    torch.testing.assert_close(middle.norm(dim=1), x0.norm(dim=1), rtol=1e-5, atol=0)
    assert (((x0 + x1) / 2).norm(dim=1) < 0.8 * x0.norm(dim=1)).all()


def test_frames_broadcast_from_single_latents():
    generator = torch.Generator().manual_seed(2)
    xa, xb = (torch.randn(1, 3, 4, 4, generator=generator) for _ in range(2))
    frames = fastddim.slerp(xa, xb, torch.linspace(0, 1, 9))
    assert frames.shape == (9, 3, 4, 4)
    assert torch.equal(frames[0], xa[0]) and torch.equal(frames[-1], xb[0])
    torch.testing.assert_close(frames[4].double(), paper_slerp(xa[0], xb[0], 0.5), rtol=1e-5, atol=1e-5)


def test_parallel_antiparallel_and_zero_rows_are_finite():
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(3))
    parallel = fastddim.slerp(x, 2 * x, 0.25)
    torch.testing.assert_close(parallel, 0.75 * x + 0.25 * (2 * x))  # the limit: linear interpolation
    antiparallel = fastddim.slerp(x, -x, 0.5)
    assert torch.isfinite(antiparallel).all()
    zero = fastddim.slerp(torch.zeros(1, 16), x, 0.5)
    assert torch.isfinite(zero).all()
    # Nearly parallel, above the fallback threshold: still the circle, still finite.
    nearly = x + 1e-3 * torch.randn(1, 16, generator=torch.Generator().manual_seed(4))
    out = fastddim.slerp(x, nearly, 0.5)
    assert torch.isfinite(out).all() and math.isclose(out.norm().item(), x.norm().item(), rel_tol=1e-3)


def test_errors_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="x0"):
        fastddim.slerp(x.long(), x, 0.5)
    with pytest.raises(TypeError, match="x1"):
        fastddim.slerp(x, [1.0], 0.5)
    with pytest.raises(ValueError, match="same shape per row"):
        fastddim.slerp(x, torch.randn(2, 4), 0.5)
    with pytest.raises(ValueError, match="dtype"):
        fastddim.slerp(x, x.double(), 0.5)
    with pytest.raises(ValueError, match="batch sizes"):
        fastddim.slerp(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="alpha"):
        fastddim.slerp(x, x, torch.ones(2, 2))
    with pytest.raises(TypeError, match="alpha"):
        fastddim.slerp(x, x, "half")
    with pytest.raises(ValueError, match="batch dimension"):
        fastddim.slerp(torch.tensor(1.0), torch.tensor(1.0), 0.5)
