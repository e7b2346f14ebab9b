"""Metadata of the built-in rewards (one place, importable without building anything).

``nominal_range`` is the typical range of raw scores of the published checkpoint, for plots and for choosing an
affine scale; it is not a bound.
"""

from __future__ import annotations

from .base import RewardSpec

BUILTIN_SPECS: dict[str, RewardSpec] = {
    spec.name: spec
    for spec in [
        RewardSpec(
            "clip",
            nominal_range=(0.15, 0.40),
            description="CLIP image-text cosine (open_clip or transformers); hessel=true gives 2.5*max(cos, 0)",
        ),
        RewardSpec(
            "hps-v2",
            nominal_range=(0.20, 0.32),
            description="Human Preference Score v2.0 (open_clip ViT-H-14 + HPS checkpoint; cosine)",
        ),
        RewardSpec(
            "hps-v2.1",
            nominal_range=(0.20, 0.35),
            description="Human Preference Score v2.1 (not comparable with v2.0)",
        ),
        RewardSpec(
            "pickscore",
            nominal_range=(18.0, 24.0),
            description="PickScore v1 (transformers CLIP-H; logit_scale.exp() * cosine)",
        ),
        RewardSpec(
            "aesthetic",
            needs_prompt=False,
            nominal_range=(3.0, 8.0),
            description="LAION aesthetic predictor v2 (linear MLP on L2-normalised CLIP ViT-L/14 embeddings)",
        ),
        RewardSpec(
            "imagereward",
            nominal_range=(-2.0, 2.0),
            description="ImageReward v1.0 (BLIP ViT-L/16 + BERT cross-attention + MLP), standardised",
        ),
        RewardSpec(
            "discriminator",
            needs_prompt=False,
            nominal_range=(-10.0, 10.0),
            description="logit of a head on a frozen encoder trained real vs model samples (log p_data/p_model)",
        ),
        RewardSpec(
            "video",
            modalities=("video",),
            description="any image reward over uniformly sampled frames, reduced by mean, min or first",
        ),
        RewardSpec(
            "temporal-consistency",
            modalities=("video",),
            needs_prompt=False,
            nominal_range=(0.8, 1.0),
            description="mean cosine similarity of encoder features of consecutive frames",
        ),
        RewardSpec(
            "stats",
            modalities=("image", "video"),
            needs_prompt=False,
            nominal_range=(0.0, 1.0),
            description="an image statistic (brightness, saturation, color_entropy) times a sign: a penalty in "
            "composites, or a deliberately hackable reward for testing the monitors",
        ),
        RewardSpec(
            "oracle",
            modalities=("image", "video"),
            differentiable=False,
            nominal_range=(0.0, 1.0),
            description="shapes-world oracle: strict (or partial) caption match; evaluation only",
        ),
        RewardSpec(
            "vlm-judge",
            nominal_range=(0.0, 1.0),
            description="Qwen2(.5)-VL judge from token probabilities: P('Yes') (VQAScore) or expected rating; "
            ".compare() judges pairs in both orders",
        ),
        RewardSpec(
            "openai-judge",
            differentiable=False,
            nominal_range=(0.0, 1.0),
            description="the same judge over an OpenAI-compatible chat-completions endpoint (logprobs or parsed "
            "answers; valid=False when unparsable)",
        ),
        RewardSpec(
            "remote",
            modalities=("image", "video"),
            needs_prompt=False,
            differentiable=False,
            description="a reward served by `visalign serve-reward` over HTTP: remote:http://127.0.0.1:PORT "
            "(its spec is fetched from /spec)",
        ),
    ]
}
