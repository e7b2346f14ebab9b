"""Tiny flow-matching image pipelines (SD3, SD3 without T5, FLUX.1-dev-style) with random weights.

Shaped like Diffusers' ``get_dummy_components`` for these pipelines, but with the released models' structure
where it matters to the code under test: a 16-channel VAE with four levels (8x downsampling, ``shift_factor``
and ``scaling_factor`` set), patch size 2 for SD3 and 2x2 packing for FLUX (so 32x32 pixels are 4x4 latents,
4 image tokens), the real CLIP vocabulary, a small T5 (v1.1-style gated-GELU) encoder, and the released
scheduler configs (SD3: shift 3; FLUX: dynamic shifting). Every component is seeded on its own, without
touching the global RNG, so a builder returns the same weights on every call.
"""

from __future__ import annotations

import torch

from visalign.offline_tokenizers import clip_tokenizer, t5_tokenizer

CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_HIDDEN = 16
T5_DIM = 32


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _clip_config(pad_token_id: int = CLIP_EOS):
    from transformers import CLIPTextConfig

    # eos_token_id must be the real one: CLIP pools at the first EOS token of the input ids
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,  # SD3 reads the penultimate hidden state
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_HIDDEN,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=pad_token_id,
        hidden_act="gelu",
    )


def _t5(seed: int, tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: T5EncoderModel(config))


def _vae(seed: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=32,
            shift_factor=shift_factor,
            scaling_factor=scaling_factor,
            use_quant_conv=False,  # as the SD3 and FLUX VAEs
            use_post_quant_conv=False,
        ),
    )


def _sd3_components(seed: int, with_t5: bool) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=8,  # 64 px by default; the position embedding covers up to 16 latents (128 px)
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,  # CLIP-L + CLIP-G hidden (16 + 16) is zero-padded to T5's width
            caption_projection_dim=16,  # = heads * head dim
            pooled_projection_dim=2 * CLIP_HIDDEN,  # both CLIP projections concatenated
            pos_embed_max_size=16,
        ),
    )
    tokenizer_2 = clip_tokenizer(pad_token="!")  # CLIP-G's tokenizer pads with "!"
    components = {
        "transformer": transformer,
        "vae": _vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5035),  # SD3's VAE constants
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": _seeded(seed + 2, lambda: CLIPTextModelWithProjection(_clip_config())),
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": _seeded(
            seed + 3, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2.pad_token_id))
        ),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    if with_t5:
        components["tokenizer_3"] = t5_tokenizer(model_max_length=256)
        components["text_encoder_3"] = _t5(seed + 4, components["tokenizer_3"])
    return components


def build_sd3(seed: int = 0):
    """SD3-style pipeline with both CLIP encoders and T5."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**_sd3_components(seed, with_t5=True))


def build_sd3_no_t5(seed: int = 0):
    """The same SD3 pipeline (same weights) without T5; it reloads with ``text_encoder_3=None, tokenizer_3=None``."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**_sd3_components(seed, with_t5=False))


def build_flux(seed: int = 0):
    """FLUX.1-dev-style pipeline: guidance-distilled transformer, CLIP pooled + T5 text, dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_HIDDEN,  # CLIPTextModel's pooled output
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),  # sums to the head dim
        ),
    )
    tokenizer_2 = t5_tokenizer(model_max_length=512)
    # FLUX.1-dev's scheduler config
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer,
        vae=_vae(seed + 1, shift_factor=0.1159, scaling_factor=0.3611),  # FLUX's VAE constants
        scheduler=scheduler,
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(_clip_config())),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(seed + 3, tokenizer_2),
        tokenizer_2=tokenizer_2,
    )
