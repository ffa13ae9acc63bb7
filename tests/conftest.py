"""Shared test configuration.

Without CUDA the Triton kernels run in Triton's CPU interpreter. ``TRITON_INTERPRET`` is read when ``@triton.jit``
decorates a function, so it must be set here, before any test module imports ``fastddim``.
"""

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # One marker, one meaning: every `gpu` test is skipped cleanly where CUDA is absent.
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(requires_cuda)


@pytest.fixture(autouse=True, scope="session")
def private_digest_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Model-file digests the CLI remembers (fastddim.digest_cache) go to a folder of this session, not the user's
    # cache; subprocesses inherit it.
    saved = os.environ.get("FASTDDIM_CACHE_DIR")
    os.environ["FASTDDIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("digest-cache"))
    yield
    if saved is None:
        del os.environ["FASTDDIM_CACHE_DIR"]
    else:
        os.environ["FASTDDIM_CACHE_DIR"] = saved


@pytest.fixture(autouse=True, scope="session")
def single_cpu_thread():
    # Test tensors and models are tiny: intra-op threads buy nothing, and with pytest-xdist workers on a busy 2-core
    # runner OpenMP barriers made the pipeline tests ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nan_poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled tensors, so unwritten outputs fail comparisons."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs)))


class ReplayingGraph:
    """Stand-in for a captured CUDA graph: "replay" reruns the captured loop over the same static buffers."""

    def __init__(self, run, num_steps):
        self.run, self.num_steps = run, num_steps
        self.output = run(num_steps).clone()

    def replay(self):
        self.output.copy_(self.run(self.num_steps))


@pytest.fixture
def stand_in_graphs(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Routes the captured-loop engine (``fastddim.graphs``) through the CPU; returns the list of captures made.

    The graph bookkeeping of every pipeline (keys, LRU, invalidation, fallback, static buffers, per-call inputs and
    noise) then runs in CI.
    """
    import fastddim.graphs

    captures = []

    def capture_graph(run, num_steps, device, uses_rng):
        captures.append(dict(num_steps=num_steps, uses_rng=uses_rng))
        graph = ReplayingGraph(run, num_steps)
        return graph, graph.output

    monkeypatch.setattr(fastddim.graphs, "graphs_supported", lambda device: True)
    monkeypatch.setattr(fastddim.graphs, "capture_graph", capture_graph)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return captures


@pytest.fixture
def exact_float32_math() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32, which would put ~1e-3 differences between otherwise identical fp32
    runs on a GPU; the previous settings come back after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per scheduler backend (FASTDDIM_BACKEND): the PyTorch twin, and the Triton kernels."""
    monkeypatch.setenv("FASTDDIM_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="session")
def targets() -> ModuleType:
    """bench/targets.py, the issues' performance targets (a script, not part of the package), as a module."""
    path = Path(__file__).resolve().parent.parent / "bench" / "targets.py"
    spec = importlib.util.spec_from_file_location("bench_targets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Components of the Stable Diffusion parity tests (tests/sd_parity.py); transformers is imported only when used.
@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.sd_components import sd_components

    return sd_components(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.sd_components import sdxl_components

    return sdxl_components(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(params=["eager", "graph"])
def path(request: pytest.FixtureRequest) -> str:
    """Runs a Stable Diffusion test through the eager loop and through the graph cache (CPU stand-in for capture)."""
    if request.param == "graph":
        request.getfixturevalue("stand_in_graphs")
    return request.param
