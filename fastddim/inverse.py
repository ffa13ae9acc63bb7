"""``fastddim.DDIMInverseScheduler``: diffusers' ``DDIMInverseScheduler`` with the step fused into one launch.

DDIM inversion runs the deterministic update of DDIM eq. (12) backwards, x_0 -> x_T (the paper's encoding, section
5.4, which its latent-space interpolation rests on). diffusers' inverse step moves x from the source timestep
s = min(t' - T // N, T - 1) to its ``timestep`` argument t':

    x_{t'} = sqrt(alpha_{t'}) x0_hat + sqrt(1 - alpha_{t'}) eps_hat,   x0_hat, eps_hat predicted at alpha_s,

which is the forward update with eta = 0 read from a different coefficient table
(``fastddim.reference.build_inverse_coefficient_table``), so it runs in the forward kernel: one launch, no host sync,
capturable, bit-identical to diffusers in fp32, per-sample timesteps and gradients included.
"""

from typing import Literal

import numpy as np
import torch
from diffusers import DDIMInverseScheduler as _DiffusersDDIMInverseScheduler
from diffusers import SchedulerMixin  # noqa: F401  (diffusers' loader looks it up in this module's namespace)
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim_inverse import DDIMSchedulerOutput as DDIMInverseSchedulerOutput

from fastddim import reference
from fastddim.compat import tensor_version
from fastddim.scheduler import UnsupportedConfigError, check_schedule_config
from fastddim.stepping import backend_for, check_sample_pair, is_int, resolve_timestep, run_step
from fastddim.utils import BoundedCache, normalize_device

INVERSE_TIMESTEP_SPACINGS = ("leading", "trailing")


class DDIMInverseScheduler(_DiffusersDDIMInverseScheduler):
    """DDIM inversion (x_0 -> x_T) with a fused, graph-capturable step; a drop-in for diffusers' class.

    Same constructor arguments, defaults and meaning as ``diffusers.DDIMInverseScheduler`` (including the deprecated
    ``set_alpha_to_zero``, an alias of ``set_alpha_to_one``, warned about as diffusers does), same config,
    ``set_timesteps`` (ascending timesteps) and ``step`` outputs.

    Args:
        num_train_timesteps (`int`, defaults to 1000): number of diffusion steps used to train the model.
        beta_start (`float`, defaults to 0.0001): first beta of ``linear``/``scaled_linear``.
        beta_end (`float`, defaults to 0.02): last beta of ``linear``/``scaled_linear``.
        beta_schedule (`str`, defaults to `"linear"`): ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): betas to use instead of a schedule.
        clip_sample (`bool`, defaults to `True`): clamp the predicted x_0 to +-``clip_sample_range``.
        set_alpha_to_one (`bool`, defaults to `True`): alpha_s = 1 for a source before the first training step,
            else ``alphas_cumprod[0]``.
        steps_offset (`int`, defaults to 0): offset added to the ``leading`` timesteps.
        prediction_type (`str`, defaults to `"epsilon"`): ``epsilon``, ``sample`` or ``v_prediction``.
        clip_sample_range (`float`, defaults to 1.0): the clip bound.
        timestep_spacing (`str`, defaults to `"leading"`): ``leading`` or ``trailing``.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale betas to a zero terminal SNR.

    Examples::

        >>> import fastddim, torch
        >>> inverse = fastddim.DDIMInverseScheduler()
        >>> inverse.set_timesteps(10)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> for t in inverse.timesteps:
        ...     x = inverse.step(torch.zeros_like(x), t, x).prev_sample
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: Literal["leading", "trailing"] = "leading",
        rescale_betas_zero_snr: bool = False,
        **kwargs,
    ):
        check_schedule_config(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, steps_offset, clip_sample_range
        )
        if prediction_type not in reference.PREDICTION_TYPES:
            raise UnsupportedConfigError(
                f"prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}"
            )
        # timestep_spacing is checked by set_timesteps, as diffusers does: pipelines build this class from another
        # scheduler's config (DDIMInverseScheduler.from_config(pipe.scheduler.config)), linspace included.
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
            clip_sample_range=clip_sample_range,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            **kwargs,
        )
        self._alphas_cpu: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(()))
        self._alphas_state: tuple | None = None
        self._coef_tables: BoundedCache[tuple, torch.Tensor] = BoundedCache(16)
        self._last_coef_table: tuple | None = None
        self._follow_alphas()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Sets the ascending timesteps of the inversion chain, as diffusers does.

        One difference: ``trailing`` never yields N + 1 timesteps starting at -1 (diffusers' float arange does for
        62 values of N <= 1000); the last N are kept. With ``device``, the coefficient table is placed there now.

        Args:
            num_inference_steps (`int`): N, a positive int no larger than ``num_train_timesteps``.
            device (`str` or `torch.device`, *optional*): where to put ``timesteps`` (CPU if None).
        """
        if not is_int(num_inference_steps) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        _check_inverse_config(self.config.prediction_type, self.config.timestep_spacing)
        super().set_timesteps(int(num_inference_steps), device)
        if len(self.timesteps) > num_inference_steps:
            self.timesteps = self.timesteps[-num_inference_steps:]
        if device is not None:
            self.coefficient_table(torch.device(device))

    def coefficient_table(self, device: str | torch.device, eta: float = 0.0) -> torch.Tensor:
        """The fp32 [T, 8] inversion table for the current N (``build_inverse_coefficient_table``), per device.

        ``eta`` exists for the shared step path and must be 0 (inversion is deterministic).
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        self._follow_alphas()
        last = self._last_coef_table
        if last is not None and last[0] == device and last[1] == self.num_inference_steps:
            return last[2]  # a loop's common case: the previous step's table
        device = normalize_device(device)
        key = (self.num_inference_steps, device)
        table = self._coef_tables.get(key)
        if table is None:
            alphas_cumprod, initial_alpha_cumprod = self._alphas_cpu
            table = reference.build_inverse_coefficient_table(
                alphas_cumprod, initial_alpha_cumprod, self.num_inference_steps
            ).to(device)
            self._coef_tables.put(key, table)
        self._last_coef_table = (device, self.num_inference_steps, table)
        return table

    def _follow_alphas(self) -> None:
        """Rebuilds the tables' CPU source when ``alphas_cumprod`` or ``initial_alpha_cumprod`` changed (by
        assignment or in place; see ``fastddim.DDIMScheduler.coefficient_table``)."""
        state = self._alphas_state
        if state is not None and torch.compiler.is_compiling():
            # Traced steps read the tables as built eagerly (Dynamo would make the version counters graph inputs).
            return
        alphas, initial = self.alphas_cumprod, self.initial_alpha_cumprod
        if (
            state is not None
            and alphas is state[0]
            and initial is state[2]
            and tensor_version(alphas) == state[1]
            and tensor_version(initial) == state[3]
        ):
            return
        initial = torch.as_tensor(initial)
        self._alphas_cpu = (
            alphas.detach().to("cpu", torch.float32).clone(),
            initial.detach().to("cpu", torch.float32).reshape(()).clone(),
        )
        self._alphas_state = (alphas, tensor_version(alphas), initial, tensor_version(initial))
        self._coef_tables.clear()
        self._last_coef_table = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> DDIMInverseSchedulerOutput | tuple:
        """One inversion step from s = min(t' - T // N, T - 1) to t' = ``timestep`` (DDIM eq. (12) run backwards).

        Args:
            model_output (`torch.Tensor`): the denoiser output at x_s, same shape, dtype and device as ``sample``.
            timestep (`int` or `torch.Tensor`): the target timestep t' in [0, num_train_timesteps): an int, a
                one-element integer tensor, or a (B,) integer tensor, one per batch entry (see
                ``fastddim.DDIMScheduler.step`` for dtypes and device tensors).
            sample (`torch.Tensor`): x_s, with the batch in dim 0.
            return_dict (`bool`, defaults to `True`): return an output object instead of a tuple.

        Returns:
            diffusers' inverse ``DDIMSchedulerOutput`` or `tuple`: (x_{t'}, x0_hat).
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        config = self.config
        _check_inverse_config(config.prediction_type, config.timestep_spacing)
        check_sample_pair(model_output, sample)
        backend = backend_for(sample)
        timestep_int, timestep_tensor, promote = resolve_timestep(timestep, sample, self._check_timestep_range)
        out_dtype = torch.float32 if promote and sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
        prev_sample, pred_original = run_step(
            self.coefficient_table,
            model_output,
            sample,
            timestep_int,
            timestep_tensor,
            self._check_timestep_range,
            backend,
            eta=0.0,
            prediction_type=config.prediction_type,
            clip_sample=bool(config.clip_sample),
            clip_sample_range=float(config.clip_sample_range),
            thresholding=None,
            use_clipped_model_output=False,
            noise=None,
            out_dtype=out_dtype,
        )
        if not return_dict:
            return (prev_sample, pred_original)
        return DDIMInverseSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)

    def _check_timestep_range(self, timestep: int) -> int:
        self._follow_alphas()
        num_train_timesteps = self._alphas_cpu[0].shape[0]
        if not 0 <= timestep < num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {num_train_timesteps}), got {timestep}")
        return timestep


def _check_inverse_config(prediction_type: object, timestep_spacing: object) -> None:
    if prediction_type not in reference.PREDICTION_TYPES:
        raise UnsupportedConfigError(
            f"prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}"
        )
    if timestep_spacing not in INVERSE_TIMESTEP_SPACINGS:
        raise UnsupportedConfigError(
            f"timestep_spacing must be one of {INVERSE_TIMESTEP_SPACINGS}, got {timestep_spacing!r}"
        )
