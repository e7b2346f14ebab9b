"""Tiny Wan 2.1 and CogVideoX text-to-video pipelines, real Diffusers classes with seeded random weights.

Sizes follow Diffusers' own ``get_dummy_components`` for these pipelines, shrunk further where possible.
Both VAEs compress 8x in space, so 32 x 32 pixels become 4 x 4 latents; in time Wan's compresses 4x (5 frames ->
2 latent frames) and the tiny CogVideoX one 2x (5 frames -> 3 latent frames, see :func:`build_cogvideox`).
Scheduler settings are those the released checkpoints ship with (Wan2.1-T2V: UniPC with flow sigmas,
``flow_shift=3``; CogVideoX-2b: CogVideoX-DDIM, v-prediction, zero-terminal-SNR, ``snr_shift_scale=3``).
"""

from __future__ import annotations

import torch

from visalign.models.cogvideox import RELEASED_SCHEDULER_CONFIG
from visalign.offline_tokenizers import t5_tokenizer

TEXT_DIM = 32


def _t5_config(cls, tokenizer):
    return cls(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def build_wan(seed: int = 0):
    """A tiny ``WanPipeline`` (Wan 2.1 text-to-video layout: latents ``[B, C, F, h, w]``)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(_t5_config(UMT5Config, tokenizer))
    torch.manual_seed(seed)
    # non-trivial per-channel statistics, so that a missing (de)normalisation changes the numbers
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, -0.05],
        latents_std=[1.5, 0.8, 2.0, 1.2],
    )
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def build_cogvideox(seed: int = 0, rotary: bool = True, scheduler: str = "ddim", patch_size_t: int | None = None):
    """A tiny ``CogVideoXPipeline`` (latents ``[B, F, C, h, w]``).

    The VAE compresses time 2x (the released one 4x): with 4x its decoder turns 2 latent frames into 8 frames
    instead of 5 (it needs an odd latent length), and the shared tests use 5-frame videos.

    Args:
        rotary: 3D rotary embeddings as CogVideoX-5b (``True``) or sin-cos position embeddings as CogVideoX-2b.
        scheduler: ``"ddim"`` (``CogVideoXDDIMScheduler``, shipped) or ``"dpm"`` (``CogVideoXDPMScheduler``).
        patch_size_t: 2 for a CogVideoX-1.5-style transformer that patchifies frames in pairs.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(_t5_config(T5Config, tokenizer))
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        sample_width=4,  # latent 4 x 4 -> 32 x 32 pixels
        sample_height=4,
        sample_frames=5,  # (5 - 1) / 2 + 1 = 3 latent frames
        patch_size=2,
        temporal_compression_ratio=2,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=rotary,
        patch_size_t=patch_size_t,
        patch_bias=patch_size_t is None,  # CogVideoX 1.5 has no patch-embedding bias
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=2,
        scaling_factor=1.15258426,
    )
    scheduler_cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[scheduler]
    scheduler = scheduler_cls(**RELEASED_SCHEDULER_CONFIG)
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
