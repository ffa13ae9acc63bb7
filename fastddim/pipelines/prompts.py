"""Prompt encoding of fastddim's Stable Diffusion pipelines: diffusers' ``encode_prompt``, minus two crashes of its
text-encoder plumbing on current transformers, with the embeddings diffusers means to compute.

- ``clip_skip`` (SD1/SD2 pipelines): diffusers applies the CLIP text model's final LayerNorm to the chosen hidden
  state through ``text_encoder.text_model``, which transformers 5.24's ``CLIPTextModel`` no longer has (it holds the
  LayerNorm itself), so the call fails. The positive embeddings are computed here by diffusers' recipe and handed to
  ``encode_prompt`` as ``prompt_embeds``; the negative ones stay diffusers' (never clip-skipped, as in diffusers).
- ``lora_scale`` (``cross_attention_kwargs={"scale": ...}``) without the PEFT backend: diffusers' non-PEFT branch
  rescales legacy patched LoRA projections, which no diffusers loader creates any more, reaching them through that
  same ``text_model``. Without PEFT there is no LoRA layer for the scale to act on, so the scale is recorded and not
  applied.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.utils import USE_PEFT_BACKEND, logging, scale_lora_layers, unscale_lora_layers

from fastddim import compat

logger = logging.get_logger(__name__)

__all__ = ["PromptEncodingMixin", "clip_skipped_prompt_embeds"]


class PromptEncodingMixin:
    """``encode_prompt`` of the parent pipeline with the ``clip_skip``/``lora_scale`` handling above.

    ``applies_clip_skip_layer_norm`` says whether the parent's ``clip_skip`` goes through ``text_model`` (SD1/SD2's
    does; SDXL's takes a hidden state without the LayerNorm and works on every transformers version).
    """

    applies_clip_skip_layer_norm = False

    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        parent = super().encode_prompt
        bound = inspect.signature(parent).bind(*args, **kwargs)
        arguments = bound.arguments
        lora_scale = arguments.get("lora_scale")
        if lora_scale is not None and not USE_PEFT_BACKEND:
            self._lora_scale = lora_scale
            arguments["lora_scale"] = lora_scale = None
        clip_skip = arguments.get("clip_skip")
        if (
            self.applies_clip_skip_layer_norm
            and clip_skip is not None
            and arguments.get("prompt_embeds") is None
            and not hasattr(self.text_encoder, "text_model")
        ):
            arguments["prompt_embeds"] = clip_skipped_prompt_embeds(
                self, arguments["prompt"], arguments["device"], clip_skip, lora_scale
            )
            arguments["clip_skip"] = None
        return parent(*bound.args, **bound.kwargs)


def clip_skipped_prompt_embeds(
    pipe: Any, prompt: str | list[str], device: torch.device, clip_skip: int, lora_scale: float | None
) -> torch.Tensor:
    """diffusers' positive prompt embeddings under ``clip_skip``: the hidden state ``clip_skip`` layers before the
    last, through the text model's final LayerNorm (before duplication per image; ``encode_prompt`` does that)."""
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 0:
        raise ValueError(f"clip_skip must be an int >= 0, got {clip_skip!r}")
    text_encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    if isinstance(pipe, TextualInversionLoaderMixin):
        prompt = pipe.maybe_convert_prompt(prompt, tokenizer)
    text_inputs = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    untruncated_ids = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
    if untruncated_ids.shape[-1] > text_inputs.input_ids.shape[-1]:
        removed = tokenizer.batch_decode(untruncated_ids[:, tokenizer.model_max_length - 1 : -1])
        logger.warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to"
            f" {tokenizer.model_max_length} tokens: {removed}"
        )
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = text_inputs.attention_mask.to(device)
    # The LoRA layers scaled for this encoding as diffusers scales them for the whole of encode_prompt.
    scaled = lora_scale is not None and USE_PEFT_BACKEND
    if scaled:
        scale_lora_layers(text_encoder, lora_scale)
    try:
        outputs = text_encoder(
            text_inputs.input_ids.to(device), attention_mask=attention_mask, output_hidden_states=True
        )
        hidden_states = outputs.hidden_states
        if clip_skip >= len(hidden_states):
            raise ValueError(
                f"clip_skip must be at most the text encoder's number of layers ({len(hidden_states) - 1}), "
                f"got {clip_skip}"
            )
        return compat.clip_text_transformer(text_encoder).final_layer_norm(hidden_states[-(clip_skip + 1)])
    finally:
        if scaled:
            unscale_lora_layers(text_encoder, lora_scale)
