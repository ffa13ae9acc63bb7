"""Tiny random Stable Diffusion / SDXL components built offline (importable as ``tests.sd_components``).

Shapes follow diffusers' own fast tests (``get_dummy_components``), smaller where the CPU allows; the CLIP tokenizer
reads a character-level vocabulary the builder writes, so nothing is downloaded.
"""

import json
import string
from pathlib import Path

import diffusers
import torch
import transformers

# Latents of 8x8 (16x16 images: the two-block VAE downsamples by 2), 4 channels.
LATENT_SIZE = 8
TOKENIZER_MAX_LENGTH = 16


def write_tokenizer(directory: Path) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer over lower-case letters, digits and a few symbols (byte-level BPE without merges)."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += [c for c in symbols] + [c + "</w>" for c in symbols]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    # from_pretrained reads the files under the same names in transformers 4 and 5 (whose constructors differ).
    return transformers.CLIPTokenizer.from_pretrained(directory, model_max_length=TOKENIZER_MAX_LENGTH)


def text_encoder_config(vocab_size: int, **overrides) -> transformers.CLIPTextConfig:
    config = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=32,
    )
    return transformers.CLIPTextConfig(**{**config, **overrides})


def make_vae() -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=2 * LATENT_SIZE,
    ).eval()


def sd_components(tmp_path: Path) -> dict:
    """Components of ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` (no safety checker)."""
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=2,
    ).eval()
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(text_encoder_config(len(tokenizer))).eval()
    return dict(
        unet=unet,
        scheduler=ddim_scheduler(),
        vae=make_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def sdxl_unet(cross_attention_dim: int, num_time_ids: int) -> diffusers.UNet2DConditionModel:
    """An SDXL UNet: added ``text_time`` conditioning of ``num_time_ids`` ids (6 for the base model's sizes, 5 for
    the refiner's sizes and aesthetic score) plus a 32-wide pooled text embedding."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=num_time_ids * 8 + 32,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=2,
    ).eval()


def sdxl_components(tmp_path: Path) -> dict:
    """Components of ``StableDiffusionXLPipeline`` (and of ``StableDiffusionXLImg2ImgPipeline`` without aesthetic
    scores): two text encoders (the second with a projection)."""
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    unet = sdxl_unet(cross_attention_dim=64, num_time_ids=6)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(text_encoder_config(len(tokenizer))).eval()
    return sdxl_pipeline_components(unet, text_encoder, tokenizer, force_zeros_for_empty_prompt=True)


def sdxl_refiner_components(tmp_path: Path) -> dict:
    """Components of ``StableDiffusionXLImg2ImgPipeline`` shaped like SDXL's refiner: only the second (projected)
    text encoder, and a UNet conditioned on an aesthetic score (``requires_aesthetics_score``); the VAE is the base
    components' (same weights), so base latents hand over."""
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    unet = sdxl_unet(cross_attention_dim=32, num_time_ids=5)
    return sdxl_pipeline_components(
        unet, None, tokenizer, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
    )


def sdxl_pipeline_components(
    unet: diffusers.UNet2DConditionModel,
    text_encoder: transformers.CLIPTextModel | None,
    tokenizer: transformers.CLIPTokenizer,
    **config,
) -> dict:
    """An SDXL pipeline's components around ``unet``: the first text encoder (None for a refiner) and a projected
    second one, both reading ``tokenizer``, a DDIM scheduler, the VAE, no watermarker; ``config`` as given."""
    torch.manual_seed(0)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(text_encoder_config(len(tokenizer))).eval()
    return dict(
        unet=unet,
        scheduler=ddim_scheduler(),
        vae=make_vae(),
        text_encoder=text_encoder,
        tokenizer=None if text_encoder is None else tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
        **config,
    )


def ddim_scheduler(**overrides) -> diffusers.DDIMScheduler:
    """diffusers' DDIMScheduler in Stable Diffusion's configuration (steps_offset 1, no clipping)."""
    config = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return diffusers.DDIMScheduler(**{**config, **overrides})
