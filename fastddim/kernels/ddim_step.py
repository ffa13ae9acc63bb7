"""Triton kernels for one DDIM update (Song et al., 2021, arXiv 2010.02502).

Only ``@triton.jit`` code lives here; launch logic (shapes, strides, grid, registration) is in ``fastddim/ops.py``
and the pure-PyTorch twin of every formula is in ``fastddim/reference.py``.

Notation (code name -> paper symbol; alpha_prod is diffusers' ``alphas_cumprod``, the paper's alpha_t):

    sqrt_alpha_prod_t       sqrt(alpha_t)
    sqrt_beta_prod_t        sqrt(1 - alpha_t)
    sqrt_alpha_prod_prev    sqrt(alpha_{t-1})                (alpha_{t-1} = final_alpha_cumprod past t = 0)
    std_dev_t               sigma_t = eta * sqrt((1 - alpha_{t-1}) / (1 - alpha_t) * (1 - alpha_t / alpha_{t-1})), eq. (16)
    direction_coef          sqrt(1 - alpha_{t-1} - sigma_t^2), eq. (12)
    pred_original_sample    "predicted x_0", eq. (12)
    pred_epsilon            epsilon_theta(x_t)
    prev_sample             x_{t-1}, eq. (12)

The per-timestep scalars come from a small fp32 table (``fastddim.reference.build_coefficient_table``) computed by the
same torch operations diffusers uses, so they are bit-identical to diffusers' 0-dim coefficients. Every elementwise
operation is then a separate IEEE-rounded fp32 op in diffusers' order, so fp32 results match diffusers bit for bit,
and the launcher disables mul+add -> FMA contraction. Division by a coefficient follows what PyTorch does for a
tensor divided by a CPU scalar on the same device: a correctly rounded division on the CPU (``div_rn``; plain ``/``
would lower to an approximate division on NVIDIA GPUs), a multiplication by the fp32 reciprocal on CUDA.
"""

import triton
import triton.language as tl

# Column layout of the per-timestep coefficient table built by ``fastddim.reference.build_coefficient_table``.
COEF_SQRT_ALPHA_PROD_T = tl.constexpr(0)
COEF_SQRT_BETA_PROD_T = tl.constexpr(1)
COEF_SQRT_ALPHA_PROD_PREV = tl.constexpr(2)
COEF_STD_DEV_T = tl.constexpr(3)
COEF_DIRECTION = tl.constexpr(4)
COEF_INV_SQRT_ALPHA_PROD_T = tl.constexpr(5)
COEF_INV_SQRT_BETA_PROD_T = tl.constexpr(6)
NUM_COEFS = tl.constexpr(8)

# PREDICTION_TYPE values (the order of ``fastddim.reference.PREDICTION_TYPES``).
EPSILON = tl.constexpr(0)
SAMPLE = tl.constexpr(1)
V_PREDICTION = tl.constexpr(2)

# TIMESTEP_FROM_PTR values: the timestep is the ``timestep`` argument, element 0 of ``timestep_ptr``, or element b of
# ``timestep_ptr`` for batch entry b (per-sample timesteps, the DDIM paper's own code steps a batch this way). The
# launchers pass a bool for the first two, which compares equal.
TIMESTEP_SCALAR = tl.constexpr(0)
TIMESTEP_POINTER = tl.constexpr(1)
TIMESTEP_PER_SAMPLE = tl.constexpr(2)

# NOISE_MODE values. The two per-sample modes draw the same numbers (element j of sample b takes component j % 4 of
# ``keyed_normals4(seed_b, t, j // 4)``); they differ in how: one Philox call per four elements where every sample's
# size is a multiple of 4 (four consecutive elements then always share a sample and a call), one per element otherwise.
NOISE_NONE = tl.constexpr(0)
NOISE_TENSOR = tl.constexpr(1)
NOISE_PHILOX = tl.constexpr(2)
NOISE_PHILOX_PER_SAMPLE = tl.constexpr(3)
NOISE_PHILOX_PER_SAMPLE_RAGGED = tl.constexpr(4)

# Philox counter word 3 of the per-sample noise: keeps its streams apart from NOISE_PHILOX's (word 3 = 0 there).
PER_SAMPLE_NOISE_STREAM = tl.constexpr(1)


@triton.jit
def load_coefficient(coef_row_ptr, column: tl.constexpr, row_valid):
    # An out-of-range device timestep cannot raise without a host sync; NaN coefficients make it visible instead.
    return tl.load(coef_row_ptr + column, mask=row_valid, other=float("nan"))


@triton.jit
def load_timestep(timestep_ptr, timestep, batch, TIMESTEP_FROM_PTR: tl.constexpr):
    """The int64 timestep(s) of this step: the argument, element 0 of ``timestep_ptr``, or element ``batch`` of it."""
    if TIMESTEP_FROM_PTR == TIMESTEP_PER_SAMPLE:
        return tl.load(timestep_ptr + batch).to(tl.int64)
    elif TIMESTEP_FROM_PTR:
        return tl.load(timestep_ptr).to(tl.int64)
    else:
        return tl.full((), timestep, tl.int64)


@triton.jit
def coefficient_row(
    coef_table_ptr,  # [num_train_timesteps, NUM_COEFS] fp32, contiguous
    timestep_ptr,  # integer scalar, or [B] per sample, read only when TIMESTEP_FROM_PTR
    timestep,  # Python int timestep, used when not TIMESTEP_FROM_PTR
    num_train_timesteps,
    batch,  # batch index (a scalar or a block of them, each in [0, B)), read only for TIMESTEP_PER_SAMPLE
    TIMESTEP_FROM_PTR: tl.constexpr,
):
    """Returns (pointer(s) to the table row of this step's timestep(s), whether each timestep is in range).

    With TIMESTEP_PER_SAMPLE and a block of batch indices, both are blocks: every element gathers its own row.
    """
    t = load_timestep(timestep_ptr, timestep, batch, TIMESTEP_FROM_PTR)
    row_valid = (t >= 0) & (t < num_train_timesteps)
    t = tl.where(row_valid, t, 0)
    return coef_table_ptr + t * NUM_COEFS, row_valid


@triton.jit
def divide_by_coefficient(numerator, coefficient, reciprocal, DIVIDE_BY_RECIPROCAL: tl.constexpr):
    """numerator / coefficient, rounded as PyTorch rounds ``tensor / cpu_scalar`` on the tensors' device."""
    if DIVIDE_BY_RECIPROCAL:
        return numerator * reciprocal
    else:
        return tl.math.div_rn(numerator, coefficient)


@triton.jit
def pred_original_sample(
    model_output,
    sample,
    coef_row_ptr,
    row_valid,
    PREDICTION_TYPE: tl.constexpr,
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
):
    """Predicted x_0 from the model output, eq. (12) "predicted x_0" (fp32 in, fp32 out)."""
    sqrt_alpha_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_ALPHA_PROD_T, row_valid)
    sqrt_beta_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_BETA_PROD_T, row_valid)
    if PREDICTION_TYPE == EPSILON:
        inv_sqrt_alpha_prod_t = load_coefficient(coef_row_ptr, COEF_INV_SQRT_ALPHA_PROD_T, row_valid)
        return divide_by_coefficient(
            sample - sqrt_beta_prod_t * model_output, sqrt_alpha_prod_t, inv_sqrt_alpha_prod_t, DIVIDE_BY_RECIPROCAL
        )
    elif PREDICTION_TYPE == SAMPLE:
        return model_output
    else:
        return sqrt_alpha_prod_t * sample - sqrt_beta_prod_t * model_output


@triton.jit
def _epsilon_from_pred_original(sample, pred_original, coef_row_ptr, row_valid, DIVIDE_BY_RECIPROCAL: tl.constexpr):
    """epsilon = (x_t - sqrt(alpha_t) x_0) / sqrt(1 - alpha_t), eq. (12) solved for epsilon."""
    sqrt_alpha_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_ALPHA_PROD_T, row_valid)
    sqrt_beta_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_BETA_PROD_T, row_valid)
    inv_sqrt_beta_prod_t = load_coefficient(coef_row_ptr, COEF_INV_SQRT_BETA_PROD_T, row_valid)
    return divide_by_coefficient(
        sample - sqrt_alpha_prod_t * pred_original, sqrt_beta_prod_t, inv_sqrt_beta_prod_t, DIVIDE_BY_RECIPROCAL
    )


@triton.jit
def keyed_normals4(seed, timestep, counter):
    """Four standard normals from Philox4x32-10 with key ``seed`` and counter (counter, timestep, stream tag).

    Args: int64 blocks of one shape (or scalars that broadcast to it): the per-sample seed, the step's timestep
    (unique within a schedule, so it names the step without a step index frozen into a captured graph) and the
    element group's counter. The Box-Muller transform is tl.randn4x's.
    """
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = c0 * 0 + timestep.to(tl.uint32)
    c3 = c0 * 0 + PER_SAMPLE_NOISE_STREAM
    i1, i2, i3, i4 = tl.philox(seed, c0, c1, c2, c3)
    n1, n2 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i1), tl.uint_to_uniform_float(i2))
    n3, n4 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i3), tl.uint_to_uniform_float(i4))
    return n1, n2, n3, n4


@triton.jit
def per_sample_noise(
    seed_ptr,  # int64 [B]: the Philox key of each sample
    timestep_ptr,
    timestep,
    pid,
    idx,  # [BLOCK_SIZE] int64 logical (row-major) element index
    batch,  # [BLOCK_SIZE] int64 batch index of each element (clamped into [0, B))
    numel,
    row_numel,
    NOISE_MODE: tl.constexpr,
    TIMESTEP_FROM_PTR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """z of eq. (12) for a block of elements: element j of sample b is component j % 4 of
    ``keyed_normals4(seed_b, t_b, j // 4)``, so it depends on (seed_b, t_b, j) only: not on the batch size, the
    sample's position in the batch, BLOCK_SIZE or the grid."""
    if NOISE_MODE == NOISE_PHILOX_PER_SAMPLE:
        # row_numel and BLOCK_SIZE are multiples of 4: the four elements from a multiple of 4 share a sample and a
        # counter, so one Philox call serves them (as in NOISE_PHILOX).
        first = pid * BLOCK_SIZE + 4 * tl.arange(0, BLOCK_SIZE // 4).to(tl.int64)  # [BLOCK_SIZE // 4]
        group_batch = tl.minimum(first, numel - 1) // row_numel
        seed = tl.load(seed_ptr + group_batch)
        t = load_timestep(timestep_ptr, timestep, group_batch, TIMESTEP_FROM_PTR)
        n1, n2, n3, n4 = keyed_normals4(seed, t, (first - group_batch * row_numel) // 4)
        # join stacks along a new last axis: this nesting flattens to n1, n2, n3, n4 per group.
        return tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (BLOCK_SIZE,))
    else:
        # A sample may start mid-group: each element runs its own group's Philox call and keeps its component.
        seed = tl.load(seed_ptr + batch)
        t = load_timestep(timestep_ptr, timestep, batch, TIMESTEP_FROM_PTR)
        j = idx - batch * row_numel
        n1, n2, n3, n4 = keyed_normals4(seed, t, j // 4)
        component = j % 4
        return tl.where(component == 0, n1, tl.where(component == 1, n2, tl.where(component == 2, n3, n4)))


@triton.jit
def element_offsets(
    idx,  # [BLOCK_SIZE] int64 logical (row-major) element index
    size1,
    size2,
    size3,
    stride0,
    stride1,
    stride2,
    stride3,
):
    """Memory offsets of logical indices into a 4-D strided view."""
    i3 = idx % size3
    rest = idx // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * stride0 + i1 * stride1 + i2 * stride2 + i3 * stride3


@triton.jit
def _ddim_update(
    model_output_ptr,
    sample_ptr,
    noise_ptr,
    prev_sample_ptr,
    pred_original_ptr,
    coef_table_ptr,
    timestep_ptr,
    seed_ptr,
    threshold_scale_ptr,
    timestep,
    num_train_timesteps,
    clip_sample_range,
    pid,  # int64 program id
    idx,  # [BLOCK_SIZE] int64 logical element index
    numel,
    row_numel,  # elements per batch entry
    mask,  # [BLOCK_SIZE] element in range
    off_mo,  # [BLOCK_SIZE] int64 memory offsets of this block's elements in each tensor
    off_s,
    off_n,
    off_out,
    batch,  # [BLOCK_SIZE] int64 batch index of each element, in [0, B) (read with THRESHOLD, per-sample timesteps or
    # per-sample noise)
    PREDICTION_TYPE: tl.constexpr,
    CLIP_SAMPLE: tl.constexpr,
    THRESHOLD: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    NOISE_MODE: tl.constexpr,
    TIMESTEP_FROM_PTR: tl.constexpr,
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The DDIM update of one block of elements, given their offsets: the body both step kernels share."""
    coef_row_ptr, row_valid = coefficient_row(
        coef_table_ptr, timestep_ptr, timestep, num_train_timesteps, batch, TIMESTEP_FROM_PTR
    )
    sqrt_alpha_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_ALPHA_PROD_T, row_valid)
    sqrt_beta_prod_t = load_coefficient(coef_row_ptr, COEF_SQRT_BETA_PROD_T, row_valid)
    sqrt_alpha_prod_prev = load_coefficient(coef_row_ptr, COEF_SQRT_ALPHA_PROD_PREV, row_valid)

    model_output = tl.load(model_output_ptr + off_mo, mask=mask).to(tl.float32)
    sample = tl.load(sample_ptr + off_s, mask=mask).to(tl.float32)

    # 1. predicted x_0 and epsilon, eq. (12)
    pred_original = pred_original_sample(
        model_output, sample, coef_row_ptr, row_valid, PREDICTION_TYPE, DIVIDE_BY_RECIPROCAL
    )
    if PREDICTION_TYPE == EPSILON:
        pred_epsilon = model_output
    elif PREDICTION_TYPE == SAMPLE:
        pred_epsilon = _epsilon_from_pred_original(
            sample, pred_original, coef_row_ptr, row_valid, DIVIDE_BY_RECIPROCAL
        )
    else:
        pred_epsilon = sqrt_alpha_prod_t * model_output + sqrt_beta_prod_t * sample

    # 2. dynamic thresholding (Imagen, arXiv 2205.11487) has priority over clipping, as in diffusers
    if THRESHOLD:
        scale = tl.load(threshold_scale_ptr + batch, mask=mask, other=1.0)
        pred_original = tl.clamp(pred_original, -scale, scale, propagate_nan=tl.PropagateNan.ALL)
        pred_original = tl.math.div_rn(pred_original, scale)
    elif CLIP_SAMPLE:
        pred_original = tl.clamp(
            pred_original, -clip_sample_range, clip_sample_range, propagate_nan=tl.PropagateNan.ALL
        )

    # 3. epsilon re-derived from the clipped x_0
    if USE_CLIPPED_MODEL_OUTPUT:
        pred_epsilon = _epsilon_from_pred_original(
            sample, pred_original, coef_row_ptr, row_valid, DIVIDE_BY_RECIPROCAL
        )

    # 4. x_{t-1} without noise, eq. (12): sqrt(alpha_{t-1}) x_0 + sqrt(1 - alpha_{t-1} - sigma_t^2) epsilon
    direction_coef = load_coefficient(coef_row_ptr, COEF_DIRECTION, row_valid)
    prev_sample = sqrt_alpha_prod_prev * pred_original + direction_coef * pred_epsilon

    # 5. random noise sigma_t * z, eq. (12)
    if NOISE_MODE != NOISE_NONE:
        std_dev_t = load_coefficient(coef_row_ptr, COEF_STD_DEV_T, row_valid)
    if NOISE_MODE == NOISE_TENSOR:
        noise = tl.load(noise_ptr + off_n, mask=mask).to(tl.float32)
        prev_sample = prev_sample + std_dev_t * noise
    elif NOISE_MODE == NOISE_PHILOX:
        # One Philox call yields four normals: element idx takes component idx % 4 of counter idx // 4. That is a
        # quarter of tl.randn's Philox and half its Box-Muller work, and the noise still depends only on (seed, idx),
        # not on BLOCK_SIZE or the grid (BLOCK_SIZE is a multiple of 4).
        seed = tl.load(seed_ptr)
        counter = pid * (BLOCK_SIZE // 4) + tl.arange(0, BLOCK_SIZE // 4).to(tl.int64)  # [BLOCK_SIZE // 4]
        noise_0, noise_1, noise_2, noise_3 = tl.randn4x(seed, counter)
        noise = tl.reshape(tl.join(tl.join(noise_0, noise_1), tl.join(noise_2, noise_3)), (BLOCK_SIZE,))
        prev_sample = prev_sample + std_dev_t * noise
    elif NOISE_MODE >= NOISE_PHILOX_PER_SAMPLE:  # either per-sample mode (Triton's compiler has no `in`)
        noise = per_sample_noise(
            seed_ptr,
            timestep_ptr,
            timestep,
            pid,
            idx,
            batch,
            numel,
            row_numel,
            NOISE_MODE,
            TIMESTEP_FROM_PTR,
            BLOCK_SIZE,
        )
        prev_sample = prev_sample + std_dev_t * noise

    tl.store(prev_sample_ptr + off_out, prev_sample.to(prev_sample_ptr.dtype.element_ty), mask=mask)
    tl.store(pred_original_ptr + off_out, pred_original.to(pred_original_ptr.dtype.element_ty), mask=mask)


# The timestep changes every step: specializing on it (Triton treats an int equal to 1 as a constant and tracks
# divisibility by 16) would compile new variants in the middle of a sampling loop, perhaps inside a CUDA-graph capture.
@triton.jit(do_not_specialize=["timestep", "num_train_timesteps"])
def ddim_step_flat_kernel(
    # Pointers to tensors, all sharing one dense layout (any dim order); see ddim_step_kernel
    model_output_ptr,
    sample_ptr,
    noise_ptr,
    prev_sample_ptr,
    pred_original_ptr,
    coef_table_ptr,
    timestep_ptr,
    seed_ptr,
    threshold_scale_ptr,
    # Scalars
    timestep,
    num_train_timesteps,
    clip_sample_range,
    numel,
    row_numel,  # elements per batch entry: the storage offset of batch b starts at b * row_numel
    # Meta-parameters
    PREDICTION_TYPE: tl.constexpr,
    CLIP_SAMPLE: tl.constexpr,
    THRESHOLD: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    NOISE_MODE: tl.constexpr,
    TIMESTEP_FROM_PTR: tl.constexpr,
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The common case, every tensor laid out alike and dense: memory is indexed directly, no div/mod address
    arithmetic, and half the arguments of the strided kernel (Triton's launch binds every argument on the host)."""
    # int64 so tensors past 2^31 elements index correctly.
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)  # [BLOCK_SIZE]
    # Clamped so that the masked-off tail of the last block reads a valid per-sample timestep.
    per_row = THRESHOLD or TIMESTEP_FROM_PTR == TIMESTEP_PER_SAMPLE or NOISE_MODE == NOISE_PHILOX_PER_SAMPLE_RAGGED
    batch = tl.minimum(idx, numel - 1) // row_numel if per_row else idx
    _ddim_update(
        model_output_ptr,
        sample_ptr,
        noise_ptr,
        prev_sample_ptr,
        pred_original_ptr,
        coef_table_ptr,
        timestep_ptr,
        seed_ptr,
        threshold_scale_ptr,
        timestep,
        num_train_timesteps,
        clip_sample_range,
        pid,
        idx,
        numel,
        row_numel,
        idx < numel,
        idx,
        idx,
        idx,
        idx,
        batch,
        PREDICTION_TYPE,
        CLIP_SAMPLE,
        THRESHOLD,
        USE_CLIPPED_MODEL_OUTPUT,
        NOISE_MODE,
        TIMESTEP_FROM_PTR,
        DIVIDE_BY_RECIPROCAL,
        BLOCK_SIZE,
    )


@triton.jit(do_not_specialize=["timestep", "num_train_timesteps"])
def ddim_step_kernel(
    # Pointers to tensors
    model_output_ptr,  # [B, D1, D2, D3] any float dtype
    sample_ptr,  # [B, D1, D2, D3] same dtype as model_output
    noise_ptr,  # [B, D1, D2, D3] (may have 0 strides) when NOISE_MODE == NOISE_TENSOR
    prev_sample_ptr,  # [B, D1, D2, D3] output x_{t-1}
    pred_original_ptr,  # [B, D1, D2, D3] output x_0, same strides as prev_sample
    coef_table_ptr,  # [num_train_timesteps, NUM_COEFS] fp32
    timestep_ptr,  # integer scalar when TIMESTEP_FROM_PTR, [B] for TIMESTEP_PER_SAMPLE
    seed_ptr,  # int64 [1] Philox seed for NOISE_PHILOX; int64 [B], one key per sample, for the per-sample modes
    threshold_scale_ptr,  # fp32 [B] dynamic-threshold s per sample when THRESHOLD
    # Scalars
    timestep,
    num_train_timesteps,
    clip_sample_range,
    numel,
    # Logical shape (the batch size is implied by numel)
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
    stride_n0,
    stride_n1,
    stride_n2,
    stride_n3,
    stride_out0,
    stride_out1,
    stride_out2,
    stride_out3,
    # Meta-parameters
    PREDICTION_TYPE: tl.constexpr,
    CLIP_SAMPLE: tl.constexpr,
    THRESHOLD: tl.constexpr,
    USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    NOISE_MODE: tl.constexpr,
    TIMESTEP_FROM_PTR: tl.constexpr,
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Any strided [B, D1, D2, D3] view per tensor (non-contiguous, broadcast noise, mixed layouts)."""
    # int64 so tensors past 2^31 elements index correctly.
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)  # [BLOCK_SIZE]
    _ddim_update(
        model_output_ptr,
        sample_ptr,
        noise_ptr,
        prev_sample_ptr,
        pred_original_ptr,
        coef_table_ptr,
        timestep_ptr,
        seed_ptr,
        threshold_scale_ptr,
        timestep,
        num_train_timesteps,
        clip_sample_range,
        pid,
        idx,
        numel,
        size1 * size2 * size3,
        idx < numel,
        element_offsets(idx, size1, size2, size3, stride_mo0, stride_mo1, stride_mo2, stride_mo3),
        element_offsets(idx, size1, size2, size3, stride_s0, stride_s1, stride_s2, stride_s3),
        element_offsets(idx, size1, size2, size3, stride_n0, stride_n1, stride_n2, stride_n3),
        element_offsets(idx, size1, size2, size3, stride_out0, stride_out1, stride_out2, stride_out3),
        tl.minimum(idx, numel - 1) // (size1 * size2 * size3)
        if THRESHOLD or TIMESTEP_FROM_PTR == TIMESTEP_PER_SAMPLE or NOISE_MODE == NOISE_PHILOX_PER_SAMPLE_RAGGED
        else idx,
        PREDICTION_TYPE,
        CLIP_SAMPLE,
        THRESHOLD,
        USE_CLIPPED_MODEL_OUTPUT,
        NOISE_MODE,
        TIMESTEP_FROM_PTR,
        DIVIDE_BY_RECIPROCAL,
        BLOCK_SIZE,
    )
