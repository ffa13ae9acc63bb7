"""``fastddim.DDIMScheduler``: diffusers' ``DDIMScheduler`` with the whole step fused into one Triton launch.

It subclasses ``diffusers.DDIMScheduler`` (pipelines check ``isinstance``), keeps its constructor, config, attributes
and outputs, and replaces ``set_timesteps`` and ``step``:

- ``step`` reads the per-timestep scalars from a small device table (``fastddim.reference.build_coefficient_table``) instead
  of indexing ``alphas_cumprod`` and branching on the previous timestep, so it never synchronizes with the host and a
  step can be captured in a CUDA graph. On CUDA tensors it is one Triton launch (two with dynamic thresholding).
- On CPU tensors it runs the PyTorch twin (``fastddim/reference.py``): same numbers, fewer passes.
- Where diffusers returns NaN or crashes on a valid configuration (eta > 0 with a zero terminal SNR; thresholding of
  2-D samples; the trailing spacing that yields N + 1 timesteps ending in -1 for some N), it returns the
  mathematically intended finite result.
"""

import numbers
import os
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler as _DiffusersDDIMScheduler
from diffusers import SchedulerMixin  # noqa: F401  (diffusers' loader looks it up in this module's namespace)
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from fastddim import compat, ops, reference
from fastddim.reference import ddim_step_ref
from fastddim.threshold import dynamic_threshold_scale, launch_dynamic_threshold_scale
from fastddim.utils import normalize_device

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "FASTDDIM_BACKEND"


class UnsupportedConfigError(ValueError, NotImplementedError):
    """A config value fastddim (and diffusers) does not implement.

    A ``ValueError`` as fastddim documents, and a ``NotImplementedError`` as diffusers raises for unknown beta
    schedules, so code written against either keeps working.
    """


_INTEGER_DTYPES = frozenset(
    (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)
)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    # float/int first: the numbers.Real ABC check costs about a microsecond, and step() checks several values.
    return type(value) in (float, int) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def selected_backend() -> str:
    """The backend named by ``FASTDDIM_BACKEND`` (``auto`` if unset), read at call time."""
    backend = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    return backend


class DDIMScheduler(_DiffusersDDIMScheduler):
    """Denoising diffusion implicit models (Song et al., 2021) with a fused, graph-capturable Triton step.

    A drop-in for `diffusers.DDIMScheduler`: same constructor arguments, defaults and meaning, same config
    (``from_config`` / ``save_config`` / ``from_pretrained``), same ``set_timesteps``, ``step``, ``add_noise``,
    ``get_velocity``, ``scale_model_input`` and outputs. Swap it into any pipeline with
    ``pipe.scheduler = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)``.

    Args:
        num_train_timesteps (`int`, defaults to 1000): number of diffusion steps used to train the model.
        beta_start (`float`, defaults to 0.0001): first beta of ``linear``/``scaled_linear``.
        beta_end (`float`, defaults to 0.02): last beta of ``linear``/``scaled_linear``.
        beta_schedule (`str`, defaults to `"linear"`): ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): betas to use instead of a schedule.
        clip_sample (`bool`, defaults to `True`): clamp the predicted x_0 to +-``clip_sample_range``.
        set_alpha_to_one (`bool`, defaults to `True`): use alpha_prev = 1 past the first training step, else
            ``alphas_cumprod[0]``.
        steps_offset (`int`, defaults to 0): offset added to the ``leading`` timesteps.
        prediction_type (`str`, defaults to `"epsilon"`): ``epsilon``, ``sample`` or ``v_prediction``.
        thresholding (`bool`, defaults to `False`): dynamic thresholding (Imagen); has priority over clipping.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the quantile of |x_0| used as threshold, in (0, 1].
        clip_sample_range (`float`, defaults to 1.0): the clip bound.
        sample_max_value (`float`, defaults to 1.0): upper bound of the dynamic threshold.
        timestep_spacing (`str`, defaults to `"leading"`): ``leading``, ``trailing`` or ``linspace``.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale betas to a zero terminal SNR (Lin et al., 2023).

    Examples::

        >>> import fastddim, torch
        >>> scheduler = fastddim.DDIMScheduler()
        >>> scheduler.set_timesteps(10)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> for t in scheduler.timesteps:
        ...     x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        if not _is_int(num_train_timesteps) or num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if trained_betas is None:
            if beta_schedule not in BETA_SCHEDULES:
                raise UnsupportedConfigError(
                    f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), got {beta_schedule!r}"
                )
            if not (_is_real(beta_start) and _is_real(beta_end)) or beta_start < 0 or beta_end < beta_start:
                raise ValueError(
                    f"need 0 <= beta_start <= beta_end, got beta_start={beta_start!r}, beta_end={beta_end!r}"
                )
        elif len(trained_betas) == 0:
            raise ValueError("trained_betas must not be empty")
        _check_step_config(prediction_type, timestep_spacing, dynamic_thresholding_ratio, sample_max_value)
        if not _is_int(steps_offset):
            raise TypeError(f"steps_offset must be an int, got {steps_offset!r}")
        if not _is_real(clip_sample_range) or clip_sample_range < 0:
            raise ValueError(f"clip_sample_range must be a number >= 0, got {clip_sample_range!r}")

        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        # `add_noise`/`get_velocity` move `alphas_cumprod` to the samples' device; the step tables are built from
        # these CPU copies so building one never reads device memory (a host sync).
        self._alphas_cumprod_cpu = self.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self._final_alpha_cumprod_cpu = self.final_alpha_cumprod.detach().to("cpu", torch.float32).clone()
        self._coef_tables: dict[tuple[int, float, torch.device], torch.Tensor] = {}
        self._checked_step_config: tuple | None = None
        self._last_coef_table: tuple | None = None

    # ------------------------------------------------------------------------------------------------ timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Sets the discrete timesteps of the sampling chain (run before inference).

        Same schedules as diffusers, except that ``trailing`` never yields N + 1 timesteps ending in -1 (float
        rounding in diffusers does for 62 values of N <= 1000, e.g. 61): the first N, which diffusers also returns,
        are kept. When ``device`` is given, the eta = 0 coefficient table is placed there now, so the first step
        needs no host-to-device copy.

        Args:
            num_inference_steps (`int`): N, a positive int no larger than ``num_train_timesteps``.
            device (`str` or `torch.device`, *optional*): where to put ``timesteps`` (CPU if None).
        """
        num_train_timesteps = self.config.num_train_timesteps
        if not _is_int(num_inference_steps) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                f" {num_train_timesteps} as the unet model trained with this scheduler can only handle"
                f" maximal {num_train_timesteps} timesteps."
            )
        num_inference_steps = int(num_inference_steps)
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            step_ratio = num_train_timesteps // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
            timesteps += self.config.steps_offset
        elif spacing == "trailing":
            step_ratio = num_train_timesteps / num_inference_steps
            timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
            timesteps = timesteps[:num_inference_steps]
        else:
            raise UnsupportedConfigError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(device)
        if device is not None:
            self.coefficient_table(torch.device(device), 0.0)

    def coefficient_table(self, device: str | torch.device, eta: float = 0.0) -> torch.Tensor:
        """The fp32 [T, 8] per-timestep coefficient table for the current N and ``eta``, cached per device.

        Building a table copies 32 KB to the device once; pipelines that capture CUDA graphs call this (or one
        eager step) before capture.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        last = self._last_coef_table
        if last is not None and last[0] == device and last[1] == eta and last[2] == self.num_inference_steps:
            # The common case of a loop: same device, eta and N as the previous step.
            return last[3]
        device = normalize_device(device)
        key = (self.num_inference_steps, float(eta), device)
        table = self._coef_tables.get(key)
        if table is None:
            table = reference.build_coefficient_table(
                self._alphas_cumprod_cpu, self._final_alpha_cumprod_cpu, self.num_inference_steps, float(eta)
            ).to(device)
            if len(self._coef_tables) >= 16:
                self._coef_tables.clear()
            self._coef_tables[key] = table
        self._last_coef_table = (device, eta, self.num_inference_steps, table)
        return table

    # ------------------------------------------------------------------------------------------------ step

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """Predicts x_{t-1} from x_t and the model output, DDIM eqs. (12) and (16).

        Args:
            model_output (`torch.Tensor`): the denoiser output, same shape, dtype and device as ``sample``.
            timestep (`int` or `torch.Tensor`): the current timestep, an int in [0, num_train_timesteps) or a
                one-element integer tensor. A tensor on the samples' CUDA device is read by the kernel (no host
                sync; an out-of-range value there yields NaN outputs instead of an exception).
            sample (`torch.Tensor`): x_t, with the batch in dim 0.
            eta (`float`, defaults to 0.0): noise weight, >= 0; 0 is DDIM, 1 is DDPM-like.
            use_clipped_model_output (`bool`, defaults to `False`): re-derive epsilon from the clipped x_0.
            generator (`torch.Generator` or a list of them, *optional*): draws the noise exactly as diffusers does.
            variance_noise (`torch.Tensor`, *optional*): the noise itself, broadcastable to ``sample``.
                With neither and eta > 0, CUDA steps draw the noise inside the kernel (Philox, seeded from torch's
                default CUDA generator, so ``torch.manual_seed`` makes runs reproducible); CPU steps draw it with
                ``torch.randn`` as diffusers does.
            return_dict (`bool`, defaults to `True`): return a `DDIMSchedulerOutput` instead of a tuple.

        Returns:
            `DDIMSchedulerOutput` or `tuple`: (prev_sample, pred_original_sample).
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        config = self.config
        step_config = (
            config.prediction_type,
            config.timestep_spacing,
            config.dynamic_thresholding_ratio,
            config.sample_max_value,
        )
        if step_config != self._checked_step_config:
            # Pipelines may rewrite the config after construction; checked once per set of values, not per step.
            _check_step_config(*step_config)
            self._checked_step_config = step_config
        _check_sample_pair(model_output, sample)
        if not _is_real(eta) or not eta >= 0:
            raise ValueError(f"eta must be a real number >= 0, got {eta!r}")
        eta = float(eta)
        thresholding = bool(config.thresholding)
        if thresholding and sample.dim() < 2:
            raise ValueError(
                f"dynamic thresholding needs a batch dimension: sample must have rank >= 2, got {sample.dim()}"
            )
        timestep_int, timestep_tensor, promote = self._resolve_timestep(timestep, sample)
        out_dtype = torch.float32 if promote and sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype

        add_noise = eta > 0
        noise = None
        if add_noise:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is not None:
                noise = _check_variance_noise(variance_noise, sample)
            elif generator is not None:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )

        backend = self._backend_for(sample)
        prediction_type = config.prediction_type
        if backend == "torch":
            if add_noise and noise is None:
                noise = randn_tensor(
                    model_output.shape, generator=None, device=model_output.device, dtype=model_output.dtype
                )
            if timestep_tensor is not None:
                # The PyTorch backend is not the graph-capturable path: reading a device timestep here is allowed.
                timestep_int = self._check_timestep_range(int(timestep_tensor))
            row = self.coefficient_table("cpu", eta)[timestep_int]
            prev_sample, pred_original = ddim_step_ref(
                model_output,
                sample,
                row,
                prediction_type=prediction_type,
                clip_sample=bool(config.clip_sample),
                clip_sample_range=float(config.clip_sample_range),
                dynamic_thresholding=(
                    (config.dynamic_thresholding_ratio, config.sample_max_value) if thresholding else None
                ),
                use_clipped_model_output=bool(use_clipped_model_output),
                noise=noise,
            )
            prev_sample = prev_sample.to(out_dtype)
            pred_original = pred_original.to(out_dtype)
        else:
            table = self.coefficient_table(sample.device, eta)
            seed = None
            if add_noise and noise is None:
                # Drawn by a device op from the default generator: reproducible under torch.manual_seed and advanced
                # on every CUDA-graph replay, so replays get fresh noise.
                seed = torch.randint(0, 2**62, (1,), device=sample.device, dtype=torch.int64)
            prediction_index = reference.PREDICTION_TYPES.index(prediction_type)
            # Under torch.compile the registered ops keep the graph whole; eagerly the plain launchers skip the
            # custom-op dispatcher.
            compiling = torch.compiler.is_compiling()
            threshold_op = dynamic_threshold_scale if compiling else launch_dynamic_threshold_scale
            step_op = ops.ddim_step if compiling else ops.launch_ddim_step
            threshold_scale = None
            if thresholding:
                threshold_scale = threshold_op(
                    model_output,
                    sample,
                    table,
                    timestep_tensor,
                    timestep_int,
                    prediction_index,
                    float(config.dynamic_thresholding_ratio),
                    float(config.sample_max_value),
                    traceable=compiling,
                )
            prev_sample, pred_original = step_op(
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
                bool(config.clip_sample),
                float(config.clip_sample_range),
                bool(use_clipped_model_output),
                out_dtype,
                traceable=compiling,
            )

        if not return_dict:
            return (prev_sample, pred_original)
        return compat.ddim_scheduler_output(prev_sample, pred_original)

    # ------------------------------------------------------------------------------------------------ helpers

    def _resolve_timestep(
        self, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[int, torch.Tensor | None, bool]:
        """Returns (int timestep, device timestep tensor or None, whether diffusers would promote to fp32)."""
        promote = False
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype not in _INTEGER_DTYPES:
                raise TypeError(f"timestep must be an integer tensor, got dtype {timestep.dtype}")
            if timestep.numel() != 1:
                raise ValueError(
                    f"timestep must be a single timestep (a 0-dim or one-element tensor), got shape {tuple(timestep.shape)}"
                )
            # diffusers' coefficients become 1-D for a 1-D timestep, which promotes fp16/bf16 results to fp32.
            promote = timestep.dim() > 0
            if timestep.is_cuda:
                # The kernels read element 0 of a one-element tensor of any rank: no reshape on the hot path.
                return 0, timestep if timestep.device == sample.device else timestep.to(sample.device), promote
            timestep = int(timestep)
        elif isinstance(timestep, np.ndarray) and timestep.size == 1 and np.issubdtype(timestep.dtype, np.integer):
            timestep = int(timestep.reshape(()))
        if not _is_int(timestep):
            raise TypeError(f"timestep must be an int or a one-element integer tensor, got {type(timestep).__name__}")
        return self._check_timestep_range(int(timestep)), None, promote

    def _check_timestep_range(self, timestep: int) -> int:
        num_train_timesteps = self._alphas_cumprod_cpu.shape[0]
        if not 0 <= timestep < num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {num_train_timesteps}), got {timestep}")
        return timestep

    @staticmethod
    def _backend_for(sample: torch.Tensor) -> str:
        backend = selected_backend()
        if backend == "auto":
            return "triton" if sample.is_cuda and sample.dtype in ops.TRITON_DTYPES else "torch"
        if backend == "triton":
            if sample.dtype not in ops.TRITON_DTYPES:
                raise ValueError(
                    f"{BACKEND_ENV_VAR}=triton supports sample dtypes {ops.TRITON_DTYPES}, got {sample.dtype}"
                )
            if not sample.is_cuda and not ops.interpreting():
                raise RuntimeError(
                    f"{BACKEND_ENV_VAR}=triton on {sample.device.type} tensors needs Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before importing fastddim (or use CUDA tensors)"
                )
        return backend


def _check_step_config(
    prediction_type: object, timestep_spacing: object, dynamic_thresholding_ratio: object, sample_max_value: object
) -> None:
    if prediction_type not in reference.PREDICTION_TYPES:
        raise UnsupportedConfigError(
            f"prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}"
        )
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise UnsupportedConfigError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    if not _is_real(dynamic_thresholding_ratio) or not 0 < dynamic_thresholding_ratio <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio!r}")
    if not _is_real(sample_max_value) or not sample_max_value > 0:
        raise ValueError(f"sample_max_value must be a number > 0, got {sample_max_value!r}")


def _check_sample_pair(model_output: object, sample: object) -> None:
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


def _check_variance_noise(variance_noise: object, sample: torch.Tensor) -> torch.Tensor:
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
