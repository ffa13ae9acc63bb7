"""Dynamic thresholding's per-sample scale s (Imagen, arXiv 2205.11487), exactly as diffusers computes it.

diffusers' ``_threshold_sample`` takes, per sample b, s_b = quantile(|x_0[b]|, ratio) over the flattened row in fp32,
then clamps s_b to [1, sample_max_value]. ``torch.quantile`` sorts every row; here a Triton kernel selects the two
needed order statistics by radix select instead and reproduces ``torch.quantile`` bit for bit (so does the PyTorch
twin, ``dynamic_threshold_scale_ref``, with ``kthvalue``). It reads
``model_output`` and ``sample`` and recomputes x_0 exactly as the fused step kernel does, so a thresholded step is two
launches (this one, then ``fastddim.ops.ddim_step`` with ``threshold_scale``) and no host sync.

Exact ``torch.quantile`` semantics (ATen ``Sorting.cpp``, checked empirically against torch 2.13 on CPU):

- rank r = fp32(ratio) * fp32(n - 1), one fp32 multiply; lo = floor(r), hi = ceil(r), w = r - lo (exact);
- value = lerp(sorted[lo], sorted[hi], w), where ATen's lerp evaluates w < 0.5 ? a + w (b - a) : b - (b - a)(1 - w)
  with a fused multiply-add: fma(w, b - a, a) or fma(w - 1, b - a, b). The CPU kernel's vectorised path says so
  explicitly (``LerpKernel.cpp``; observed on rows of every batch size) and nvcc contracts the CUDA lambda the same
  way. An unfused evaluation differs in the last bit for roughly one row in a thousand;
- any NaN in a row makes its quantile NaN; the formula itself gives NaN for inf - inf (e.g. a = b = inf).

Radix select: |x| clears the sign bit, and for non-negative IEEE floats the bit pattern, read as an int32 key, is
monotone in the value (NaN patterns sort above +inf, as NaN does in ``torch.sort``). The lo-th smallest key is found
digit by digit, 7 + 8 + 8 + 8 bits from the top, each pass a 256-bin ``tl.histogram`` of the digit among the keys
that share the digits found so far. The hi-th key (hi = lo + 1 unless w = 0) is the same key if it occurs often
enough, else the smallest key above it: the next non-empty bin of the last pass, or the smallest key whose top 24
bits exceed the prefix (a min-reduction folded into the last pass). A program's span of up to
``REGISTER_ROW_LIMIT`` elements is loaded once and kept in registers; longer spans are re-read in ``CHUNK_SIZE``
chunks in each of the four passes.

Several programs per row: the passes are instruction-bound (``tl.histogram`` costs tens of instructions per key), so
one program per row would leave all but B SMs idle. When B is below the SM count, each row is split into C spans,
one program each, launched cooperatively (all resident, one per SM). After each pass every program atomically adds
its histogram (and NaN count, and min above) into a per-row scratch buffer and waits at a barrier among the row's
programs; all then read the same row-wide histogram and take the same digit, so the result does not depend on C.
Once few keys of the row still match the prefix (with the default ratio the quantile lies in the tail, so from the
second or third pass on), a pass skips ``tl.histogram`` and adds one atomic per matching key to the shared bins
instead: the same counts, without a histogram's cost for every key of the span.
The scratch is kept per (device, stream, B, C) and left as found: a pass's histogram is zero-filled once every
program has read it (after the next barrier; the last pass's at the start of the next launch), and the barrier
counter counts generations instead of being reset.
"""

import math
from typing import NamedTuple

import torch
import triton

from fastddim import compat, ops
from fastddim.kernels import threshold as threshold_kernels
from fastddim.kernels.threshold import dynamic_threshold_scale_kernel
from fastddim.ops import coalesce_layout, contiguous_strides
from fastddim.reference import PREDICTION_TYPES, quantile_rank
from fastddim.utils import BoundedCache

# Rows up to this many elements stay in registers (16 warps x 32 keys per thread); longer rows are streamed.
REGISTER_ROW_LIMIT = 16384
SCRATCH_STRIDE = threshold_kernels.SCRATCH_STRIDE.value
# Elements per iteration of the streamed path for dense rows, and for strided rows, whose int64 div/mod address
# arithmetic needs more registers (8192 spills there at 16 warps on sm_90).
CHUNK_SIZE = 8192
STRIDED_CHUNK_SIZE = 4096


# The fewest elements a program of a split row gets (a power of two: spans are powers of two from it, or multiples of
# the chunk size, so every span's first element stays 16-byte aligned). Measured on an H100
# (bench/tools/threshold_split_sweep.py): the scale of a 1x4x64x64 row took 10.4 us with 64 programs of 256, 12.8 us
# with 16 of 1024, 35 us with one.
MIN_PROGRAM_SPAN = 256
# Launches with this many programs per row or more share histograms through scratch (tests lower it to 1 to run the
# shared-histogram protocol in the interpreter, which runs one program at a time and so can only run C = 1).
MIN_PROGRAMS_FOR_SHARED_HISTOGRAM = 2
# With shared histograms, a pass counts per key (see the module docstring) when at most this many program spans'
# worth of the row's keys match its prefix. The bound caps the worst case, every match in one bin (ties), at a span's
# worth of atomics on one address, estimated to cost about what tl.histogram costs a program
# (bench/tools/threshold_split_sweep.py compares 1 and 4 with 0, never). The first pass, where every key of the row
# matches and a few exponent bins take them all, always takes the histogram, whatever the value.
PER_KEY_COUNT_SPANS = 1


class _LaunchConfig(NamedTuple):
    programs_per_row: int
    program_span: int
    block_size: int
    num_warps: int
    single_block: bool
    shared_histogram: bool
    per_key_count_limit: int  # the kernel's per_key_count_limit: 0 (never) unless shared_histogram


_multiprocessor_counts: dict[torch.device, int] = {}


def _max_resident_programs(device: torch.device) -> int:
    """Programs a cooperative launch can hold with one program per SM (1 off CUDA: the interpreter runs them in turn)."""
    if device.type != "cuda":
        return 1
    count = _multiprocessor_counts.get(device)
    if count is None:
        count = _multiprocessor_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def _threshold_launch_config(row_numel: int, dense_row: bool, batch: int = 1, max_programs: int = 1) -> _LaunchConfig:
    """Grid split and block shape for a row of ``row_numel`` elements; no autotune (graph capture forbids it).

    Up to ``max_programs`` programs in all, one per SM: a batch smaller than the SM count splits each row into C
    spans so the radix passes run on C SMs and meet at a barrier, instead of leaving all but B SMs idle.
    """
    chunk_size = CHUNK_SIZE if dense_row else STRIDED_CHUNK_SIZE
    programs_per_row = max(1, min(max_programs // max(batch, 1), row_numel // MIN_PROGRAM_SPAN))
    program_span = row_numel
    if programs_per_row > 1:
        # A program's time follows its block, not its span: round spans up to whole blocks (fewer programs, same
        # time), which also keeps every span's first element aligned for vector loads.
        program_span = triton.cdiv(row_numel, programs_per_row)
        if program_span <= REGISTER_ROW_LIMIT:
            program_span = triton.next_power_of_2(program_span)
        else:
            program_span = triton.cdiv(program_span, chunk_size) * chunk_size
        programs_per_row = triton.cdiv(row_numel, program_span)
    if program_span > REGISTER_ROW_LIMIT:
        block_size, single_block = chunk_size, False
    else:
        block_size, single_block = triton.next_power_of_2(program_span), True
    block_size = max(block_size, 32)
    # One program per SM: up to 16 warps for memory-level parallelism, but at least one element per thread, so
    # that no warp holds a replica of another's elements when tl.histogram counts them.
    num_warps = min(4 if block_size <= 1024 else 8 if block_size <= 2048 else 16, block_size // 32)
    shared_histogram = programs_per_row >= MIN_PROGRAMS_FOR_SHARED_HISTOGRAM
    per_key_count_limit = min(int(program_span * PER_KEY_COUNT_SPANS), row_numel - 1) if shared_histogram else 0
    return _LaunchConfig(
        programs_per_row, program_span, block_size, num_warps, single_block, shared_histogram, per_key_count_limit
    )


# Shared-histogram scratch per (device, stream, batch, programs per row). The kernel leaves it zero-filled (each
# pass's histogram is cleared once read) and its barrier counters consistent, so one zero-fill at creation serves
# every later launch and graph replay; launches on one stream are ordered, and other streams get their own. Entries are
# never evicted: a captured graph may hold the only other reference. Graphs captured on one stream (PyTorch's shared
# capture stream) share a scratch, so, like graphs sharing a memory pool, they must not replay concurrently.
_scratch_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _histogram_scratch(device: torch.device, batch: int, programs_per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(histograms int32 [B, 4, 512], barrier counters int64 [B]) for a shared-histogram launch."""
    stream = compat.current_raw_stream(device.index) if device.type == "cuda" else 0
    key = (device, stream, batch, programs_per_row)
    scratch = _scratch_buffers.get(key)
    if scratch is None:
        histograms = torch.zeros(batch, 4, SCRATCH_STRIDE, dtype=torch.int32, device=device)
        barriers = torch.zeros(batch, dtype=torch.int64, device=device)
        scratch = _scratch_buffers[key] = (histograms, barriers)
    return scratch


def _inner_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """(size, stride) of the non-trivial inner dims: equal lists mean identically laid out rows."""
    return [(size, stride) for size, stride in zip(shape[1:], strides[1:], strict=True) if size != 1]


def _row_layout(
    shape: tuple[int, ...], stride_mo: tuple[int, ...], stride_s: tuple[int, ...]
) -> tuple[bool, list[int], list[int], list[int]] | None:
    """(DENSE_ROW, sizes [B, D1, D2, D3], model_output strides, sample strides), or None if not expressible.

    Rows are dense when both tensors store each row as the same permutation of one block of consecutive slots
    (contiguous, channels_last, ...): a quantile ignores element order, so the kernel then reads each row linearly.
    """
    batch = shape[0]
    inner = _inner_layout(shape, stride_s)
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in inner):
        if stride != expected:
            break
        expected *= size
    else:
        if _inner_layout(shape, stride_mo) == inner:
            row_numel = expected
            return True, [batch, 1, 1, row_numel], [stride_mo[0], 0, 0, 1], [stride_s[0], 0, 0, 1]
    layout = coalesce_layout(shape, [stride_mo, stride_s])
    if layout is None:
        return None
    sizes, (coalesced_mo, coalesced_s) = layout
    return False, sizes, coalesced_mo, coalesced_s


class _ThresholdPlan(NamedTuple):
    """How to launch the scale kernel for one signature: everything derived from shapes, strides and the ratio."""

    make_contiguous: bool  # the rows are not expressible as [B, D1, D2, D3]: copy the inputs once first
    config: _LaunchConfig
    row_args: tuple  # (row_numel, programs_per_row, program_span, rank_lo, rank_weight, per_key_count_limit)
    layout_args: tuple[int, ...]  # (size1, size2, size3, *model_output strides, *sample strides)
    meta: dict  # constexpr meta-parameters and launch options
    constexpr_values: tuple | None  # in signature order, for direct launches; None when interpreted
    launchers: dict  # compiled kernels' launchers by fastddim.compat.launcher_key


THRESHOLD_PLANS: BoundedCache[tuple, _ThresholdPlan] = BoundedCache(256)


def _plan_threshold(
    shape: tuple[int, ...],
    stride_mo: tuple[int, ...],
    stride_s: tuple[int, ...],
    prediction_type: int,
    ratio: float,
    timestep_from_ptr: int,
    is_cuda: bool,
    max_programs: int,
) -> _ThresholdPlan:
    batch = shape[0]
    row_numel = math.prod(shape) // batch
    make_contiguous = False
    layout = _row_layout(shape, stride_mo, stride_s)
    if layout is None:
        # More than three non-mergeable inner dims (e.g. a permuted 6-D tensor): copy once (rare).
        make_contiguous = True
        contiguous = contiguous_strides(shape)
        layout = _row_layout(shape, contiguous, contiguous)
    dense_row, sizes, coalesced_mo, coalesced_s = layout
    config = _threshold_launch_config(row_numel, dense_row, batch, max_programs)
    rank_lo, rank_weight = quantile_rank(row_numel, ratio)
    meta = {
        "PREDICTION_TYPE": prediction_type,
        "DENSE_ROW": dense_row,
        "TIMESTEP_FROM_PTR": timestep_from_ptr,
        "DIVIDE_BY_RECIPROCAL": is_cuda,
        "SHARED_HISTOGRAM": config.shared_histogram,
        "SINGLE_BLOCK": config.single_block,
        "BLOCK_SIZE": config.block_size,
        "num_warps": config.num_warps,
        "enable_fp_fusion": False,
    }
    if config.shared_histogram:
        # All programs of a row must be resident at once for the barrier: a cooperative launch guarantees it, or
        # fails outright rather than hang.
        meta["launch_cooperative_grid"] = True
    return _ThresholdPlan(
        make_contiguous,
        config,
        (
            row_numel,
            config.programs_per_row,
            config.program_span,
            rank_lo,
            float(rank_weight),
            config.per_key_count_limit,
        ),
        (*sizes[1:], *coalesced_mo, *coalesced_s),
        meta,
        compat.constexpr_values(dynamic_threshold_scale_kernel, meta),
        {},
    )


def launch_dynamic_threshold_scale(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_table: torch.Tensor,
    timestep_tensor: torch.Tensor | None,
    timestep: int,
    prediction_type: int,
    ratio: float,
    sample_max_value: float,
    traceable: bool = True,
) -> torch.Tensor:
    """Per-sample dynamic-thresholding scale s from the step's inputs, on a CUDA (or interpreted CPU) device.

    Bit-identical to ``dynamic_threshold_scale_ref`` applied to x_0 as the fused step kernel computes it (fp32, from
    inputs upcast to fp32). One program per batch row, or, for batches smaller than the SM count (and not under
    torch.compile), C programs per row that share their histograms (see the module docstring); no host sync, so it
    can be captured in a CUDA graph.

    Args:
        model_output (`torch.Tensor`): the denoiser output, rank >= 1 with the batch first, fp16/bf16/fp32.
        sample (`torch.Tensor`): x_t, same shape and dtype as ``model_output`` (any strides).
        coef_table (`torch.Tensor`): fp32 [T, 8] table from ``fastddim.reference.build_coefficient_table`` on the device.
        timestep_tensor (`torch.Tensor`, *optional*): one-element integer timestep on the device, or [B] timesteps,
            one per row; if None, ``timestep`` is used.
        timestep (`int`): the timestep when ``timestep_tensor`` is None.
        prediction_type (`int`): index into ``fastddim.reference.PREDICTION_TYPES``.
        ratio (`float`): the quantile of |x_0|, in (0, 1] (validated by the scheduler).
        sample_max_value (`float`): upper clamp of s, > 0 (validated by the scheduler).
        traceable (`bool`): launch through ``torch.library.wrap_triton`` (what the registered op does, for
            torch.compile), one program per row. ``False`` launches eagerly, through a cached launch plan and, on
            CUDA, the compiled kernel's launcher where that fast path is on (``fastddim.compat.launch``).

    Returns:
        `torch.Tensor`: fp32 [B] s per sample, clamp(quantile(|x_0|, ratio), 1, sample_max_value).
    """
    batch = sample.shape[0]
    row_numel = sample.numel() // batch if batch > 0 else 0
    if row_numel == 0:
        # torch.quantile rejects empty rows; an empty batch needs no launch.
        return torch.full((batch,), float("nan"), dtype=torch.float32, device=sample.device)
    scale = torch.empty(batch, dtype=torch.float32, device=sample.device)

    if PREDICTION_TYPES[prediction_type] == "sample":
        # x_0 = model_output: the layout of `sample` is irrelevant since it is never read.
        sample = model_output
    shape, stride_mo, stride_s = tuple(sample.shape), model_output.stride(), sample.stride()
    # The traced launch (torch.compile) keeps one program per row: the shared-histogram scratch is state kept across
    # launches, which a functional graph cannot hold.
    max_programs = 1 if traceable else _max_resident_programs(sample.device)
    signature = (
        shape,
        stride_mo,
        stride_s,
        prediction_type,
        ratio,
        ops.timestep_mode(timestep_tensor),
        sample.is_cuda,
    )
    key = None if traceable else (*signature, max_programs)
    plan = None if key is None else THRESHOLD_PLANS.get(key)
    if plan is None:
        # Traced launches plan every time, as in fastddim.ops.launch_ddim_step.
        plan = _plan_threshold(*signature, max_programs)
        if key is not None:
            THRESHOLD_PLANS.put(key, plan)
    if plan.make_contiguous:
        model_output, sample = model_output.contiguous(), sample.contiguous()

    config = plan.config
    if config.shared_histogram:
        histograms, barriers = _histogram_scratch(sample.device, batch, config.programs_per_row)
    else:
        histograms = barriers = scale  # placeholders, never read
    tensors = (
        model_output,
        sample,
        coef_table,
        timestep_tensor if timestep_tensor is not None else coef_table,
        scale,
        histograms,
        barriers,
    )
    scalars = (timestep, coef_table.shape[0], *plan.row_args, float(sample_max_value), *plan.layout_args)
    grid = (batch, config.programs_per_row)
    compat.launch(
        dynamic_threshold_scale_kernel,
        grid,
        tensors,
        scalars,
        plan.meta,
        plan.constexpr_values,
        plan.launchers,
        traceable,
    )
    return scale


# Registered for torch.compile; eager callers use the plain launcher, as for ``fastddim.ops.ddim_step``.
dynamic_threshold_scale = torch.library.triton_op("fastddim::dynamic_threshold_scale", mutates_args={})(
    launch_dynamic_threshold_scale
)
