"""Tiny Stable Diffusion pipelines (SD1.5-style, SD2-style v-prediction, SDXL) with random weights.

Sizes follow Diffusers' own ``get_dummy_components`` but smaller: a two-level UNet (32, 64 channels), a
two-level VAE (downsampling 2x, so 32x32 pixels are 16x16 latents) and 2-layer CLIP text encoders with the
real CLIP vocabulary, so prompts tokenize exactly as in the released models.
"""

from __future__ import annotations

import torch

from visalign.offline_tokenizers import clip_tokenizer

CLIP_BOS, CLIP_EOS = 49406, 49407


def _text_config(hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    # eos_token_id must be the real one: CLIP pools at the first EOS token of the input ids
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=CLIP_EOS,
        layer_norm_eps=1e-5,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def _sd(seed: int, prediction_type: str):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        # SD2 uses linear projections in its transformer blocks; SD1.5 uses 1x1 convolutions
        use_linear_projection=prediction_type == "v_prediction",
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config()).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd(seed: int = 0):
    """SD1.5-style: epsilon-prediction UNet, DDIM scheduler."""
    return _sd(seed, "epsilon")


def build_sd_v(seed: int = 0):
    """SD2-style: v-prediction UNet, DDIM scheduler."""
    return _sd(seed, "v_prediction")


def build_sdxl(seed: int = 0):
    """SDXL: two text encoders (the second with projection, pooled), ``text_time`` micro-conditioning, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x 8 + pooled projection 32
        cross_attention_dim=64,  # both encoders' hidden states concatenated: 32 + 32
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config()).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config()).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
