"""Dynamic thresholding's per-sample scale s (Imagen, arXiv 2205.11487), exactly as diffusers computes it.

diffusers' ``_threshold_sample`` takes, per sample b, s_b = quantile(|x_0[b]|, ratio) over the flattened row in fp32,
then clamps s_b to [1, sample_max_value]. ``torch.quantile`` sorts every row; here a Triton kernel selects the two
needed order statistics by radix select instead and reproduces ``torch.quantile`` bit for bit. It reads
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
bits exceed the prefix (a min-reduction folded into the last pass). Rows up to ``REGISTER_ROW_LIMIT`` elements are
loaded once and kept in registers; longer rows are re-read in ``CHUNK_SIZE`` chunks in each of the four passes.
"""

import math

import numpy as np
import torch
import triton
import triton.language as tl

from fastddim.kernels.ddim_step import (
    SAMPLE,
    _coefficient_row,
    _element_offsets,
    _pred_original_sample,
)
from fastddim.ops import PREDICTION_TYPES, _coalesce_layout, _nullcontext

# Rows up to this many elements stay in registers (16 warps x 32 keys per thread); longer rows are streamed.
REGISTER_ROW_LIMIT = 16384
# Elements per iteration of the streamed path for dense rows, and for strided rows, whose int64 div/mod address
# arithmetic needs more registers (8192 spills there at 16 warps on sm_90).
CHUNK_SIZE = 8192
STRIDED_CHUNK_SIZE = 4096

_KEY_INF = tl.constexpr(0x7F800000)  # bits of +inf; keys above it are NaN
_KEY_MAX = tl.constexpr(0x7FFFFFFF)  # "no key" sentinel of the min-reductions
_NUM_BINS = tl.constexpr(256)


@triton.jit
def _row_keys(
    model_output_row_ptr,
    sample_row_ptr,
    idx,  # [BLOCK_SIZE] int64 element index within the row
    valid,  # [BLOCK_SIZE] idx < row_numel
    coef_row_ptr,  # this step's row of the coefficient table
    row_valid,  # whether the timestep is in range
    size1,
    size2,
    size3,
    stride_mo1,
    stride_mo2,
    stride_mo3,
    stride_s1,
    stride_s2,
    stride_s3,
    PREDICTION_TYPE: tl.constexpr,
    DENSE_ROW: tl.constexpr,
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
):
    """int32 keys of |x_0| for one block of a row: the fp32 bit pattern with the sign bit cleared."""
    if DENSE_ROW:
        # Both rows are the same permutation of one dense block: element order is irrelevant to a quantile.
        off_mo = idx
        off_s = idx
    else:
        off_mo = _element_offsets(idx, size1, size2, size3, 0, stride_mo1, stride_mo2, stride_mo3)
        off_s = _element_offsets(idx, size1, size2, size3, 0, stride_s1, stride_s2, stride_s3)
    model_output = tl.load(model_output_row_ptr + off_mo, mask=valid, other=0.0).to(tl.float32)
    if PREDICTION_TYPE == SAMPLE:
        sample = model_output
    else:
        sample = tl.load(sample_row_ptr + off_s, mask=valid, other=0.0).to(tl.float32)
    pred_original = _pred_original_sample(
        model_output, sample, coef_row_ptr, row_valid, PREDICTION_TYPE, DIVIDE_BY_RECIPROCAL
    )
    return pred_original.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _radix_pass_block(
    keys,  # [BLOCK_SIZE] int32
    valid,  # [BLOCK_SIZE]
    prefix,  # int32: the digits above SHIFT + 8 found so far, in place
    histogram,  # [256] int32 running histogram of this pass
    nan_count,  # int32 running count of NaN keys (pass 0 only)
    above_min,  # int32 running min of keys above prefix | 0xFF (last pass only)
    SHIFT: tl.constexpr,
):
    """Adds one block of keys to a radix pass: histogram of digit (keys >> SHIFT) & 0xFF among prefix matches."""
    if SHIFT == 24:
        # Top digit: every key matches the empty prefix (and a shift by 32 would be undefined).
        match = valid
        nan_count += tl.sum((valid & (keys > _KEY_INF)).to(tl.int32), axis=0)
    else:
        match = valid & ((keys >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    if SHIFT == 0:
        above = valid & (keys > (prefix | 0xFF))
        above_min = tl.minimum(above_min, tl.min(tl.where(above, keys, _KEY_MAX), axis=0))
    digit = (keys >> SHIFT) & 0xFF
    histogram += tl.histogram(digit, _NUM_BINS, mask=match)
    return histogram, nan_count, above_min


@triton.jit(do_not_specialize=["rank_lo"])
def _dynamic_threshold_scale_kernel(
    # Pointers to tensors
    model_output_ptr,  # [B, D1, D2, D3] any float dtype
    sample_ptr,  # [B, D1, D2, D3] same dtype as model_output; not read for PREDICTION_TYPE == SAMPLE
    coef_table_ptr,  # [num_train_timesteps, NUM_COEFS] fp32
    timestep_ptr,  # int64 scalar when TIMESTEP_FROM_PTR
    scale_ptr,  # fp32 [B] output s
    # Scalars
    timestep,
    num_train_timesteps,
    row_numel,  # n = D1 * D2 * D3
    rank_lo,  # floor(r), r = fp32(ratio) * fp32(n - 1), computed on the host
    rank_weight,  # r - floor(r), an fp32 value
    sample_max_value,
    # Logical row shape (ignored when DENSE_ROW)
    size1,
    size2,
    size3,
    # Strides, in elements
    stride_mo0,
    stride_mo1,
    stride_mo2,
    stride_mo3,
    stride_s0,
    stride_s1,
    stride_s2,
    stride_s3,
    # Meta-parameters
    PREDICTION_TYPE: tl.constexpr,
    DENSE_ROW: tl.constexpr,
    TIMESTEP_FROM_PTR: tl.constexpr,
    # Divide by a coefficient as PyTorch divides a tensor by a CPU scalar on this device (see ddim_step.py).
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
    # The whole row fits in one block: load it once and run every pass on registers.
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 so batches past 2^31 elements index correctly.
    row = tl.program_id(0).to(tl.int64)
    model_output_row_ptr = model_output_ptr + row * stride_mo0
    sample_row_ptr = sample_ptr + row * stride_s0

    # For SAMPLE, x_0 = model_output ignores the coefficients (and an out-of-range timestep), as in the step kernel.
    coef_row_ptr, row_valid = _coefficient_row(
        coef_table_ptr, timestep_ptr, timestep, num_train_timesteps, TIMESTEP_FROM_PTR
    )

    offsets = tl.arange(0, BLOCK_SIZE).to(tl.int64)  # [BLOCK_SIZE]
    if SINGLE_BLOCK:
        in_row = offsets < row_numel
        row_keys = _row_keys(
            model_output_row_ptr,
            sample_row_ptr,
            offsets,
            in_row,
            coef_row_ptr,
            row_valid,
            size1,
            size2,
            size3,
            stride_mo1,
            stride_mo2,
            stride_mo3,
            stride_s1,
            stride_s2,
            stride_s3,
            PREDICTION_TYPE,
            DENSE_ROW,
            DIVIDE_BY_RECIPROCAL,
        )

    bins = tl.arange(0, _NUM_BINS)  # [256]
    prefix = tl.full((), 0, tl.int32)
    # Rank of the wanted key among the keys that share `prefix`.
    rank = tl.full((), 0, tl.int32) + rank_lo
    nan_count = tl.full((), 0, tl.int32)
    above_min = tl.full((), _KEY_MAX, tl.int32)
    for radix_pass in tl.static_range(4):
        shift = 24 - 8 * radix_pass
        histogram = tl.zeros([_NUM_BINS], tl.int32)
        if SINGLE_BLOCK:
            histogram, nan_count, above_min = _radix_pass_block(
                row_keys, in_row, prefix, histogram, nan_count, above_min, shift
            )
        else:
            for start in range(0, row_numel, BLOCK_SIZE):
                idx = start + offsets
                valid = idx < row_numel
                keys = _row_keys(
                    model_output_row_ptr,
                    sample_row_ptr,
                    idx,
                    valid,
                    coef_row_ptr,
                    row_valid,
                    size1,
                    size2,
                    size3,
                    stride_mo1,
                    stride_mo2,
                    stride_mo3,
                    stride_s1,
                    stride_s2,
                    stride_s3,
                    PREDICTION_TYPE,
                    DENSE_ROW,
                    DIVIDE_BY_RECIPROCAL,
                )
                histogram, nan_count, above_min = _radix_pass_block(
                    keys, valid, prefix, histogram, nan_count, above_min, shift
                )
        # The wanted digit is the first bin whose inclusive cumulative count exceeds the rank.
        cumulative = tl.cumsum(histogram, axis=0)
        digit = tl.sum((cumulative <= rank).to(tl.int32), axis=0)
        rank -= tl.sum(tl.where(bins < digit, histogram, 0), axis=0)
        prefix = prefix | (digit << shift)

    key_lo = prefix
    # The hi-th key equals key_lo while copies of it remain, else it is the smallest key above key_lo.
    copies = tl.sum(tl.where(bins == digit, histogram, 0), axis=0)
    next_digit = tl.min(tl.where((bins > digit) & (histogram > 0), bins, _NUM_BINS), axis=0)
    next_in_bin = tl.where(next_digit < _NUM_BINS, (key_lo & ~0xFF) | next_digit, _KEY_MAX)
    key_hi = tl.where(rank + 1 < copies, key_lo, tl.minimum(next_in_bin, above_min))
    # hi = lo when w = 0, which also covers lo = n - 1 (nothing above; see quantile_rank): weight 0 must not meet
    # an inf above, as 0 * inf would be NaN.
    key_hi = tl.where(rank_weight == 0.0, key_lo, key_hi)

    value_lo = key_lo.to(tl.float32, bitcast=True)
    value_hi = key_hi.to(tl.float32, bitcast=True)
    difference = value_hi - value_lo
    quantile = tl.where(
        rank_weight < 0.5,
        tl.fma(rank_weight, difference, value_lo),
        tl.fma(rank_weight - 1.0, difference, value_hi),
    )
    quantile = tl.where(nan_count > 0, float("nan"), quantile)
    # torch.clamp(s, min=1, max=sample_max_value): max wins when min > max; NaN propagates.
    scale = tl.maximum(quantile, 1.0, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.minimum(scale, sample_max_value, propagate_nan=tl.PropagateNan.ALL)
    tl.store(scale_ptr + row, scale)


def quantile_rank(row_numel: int, ratio: float) -> tuple[int, float]:
    """``torch.quantile``'s interpolation rank for a row of ``row_numel`` >= 1 elements, evaluated in fp32.

    Args:
        row_numel (`int`): n, the number of elements per row.
        ratio (`float`): the quantile q in [0, 1].

    Returns:
        `tuple`: (lo, w) with lo = floor(r) clamped to n - 1 and w = r - floor(r), r = fp32(q) * fp32(n - 1).
    """
    rank = np.float32(ratio) * np.float32(row_numel - 1)
    lo = math.floor(rank)
    if lo >= row_numel - 1:
        # r = n - 1 exactly (ratio 1), or r > n - 1 when fp32(n - 1) rounds up (n > 2^24 + 1), where torch would
        # index past the row: both take the last element.
        return row_numel - 1, 0.0
    return lo, float(rank - np.float32(lo))


def _threshold_launch_config(row_numel: int, dense_row: bool) -> tuple[int, int, bool]:
    """(BLOCK_SIZE, num_warps, SINGLE_BLOCK) for one program per row; no autotune (graph capture forbids it)."""
    if row_numel > REGISTER_ROW_LIMIT:
        block_size, single_block = CHUNK_SIZE if dense_row else STRIDED_CHUNK_SIZE, False
    else:
        block_size, single_block = triton.next_power_of_2(row_numel), True
    block_size = max(block_size, 32)
    # One program per row runs alone on its SM: up to 16 warps for memory-level parallelism, but at least one
    # element per thread, so that no warp holds a replica of another's elements when tl.histogram counts them.
    num_warps = min(4 if block_size <= 1024 else 8 if block_size <= 2048 else 16, block_size // 32)
    return block_size, num_warps, single_block


def _inner_layout(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(size, stride) of the non-trivial inner dims: equal lists mean identically laid out rows."""
    return [(size, stride) for size, stride in zip(tensor.shape[1:], tensor.stride()[1:], strict=True) if size != 1]


def _row_layout(
    model_output: torch.Tensor, sample: torch.Tensor
) -> tuple[bool, list[int], list[int], list[int]] | None:
    """(DENSE_ROW, sizes [B, D1, D2, D3], model_output strides, sample strides), or None if not expressible.

    Rows are dense when both tensors store each row as the same permutation of one block of consecutive slots
    (contiguous, channels_last, ...): a quantile ignores element order, so the kernel then reads each row linearly.
    """
    batch = sample.shape[0]
    inner = _inner_layout(sample)
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in inner):
        if stride != expected:
            break
        expected *= size
    else:
        if _inner_layout(model_output) == inner:
            row_numel = expected
            return True, [batch, 1, 1, row_numel], [model_output.stride(0), 0, 0, 1], [sample.stride(0), 0, 0, 1]
    layout = _coalesce_layout(tuple(sample.shape), [tuple(model_output.stride()), tuple(sample.stride())])
    if layout is None:
        return None
    sizes, (stride_mo, stride_s) = layout
    return False, sizes, stride_mo, stride_s


@torch.library.triton_op("fastddim::dynamic_threshold_scale", mutates_args={})
def dynamic_threshold_scale(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_table: torch.Tensor,
    timestep_tensor: torch.Tensor | None,
    timestep: int,
    prediction_type: int,
    ratio: float,
    sample_max_value: float,
) -> torch.Tensor:
    """Per-sample dynamic-thresholding scale s from the step's inputs, on a CUDA (or interpreted CPU) device.

    Bit-identical to ``dynamic_threshold_scale_ref`` applied to x_0 as the fused step kernel computes it (fp32, from
    inputs upcast to fp32). One program per batch row; no host sync, so it can be captured in a CUDA graph.

    Args:
        model_output (`torch.Tensor`): the denoiser output, rank >= 1 with the batch first, fp16/bf16/fp32.
        sample (`torch.Tensor`): x_t, same shape and dtype as ``model_output`` (any strides).
        coef_table (`torch.Tensor`): fp32 [T, 8] table from ``fastddim.ops.build_coefficient_table`` on the device.
        timestep_tensor (`torch.Tensor`, *optional*): 0-dim int timestep on the device; if None, ``timestep`` is used.
        timestep (`int`): the timestep when ``timestep_tensor`` is None.
        prediction_type (`int`): index into ``fastddim.ops.PREDICTION_TYPES``.
        ratio (`float`): the quantile of |x_0|, in (0, 1] (validated by the scheduler).
        sample_max_value (`float`): upper clamp of s, > 0 (validated by the scheduler).

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
    layout = _row_layout(model_output, sample)
    if layout is None:
        # More than three non-mergeable inner dims (e.g. a permuted 6-D tensor): copy once (rare).
        model_output, sample = model_output.contiguous(), sample.contiguous()
        layout = _row_layout(model_output, sample)
    dense_row, sizes, stride_mo, stride_s = layout

    rank_lo, rank_weight = quantile_rank(row_numel, ratio)
    block_size, num_warps, single_block = _threshold_launch_config(row_numel, dense_row)
    placeholder = coef_table
    kernel = torch.library.wrap_triton(_dynamic_threshold_scale_kernel)
    with torch.cuda.device(sample.device) if sample.is_cuda else _nullcontext():
        kernel[(batch,)](
            model_output,
            sample,
            coef_table,
            timestep_tensor if timestep_tensor is not None else placeholder,
            scale,
            timestep,
            coef_table.shape[0],
            row_numel,
            rank_lo,
            rank_weight,
            sample_max_value,
            sizes[1],
            sizes[2],
            sizes[3],
            *stride_mo,
            *stride_s,
            PREDICTION_TYPE=prediction_type,
            DENSE_ROW=dense_row,
            TIMESTEP_FROM_PTR=timestep_tensor is not None,
            DIVIDE_BY_RECIPROCAL=sample.is_cuda,
            SINGLE_BLOCK=single_block,
            BLOCK_SIZE=block_size,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return scale


def dynamic_threshold_scale_ref(
    pred_original_sample: torch.Tensor, ratio: float, sample_max_value: float
) -> torch.Tensor:
    """Pure-PyTorch twin of ``dynamic_threshold_scale``, given x_0: diffusers' ``_threshold_sample`` scale s.

    Unlike diffusers it accepts any rank >= 1 (diffusers' ``np.prod`` of the trailing dims breaks 2-D samples).

    Args:
        pred_original_sample (`torch.Tensor`): x_0, batch first; upcast to fp32 unless fp64.
        ratio (`float`): the quantile of |x_0| per sample, in (0, 1].
        sample_max_value (`float`): upper clamp of s.

    Returns:
        `torch.Tensor`: [B] s = clamp(quantile(|x_0[b]|, ratio), min=1, max=sample_max_value), fp32 (fp64 for fp64).
    """
    x = pred_original_sample
    if x.dtype not in (torch.float32, torch.float64):
        # torch.quantile needs fp32/fp64 (diffusers #1349).
        x = x.float()
    abs_rows = x.reshape(x.shape[0], -1).abs()
    scale = torch.quantile(abs_rows, ratio, dim=1)
    return torch.clamp(scale, min=1, max=sample_max_value)
