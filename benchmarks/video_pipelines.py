"""Random-weight Wan 2.1 and CogVideoX pipelines for the benchmarks, at a small size or a released one.

``wan-1.3b`` has Wan2.1-T2V-1.3B's transformer (30 layers, 12 heads x 128, FFN 8960) and VAE; ``cogvideox-2b``
has CogVideoX-2b's transformer (30 layers, 30 heads x 64, sin-cos positions) and VAE. The T5 text encoders keep
the released width (4096, what the transformers read) but one layer and the offline tokenizer's small vocabulary:
visalign caches text embeddings per prompt, so their size only matters to the naive way, which re-encodes.
``wan-small`` and ``cogvideox-small`` are the same graphs at CPU sizes.
"""

from __future__ import annotations

import torch

from visalign.models.cogvideox import RELEASED_SCHEDULER_CONFIG
from visalign.offline_tokenizers import t5_tokenizer

VIDEO_PRESETS = ("wan-small", "wan-1.3b", "cogvideox-small", "cogvideox-2b")


def _t5(cls_config, cls_model, width: int, tokenizer):
    heads = max(width // 64, 1)
    return cls_model(
        cls_config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=width // heads,
            d_ff=width,
            num_layers=1,
            num_heads=heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def build_wan(full: bool):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    text = 4096 if full else 64
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12 if full else 2,
        attention_head_dim=128 if full else 32,
        in_channels=16,
        out_channels=16,
        text_dim=text,
        freq_dim=256,
        ffn_dim=8960 if full else 128,
        num_layers=30 if full else 2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    vae = AutoencoderKLWan() if full else AutoencoderKLWan(base_dim=16, z_dim=16, num_res_blocks=1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(UMT5Config, UMT5EncoderModel, text, tokenizer),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )


def build_cogvideox(full: bool):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer()
    text = 4096 if full else 64
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=30 if full else 2,
        attention_head_dim=64 if full else 32,
        in_channels=16,
        out_channels=16,
        time_embed_dim=512 if full else 64,
        text_embed_dim=text,
        num_layers=30 if full else 2,
        sample_width=90 if full else 8,
        sample_height=60 if full else 8,
        sample_frames=49 if full else 9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=False,
    )
    vae = (
        AutoencoderKLCogVideoX()
        if full
        else AutoencoderKLCogVideoX(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16)
    )
    scheduler = CogVideoXDDIMScheduler(**RELEASED_SCHEDULER_CONFIG)
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(T5Config, T5EncoderModel, text, tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def build_video_pipeline(preset: str, seed: int = 0):
    """One of :data:`VIDEO_PRESETS`, seeded."""
    if preset not in VIDEO_PRESETS:
        raise SystemExit(f"unknown video preset {preset!r} ({', '.join(VIDEO_PRESETS)})")
    torch.manual_seed(seed)
    family, size = preset.split("-")
    return (build_wan if family == "wan" else build_cogvideox)(full=size != "small")
