"""The step benchmark's kinds of step beyond the forward one: what each runs, and diffusers' reference for it.

- ``inverse``: one step of DDIM inversion, ``fastddim.DDIMInverseScheduler.step`` against
  ``diffusers.DDIMInverseScheduler.step`` at a mid-schedule timestep of the ascending inverse schedule.
- ``per-sample``: the forward step with a ``(B,)`` timestep tensor, one timestep per sample spread over the schedule,
  in one fastddim call; diffusers cannot step per-sample timesteps in one call, so its side loops over the samples
  (one step per sample, then ``torch.cat``, as a caller would have to).
- ``backward``: the forward step then ``torch.autograd.grad`` of ``(prev_sample, pred_original_sample)`` with respect
  to ``(model_output, sample)`` with fixed ``grad_outputs`` (g_prev, g_x0): the gradient of the scalar loss
  ``sum(g_prev * prev_sample) + sum(g_x0 * pred_original_sample)`` without timing the loss's own kernels; the
  outputs checked are the two gradients.

Every function takes the harness's `fastddim.benchmark.step.StepInputs`; a step function returns the two tensors the
check compares (prev_sample and x_0, or the two gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fastddim.benchmark.step import StepInputs


# How each implementation receives a per-sample case's timesteps (recorded in the record's ``config``).
PER_SAMPLE_TIMESTEP_KINDS = {
    "diffusers": "one step per sample, each a 0-dim device tensor (host syncs on CUDA), then torch.cat",
    "diffusers-int": "one step per sample, each a Python int, then torch.cat",
    "fastddim": "(B,) device tensor, one call",
    "fastddim-graph": "(B,) device tensor, one call",
}


def diffusers_scheduler(inputs: StepInputs) -> Any:
    """diffusers' DDIMScheduler (DDIMInverseScheduler for the inverse kind) with the case's config and schedule."""
    import diffusers

    cls = diffusers.DDIMInverseScheduler if inputs.case.kind == "inverse" else diffusers.DDIMScheduler
    scheduler = cls(**inputs.config)
    scheduler.set_timesteps(inputs.num_inference_steps)
    return scheduler


def fastddim_scheduler(inputs: StepInputs) -> Any:
    """fastddim's DDIMScheduler (DDIMInverseScheduler for the inverse kind), its schedule on the inputs' device."""
    import fastddim

    cls = fastddim.DDIMInverseScheduler if inputs.case.kind == "inverse" else fastddim.DDIMScheduler
    scheduler = cls(**inputs.config)
    scheduler.set_timesteps(inputs.num_inference_steps, device=inputs.device)
    return scheduler


def mid_timestep(kind: str, config: dict[str, Any], num_inference_steps: int) -> int:
    """The timestep a case steps from: the middle of diffusers' schedule (the ascending one for ``inverse``)."""
    import diffusers

    cls = diffusers.DDIMInverseScheduler if kind == "inverse" else diffusers.DDIMScheduler
    scheduler = cls(**config)
    scheduler.set_timesteps(num_inference_steps)
    return int(scheduler.timesteps[len(scheduler.timesteps) // 2])


def per_sample_timesteps(config: dict[str, Any], num_inference_steps: int, batch_size: int) -> torch.Tensor:
    """(B,) int64 CPU timesteps spread over diffusers' schedule: sample i at schedule index i * N // B."""
    import diffusers

    scheduler = diffusers.DDIMScheduler(**config)
    scheduler.set_timesteps(num_inference_steps)
    index = torch.arange(batch_size) * len(scheduler.timesteps) // batch_size
    return scheduler.timesteps[index].to(torch.int64)


def _forward_backward(
    step: Callable[[torch.Tensor, torch.Tensor], Any], model_output: torch.Tensor, sample: torch.Tensor, grads: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d model_output, d loss / d sample) through ``step``, loss = <g_prev, prev> + <g_x0, x0>."""
    with torch.enable_grad():
        prev, x0 = step(model_output, sample)
        grad_model_output, grad_sample = torch.autograd.grad((prev, x0), (model_output, sample), grads)
    return grad_model_output, grad_sample


def reference(inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' result for the case's kind in fp32 on the inputs' device (eta 0 for every kind here)."""
    scheduler = diffusers_scheduler(inputs)
    model_output, sample = inputs.model_output.float(), inputs.sample.float()
    kind = inputs.case.kind
    if kind == "inverse":
        prev, x0 = scheduler.step(model_output, inputs.timestep, sample, return_dict=False)
        return prev, x0
    if kind == "per-sample":
        outputs = [
            scheduler.step(model_output[i : i + 1], int(t), sample[i : i + 1], return_dict=False)
            for i, t in enumerate(inputs.timesteps.tolist())
        ]
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
    if kind == "backward":
        grads = tuple(g.float() for g in inputs.grad_outputs)

        def step(mo: torch.Tensor, s: torch.Tensor) -> Any:
            return scheduler.step(mo, inputs.timestep, s, return_dict=False)

        leaves = model_output.detach().requires_grad_(), sample.detach().requires_grad_()
        return _forward_backward(step, *leaves, grads)
    raise ValueError(f"no reference for step kind {kind!r}")


def step_fn(inputs: StepInputs, scheduler: Any, timestep: Any, *, per_sample: Any = None) -> Callable[[], Any]:
    """One call of the case's kind on ``scheduler`` (diffusers' or fastddim's) with ``timestep``.

    Args:
        inputs (`StepInputs`): the case's inputs.
        scheduler: a scheduler from `diffusers_scheduler` or `fastddim_scheduler`.
        timestep: what the step receives (an int, a 0-dim or a (B,) device tensor).
        per_sample (*optional*): for the ``per-sample`` kind on diffusers, the B timesteps (ints or 0-dim tensors)
            to loop over, one step per sample; None steps the whole batch with ``timestep`` in one call.

    Returns:
        `Callable`: runs one step (or one forward + backward) and returns the two checked tensors.
    """
    model_output, sample = inputs.model_output, inputs.sample
    kind = inputs.case.kind
    if kind == "per-sample" and per_sample is not None:
        timesteps = list(per_sample)

        def loop() -> tuple[torch.Tensor, torch.Tensor]:
            outputs = [
                scheduler.step(model_output[i : i + 1], t, sample[i : i + 1], return_dict=False)
                for i, t in enumerate(timesteps)
            ]
            return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])

        return loop
    if kind == "backward":
        leaves = model_output.detach().requires_grad_(), sample.detach().requires_grad_()
        grads = inputs.grad_outputs

        def backward() -> tuple[torch.Tensor, torch.Tensor]:
            return _forward_backward(lambda mo, s: scheduler.step(mo, timestep, s, return_dict=False), *leaves, grads)

        return backward
    return lambda: scheduler.step(model_output, timestep, sample, return_dict=False)


def diffusers_step_fn(inputs: StepInputs, *, int_timestep: bool) -> Callable[[], Any]:
    """diffusers' side of a kind: per-sample loops over the samples with ints or 0-dim device tensors."""
    scheduler = diffusers_scheduler(inputs)
    if inputs.case.kind == "per-sample":
        per_sample = inputs.timesteps.tolist() if int_timestep else list(inputs.timesteps.to(inputs.device).unbind())
        return step_fn(inputs, scheduler, None, per_sample=per_sample)
    timestep = inputs.timestep if int_timestep else inputs.timestep_tensor
    return step_fn(inputs, scheduler, timestep)


def fastddim_step_fn(inputs: StepInputs) -> Callable[[], Any]:
    """fastddim's side of a kind: one call, a 0-dim (or, per-sample, a (B,)) device timestep tensor."""
    scheduler = fastddim_scheduler(inputs)
    timestep = inputs.timesteps.to(inputs.device) if inputs.case.kind == "per-sample" else inputs.timestep_tensor
    return step_fn(inputs, scheduler, timestep)


def bytes_multiplier(kind: str) -> int:
    """Tensors of numel elements a step of ``kind`` must move at least, besides the noise: forward steps read two and
    write two; backward adds reading the two output gradients and writing the two input gradients."""
    return 8 if kind == "backward" else 4
