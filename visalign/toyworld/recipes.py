"""Architectures of the shapes-world models: real Diffusers / transformers / open_clip classes at toy sizes.

Everything here builds randomly initialised components from a seed; :mod:`visalign.toyworld.pretrain` trains
them. Sizes are chosen so each shipped model stays under ~10 MB of fp32 safetensors and pretrains on two CPU
cores in minutes:

* **Tokenizer** (toy-sd, toy-flow): a real ``CLIPTokenizer`` (byte-level BPE, ``</w>`` word ends) with a
  small vocabulary: the 512 byte-level base symbols of CLIP, whole-word tokens for the shapes world's words
  (and a few common ones), and CLIP's two special tokens: 669 tokens instead of 49,408, so a 64-wide text
  embedding is 170 KB instead of 12.6 MB. Any text still tokenizes (unknown words fall back to bytes), and
  prompts are padded to 16 tokens (the longest caption is 8).
* **VAE**: ``AutoencoderKL`` with three levels of 32 channels: 64x64 pixels to 4x16x16 latents. (16 channels at
  full resolution rounded the corners of squares: the oracle then read 1 square in 6 as a circle.)
* **toy-sd**: ``UNet2DConditionModel`` on 16x16 latents (32, 64, 64 channels; cross-attention on the two
  lower levels), a frozen ``CLIPTextModel`` (toy-flow's first text encoder, 32 wide, 3 layers: SD too trains its
  UNet under a frozen CLIP text encoder), ``DDIMScheduler`` with SD's scaled-linear betas rescaled to zero terminal
  SNR, trailing timesteps and v-prediction (as SD 2.x predicts v; Lin et al. 2024 for the rescaling).
* **toy-flow**: ``SD3Transformer2DModel`` (patch 2, 4 joint blocks, 64 wide), two ``CLIPTextModelWithProjection``
  (32 wide each: their penultimate states concatenate to the 64-wide joint attention input), no T5
  (``text_encoder_3=None``), ``FlowMatchEulerDiscreteScheduler`` (shift 3).
* **toy-video**: ``WanPipeline`` on 8-frame 32x32 videos: ``AutoencoderKLWan`` (base 16 channels, 4 latent channels,
  2x spatial and **no temporal** compression, so 8 frames stay 8 latent frames of 16x16), ``WanTransformer3DModel``
  (patch 1x4x4: 16 tokens per frame, 4 blocks, 64 wide), a frozen randomly initialised ``UMT5EncoderModel`` (32 wide,
  one layer) with the small offline T5 tokenizer, and UniPC with flow sigmas (``flow_shift=3``) as Wan ships.
* **toy-clip**: an open_clip ``CLIP`` (ViT 64 px, patch 8; text tower 32 wide) registered as the custom config
  ``toy-clip``; it keeps open_clip's own BPE tokenizer (49,408 tokens, context 16) so that
  ``open_clip.get_tokenizer("toy-clip")`` works offline and the 32-wide embedding is 6.3 MB.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import torch

from ..offline_tokenizers import WORDS
from .captions import COLORS, DIRECTIONS, POSITIONS, SHAPES
from .render import IMAGE_SIZE, VIDEO_SIZE

TOKENIZER_MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LATENT_CHANNELS = 4
VAE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR
CLIP_MODEL_NAME = "toy-clip"
CLIP_CONTEXT_LENGTH = 16


# ----------------------------------------------------------------------------------------------- tokenizer
def _world_words() -> list[str]:
    words = ["a", "the", "on", "moving", *COLORS, *SHAPES, *POSITIONS, *DIRECTIONS, *WORDS]
    return list(dict.fromkeys(words))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one lower-case ASCII word (CLIP's algorithm: merge the best-ranked pair, repeat)."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks) + 1), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, _, best = min(pairs)
        if rank > len(ranks):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@functools.lru_cache(maxsize=1)
def toy_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The toy BPE vocabulary: CLIP's 512 byte-level symbols, whole-word merges, then the special tokens.

    Merges are added word by word, each new one ranked last, until the word encodes to one token; a merge
    ranked after every earlier one never changes how an earlier word encodes, so every word stays whole.
    """
    from open_clip.tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in _world_words():
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.append(pair[0] + pair[1])
    vocab += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def toy_tokenizer():
    """The toy ``CLIPTokenizer`` (669 tokens, padded to 16 with ``<|endoftext|>``)."""
    from transformers import CLIPTokenizer

    vocab, merges = toy_vocab_and_merges()
    # transformers 5 needs vocab=dict, merges=list (file paths silently build an empty vocabulary)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=TOKENIZER_MAX_LENGTH)


def _text_config(hidden_size: int, layers: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    vocab, _ = toy_vocab_and_merges()
    # CLIP pools at the first EOS token: the ids must be this vocabulary's
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        hidden_act="gelu",
    )


# ----------------------------------------------------------------------------------------------- components
def toy_vae(seed: int = 0):
    """``AutoencoderKL`` 64x64x3 <-> 16x16x4 (scaling and shift are set from data after training)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )
    # The posterior's log-variance starts at -8 (std 0.02) instead of 0 (std 1): with SD's tiny KL weight a
    # short run never shrinks a unit std, and a decoder trained on such noisy latents rounds every corner.
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] = -8.0
    return vae


def toy_unet(seed: int = 0, cross_attention_dim: int = 64):
    """SD-style ``UNet2DConditionModel`` on 4x16x16 latents, cross-attention to 64-wide text states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


FLOW_WIDTH = 64  # the shipped toy-flow: 4 heads of 16


def check_width(width: int, flag: str) -> None:
    """Raise :class:`~visalign.errors.ConfigError` unless a transformer ``width`` is a positive multiple of 16."""
    from ..errors import ConfigError

    if width < 16 or width % 16:
        raise ConfigError(f"{flag} must be a multiple of 16 (heads of 16), got {width}")


def toy_transformer(seed: int = 0, width: int = FLOW_WIDTH):
    """``SD3Transformer2DModel`` on 4x16x16 latents: 64 image tokens (patch 2), 4 joint blocks, ``width`` wide
    (heads of 16)."""
    from diffusers import SD3Transformer2DModel

    check_width(width, "--flow_width")
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=width // 16,
        joint_attention_dim=64,
        caption_projection_dim=width,
        pooled_projection_dim=64,
        pos_embed_max_size=LATENT_SIZE // 2,
    )


def sd_scheduler(prediction_type: str = "epsilon", zero_snr: bool = False):
    """DDIM on Stable Diffusion's scaled-linear betas (epsilon-prediction by default, as SD1.5 ships).

    What the toy world showed about following "on the left" (probe: 32 seeds x 4 position words, 3,000 steps):

    * A text encoder trained jointly with the UNet collapses the position words: "left" and "right" ended 0.025
      apart at their token (colours ~1.0), so the UNet's output did not depend on the position word at all.
      With toy-flow's trained text encoder, frozen, the words are 0.5 apart.
    * Even then an epsilon-prediction model on SD's betas follows positions at chance (39%): 7% of ``x0`` is left
      in ``x_T`` in training, none at sampling, and the layout is read from the initial noise. With the betas
      rescaled to zero terminal SNR, trailing timesteps and v-prediction the same probe gives 76% (and the
      clean estimate at ``t = T`` moves with the position word).

    Hence toy-sd: ``prediction_type="v_prediction", zero_snr=True`` and a frozen text encoder.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if zero_snr else "leading",
    )


def flow_scheduler():
    """Flow-matching Euler with SD3's shift 3 (Esser et al. 2024, Eq. 23), for training and sampling sigmas.

    Shift 1 trains almost never above sigma 0.9 (logit-normal), where the object's position is still hidden
    in the noise: the layout was then decided by the initial noise, whatever the caption said.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build_toy_sd(seed: int = 0, vae=None, prediction_type: str = "epsilon", zero_snr: bool = False, text_encoder=None):
    """A randomly initialised toy-sd ``StableDiffusionPipeline`` (``vae``, ``text_encoder``: reuse trained ones;
    the UNet's cross-attention then takes the text encoder's width)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    if text_encoder is None:
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(64, 2))
    return StableDiffusionPipeline(
        vae=copy.deepcopy(vae) if vae is not None else toy_vae(seed + 1),
        text_encoder=text_encoder,
        tokenizer=toy_tokenizer(),
        unet=toy_unet(seed, cross_attention_dim=text_encoder.config.hidden_size),
        scheduler=sd_scheduler(prediction_type, zero_snr),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_toy_flow(seed: int = 0, vae=None, width: int = FLOW_WIDTH):
    """A randomly initialised toy-flow ``StableDiffusion3Pipeline`` without T5 (``vae``: reuse a trained one;
    ``width``: the transformer's, see :func:`toy_transformer`)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_text_config(32, 3, projection_dim=32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, 3, projection_dim=32))
    return StableDiffusion3Pipeline(
        transformer=toy_transformer(seed, width),
        scheduler=flow_scheduler(),
        vae=copy.deepcopy(vae) if vae is not None else toy_vae(seed + 1),
        text_encoder=text_encoder,
        tokenizer=toy_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=toy_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


# ----------------------------------------------------------------------------------------------- toy-video
VIDEO_LATENT_CHANNELS = 4
# 2x, not 4x: objects of 8-14 px then span 4-7 latent pixels, as the image VAE's 16-30 px do at 4x. At 4x the
# decoder's edges stayed blurred: the halo of mixed colours moved the oracle's median colour (red read as purple) and
# rounded the corners, 22% strict on reconstructions after 1,200 steps (2x: 18% vs 4% after 500 steps already)
VIDEO_VAE_FACTOR = 2
VIDEO_LATENT_SIZE = VIDEO_SIZE // VIDEO_VAE_FACTOR
VIDEO_TEXT_DIM = 32


def toy_video_vae(seed: int = 0):
    """``AutoencoderKLWan`` [3, F, 32, 32] <-> [4, F, 16, 16]: 2x in space, none in time (latent statistics set later).

    Wan's VAE compresses time 4x and wants ``4k + 1`` frames; the world's videos have 8, so time is not compressed
    (``temperal_downsample=[False]``, ``scale_factor_temporal=1``) and every frame keeps its own latent.
    Its encoder still reads frames in chunks of 1 + 4 + 4 ...: :meth:`visalign.models.wan.WanModel.encode` pads 8
    frames to 9 by repeating the last one and drops its latent, which the causal convolutions make exact.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=16,
        z_dim=VIDEO_LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * VIDEO_LATENT_CHANNELS,
        latents_std=[1.0] * VIDEO_LATENT_CHANNELS,
        scale_factor_temporal=1,
        scale_factor_spatial=VIDEO_VAE_FACTOR,
    )
    # posterior std starts at 0.02, not 1 (see toy_vae: noisy latents round every corner)
    with torch.no_grad():
        vae.quant_conv.bias[VIDEO_LATENT_CHANNELS:] = -8.0
    return vae


def toy_video_text_encoder(seed: int = 0):
    """A randomly initialised, frozen ``UMT5EncoderModel`` (32 wide, one layer) and its small offline T5 tokenizer.

    Never trained: trained jointly with the denoiser, toy-sd's text encoder collapsed the position words (left and
    right 0.025 apart) and the denoiser then ignored them. Random token embeddings keep the direction words apart.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    from ..offline_tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=VIDEO_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return UMT5EncoderModel(config).eval().requires_grad_(False), tokenizer


VIDEO_PATCH = 4  # the shipped toy-video: tokens of 1 x 4 x 4 latent pixels (8x8 pixels)
VIDEO_WIDTH = 128  # 8 heads of 16; the 64-wide first toy-video rounded every square's corners


def check_video_architecture(patch: int, width: int) -> None:
    """Raise :class:`~visalign.errors.ConfigError` unless ``patch`` is 1, 2 or 4 and ``width`` a multiple of 16."""
    from ..errors import ConfigError

    if patch not in (1, 2, 4):
        raise ConfigError(f"--video_patch must be 1, 2 or 4 (latent pixels per token side), got {patch}")
    check_width(width, "--video_width")


def toy_video_transformer(seed: int = 0, patch: int = VIDEO_PATCH, width: int = VIDEO_WIDTH):
    """``WanTransformer3DModel`` on [4, 8, 16, 16] latents: 4 blocks of ``width`` (heads of 16), FFN twice as wide;
    patch ``1 x patch x patch`` (4: 128 tokens of 8x8 pixels)."""
    from diffusers import WanTransformer3DModel

    check_video_architecture(patch, width)
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, patch, patch),
        num_attention_heads=width // 16,
        attention_head_dim=16,
        in_channels=VIDEO_LATENT_CHANNELS,
        out_channels=VIDEO_LATENT_CHANNELS,
        text_dim=VIDEO_TEXT_DIM,
        freq_dim=64,
        ffn_dim=2 * width,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def video_scheduler():
    """UniPC with flow sigmas and ``flow_shift=3``, as Wan2.1-T2V ships (the shift also sets the training sigmas)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )


def build_toy_video(seed: int = 0, vae=None, patch: int = VIDEO_PATCH, width: int = VIDEO_WIDTH):
    """A randomly initialised toy-video ``WanPipeline`` (``vae``: reuse a trained one; ``patch``, ``width``: see
    :func:`toy_video_transformer`)."""
    from diffusers import WanPipeline

    text_encoder, tokenizer = toy_video_text_encoder(seed + 2)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=copy.deepcopy(vae) if vae is not None else toy_video_vae(seed + 1),
        scheduler=video_scheduler(),
        transformer=toy_video_transformer(seed, patch, width),
    )


# ----------------------------------------------------------------------------------------------- toy-clip
def clip_model_config() -> dict:
    """The open_clip model config of toy-clip (the ``model_cfg`` of ``open_clip_config.json``)."""
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "width": 64,
            "layers": 3,
            "head_width": 16,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {
            "context_length": CLIP_CONTEXT_LENGTH,
            "vocab_size": 49408,
            "width": 32,
            "heads": 4,
            "layers": 2,
            "mlp_ratio": 2.0,
        },
    }


def clip_preprocess_config() -> dict:
    """Preprocessing of toy-clip: 64x64 images (no resize needed), OpenAI mean/std."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "size": IMAGE_SIZE,
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


@functools.cache
def register_clip_config() -> Path:
    """Register ``toy-clip`` with ``open_clip.add_model_config`` (from a private folder; idempotent)."""
    import tempfile

    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="visalign-toy-clip-config-"))
    (folder / f"{CLIP_MODEL_NAME}.json").write_text(json.dumps(clip_model_config(), indent=2))
    open_clip.add_model_config(folder)
    return folder


def build_toy_clip(seed: int = 0):
    """A randomly initialised toy-clip (open_clip ``CLIP``) and its tokenizer."""
    import open_clip

    register_clip_config()
    torch.manual_seed(seed)
    model = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None)
    return model, open_clip.get_tokenizer(CLIP_MODEL_NAME)


CLIP_WEIGHTS = "open_clip_model.safetensors"


def save_toy_clip(model, directory: str | os.PathLike) -> Path:
    """Save toy-clip as a folder that open_clip loads offline in two ways.

    * ``open_clip.create_model_and_transforms("local-dir:DIR")`` (``open_clip_config.json`` + weights);
    * ``open_clip.add_model_config("DIR/toy-clip.json")`` then ``create_model("toy-clip", pretrained=
      "DIR/open_clip_model.safetensors")``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / CLIP_WEIGHTS)
    config = {"model_cfg": clip_model_config(), "preprocess_cfg": clip_preprocess_config()}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / f"{CLIP_MODEL_NAME}.json").write_text(json.dumps(clip_model_config(), indent=2) + "\n")
    return directory


def load_toy_clip(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a saved toy-clip folder: ``(model, tokenizer)`` in eval mode."""
    import open_clip

    directory = Path(directory)
    if not (directory / "open_clip_config.json").is_file():
        from ..errors import VisalignError

        raise VisalignError(f"{directory} is not a toy-clip folder: it has no open_clip_config.json")
    name = f"local-dir:{directory}"
    model = open_clip.create_model(name, device=device)
    model.eval()
    return model, open_clip.get_tokenizer(name)
