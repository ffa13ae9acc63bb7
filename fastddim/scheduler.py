"""``fastddim.DDIMScheduler``: diffusers' ``DDIMScheduler`` with the whole step fused into one Triton launch.

It subclasses ``diffusers.DDIMScheduler`` (pipelines check ``isinstance``), keeps its constructor, config, attributes
and outputs, and replaces ``set_timesteps`` and ``step``:

- ``step`` reads the per-timestep scalars from a small device table (``fastddim.reference.build_coefficient_table``) instead
  of indexing ``alphas_cumprod`` and branching on the previous timestep, so it never synchronizes with the host and a
  step can be captured in a CUDA graph. On CUDA tensors it is one Triton launch (two with dynamic thresholding).
- On CPU tensors it runs the PyTorch twin (``fastddim/reference.py``): same numbers, fewer passes.
- Where diffusers returns NaN or crashes on a valid configuration (eta > 0 with a zero terminal SNR; eta > 1;
  thresholding of 2-D samples; the trailing spacing that yields N + 1 timesteps ending in -1 for some N), it returns
  the mathematically intended finite result.
- Beyond diffusers (opt-in): per-sample timesteps (a (B,) ``timestep`` tensor), custom schedules
  (``set_timesteps(timesteps=...)``), the DDIM paper's quadratic skip (``timestep_spacing="quad"``) and previous
  timesteps taken from the schedule (``prev_timestep_from_schedule``, see ``fastddim/schedules.py``). The step is
  differentiable on every backend (``fastddim/autograd.py``). The step dispatch both this and
  ``fastddim.DDIMInverseScheduler`` use is ``fastddim/stepping.py``.
"""

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler as _DiffusersDDIMScheduler
from diffusers import SchedulerMixin  # noqa: F401  (diffusers' loader looks it up in this module's namespace)
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from fastddim import autograd as _autograd  # noqa: F401  (registers the step's backward)
from fastddim import compat, reference, schedules
from fastddim.compat import tensor_version
from fastddim.schedules import TIMESTEP_SPACINGS
from fastddim.stepping import (
    BACKEND_ENV_VAR,
    BACKENDS,
    backend_for,
    check_noise_seeds,
    check_sample_pair,
    is_int,
    is_real,
    resolve_timestep,
    run_step,
    selected_backend,
    step_noise,
)
from fastddim.utils import BoundedCache, normalize_device

__all__ = ["BACKENDS", "BACKEND_ENV_VAR", "DDIMScheduler", "UnsupportedConfigError", "selected_backend"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class UnsupportedConfigError(ValueError, NotImplementedError):
    """A config value fastddim (and diffusers) does not implement.

    A ``ValueError`` as fastddim documents, and a ``NotImplementedError`` as diffusers raises for unknown beta
    schedules, so code written against either keeps working.
    """


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
        timestep_spacing (`str`, defaults to `"leading"`): ``leading``, ``trailing``, ``linspace`` or ``quad`` (the
            DDIM paper's quadratic skip; fastddim only, see ``set_timesteps``).
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale betas to a zero terminal SNR (Lin et al., 2023).
        prev_timestep_from_schedule (`bool`, defaults to `False`): fastddim only, opt-in. Step from each timestep to
            the schedule's next one (past the last, to ``final_alpha_cumprod``) instead of diffusers' t - T // N,
            which lands between schedule entries for every spacing but ``leading`` (``fastddim.schedules``).

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
        timestep_spacing: Literal["leading", "trailing", "linspace", "quad"] = "leading",
        rescale_betas_zero_snr: bool = False,
        prev_timestep_from_schedule: bool = False,
    ):
        check_schedule_config(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, steps_offset, clip_sample_range
        )
        _check_step_config(prediction_type, timestep_spacing, dynamic_thresholding_ratio, sample_max_value)

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
        # The tables are built from CPU copies of alphas_cumprod / final_alpha_cumprod (`_follow_alphas`), so
        # building one never reads device memory (a host sync).
        self._alphas_cpu: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(()))
        self._alphas_state: tuple | None = None
        self._coef_tables: BoundedCache[tuple, torch.Tensor] = BoundedCache(16)
        self._checked_step_config: tuple | None = None
        self._last_coef_table: tuple | None = None
        self._schedule: np.ndarray | None = None
        self._schedule_key: bytes | None = None
        self._warned_large_eta = False
        self._follow_alphas()

    # ------------------------------------------------------------------------------------------------ timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Sets the discrete timesteps of the sampling chain (run before inference).

        diffusers' spacings, except that ``trailing`` never yields N + 1 timesteps ending in -1 (float rounding in
        diffusers does for 62 values of N <= 1000, e.g. 61): the first N, which diffusers also returns, are kept.
        ``timestep_spacing="quad"`` is the DDIM paper's quadratic skip without repeated timesteps, so it can yield
        fewer than N timesteps (``fastddim.schedules.spaced_timesteps``); ``num_inference_steps`` then becomes the
        number yielded. Each step's previous timestep is t - T // N (diffusers) unless the config's
        ``prev_timestep_from_schedule`` is set, which steps to the schedule's next entry. When ``device`` is given,
        the eta = 0 coefficient table is placed there now, so the first step needs no host-to-device copy.

        Args:
            num_inference_steps (`int`, *optional*): N, a positive int no larger than ``num_train_timesteps``.
            device (`str` or `torch.device`, *optional*): where to put ``timesteps`` (CPU if None).
            timesteps (`list[int]`, *optional*): a custom schedule instead of N: strictly descending ints in
                [0, num_train_timesteps); N is then its length. (diffusers' ``retrieve_timesteps`` passes it.)
        """
        num_train_timesteps = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps to set_timesteps, not both")
            schedule = schedules.check_custom_timesteps(timesteps, num_train_timesteps)
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or timesteps")
            if not is_int(num_inference_steps) or num_inference_steps <= 0:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            if num_inference_steps > num_train_timesteps:
                raise ValueError(
                    f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                    f" {num_train_timesteps} as the unet model trained with this scheduler can only handle"
                    f" maximal {num_train_timesteps} timesteps."
                )
            spacing = self.config.timestep_spacing
            if spacing not in TIMESTEP_SPACINGS:
                raise UnsupportedConfigError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
            schedule = schedules.spaced_timesteps(
                spacing, num_train_timesteps, int(num_inference_steps), self.config.steps_offset
            )
        self.num_inference_steps = len(schedule)
        # Hashable and compared by identity on the hot path: a new object per call.
        self._schedule_key = schedule.tobytes() if self._prev_from_schedule() else None
        self._schedule = schedule
        self.timesteps = torch.from_numpy(np.ascontiguousarray(schedule)).to(device)
        if device is not None:
            self.coefficient_table(torch.device(device), 0.0)

    def _prev_from_schedule(self) -> bool:
        return bool(getattr(self.config, "prev_timestep_from_schedule", False))

    def coefficient_table(self, device: str | torch.device, eta: float = 0.0) -> torch.Tensor:
        """The fp32 [T, 8] per-timestep coefficient table for the current schedule and ``eta``, cached per device.

        Building a table copies 32 KB to the device once; pipelines that capture CUDA graphs call this (or one
        eager step) before capture. Tables follow ``alphas_cumprod`` and ``final_alpha_cumprod``: assigning either
        (or changing it in place) rebuilds them at the next step, reading the new values once (a host sync if they
        are on a GPU); ``add_noise``/``get_velocity`` moving them to the samples' device changes no value and
        rebuilds nothing. A CUDA graph captured before such a change keeps reading the table it captured.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        self._follow_alphas()
        last = self._last_coef_table
        if (
            last is not None
            and last[0] == device
            and last[1] == eta
            and last[2] == self.num_inference_steps
            and last[4] is self._schedule_key
        ):
            # The common case of a loop: same device, eta and schedule as the previous step.
            return last[3]
        device = normalize_device(device)
        key = (self.num_inference_steps, float(eta), device, self._schedule_key)
        table = self._coef_tables.get(key)
        if table is None:
            table = self._build_table(float(eta)).to(device)
            self._coef_tables.put(key, table)
        self._last_coef_table = (device, eta, self.num_inference_steps, table, self._schedule_key)
        return table

    def _build_table(self, eta: float) -> torch.Tensor:
        alphas_cumprod, final_alpha_cumprod = self._alphas_cpu
        prev_timesteps = None
        if self._schedule_key is not None:
            prev_timesteps = schedules.previous_timesteps(
                alphas_cumprod.shape[0], self.num_inference_steps, self._schedule
            )
        return reference.build_coefficient_table(
            alphas_cumprod, final_alpha_cumprod, self.num_inference_steps, eta, prev_timesteps
        )

    def _follow_alphas(self) -> None:
        """Rebuilds the CPU copies the tables come from when ``alphas_cumprod`` or ``final_alpha_cumprod`` changed."""
        state = self._alphas_state
        if state is not None and torch.compiler.is_compiling():
            # Traced steps read the tables as built eagerly (Dynamo would make the version counters graph inputs).
            return
        alphas, final = self.alphas_cumprod, self.final_alpha_cumprod
        if (
            state is not None
            and alphas is state[0]
            and final is state[2]
            and tensor_version(alphas) == state[1]
            and tensor_version(final) == state[3]
        ):
            return
        if not isinstance(alphas, torch.Tensor) or alphas.dim() != 1 or alphas.numel() == 0:
            raise TypeError(f"alphas_cumprod must be a non-empty 1-D tensor, got {alphas!r:.80}")
        final = torch.as_tensor(final)
        self._alphas_cpu = (
            alphas.detach().to("cpu", torch.float32).clone(),
            final.detach().to("cpu", torch.float32).reshape(()).clone(),
        )
        self._alphas_state = (alphas, tensor_version(alphas), final, tensor_version(final))
        self._coef_tables.clear()
        self._last_coef_table = None

    def _keep_following(self, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        # diffusers' add_noise/get_velocity replace alphas_cumprod by its copy on the samples' device: same values,
        # so the tables stay (re-reading them from a GPU would be a host sync on every such call).
        before = self.alphas_cumprod
        unchanged = self._alphas_state is not None and before is self._alphas_state[0]
        result = call()
        after = self.alphas_cumprod
        if unchanged and after is not before:
            state = self._alphas_state
            self._alphas_state = (after, tensor_version(after), *state[2:])
        return result

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """diffusers' forward process q(x_t | x_0), DDIM eq. (4): per-sample ``timesteps`` of shape (B,) included."""
        self._follow_alphas()
        return self._keep_following(lambda: super(DDIMScheduler, self).add_noise(original_samples, noise, timesteps))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """diffusers' v-prediction target sqrt(alpha_t) noise - sqrt(1 - alpha_t) sample."""
        self._follow_alphas()
        return self._keep_following(lambda: super(DDIMScheduler, self).get_velocity(sample, noise, timesteps))

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
        *,
        noise_seeds: torch.Tensor | None = None,
    ) -> DDIMSchedulerOutput | tuple:
        """Predicts x_{t-1} from x_t and the model output, DDIM eqs. (12) and (16).

        Differentiable w.r.t. ``model_output`` and ``sample`` (and ``variance_noise``) on every backend, with
        diffusers' gradients (see ``fastddim.autograd``).

        Args:
            model_output (`torch.Tensor`): the denoiser output, same shape, dtype and device as ``sample``.
            timestep (`int` or `torch.Tensor`): the current timestep, an int in [0, num_train_timesteps) or a
                one-element integer tensor; or an integer tensor of shape (B,), one timestep per batch entry, which
                steps each sample from its own timestep in one launch, equal bit for bit to stepping each alone.
                A tensor on the samples' CUDA device is read by the kernel (no host sync; an out-of-range value
                there yields NaN outputs for its samples instead of an exception); a (B,) CPU tensor is checked on
                the host and copied to the device, so inside a captured CUDA graph pass per-sample timesteps on the
                samples' device. Output dtypes: a one-element 1-D timestep promotes fp16/bf16 results to fp32 as
                diffusers does; a (B,) timestep with B > 1 (which diffusers cannot step) keeps the sample's dtype.
            sample (`torch.Tensor`): x_t, with the batch in dim 0.
            eta (`float`, defaults to 0.0): noise weight, >= 0; 0 is DDIM, 1 is DDPM-like. Above 1, where
                diffusers returns NaN (1 - alpha_prev - sigma^2 < 0), the direction term is taken as 0 and a
                warning is given once per scheduler.
            use_clipped_model_output (`bool`, defaults to `False`): re-derive epsilon from the clipped x_0.
            generator (`torch.Generator` or a list of them, *optional*): draws the noise exactly as diffusers does.
            variance_noise (`torch.Tensor`, *optional*): the noise itself, broadcastable to ``sample``.
                With neither and eta > 0, CUDA steps draw the noise inside the kernel (Philox, seeded from torch's
                default CUDA generator, so ``torch.manual_seed`` makes runs reproducible); CPU steps draw it with
                ``torch.randn`` as diffusers does.
            return_dict (`bool`, defaults to `True`): return a `DDIMSchedulerOutput` instead of a tuple.
            noise_seeds (`torch.Tensor`, *optional*, keyword only): fastddim only. An int64 tensor of shape (B,) on
                the samples' device, one seed per sample: with eta > 0 the fused kernel draws sample b's noise from
                Philox keyed by ``noise_seeds[b]``, with this step's timestep in the counter, so it depends on that
                seed and timestep only, never on the batch size or the sample's place in the batch (no host sync,
                new seeds need no new CUDA graph). Not with ``generator`` or ``variance_noise``. Triton backend
                only: the torch backend (CPU tensors) raises a ValueError; there, one CPU generator per sample
                keeps the same promise with a different random stream.

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
        check_sample_pair(model_output, sample)
        if not is_real(eta) or not eta >= 0:
            raise ValueError(f"eta must be a real number >= 0, got {eta!r}")
        eta = float(eta)
        if eta > 1 and not self._warned_large_eta:
            self._warned_large_eta = True
            warnings.warn(
                f"eta = {eta} > 1: 1 - alpha_prev - sigma_t^2 can be negative, where diffusers returns NaN; fastddim"
                " takes the direction term as 0 there (warned once per scheduler)",
                stacklevel=2,
            )
        thresholding = (config.dynamic_thresholding_ratio, config.sample_max_value) if config.thresholding else None
        if thresholding and sample.dim() < 2:
            raise ValueError(
                f"dynamic thresholding needs a batch dimension: sample must have rank >= 2, got {sample.dim()}"
            )
        backend = self._backend_for(sample)
        timestep_int, timestep_tensor, promote = resolve_timestep(timestep, sample, self._check_timestep_range)
        out_dtype = torch.float32 if promote and sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
        if noise_seeds is not None:
            noise_seeds = check_noise_seeds(noise_seeds, sample, backend, generator, variance_noise)
        noise = step_noise(eta, generator, variance_noise, model_output)
        prev_sample, pred_original = run_step(
            self.coefficient_table,
            model_output,
            sample,
            timestep_int,
            timestep_tensor,
            self._check_timestep_range,
            backend,
            eta=eta,
            prediction_type=config.prediction_type,
            clip_sample=bool(config.clip_sample),
            clip_sample_range=float(config.clip_sample_range),
            thresholding=thresholding,
            use_clipped_model_output=bool(use_clipped_model_output),
            noise=noise,
            out_dtype=out_dtype,
            noise_seeds=noise_seeds,
        )
        if not return_dict:
            return (prev_sample, pred_original)
        return compat.ddim_scheduler_output(prev_sample, pred_original)

    # ------------------------------------------------------------------------------------------------ helpers

    def _resolve_timestep(
        self, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[int, torch.Tensor | None, bool]:
        """Returns (int timestep, device timestep tensor or None, whether diffusers would promote to fp32)."""
        return resolve_timestep(timestep, sample, self._check_timestep_range)

    def _check_timestep_range(self, timestep: int) -> int:
        # T of the tables' source as of the last table lookup (step looks the table up after this check, and
        # rebuilds it there if alphas_cumprod was replaced): one alphas check per step, not two.
        num_train_timesteps = self._alphas_cpu[0].shape[0]
        if not 0 <= timestep < num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {num_train_timesteps}), got {timestep}")
        return timestep

    @staticmethod
    def _backend_for(sample: torch.Tensor) -> str:
        return backend_for(sample)


def check_schedule_config(
    num_train_timesteps: object,
    beta_start: object,
    beta_end: object,
    beta_schedule: object,
    trained_betas: object,
    steps_offset: object,
    clip_sample_range: object,
) -> None:
    """Checks the noise-schedule arguments both DDIM schedulers (forward and inverse) take.

    Raises:
        ValueError, TypeError, UnsupportedConfigError: naming the argument and what was expected.
    """
    if not is_int(num_train_timesteps) or num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    if trained_betas is None:
        if beta_schedule not in BETA_SCHEDULES:
            raise UnsupportedConfigError(
                f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), got {beta_schedule!r}"
            )
        if not (is_real(beta_start) and is_real(beta_end)) or beta_start < 0 or beta_end < beta_start:
            raise ValueError(f"need 0 <= beta_start <= beta_end, got beta_start={beta_start!r}, beta_end={beta_end!r}")
    elif len(trained_betas) == 0:
        raise ValueError("trained_betas must not be empty")
    if not is_int(steps_offset):
        raise TypeError(f"steps_offset must be an int, got {steps_offset!r}")
    if not is_real(clip_sample_range) or clip_sample_range < 0:
        raise ValueError(f"clip_sample_range must be a number >= 0, got {clip_sample_range!r}")


def _check_step_config(
    prediction_type: object, timestep_spacing: object, dynamic_thresholding_ratio: object, sample_max_value: object
) -> None:
    if prediction_type not in reference.PREDICTION_TYPES:
        raise UnsupportedConfigError(
            f"prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}"
        )
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise UnsupportedConfigError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    if not is_real(dynamic_thresholding_ratio) or not 0 < dynamic_thresholding_ratio <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio!r}")
    if not is_real(sample_max_value) or not sample_max_value > 0:
        raise ValueError(f"sample_max_value must be a number > 0, got {sample_max_value!r}")
