"""The step dispatch both fastddim schedulers share: timestep resolution, backend choice, noise, and the fused step.

``fastddim.DDIMScheduler`` and ``fastddim.DDIMInverseScheduler`` validate their arguments with these functions and
step through ``run_step``; they differ only in the coefficient table they hand it.
"""

import numbers
import os
from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from fastddim import ops, reference
from fastddim.reference import ddim_step_ref
from fastddim.threshold import dynamic_threshold_scale, launch_dynamic_threshold_scale

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "FASTDDIM_BACKEND"

_INTEGER_DTYPES = frozenset(
    (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)
)


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    # float/int first: the numbers.Real ABC check costs about a microsecond, and step() checks several values.
    return type(value) in (float, int) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def selected_backend() -> str:
    """The backend named by ``FASTDDIM_BACKEND`` (``auto`` if unset), read at call time."""
    backend = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    return backend


def backend_for(sample: torch.Tensor) -> str:
    """The backend that steps ``sample``: ``triton`` or ``torch`` (``FASTDDIM_BACKEND``, else by device and dtype)."""
    backend = selected_backend()
    if backend == "auto":
        return "triton" if sample.is_cuda and sample.dtype in ops.TRITON_DTYPES else "torch"
    if backend == "triton":
        if sample.dtype not in ops.TRITON_DTYPES:
            raise ValueError(
                f"{BACKEND_ENV_VAR}=triton supports sample dtypes {ops.TRITON_DTYPES}, got {sample.dtype}"
            )
        if not sample.is_cuda and not ops.KERNELS_INTERPRETED:
            if ops.interpreting():
                raise RuntimeError(
                    "TRITON_INTERPRET=1 was set after fastddim was imported: Triton reads it when fastddim's kernels"
                    " are defined, so set TRITON_INTERPRET=1 before importing fastddim (or use CUDA tensors)"
                )
            raise RuntimeError(
                f"{BACKEND_ENV_VAR}=triton on {sample.device.type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing fastddim (or use CUDA tensors)"
            )
    return backend


def resolve_timestep(
    timestep: object, sample: torch.Tensor, check_range: Callable[[int], int]
) -> tuple[int, torch.Tensor | None, bool]:
    """(int timestep, timestep tensor for the kernels or None, whether diffusers would promote fp16 to fp32).

    A (B,) integer tensor with B = sample.shape[0] > 1 is returned as the tensor (per-sample timesteps), moved to
    the samples' device; its range is checked here when it is on the CPU (no sync), else the kernels give NaN.
    """
    promote = False
    if isinstance(timestep, np.ndarray) and np.issubdtype(timestep.dtype, np.integer) and timestep.size > 1:
        timestep = torch.from_numpy(timestep)
    if isinstance(timestep, torch.Tensor):
        if timestep.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"timestep must be an integer tensor, got dtype {timestep.dtype}")
        if timestep.numel() != 1:
            batch = sample.shape[0]
            if timestep.dim() != 1 or timestep.shape[0] != batch:
                raise ValueError(
                    "timestep must be a single timestep (a 0-dim or one-element tensor) or one per sample (shape"
                    f" ({batch},)), got shape {tuple(timestep.shape)}"
                )
            if not timestep.is_cuda:
                check_range(int(timestep.min()))
                check_range(int(timestep.max()))
            return 0, timestep if timestep.device == sample.device else timestep.to(sample.device), False
        # diffusers' coefficients become 1-D for a 1-D timestep, which promotes fp16/bf16 results to fp32.
        promote = timestep.dim() > 0
        if timestep.is_cuda:
            # The kernels read element 0 of a one-element tensor of any rank: no reshape on the hot path.
            return 0, timestep if timestep.device == sample.device else timestep.to(sample.device), promote
        timestep = int(timestep)
    elif isinstance(timestep, np.ndarray) and timestep.size == 1 and np.issubdtype(timestep.dtype, np.integer):
        timestep = int(timestep.reshape(()))
    if not is_int(timestep):
        raise TypeError(
            f"timestep must be an int, a one-element integer tensor or a (batch,) integer tensor, got"
            f" {type(timestep).__name__}"
        )
    return check_range(int(timestep)), None, promote


def step_noise(
    eta: float,
    generator: torch.Generator | list[torch.Generator] | None,
    variance_noise: torch.Tensor | None,
    model_output: torch.Tensor,
) -> torch.Tensor | None:
    """The z of eq. (12) as diffusers draws it, or None (eta = 0, or to be drawn by the backend)."""
    if not eta > 0:
        return None
    if variance_noise is not None and generator is not None:
        raise ValueError(
            "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
            " `variance_noise` stays `None`."
        )
    if variance_noise is not None:
        return check_variance_noise(variance_noise, model_output)
    if generator is not None:
        return randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
    return None


def check_noise_seeds(
    noise_seeds: object,
    sample: torch.Tensor,
    backend: str,
    generator: object,
    variance_noise: object,
) -> torch.Tensor:
    """Validates ``step``'s ``noise_seeds``: an int64 (B,) tensor on the samples' device, on the Triton backend,
    without ``generator`` or ``variance_noise``. Returns it."""
    if generator is not None or variance_noise is not None:
        other = "generator" if generator is not None else "variance_noise"
        raise ValueError(f"pass at most one of noise_seeds and {other}: each chooses the step noise")
    if not isinstance(noise_seeds, torch.Tensor) or noise_seeds.dtype != torch.int64:
        described = noise_seeds.dtype if isinstance(noise_seeds, torch.Tensor) else type(noise_seeds).__name__
        raise TypeError(f"noise_seeds must be an int64 torch.Tensor of one seed per sample, got {described}")
    batch = sample.shape[0]
    if tuple(noise_seeds.shape) != (batch,):
        raise ValueError(
            f"noise_seeds must have shape ({batch},), one seed per sample, got {tuple(noise_seeds.shape)}"
        )
    if noise_seeds.device != sample.device:
        raise ValueError(f"noise_seeds must be on the sample's device {sample.device}, got {noise_seeds.device}")
    if backend != "triton":
        raise ValueError(
            "noise_seeds draws the step noise inside the fused Triton kernel, which steps CUDA tensors (and CPU"
            f" tensors with TRITON_INTERPRET=1 and {BACKEND_ENV_VAR}=triton); on the torch backend pass one generator"
            " per sample instead: generator=[torch.Generator().manual_seed(s) for s in seeds]"
        )
    return noise_seeds


def run_step(
    table_for: Callable[[torch.device | str, float], torch.Tensor],
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timestep_int: int,
    timestep_tensor: torch.Tensor | None,
    check_range: Callable[[int], int],
    backend: str,
    *,
    eta: float,
    prediction_type: str,
    clip_sample: bool,
    clip_sample_range: float,
    thresholding: tuple[float, float] | None,
    use_clipped_model_output: bool,
    noise: torch.Tensor | None,
    out_dtype: torch.dtype,
    noise_seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused step on ``backend`` from the coefficient table ``table_for(device, eta)``: (prev, x_0).

    The forward and the inverse scheduler share it (they differ only in their tables). Paths:

    - ``torch``: the PyTorch twin (``reference.ddim_step_ref``) from the table row(s) of the timestep(s).
    - ``triton``: the fused kernel (after the dynamic-threshold scale kernel when thresholding). When autograd
      records, through the registered op ``fastddim::ddim_step``, whose backward is a fused kernel
      (``fastddim.autograd``). Thresholded steps that autograd records run the twin instead, on the same device
      and with per-sample rows gathered there (no host sync): the scale's gradient follows ``torch.quantile``'s,
      which the twin's ``kthvalue`` + ``lerp`` reproduces.

    ``noise_seeds`` (int64 (B,), checked by ``check_noise_seeds``) keys each sample's in-kernel noise; the twin has
    no such noise, so the paths that run it refuse them.
    """
    add_noise = eta > 0
    needs_grad = torch.is_grad_enabled() and (
        model_output.requires_grad or sample.requires_grad or (noise is not None and noise.requires_grad)
    )
    if backend == "torch" or (needs_grad and thresholding is not None):
        if add_noise and noise_seeds is not None:
            raise ValueError(
                "noise_seeds needs the fused kernel, which does not record thresholded steps for autograd: pass"
                " variance_noise, or step under torch.no_grad()"
            )
        if add_noise and noise is None:
            noise = randn_tensor(
                model_output.shape, generator=None, device=model_output.device, dtype=model_output.dtype
            )
        if backend == "torch":
            table = table_for("cpu", eta)
            if timestep_tensor is None:
                row = table[timestep_int]
            elif timestep_tensor.numel() == 1:
                # The PyTorch backend is not the graph-capturable path: reading a device timestep here is allowed.
                row = table[check_range(int(timestep_tensor))]
            else:
                timesteps = timestep_tensor.cpu().long()
                check_range(int(timesteps.min()))
                check_range(int(timesteps.max()))
                row = table[timesteps]
        else:
            table = table_for(sample.device, eta)
            if timestep_tensor is None:
                timestep_tensor = torch.full((1,), timestep_int, dtype=torch.int64, device=sample.device)
            row = _device_rows(table, timestep_tensor.reshape(-1).long().expand(sample.shape[0]))
        prev_sample, pred_original = ddim_step_ref(
            model_output,
            sample,
            row,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
            dynamic_thresholding=thresholding,
            use_clipped_model_output=use_clipped_model_output,
            noise=noise,
        )
        return prev_sample.to(out_dtype), pred_original.to(out_dtype)

    table = table_for(sample.device, eta)
    seed = None
    if add_noise and noise is None and noise_seeds is None:
        # Drawn by a device op from the default generator: reproducible under torch.manual_seed and advanced on
        # every CUDA-graph replay, so replays get fresh noise.
        seed = torch.randint(0, 2**62, (1,), device=sample.device, dtype=torch.int64)
    prediction_index = reference.PREDICTION_TYPES.index(prediction_type)
    # Under torch.compile the registered ops keep the graph whole; eagerly the plain launchers skip the custom-op
    # dispatcher, unless autograd must record the step.
    compiling = torch.compiler.is_compiling()
    threshold_op = dynamic_threshold_scale if compiling else launch_dynamic_threshold_scale
    step_op = ops.ddim_step if compiling or needs_grad else ops.launch_ddim_step
    threshold_scale = None
    if thresholding is not None:
        threshold_scale = threshold_op(
            model_output,
            sample,
            table,
            timestep_tensor,
            timestep_int,
            prediction_index,
            float(thresholding[0]),
            float(thresholding[1]),
            traceable=compiling,
        )
    return step_op(
        model_output,
        sample,
        table,
        timestep_tensor,
        timestep_int,
        noise,
        seed,
        threshold_scale,
        add_noise,
        prediction_index,
        clip_sample,
        clip_sample_range,
        use_clipped_model_output,
        out_dtype,
        traceable=compiling,
        noise_seeds=noise_seeds if add_noise else None,
    )


def _device_rows(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Table rows gathered on the device without a host sync; NaN rows for out-of-range timesteps, as the kernel."""
    valid = (timesteps >= 0) & (timesteps < table.shape[0])
    rows = table[timesteps.clamp(0, table.shape[0] - 1)]
    return torch.where(valid[:, None], rows, torch.full_like(rows, float("nan")))


def check_sample_pair(model_output: object, sample: object) -> None:
    for name, value in (("model_output", model_output), ("sample", sample)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension (batch first)")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output and sample must have the same shape, got {tuple(model_output.shape)} and {tuple(sample.shape)}"
        )
    if model_output.dtype != sample.dtype:
        raise ValueError(
            f"model_output and sample must have the same dtype, got {model_output.dtype} and {sample.dtype}"
        )
    if model_output.device != sample.device:
        raise ValueError(
            f"model_output and sample must be on the same device, got {model_output.device} and {sample.device}"
        )


def check_variance_noise(variance_noise: object, sample: torch.Tensor) -> torch.Tensor:
    if not isinstance(variance_noise, torch.Tensor) or not variance_noise.is_floating_point():
        raise TypeError(f"variance_noise must be a floating-point torch.Tensor, got {variance_noise!r:.80}")
    if variance_noise.shape == sample.shape:
        expanded_shape = sample.shape
    else:
        try:
            expanded_shape = torch.broadcast_shapes(variance_noise.shape, sample.shape)
        except RuntimeError:
            expanded_shape = None
    if expanded_shape != sample.shape:
        raise ValueError(
            f"variance_noise must be broadcastable to the sample shape {tuple(sample.shape)}, "
            f"got {tuple(variance_noise.shape)}"
        )
    if variance_noise.device != sample.device:
        raise ValueError(f"variance_noise must be on the sample's device {sample.device}, got {variance_noise.device}")
    return variance_noise
