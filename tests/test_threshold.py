"""Dynamic thresholding's per-sample scale: the radix-select kernel (``fastddim.threshold``) against torch.quantile.

The oracle is diffusers' formula, ``torch.quantile`` on the CPU then the clamp, applied to x_0 computed by diffusers'
torch formula from the inputs upcast to fp32, i.e. the same fp32 x_0 the kernel computes. The PyTorch twin
``dynamic_threshold_scale_ref`` (selection by ``kthvalue``) is checked against the same oracle. Every comparison is bit
for bit (NaN where the oracle is NaN). On the CPU the kernel runs in Triton's interpreter; with CUDA the same tests
compile it for the GPU, and the ``gpu`` tests add realistic sizes, CUDA's own ``torch.quantile`` and graph capture.
"""

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from fastddim import reference, threshold
from fastddim.reference import dynamic_threshold_scale_ref, quantile_rank
from fastddim.threshold import dynamic_threshold_scale, launch_dynamic_threshold_scale
from fastddim.utils import BoundedCache
from tests.helpers import interpreter_fma_rounds_twice

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TIMESTEP = 981
BIG = 1e4  # a sample_max_value that clamps nothing here
EPSILON, SAMPLE, V_PREDICTION = (reference.PREDICTION_TYPES.index(p) for p in ("epsilon", "sample", "v_prediction"))

interpreter = pytest.mark.interpreter


def gpu(test):
    """The ``gpu`` marker, skipping cleanly where CUDA is absent."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@pytest.fixture(autouse=True)
def fresh_launch_plans(monkeypatch):
    # Launch plans are cached per signature: tests that lower the module's size limits must not meet plans made with
    # the defaults (nor leave theirs behind).
    monkeypatch.setattr(threshold, "THRESHOLD_PLANS", BoundedCache(256))


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    scheduler = DiffusersDDIMScheduler()
    return reference.build_coefficient_table(scheduler.alphas_cumprod, scheduler.final_alpha_cumprod, 50, 0.0)


def _pred_original(model_output, sample, table, prediction_type, timestep=TIMESTEP):
    """x_0 by diffusers' formula, in fp32 from fp32-upcast inputs (one rounding per op, as in the kernel)."""
    sqrt_alpha_prod_t, sqrt_beta_prod_t = table[timestep, 0], table[timestep, 1]
    model_output, sample = model_output.float(), sample.float()
    if prediction_type == EPSILON:
        return (sample - sqrt_beta_prod_t * model_output) / sqrt_alpha_prod_t
    if prediction_type == SAMPLE:
        return model_output
    return sqrt_alpha_prod_t * sample - sqrt_beta_prod_t * model_output


def _scale(model_output, sample, table, prediction_type=EPSILON, ratio=0.995, sample_max_value=BIG, **kwargs):
    """The scale by the eager launcher, as the scheduler's step calls it (the registered op is tested apart)."""
    timestep_tensor = kwargs.get("timestep_tensor")
    timestep = kwargs.get("timestep", TIMESTEP)
    return launch_dynamic_threshold_scale(
        model_output,
        sample,
        table.to(model_output.device),
        timestep_tensor,
        timestep,
        prediction_type,
        ratio,
        sample_max_value,
        traceable=False,
    )


def _quantile_scale(pred_original, ratio, sample_max_value):
    """diffusers' ``_threshold_sample`` scale, literally: torch.quantile of |x_0| per row, then the clamp."""
    rows = pred_original.reshape(pred_original.shape[0], -1).abs()
    return torch.clamp(torch.quantile(rows, ratio, dim=1), min=1, max=sample_max_value)


def _expected(model_output, sample, table, prediction_type=EPSILON, ratio=0.995, sample_max_value=BIG):
    pred_original = _pred_original(model_output, sample, table, prediction_type).cpu()
    return _quantile_scale(pred_original, ratio, sample_max_value)


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual = actual.cpu()
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"NaN pattern differs: {actual} vs {expected}"
    assert torch.equal(actual[~nan].view(torch.int32), expected[~nan].view(torch.int32)), f"{actual} vs {expected}"


def _check(model_output, sample, table, prediction_type=EPSILON, ratio=0.995, sample_max_value=BIG) -> None:
    actual = _scale(model_output, sample, table, prediction_type, ratio, sample_max_value)
    _assert_bitwise(actual, _expected(model_output, sample, table, prediction_type, ratio, sample_max_value))


def _inputs(shape, dtype=torch.float32, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    model_output = (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
    sample = (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
    return model_output, sample


SHAPES = [(3, 5), (2, 3, 8, 8), (1, 1, 1, 1), (2, 3, 2, 4, 4), (2, 3, 7, 9), (4,), (5, 1)]


@interpreter_fma_rounds_twice
@interpreter
@pytest.mark.parametrize("prediction_type", [EPSILON, SAMPLE, V_PREDICTION], ids=reference.PREDICTION_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_quantile_fp32(table, shape, prediction_type, nan_poisoned_empty):
    model_output, sample = _inputs(shape)
    _check(model_output, sample, table, prediction_type)


@interpreter
@pytest.mark.parametrize("prediction_type", [EPSILON, SAMPLE, V_PREDICTION], ids=reference.PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_use_fp32_pred_original(table, dtype, prediction_type):
    model_output, sample = _inputs((2, 3, 8, 8), dtype)
    _check(model_output, sample, table, prediction_type)


@interpreter
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.995, 1.0, 1e-6, 0.3333])
def test_ratios(table, ratio):
    model_output, sample = _inputs((3, 3, 7, 9))
    _check(model_output, sample, table, EPSILON, ratio)


@interpreter
@pytest.mark.parametrize("sample_max_value", [0.25, 1.0, 3.0, BIG])
def test_sample_max_value_clamp(table, sample_max_value):
    # Rows of |x_0| around 0.5, 2 and 6: below the clamp's min of 1, inside [1, 3] and above 3.
    model_output = (
        torch.rand(3, 2, 4, 4).to(DEVICE) * torch.tensor([0.5, 2.0, 6.0], device=DEVICE)[:, None, None, None]
    )
    expected = _expected(model_output, model_output, table, SAMPLE, 0.9, sample_max_value)
    if sample_max_value < 1:
        # torch.clamp with min > max returns max.
        assert torch.equal(expected, torch.full((3,), sample_max_value))
    _assert_bitwise(_scale(model_output, model_output, table, SAMPLE, 0.9, sample_max_value), expected)


@interpreter
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9, 0.995, 1.0])
def test_ties(table, ratio):
    generator = torch.Generator().manual_seed(3)
    pool = torch.tensor([0.0, -0.0, 1.5, -1.5, 2.0, 7.25, -7.25])
    rows = [
        torch.full((64,), 3.0),  # one value
        torch.zeros(64),
        pool[torch.randint(0, len(pool), (64,), generator=generator)],  # many duplicates, +-x are equal in |x|
        # Keys that share their top 24 bits: the second order statistic comes from the last radix pass.
        torch.tensor([1.0, 1.0 + 2**-23, 1.0 + 2**-22]).repeat(22)[:64],
        # Neighbours across a radix-bin boundary: 2 - 1 ulp and 2.
        torch.tensor([2.0 - 2**-23, 2.0]).repeat(32),
    ]
    model_output = torch.stack(rows).reshape(len(rows), 4, 16).to(DEVICE)
    _check(model_output, model_output, table, SAMPLE, ratio)


@interpreter
@pytest.mark.parametrize("streamed", [False, True], ids=["registers", "streamed"])
@pytest.mark.parametrize("ratio", [0.3, 0.9, 0.995])
def test_second_order_statistic_sources(table, monkeypatch, ratio, streamed):
    # Rows whose (lo + 1)-th smallest |x| comes from each place the kernel looks for it.
    if streamed:
        monkeypatch.setattr(threshold, "REGISTER_ROW_LIMIT", 32)
        monkeypatch.setattr(threshold, "CHUNK_SIZE", 32)
    row_numel = 64
    lo, weight = quantile_rank(row_numel, ratio)
    assert weight != 0
    low, same_top_bits, higher = 1.0, 1.0 + 2**-22, 3.0  # 1 + 2^-22 differs from 1 in the last radix digit only
    rows = []
    for after_low in ([same_top_bits], [same_top_bits, higher], [higher], [higher, same_top_bits]):
        tail = (after_low * row_numel)[: row_numel - lo - 1]
        rows.append(torch.tensor([low] * (lo + 1) + tail))
    rows.append(torch.tensor([low] * lo + [same_top_bits] + [higher] * (row_numel - lo - 1)))  # a single lo-th
    permutation = torch.randperm(row_numel, generator=torch.Generator().manual_seed(0))
    model_output = torch.stack(rows)[:, permutation].reshape(len(rows), 8, 8).to(DEVICE)
    _check(model_output, model_output, table, SAMPLE, ratio)


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_integer_rank_ignores_the_next_value(table):
    # r = 0.5 * 4 = 2 exactly: torch lerps sorted[2] with itself (weight 0); sorted[3] = inf must not leak in as
    # 0 * inf = NaN. At ratio 1 the rank is the last one, with nothing above it.
    model_output = torch.tensor([[1.0, 3.0, float("inf"), 2.0, float("inf")]], device=DEVICE)
    for ratio in (0.5, 1.0):
        _check(model_output, model_output, table, SAMPLE, ratio)
    assert _scale(model_output, model_output, table, SAMPLE, 0.5).item() == 3.0


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("ratio", [0.5, 0.995, 1.0])
def test_nan_and_inf_rows(table, ratio):
    inf, nan = float("inf"), float("nan")
    base = torch.linspace(-3, 3, 16)
    rows = []
    for position, value in [(5, nan), (15, inf), (0, -inf), (3, nan)]:
        row = base.clone()
        row[position] = value
        rows.append(row)
    rows.append(torch.full((16,), inf))  # inf - inf inside torch's lerp: NaN
    rows.append(torch.where(base > 0, inf, base))  # half inf
    model_output = torch.stack(rows).reshape(len(rows), 2, 8).to(DEVICE)
    _check(model_output, model_output, table, SAMPLE, ratio)
    assert _scale(model_output, model_output, table, SAMPLE, ratio)[[0, 3]].isnan().all()


@interpreter
def test_out_of_range_timestep_gives_nan_except_for_sample_prediction(table):
    model_output, sample = _inputs((2, 3, 4, 4))
    bad = torch.tensor(table.shape[0], device=DEVICE)
    assert _scale(model_output, sample, table, EPSILON, timestep_tensor=bad).isnan().all()
    good = _scale(model_output, sample, table, SAMPLE, timestep_tensor=bad)
    _assert_bitwise(good, _expected(model_output, sample, table, SAMPLE))


@interpreter
def test_timestep_tensor_matches_int_timestep(table):
    model_output, sample = _inputs((2, 3, 4, 4))
    by_tensor = _scale(
        model_output, sample, table, V_PREDICTION, timestep_tensor=torch.tensor(TIMESTEP, device=DEVICE)
    )
    _assert_bitwise(by_tensor, _expected(model_output, sample, table, V_PREDICTION))


@interpreter_fma_rounds_twice
@interpreter
@pytest.mark.parametrize(
    ("low", "high", "ratio"),
    [
        # Pairs where torch's fused-multiply-add lerp differs from an unfused one in the last bit.
        (5.1197190284729, 7.604398250579834, 0.2624344825744629),
        (0.43615421652793884, 3.9577383995056152, 0.6075145602226257),
    ],
)
def test_lerp_is_fused_like_torch(table, low, high, ratio):
    model_output = torch.tensor([[high, low]], device=DEVICE)
    expected = dynamic_threshold_scale_ref(model_output.cpu(), ratio, BIG)
    a, b, w = (torch.tensor(v, dtype=torch.float32) for v in (low, high, ratio))
    unfused = a + w * (b - a) if ratio < 0.5 else b - (b - a) * (1 - w)
    assert not torch.equal(expected[0], unfused), "torch.quantile no longer uses a fused lerp here"
    _assert_bitwise(_scale(model_output, model_output, table, SAMPLE, ratio), expected)


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _strided_slice(x):
    # Every other column of a wider tensor: non-dense rows.
    wide = torch.cat([x, x.flip(-1) * 0.5], dim=-1)
    return wide[..., ::2]


def _batch_slice(x):
    # Rows stay dense, but the batch stride skips a row.
    return torch.stack([x, -x], dim=1).flatten(0, 1)[::2]


def _expanded(x):
    # Stride-0 inner dims: rows are not dense.
    return x[:, :, :1].expand_as(x)


LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": _channels_last,
    "strided": _strided_slice,
    "batch_sliced": _batch_slice,
    "expanded": _expanded,
    "transposed": lambda x: x.transpose(1, 3).contiguous().transpose(1, 3),
}


@interpreter
@pytest.mark.parametrize("sample_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("model_output_layout", list(LAYOUTS))
def test_layouts(table, model_output_layout, sample_layout):
    model_output, sample = _inputs((2, 3, 5, 6))
    model_output = LAYOUTS[model_output_layout](model_output)
    sample = LAYOUTS[sample_layout](sample)
    _check(model_output, sample, table, EPSILON, 0.9)


@interpreter
def test_permuted_high_rank_falls_back_to_a_copy(table):
    # Five inner dims that no pair of strides lets merge: not expressible as [B, D1, D2, D3].
    model_output, sample = _inputs((2, 2, 3, 2, 3, 2))
    model_output = model_output.permute(0, 5, 3, 1, 4, 2).contiguous().permute(0, 3, 5, 2, 4, 1)
    assert threshold._row_layout(tuple(sample.shape), model_output.stride(), sample.stride()) is None
    _check(model_output, sample, table, EPSILON, 0.9)


def _stream_small_rows(monkeypatch) -> None:
    # Small limits push 189-element rows through the multi-chunk path (3 or 6 chunks per pass, the last partial).
    monkeypatch.setattr(threshold, "REGISTER_ROW_LIMIT", 100)
    monkeypatch.setattr(threshold, "CHUNK_SIZE", 64)
    monkeypatch.setattr(threshold, "STRIDED_CHUNK_SIZE", 32)


def _row_case(case: str, seed: int) -> tuple:
    """(model_output, sample, prediction_type, ratio) of 3 rows of 189 elements for a named edge case."""
    model_output, sample = _inputs((3, 3, 7, 9), seed=seed)
    prediction_type, ratio = EPSILON, 0.995
    if case == "strided":
        model_output = _channels_last(model_output)
    elif case == "ties":
        model_output = model_output.round().clamp(-2, 2)
        prediction_type, ratio = SAMPLE, 0.9
    elif case == "nan":
        model_output[seed % 3, 2, 6, 8] = float("nan")
    elif case == "ratio_one":
        ratio = 1.0
    elif case == "sample":
        prediction_type = SAMPLE
    elif case == "inf":
        # The last pass's "smallest key above" slot: inf is the hi-th value of the top rank.
        model_output[seed % 3, 0, 0, 0] = float("inf")
        prediction_type, ratio = SAMPLE, 1 - 1 / 188
    return model_output, sample, prediction_type, ratio


@interpreter
@pytest.mark.parametrize("case", ["dense", "strided", "ties", "nan", "ratio_one", "sample", "inf"])
def test_streamed_rows(table, monkeypatch, case):
    _stream_small_rows(monkeypatch)
    assert not threshold._threshold_launch_config(189, True).single_block
    model_output, sample, prediction_type, ratio = _row_case(case, seed=5)
    _check(model_output, sample, table, prediction_type, ratio)


@interpreter
@pytest.mark.parametrize("counting", ["histogram", "per_key", "mixed"])
@pytest.mark.parametrize("streamed", [False, True], ids=["registers", "streamed"])
@pytest.mark.parametrize("case", ["dense", "strided", "ties", "nan", "ratio_one", "inf"])
def test_shared_histogram_protocol(table, monkeypatch, streamed, case, counting):
    # The interpreter runs one program at a time, so a row's programs cannot meet at a barrier there; with the
    # threshold lowered to C = 1 the kernel still runs the whole protocol: atomics into scratch, the barrier, the
    # row-wide histogram read back, the scratch cleared behind. Several launches on one scratch check that each
    # leaves it as it found it (a stale histogram or counter would change the next result).
    # Passes count with tl.histogram; per key from the second pass on (the first, with every key matching, always
    # takes the histogram: the limit is capped at 188 of 189); or mixed: with a limit of 32, the second pass either
    # way (22-65 keys share a row's top digit, so rows of one launch differ), the last two per key, except on the
    # ties' rows (75-94 keys in one bin), which never count per key.
    monkeypatch.setattr(threshold, "MIN_PROGRAMS_FOR_SHARED_HISTOGRAM", 1)
    monkeypatch.setattr(threshold, "PER_KEY_COUNT_SPANS", {"histogram": 0, "per_key": 1, "mixed": 0.17}[counting])
    monkeypatch.setattr(threshold, "_scratch_buffers", {})
    if streamed:
        _stream_small_rows(monkeypatch)
    assert threshold._threshold_launch_config(189, True).shared_histogram
    for seed in (31, 37, 41):
        model_output, sample, prediction_type, ratio = _row_case(case, seed)
        _check(model_output, sample, table, prediction_type, ratio)
    ((histograms, barriers),) = threshold._scratch_buffers.values()
    # Passes 0-2 are cleared within the launch; the last pass's histogram waits for the next launch to clear it.
    assert not histograms[:, :3].any(), "a launch left a histogram behind"
    assert histograms[:, 3].any()
    assert torch.equal(barriers.cpu(), torch.full((3,), 3 * 4, dtype=torch.int64)), "four barriers per launch"


def test_launch_config_splits_rows_over_the_sms():
    # B rows on an SM count of 132: C programs per row, C * B <= 132, spans of at least MIN_PROGRAM_SPAN elements
    # aligned for vector loads, covering the row exactly.
    for batch, row_numel in [(1, 16384), (16, 12288), (4, 196608), (2, 3 * 256 * 256), (200, 12288), (1, 1500)]:
        config = threshold._threshold_launch_config(row_numel, True, batch, 132)
        assert config.programs_per_row * batch <= max(132, batch)
        assert (
            (config.programs_per_row - 1) * config.program_span
            < row_numel
            <= (config.programs_per_row * config.program_span)
        )
        assert config.shared_histogram == (config.programs_per_row > 1)
        # Later passes may count per key only through shared bins, at most a span's worth of keys.
        assert config.per_key_count_limit == (config.program_span if config.shared_histogram else 0)
    # Never the first pass (all row_numel keys match there), whatever the bound.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threshold, "PER_KEY_COUNT_SPANS", 1 << 30)
        assert threshold._threshold_launch_config(16384, True, 33, 132).per_key_count_limit == 16383
        if config.shared_histogram:
            # Powers of two from MIN_PROGRAM_SPAN, or whole chunks: each span starts 16-byte aligned.
            assert config.program_span % 64 == 0
            assert config.program_span >= threshold.MIN_PROGRAM_SPAN
            assert config.program_span <= config.block_size or config.program_span % config.block_size == 0
    # Spans are whole blocks: 12288 / 8 -> blocks of 2048, so 6 programs do what 8 would in the same time.
    assert threshold._threshold_launch_config(12288, True, 16, 132)[:2] == (6, 2048)
    assert threshold._threshold_launch_config(12288, True, 200, 132).programs_per_row == 1
    assert threshold._threshold_launch_config(196608, True, 4, 132)[:2] == (24, 8192)
    # Spans past the register limit are whole streamed chunks.
    assert threshold._threshold_launch_config(2**22, True, 1, 132)[:3] == (128, 32768, threshold.CHUNK_SIZE)
    # Off CUDA (the interpreter) there is one program per row.
    assert threshold._max_resident_programs(torch.device("cpu")) == 1


@interpreter
def test_rows_longer_than_the_register_limit(table):
    # 27 648 elements per row with the default limits: the 8192-element chunked path.
    shape = (2, 3, 96, 96)
    assert shape[1] * shape[2] * shape[3] > threshold.REGISTER_ROW_LIMIT
    model_output, sample = _inputs(shape, seed=7)
    _check(model_output, sample, table, EPSILON, 0.995)


@interpreter
def test_registered_op_and_empty_inputs(table):
    model_output, sample = _inputs((2, 3, 4, 4))
    args = (table.to(DEVICE), None, TIMESTEP, EPSILON, 0.995, BIG)
    by_op = torch.ops.fastddim.dynamic_threshold_scale(model_output, sample, *args)
    _assert_bitwise(by_op, _expected(model_output, sample, table))
    empty_batch = torch.empty(0, 3, 4, device=DEVICE)
    assert dynamic_threshold_scale(empty_batch, empty_batch, *args).shape == (0,)
    empty_rows = torch.empty(2, 0, device=DEVICE)
    assert dynamic_threshold_scale(empty_rows, empty_rows, *args).isnan().all()


@pytest.mark.parametrize("row_numel", [1, 2, 3, 64, 12288, 196608, 2**24 + 3])
@pytest.mark.parametrize("ratio", [1e-6, 0.5, 0.995, 1.0])
def test_quantile_rank_is_fp32(row_numel, ratio):
    rank = torch.tensor(ratio, dtype=torch.float32) * (row_numel - 1)
    lo, weight = quantile_rank(row_numel, ratio)
    assert lo == min(int(rank.floor()), row_numel - 1)
    if lo < row_numel - 1:
        assert weight == (rank - rank.floor()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sample_max_value", [0.5, 1.0, 2.5])
def test_reference_matches_diffusers_threshold_sample(dtype, sample_max_value):
    scheduler = DiffusersDDIMScheduler(
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=sample_max_value
    )
    generator = torch.Generator().manual_seed(11)
    pred_original = (torch.randn(3, 4, 5, 6, generator=generator) * 2).to(dtype)
    scale = dynamic_threshold_scale_ref(pred_original, 0.9, sample_max_value)[:, None, None, None]
    ours = (torch.clamp(pred_original.float(), -scale, scale) / scale).to(dtype)
    assert torch.equal(ours, scheduler._threshold_sample(pred_original))


def test_reference_accepts_any_rank():
    values = torch.randn(3, 5)
    assert torch.equal(
        dynamic_threshold_scale_ref(values, 0.7, BIG), torch.quantile(values.abs(), 0.7, dim=1).clamp(1)
    )
    assert dynamic_threshold_scale_ref(torch.randn(4), 0.7, BIG).shape == (4,)
    assert (
        dynamic_threshold_scale_ref(torch.randn(2, 3, 2, 4, 4, dtype=torch.float64), 0.7, BIG).dtype == torch.float64
    )


_VALUES = st.one_of(
    st.sampled_from([0.0, 0.5, -1.0, 2.0, 3.0]),
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 20),
    row_numel=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    ratio=st.one_of(st.sampled_from([1.0, 0.5, 0.995]), st.floats(min_value=1e-7, max_value=1.0, exclude_min=True)),
    special=st.sampled_from([None, float("nan"), float("inf")]),
)
def test_reference_selects_what_torch_quantile_sorts(data, batch, row_numel, dtype, ratio, special):
    """kthvalue + lerp in the reference == torch.quantile, bit for bit: ties, NaN and inf rows, ranks computed in the
    row's dtype (fp64 for fp64), and batch sizes on both sides of the CPU lerp kernel's vector width."""
    values = data.draw(st.lists(_VALUES, min_size=batch * row_numel, max_size=batch * row_numel))
    # Shifted to >= 1 so that the clamp to [1, BIG] hides no quantile.
    rows = torch.tensor(values, dtype=dtype).reshape(batch, row_numel).abs() + 1
    if special is not None:
        rows[data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, row_numel - 1))] = special
    _assert_bitwise_any_dtype(dynamic_threshold_scale_ref(rows, ratio, BIG), _quantile_scale(rows, ratio, BIG))


def _assert_bitwise_any_dtype(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"NaN pattern differs: {actual} vs {expected}"
    assert torch.equal(actual[~nan], expected[~nan]), f"{actual} vs {expected}"


def test_reference_on_large_rows_and_empty_rows():
    rows = torch.randn(3, 70000, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 10
    _assert_bitwise_any_dtype(dynamic_threshold_scale_ref(rows, 0.995, BIG), _quantile_scale(rows, 0.995, BIG))
    # torch.quantile rejects empty rows; the twin returns NaN, as the kernel's launcher does.
    assert dynamic_threshold_scale_ref(torch.empty(2, 0), 0.9, BIG).isnan().all()


@interpreter_fma_rounds_twice
@interpreter
@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    inner=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    prediction_type=st.sampled_from([EPSILON, SAMPLE, V_PREDICTION]),
    ratio=st.one_of(st.sampled_from([1.0, 0.5]), st.floats(min_value=1e-7, max_value=1.0, exclude_min=True)),
    sample_max_value=st.sampled_from([0.5, 1.0, 2.0, BIG]),
)
def test_random_rows(table, data, batch, inner, prediction_type, ratio, sample_max_value):
    shape = (batch, *inner)
    numel = batch * torch.Size(inner).numel()
    model_output = torch.tensor(data.draw(st.lists(_VALUES, min_size=numel, max_size=numel))).reshape(shape)
    sample = torch.tensor(data.draw(st.lists(_VALUES, min_size=numel, max_size=numel))).reshape(shape)
    _check(model_output.to(DEVICE), sample.to(DEVICE), table, prediction_type, ratio, sample_max_value)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (16, 4, 128, 128), (2, 3, 256, 256)], ids=str)
def test_gpu_matches_torch_quantile(table, shape, dtype):
    model_output, sample = _inputs(shape, dtype, seed=13)
    actual = _scale(model_output, sample, table, EPSILON, 0.995, BIG)
    # The same fp32 x_0 on the GPU (elementwise torch ops round like the kernel), then CUDA's torch.quantile.
    pred_original = _pred_original(model_output, sample, table, EPSILON)
    _assert_bitwise(actual, dynamic_threshold_scale_ref(pred_original.cpu(), 0.995, BIG))
    # CUDA's torch.quantile agrees if nvcc contracts ATen's lerp into FMAs, as the CPU kernel's vector path does.
    on_cuda = torch.quantile(pred_original.reshape(shape[0], -1).abs(), 0.995, dim=1).clamp(min=1, max=BIG)
    _assert_bitwise(actual, on_cuda.cpu())


@gpu
def test_gpu_channels_last_and_v_prediction(table):
    model_output, sample = _inputs((4, 3, 128, 128), torch.bfloat16, seed=17)
    model_output = _channels_last(model_output)
    _check(model_output, sample, table, V_PREDICTION, 0.9)
    _check(_channels_last(sample), model_output, table, V_PREDICTION, 0.9)


@gpu
@pytest.mark.parametrize("counting", ["default", "histogram", "per_key"])
@pytest.mark.parametrize(
    "shape",
    [(1, 4, 64, 64), (16, 3, 64, 64), (4, 3, 256, 256), (1, 4, 1024, 1024), (3, 2, 37, 41)],
    ids=str,
)
def test_gpu_rows_split_over_programs(table, monkeypatch, shape, counting):
    # Rows split into C programs that meet at barriers: register spans, streamed spans (2^22 elements: 32768 per
    # program), a partial last span. Each case runs several launches on one scratch, with ties, a NaN row, an inf
    # and a strided layout, so a race, a stale histogram or a counter out of step shows as a wrong bit. The passes
    # count by the default rule, always by tl.histogram, or per key from the second pass on (ties then pile
    # thousands of atomics onto one bin).
    monkeypatch.setattr(threshold, "PER_KEY_COUNT_SPANS", {"default": 1, "histogram": 0, "per_key": 1 << 30}[counting])
    config = threshold._threshold_launch_config(
        torch.Size(shape[1:]).numel(), True, shape[0], threshold._max_resident_programs(torch.device(DEVICE))
    )
    assert config.shared_histogram
    for seed in (43, 47):
        model_output, sample = _inputs(shape, torch.float16, seed=seed)
        _check(model_output, sample, table, EPSILON, 0.995)
        _check(_channels_last(model_output), sample, table, V_PREDICTION, 0.9)
        _check(_strided_slice(model_output), _strided_slice(sample), table, EPSILON, 0.9)
        ties = model_output.round().clamp(-2, 2)
        ties[0].view(-1)[seed] = float("inf")
        _check(ties, sample, table, SAMPLE, 1 - 1 / torch.Size(shape[1:]).numel())
        ties[-1].view(-1)[-1] = float("nan")
        _check(ties, sample, table, SAMPLE, 0.5)


@gpu
@pytest.mark.parametrize("launcher", ["registered_op", "eager"])
def test_gpu_cuda_graph_capture(table, launcher):
    # (2, 3, 64, 64): the eager launcher splits each row over 12 programs, a cooperative launch inside the graph.
    model_output, sample = _inputs((2, 3, 64, 64), torch.float16, seed=19)
    device_table = table.to(DEVICE)
    timestep = torch.tensor(TIMESTEP, device=DEVICE)
    traceable = {"registered_op": True, "eager": False}[launcher]

    def run() -> torch.Tensor:
        args = (model_output, sample, device_table, timestep, 0, EPSILON, 0.995, 1.5)
        return dynamic_threshold_scale(*args) if traceable else launch_dynamic_threshold_scale(*args, traceable=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for seed, step in [(23, TIMESTEP), (29, 501)]:
        new_model_output, new_sample = _inputs((2, 3, 64, 64), torch.float16, seed=seed)
        model_output.copy_(new_model_output)
        sample.copy_(new_sample)
        timestep.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        pred_original = _pred_original(model_output, sample, table, EPSILON, step).cpu()
        _assert_bitwise(captured, dynamic_threshold_scale_ref(pred_original, 0.995, 1.5))
