"""Triton kernel for dynamic thresholding's per-sample scale s (Imagen, arXiv 2205.11487).

Only ``@triton.jit`` code lives here; the launcher, the exact ``torch.quantile`` semantics it reproduces and the
radix-select algorithm are documented in ``fastddim/threshold.py``, next to the PyTorch reference twin.
"""

import triton
import triton.language as tl

from fastddim.kernels.ddim_step import (
    SAMPLE,
    coefficient_row,
    element_offsets,
    pred_original_sample,
)

_KEY_INF = tl.constexpr(0x7F800000)  # bits of +inf; keys above it are NaN
_KEY_MAX = tl.constexpr(0x7FFFFFFF)  # "no key" sentinel of the min-reductions
_NUM_BINS = tl.constexpr(256)
# Shared-histogram scratch, per row and radix pass: the 256 bins, the NaN count (pass 0) and KEY_MAX minus the
# smallest key above the last pass's bin (pass 3), so that a zero-filled buffer means "nothing seen" in every slot.
SCRATCH_STRIDE = tl.constexpr(512)
_NAN_SLOT = tl.constexpr(256)
_ABOVE_SLOT = tl.constexpr(257)


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
        off_mo = element_offsets(idx, size1, size2, size3, 0, stride_mo1, stride_mo2, stride_mo3)
        off_s = element_offsets(idx, size1, size2, size3, 0, stride_s1, stride_s2, stride_s3)
    model_output = tl.load(model_output_row_ptr + off_mo, mask=valid, other=0.0).to(tl.float32)
    if PREDICTION_TYPE == SAMPLE:
        sample = model_output
    else:
        sample = tl.load(sample_row_ptr + off_s, mask=valid, other=0.0).to(tl.float32)
    pred_original = pred_original_sample(
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
    row_histogram_ptr,  # this pass's 256 shared bins in scratch (only used when count_per_key)
    count_per_key,  # bool: count matches with an atomic each into row_histogram_ptr instead (needs PER_KEY)
    SHIFT: tl.constexpr,
    PER_KEY: tl.constexpr,
):
    """Adds one block of keys to a radix pass: histogram of digit (keys >> SHIFT) & 0xFF among prefix matches.

    tl.histogram costs tens of instructions per key whether or not the key matches (Triton 3.6). Once few keys of the
    row match the prefix (typical from the second pass on), a global atomic per matching key should cost less, though
    every key still pays a layout conversion of its bin pointer for the atomic (timed by
    bench/tools/threshold_split_sweep.py); the row-wide histogram in scratch is the same either way.
    """
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
    if PER_KEY:
        # A branch on a row-wide count: every program of the row takes the same side.
        if count_per_key:
            ones = tl.full(digit.shape, 1, tl.int32)
            tl.atomic_add(row_histogram_ptr + digit, ones, mask=match, sem="relaxed", scope="gpu")
        else:
            histogram += tl.histogram(digit, _NUM_BINS, mask=match)
    else:
        histogram += tl.histogram(digit, _NUM_BINS, mask=match)
    return histogram, nan_count, above_min


@triton.jit
def _row_barrier(barrier_ptr, programs_per_row):
    """Waits until every program of this row has arrived: a grid barrier among the row's programs.

    The int64 counter is never reset: each barrier adds exactly ``programs_per_row`` arrivals, so the arrival count
    divided by ``programs_per_row`` is the barrier's generation, across passes and across launches. The launch is
    cooperative, so all programs are resident and spinning cannot starve a program that has not started.
    """
    # Every thread's histogram atomics are issued before this program's release (the CUDA grid-sync pattern).
    tl.debug_barrier()
    arrived = tl.atomic_add(barrier_ptr, 1, sem="acq_rel", scope="gpu")
    target = (arrived // programs_per_row + 1) * programs_per_row
    current = arrived + 1
    while current < target:
        current = tl.atomic_add(barrier_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _zero_scratch(pass_ptr, slots, is_first_program):
    """Zero-fills one pass's shared histogram, by the row's first program only (the others may still read it)."""
    # (A compare, not `& is_first_program`: Triton's interpreter turns a bool vector & a program_id test into int32.)
    in_range = slots < tl.where(is_first_program, SCRATCH_STRIDE, 0)
    tl.store(pass_ptr + slots, tl.zeros([SCRATCH_STRIDE], tl.int32), mask=in_range)


# The per-call integers are not specialized (a new timestep must not compile a new kernel mid-loop or mid-capture,
# and fastddim.compat._launch_compiled relies on it).
@triton.jit(do_not_specialize=["timestep", "num_train_timesteps", "rank_lo"])
def dynamic_threshold_scale_kernel(
    # Pointers to tensors
    model_output_ptr,  # [B, D1, D2, D3] any float dtype
    sample_ptr,  # [B, D1, D2, D3] same dtype as model_output; not read for PREDICTION_TYPE == SAMPLE
    coef_table_ptr,  # [num_train_timesteps, NUM_COEFS] fp32
    timestep_ptr,  # integer scalar when TIMESTEP_FROM_PTR, [B] per row for TIMESTEP_PER_SAMPLE
    scale_ptr,  # fp32 [B] output s
    scratch_ptr,  # int32 [B, 4, SCRATCH_STRIDE] shared histograms, zero-filled (only read when SHARED_HISTOGRAM)
    barrier_ptr,  # int64 [B] barrier arrival counters (only read when SHARED_HISTOGRAM)
    # Scalars
    timestep,
    num_train_timesteps,
    row_numel,  # n = D1 * D2 * D3
    programs_per_row,  # C: the row is split into C spans of program_span elements
    program_span,
    rank_lo,  # floor(r), r = fp32(ratio) * fp32(n - 1), computed on the host
    rank_weight,  # r - floor(r), an fp32 value
    per_key_count_limit,  # a pass counts per key when at most this many keys of the row share its prefix
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
    # C > 1 programs per row add their histograms into scratch and meet at a barrier after each pass.
    SHARED_HISTOGRAM: tl.constexpr,
    # The program's span fits in one block: load it once and run every pass on registers.
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64 so batches past 2^31 elements index correctly.
    row = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1)
    model_output_row_ptr = model_output_ptr + row * stride_mo0
    sample_row_ptr = sample_ptr + row * stride_s0
    span_start = program.to(tl.int64) * program_span
    span_end = tl.minimum(span_start + program_span, row_numel)

    # For SAMPLE, x_0 = model_output ignores the coefficients (and an out-of-range timestep), as in the step kernel.
    coef_row_ptr, row_valid = coefficient_row(
        coef_table_ptr, timestep_ptr, timestep, num_train_timesteps, row, TIMESTEP_FROM_PTR
    )

    offsets = tl.arange(0, BLOCK_SIZE).to(tl.int64)  # [BLOCK_SIZE]
    if SINGLE_BLOCK:
        span_idx = span_start + offsets
        in_span = span_idx < span_end
        span_keys = _row_keys(
            model_output_row_ptr,
            sample_row_ptr,
            span_idx,
            in_span,
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
    slots = tl.arange(0, SCRATCH_STRIDE)
    scratch_row_ptr = scratch_ptr + row * (4 * SCRATCH_STRIDE)
    is_first_program = program == 0
    prefix = tl.full((), 0, tl.int32)
    # Rank of the wanted key among the keys that share `prefix`.
    rank = tl.full((), 0, tl.int32) + rank_lo
    nan_count = tl.full((), 0, tl.int32)
    above_min = tl.full((), _KEY_MAX, tl.int32)
    # Keys of the row that share `prefix`: the whole row before the first pass.
    prefix_count = tl.full((), 0, tl.int32) + row_numel
    for radix_pass in tl.static_range(4):
        shift = 24 - 8 * radix_pass
        pass_ptr = scratch_row_ptr + radix_pass * SCRATCH_STRIDE
        if SHARED_HISTOGRAM:
            # Pass q's histogram is free once every program has read it, i.e. after barrier q + 1; the last pass's
            # is cleared at the start of the next launch (launches on one stream run in order), long before that
            # launch's pass 3 adds to it after barrier 2.
            if radix_pass == 0:
                _zero_scratch(scratch_row_ptr + 3 * SCRATCH_STRIDE, slots, is_first_program)
            if radix_pass >= 2:
                _zero_scratch(scratch_row_ptr + (radix_pass - 2) * SCRATCH_STRIDE, slots, is_first_program)
        histogram = tl.zeros([_NUM_BINS], tl.int32)
        count_per_key = prefix_count <= per_key_count_limit
        if SINGLE_BLOCK:
            histogram, nan_count, above_min = _radix_pass_block(
                span_keys,
                in_span,
                prefix,
                histogram,
                nan_count,
                above_min,
                pass_ptr,
                count_per_key,
                shift,
                SHARED_HISTOGRAM,
            )
        else:
            for block_start in range(span_start, span_end, BLOCK_SIZE):
                idx = block_start + offsets
                valid = idx < span_end
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
                    keys,
                    valid,
                    prefix,
                    histogram,
                    nan_count,
                    above_min,
                    pass_ptr,
                    count_per_key,
                    shift,
                    SHARED_HISTOGRAM,
                )
        if SHARED_HISTOGRAM:
            # Sum the programs' histograms (and the NaN count, the min above) through scratch: after the barrier
            # every program reads the same row-wide figures, so all take the same digit below. (A pass that counted
            # per key has already added to scratch; its register histogram is zero and adds nothing.)
            tl.atomic_add(pass_ptr + bins, histogram, mask=histogram > 0, sem="relaxed", scope="gpu")
            if radix_pass == 0:
                tl.atomic_add(pass_ptr + _NAN_SLOT, nan_count, mask=nan_count > 0, sem="relaxed", scope="gpu")
            if radix_pass == 3:
                key_max = tl.full((), _KEY_MAX, tl.int32)
                tl.atomic_max(pass_ptr + _ABOVE_SLOT, key_max - above_min, sem="relaxed", scope="gpu")
            _row_barrier(barrier_ptr + row, programs_per_row)
            # .cg reads at L2, where the atomics landed, past this SM's L1.
            histogram = tl.load(pass_ptr + bins, cache_modifier=".cg")
            if radix_pass == 0:
                nan_count = tl.load(pass_ptr + _NAN_SLOT, cache_modifier=".cg")
            if radix_pass == 3:
                above_min = key_max - tl.load(pass_ptr + _ABOVE_SLOT, cache_modifier=".cg")
        # The wanted digit is the first bin whose inclusive cumulative count exceeds the rank.
        cumulative = tl.cumsum(histogram, axis=0)
        digit = tl.sum((cumulative <= rank).to(tl.int32), axis=0)
        rank -= tl.sum(tl.where(bins < digit, histogram, 0), axis=0)
        prefix_count = tl.sum(tl.where(bins == digit, histogram, 0), axis=0)
        prefix = prefix | (digit << shift)
    if SHARED_HISTOGRAM:
        _zero_scratch(scratch_row_ptr + 2 * SCRATCH_STRIDE, slots, is_first_program)

    key_lo = prefix
    # The hi-th key equals key_lo while copies of it remain (prefix_count: all 31 bits now), else it is the smallest
    # key above key_lo.
    next_digit = tl.min(tl.where((bins > digit) & (histogram > 0), bins, _NUM_BINS), axis=0)
    next_in_bin = tl.where(next_digit < _NUM_BINS, (key_lo & ~0xFF) | next_digit, _KEY_MAX)
    key_hi = tl.where(rank + 1 < prefix_count, key_lo, tl.minimum(next_in_bin, above_min))
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
    tl.store(scale_ptr + row, scale, mask=is_first_program)
