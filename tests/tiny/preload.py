"""Imported once by the server that forks :func:`tiny.launch.launch`'s processes: what every visalign run imports
(torch, Diffusers' pipelines and models, transformers, peft, accelerate, datasets, the trainers), so a forked
process starts with them loaded. Nothing here starts a thread or touches a device."""

import accelerate  # noqa: F401
import datasets  # noqa: F401
import diffusers
import peft  # noqa: F401
import torch  # noqa: F401
import transformers

import apps.cli  # noqa: F401
import trainers.diffusion_dpo  # noqa: F401
import trainers.drl  # noqa: F401
import trainers.grpo  # noqa: F401

for name in ("StableDiffusionPipeline", "UNet2DConditionModel", "AutoencoderKL", "DDIMScheduler", "DDPMScheduler"):
    getattr(diffusers, name)  # Diffusers imports lazily: these load the modules a tiny SD run uses
for name in ("CLIPTextModel", "CLIPTokenizer", "CLIPVisionModelWithProjection"):
    getattr(transformers, name)
