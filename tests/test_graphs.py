"""The captured-loop engine (``fastddim.graphs``) on the CPU, through the stand-in for capture (tests/conftest.py):
keys, per-call and per-step inputs, static buffers, invalidation, LRU, fallback and its warning."""

import contextlib
import gc
import warnings
import weakref

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from fastddim import compat, graphs
from fastddim.graphs import CapturedLoopCache, CudaGraphCacheInfo, StepInput

CPU = torch.device("cpu")
TIMESTEPS = torch.tensor([9, 5, 1])


def body(buffers: graphs.LoopBuffers, steps: int) -> torch.Tensor:
    """x <- x * scale + t (+ noise_i) per step: reads every kind of static buffer."""
    x = buffers.inputs["x"]
    noises = buffers.steps.get("noise")
    for i, t in enumerate(buffers.timesteps[:steps]):
        x = x * buffers.inputs["scale"] + t
        if noises is not None:
            x = x + noises[i]
    return x


def expected(x, scale, timesteps=TIMESTEPS, noises=None):
    for i, t in enumerate(timesteps.tolist()):
        x = x * scale + t
        if noises is not None:
            x = x + noises[i]
    return x


def lookup(cache, x, scale=2.0, *, timesteps=TIMESTEPS, module=None, step_inputs=None, **kwargs):
    module = module if module is not None else torch.nn.Linear(1, 1)
    return cache.lookup(
        ("test",),
        device=CPU,
        modules=(module,),
        timesteps=timesteps,
        inputs={"x": x, "scale": scale},
        step_inputs=step_inputs or {},
        body=body,
        uses_rng=False,
        **kwargs,
    )


@pytest.fixture
def module():
    return torch.nn.Linear(2, 2)


def test_captures_once_and_replays_fresh_inputs(stand_in_graphs, module):
    cache = CapturedLoopCache()
    results = []
    for x, scale in ((torch.ones(2, 3), 2.0), (torch.arange(6.0).view(2, 3), 0.5), (torch.ones(2, 3), 2.0)):
        loop = lookup(cache, x, scale, module=module)
        results.append(loop.replay({"x": x, "scale": scale}, {}))
        torch.testing.assert_close(results[-1], expected(x, scale), atol=0, rtol=0)
    assert stand_in_graphs == [dict(num_steps=3, uses_rng=False)]
    assert cache.info() == CudaGraphCacheInfo(hits=2, misses=1, maxsize=4, currsize=1, fallbacks=0)
    assert torch.equal(results[0], results[2]) and not torch.equal(results[0], results[1])
    assert results[0].data_ptr() != results[2].data_ptr(), "a replay must hand out a copy of the static output"


@pytest.mark.parametrize(
    "change",
    ["timesteps", "shape", "dtype", "channels_last", "key", "training"],
)
def test_everything_the_loop_bakes_in_is_in_the_key(stand_in_graphs, module, change):
    cache = CapturedLoopCache()
    x = torch.ones(1, 2, 3, 3)
    lookup(cache, x, module=module)
    timesteps = TIMESTEPS
    if change == "timesteps":
        timesteps = torch.tensor([9, 4, 1])
    elif change == "shape":
        x = torch.ones(2, 2, 3, 3)
    elif change == "dtype":
        x = x.double()
    elif change == "channels_last":
        x = torch.ones(1, 2, 3, 3).to(memory_format=torch.channels_last)
    elif change == "training":
        module.train(not module.training)
    if change == "key":
        cache.lookup(
            ("other",),
            device=CPU,
            modules=(module,),
            timesteps=timesteps,
            inputs={"x": x, "scale": 2.0},
            step_inputs={},
            body=body,
            uses_rng=False,
        )
    else:
        loop = lookup(cache, x, module=module, timesteps=timesteps)
        if change == "channels_last":
            assert loop.buffers.inputs["x"].is_contiguous(memory_format=torch.channels_last), "layout not kept"
    assert cache.info()[:2] == (0, 2)


def test_a_number_input_is_not_in_the_key(stand_in_graphs, module):
    cache = CapturedLoopCache()
    for scale in (1.0, 3, 7.5):
        loop = lookup(cache, torch.ones(3), scale, module=module)
        assert loop.buffers.inputs["scale"].dtype == torch.float32 and loop.buffers.inputs["scale"].dim() == 0
        torch.testing.assert_close(
            loop.replay({"x": torch.ones(3), "scale": scale}, {}), expected(torch.ones(3), scale)
        )
    assert cache.info()[:2] == (2, 1)
    with pytest.raises(TypeError, match="'scale'"):
        lookup(cache, torch.ones(3), "2", module=module)


def test_step_inputs_are_drawn_once_per_replay(stand_in_graphs, module):
    cache = CapturedLoopCache()
    draws = []

    def draw(num_steps):
        draws.append(num_steps)
        return torch.full((num_steps, 3), float(len(draws)))

    step_inputs = {"noise": StepInput((3,), torch.float32, draw)}
    for call in (1, 2):
        loop = lookup(cache, torch.ones(3), module=module, step_inputs=step_inputs)
        assert draws == [3] * (call - 1), "drawn before the replay"
        out = loop.replay({"x": torch.ones(3), "scale": 2.0}, step_inputs)
        assert draws == [3] * call
        torch.testing.assert_close(out, expected(torch.ones(3), 2.0, noises=torch.full((3, 3), float(call))))
    slots = loop.step_slots["noise"]
    assert all(
        slots[i].data_ptr() % graphs.SLOT_ALIGN_BYTES == slots[0].data_ptr() % graphs.SLOT_ALIGN_BYTES
        for i in range(3)
    )


def test_weight_updates_replace_the_stale_graph(stand_in_graphs, module):
    cache = CapturedLoopCache()
    lookup(cache, torch.ones(3), module=module)
    lookup(cache, torch.ones(4), module=module)
    with torch.no_grad():
        module.weight.add_(1)
    lookup(cache, torch.ones(3), module=module)
    info = cache.info()
    assert (info.misses, info.currsize) == (3, 1), "both graphs of the old weights must go"
    assert graphs.weights_fingerprint([module]) != ()


def test_bounded_lru(stand_in_graphs, module):
    cache = CapturedLoopCache(maxsize=2)
    for n in (3, 4, 5):
        lookup(cache, torch.ones(n), module=module)
    assert cache.info() == CudaGraphCacheInfo(0, 3, 2, 2, 0)
    lookup(cache, torch.ones(5), module=module)
    lookup(cache, torch.ones(3), module=module)  # evicted: captured again
    assert cache.info() == CudaGraphCacheInfo(1, 4, 2, 2, 0)
    cache.set_size(1)
    assert cache.info().currsize == 1
    cache.clear()
    assert cache.info().currsize == 0
    for bad, error in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="size"):
            cache.set_size(bad)


def test_failed_capture_warns_once_at_the_callers_line_and_never_draws(stand_in_graphs, module, monkeypatch):
    attempts = []

    def failing_capture(run, num_steps, device, uses_rng):
        attempts.append(num_steps)
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    monkeypatch.setattr(graphs, "capture_graph", failing_capture)
    cache = CapturedLoopCache()
    draw_calls = []
    step_inputs = {"noise": StepInput((3,), torch.float32, lambda n: draw_calls.append(n))}
    with pytest.warns(RuntimeWarning, match=r"failed \(RuntimeError: operation not permitted[^\n]*\); this") as record:
        assert lookup(cache, torch.ones(3), module=module, step_inputs=step_inputs) is None
    assert len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup(cache, torch.ones(3), module=module, step_inputs=step_inputs) is None
    assert attempts == [3] and draw_calls == []
    assert cache.info() == CudaGraphCacheInfo(0, 1, 4, 0, 2)


def test_unsupported_configuration_runs_eagerly_with_one_warning(stand_in_graphs, module):
    cache = CapturedLoopCache()
    with pytest.warns(RuntimeWarning, match="not capturable here"):
        assert lookup(cache, torch.ones(3), module=module, unsupported="not capturable here") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup(cache, torch.ones(3), module=module, unsupported="not capturable here") is None
    assert stand_in_graphs == [] and cache.info().fallbacks == 2


@pytest.mark.parametrize("seeds", [0, (1, 2)], ids=["one-generator", "generator-list"])
def test_draw_step_noises_follows_diffusers_step_order(seeds):
    def make():
        if isinstance(seeds, int):
            return torch.Generator().manual_seed(seeds)
        return [torch.Generator().manual_seed(s) for s in seeds]

    shape = (2, 4, 3, 3)
    drawn = graphs.draw_step_noises(make(), shape, torch.float32, CPU, 3)
    generator = make()
    stepwise = torch.stack([randn_tensor(shape, generator=generator, dtype=torch.float32) for _ in range(3)])
    assert drawn.shape == (3, *shape)
    assert torch.equal(drawn, stepwise)


def test_resolve_cuda_graph():
    assert graphs.resolve_cuda_graph(None, CPU) is False
    assert graphs.resolve_cuda_graph(False, CPU) is False
    with pytest.raises(ValueError, match="cuda_graph=True"):
        graphs.resolve_cuda_graph(True, CPU)
    with pytest.raises(TypeError, match="cuda_graph"):
        graphs.resolve_cuda_graph(1, CPU)


def test_compat_helpers():
    tensor = torch.zeros(3)
    before = compat.tensor_version(tensor)
    tensor.add_(1)
    assert compat.tensor_version(tensor) == before + 1
    state = torch.get_rng_state()
    compat.repair_default_generator(CPU)  # nothing to repair off CUDA
    assert torch.equal(torch.get_rng_state(), state)


def test_cached_loops_keep_their_modules_alive(stand_in_graphs):
    """The graph reads the modules' weights and their ids are in the key: a dropped module must not be freed (and its
    id reused) while a loop captured from it is cached."""
    cache = CapturedLoopCache()
    module = torch.nn.Linear(2, 2)
    alive = weakref.ref(module)
    lookup(cache, torch.ones(3), module=module)
    del module
    gc.collect()
    assert alive() is not None
    cache.clear()
    gc.collect()
    assert alive() is None


def test_inference_tensors_have_no_version_counter_but_fingerprint(stand_in_graphs):
    with torch.inference_mode():
        module = torch.nn.Linear(2, 2)
    assert compat.tensor_version(module.weight) is None
    cache = CapturedLoopCache()
    assert lookup(cache, torch.ones(3), module=module) is not None
    assert lookup(cache, torch.ones(3), module=module) is not None
    assert cache.info()[:2] == (1, 1)


class _CaptureModeGraph:
    """A stand-in graph whose replay writes its output as a real graph does: from the device, whatever the caller's
    inference mode (a captured kernel's writes pass no autograd check)."""

    def __init__(self, run, num_steps):
        self.run, self.num_steps = run, num_steps
        self.output = run(num_steps).clone()

    def replay(self):
        with torch.inference_mode():
            self.output.copy_(self.run(self.num_steps))


def test_a_loop_captured_under_inference_mode_replays_outside_it(stand_in_graphs, module, monkeypatch):
    def capture_graph(run, num_steps, device, uses_rng):
        graph = _CaptureModeGraph(run, num_steps)
        return graph, graph.output

    monkeypatch.setattr(graphs, "capture_graph", capture_graph)
    cache = CapturedLoopCache()
    noise = {"noise": StepInput((3,), torch.float32, lambda n: torch.ones(n, 3))}
    with torch.inference_mode():
        loop = lookup(cache, torch.ones(3), module=module, step_inputs=noise)
        first = loop.replay({"x": torch.ones(3), "scale": 2.0}, noise)
    with torch.no_grad():
        again = lookup(cache, torch.zeros(3), module=module, step_inputs=noise)
        assert again is loop
        second = again.replay({"x": torch.zeros(3), "scale": 0.5}, noise)
    torch.testing.assert_close(first, expected(torch.ones(3), 2.0, noises=torch.ones(3, 3)))
    torch.testing.assert_close(second, expected(torch.zeros(3), 0.5, noises=torch.ones(3, 3)))


class _FakeStream:
    cuda_stream = 0

    def wait_stream(self, other):
        pass


class _FakeGraph:
    """torch.cuda.CUDAGraph's capture protocol as CUDAGraph.cpp implements it: ``pool()`` refuses until capture_end
    ended the capture; an invalidated capture makes capture_end raise before that."""

    def __init__(self, end_fails):
        self.end_fails, self.ended, self.begun_with = end_fails, False, None

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self.begun_with = pool

    def capture_end(self):
        if self.end_fails:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.ended = True

    def pool(self):
        if not self.ended:
            raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
        return self.begun_with


@pytest.mark.parametrize("outcome", ["captured", "python-error", "invalidated"])
def test_a_capture_that_never_ended_gives_its_pool_back(monkeypatch, outcome):
    made, released, streams = [], [], []
    monkeypatch.setattr(graphs, "_capture_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: streams.append(_FakeStream()) or streams[-1])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: made.append(_FakeGraph(outcome == "invalidated")) or made[-1])
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        monkeypatch.setattr(torch._C, name, lambda *args, name=name: released.append((name, *args)), raising=False)

    calls = []

    def run(num_steps):
        calls.append(num_steps)
        if outcome != "captured" and len(calls) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return torch.ones(2)

    device = torch.device("cuda", 3)
    if outcome == "captured":
        graph, output = graphs.capture_graph(run, 5, device, uses_rng=False)
        assert graph is made[0] and torch.equal(output, torch.ones(2))
    else:
        with pytest.raises(RuntimeError, match="not permitted"):
            graphs.capture_graph(run, 5, device, uses_rng=False)
    assert calls == [graphs.WARMUP_STEPS, 5] and made[0].begun_with == (0, 7)
    if outcome == "invalidated":
        assert released == [("_cuda_endAllocateToPool", 3, (0, 7)), ("_cuda_releasePool", 3, (0, 7))]
    else:
        assert released == [], "an ended capture's graph releases its own pool"
    if outcome == "captured":
        graphs.capture_graph(run, 5, device, uses_rng=False)
        assert len(streams) == 1, "every capture on a device warms up and captures on one stream"
    else:
        assert graphs._capture_streams == {}, "a failed capture's stream is not reused"


class _NamedStream:
    """A stand-in stream that logs which streams it was made to wait for."""

    def __init__(self, name: str, waits: list):
        self.name, self.waits = name, waits

    def __eq__(self, other):
        return isinstance(other, _NamedStream) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    def wait_stream(self, other):
        self.waits.append((self.name, other.name))


def test_a_replay_on_another_stream_waits_for_the_last_and_records_the_graphs_memory_once(
    stand_in_graphs, module, monkeypatch
):
    # CPU tensors stand for the device's (the loop's device is the CPU here): checked is which tensors are recorded
    # on which stream, how often, and which stream waits for which (CapturedLoop.replay calls this on CUDA).
    cache = CapturedLoopCache()
    table = torch.zeros(4, 8)
    noise = {"noise": StepInput((3,), torch.float32, lambda n: torch.zeros(n, 3))}
    loop = lookup(cache, torch.ones(3), module=module, step_inputs=noise, keep_alive=(table, "not a tensor"))
    recorded, waits = [], []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: recorded.append((tensor, stream.name)))

    for name in ("home", "home", "user", "user", "other", "home", "other"):
        loop._enter_stream(_NamedStream(name, waits))
    assert waits == [("user", "home"), ("other", "user"), ("home", "other"), ("other", "home")]

    expected_tensors = [
        loop.buffers.inputs["x"],
        loop.buffers.inputs["scale"],
        loop.step_slots["noise"],
        loop.buffers.timesteps[0]._base,
        table,
        module.weight,
        module.bias,
    ]
    for stream in ("home", "user", "other"):
        tensors = [tensor for tensor, recorded_on in recorded if recorded_on == stream]
        assert len(tensors) == len(expected_tensors), f"{stream}: each allocation once"
        assert all(any(tensor is kept for tensor in tensors) for kept in expected_tensors), stream
