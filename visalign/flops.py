"""FLOPs of training steps and model FLOP utilisation (MFU).

The method, as every benchmark report states it:

* ``F``: FLOPs of one denoiser forward on **one sample** at the benchmarked shape, counted by PyTorch's
  ``FlopCounterMode`` (matmuls, convolutions and attention; one multiply-add = 2 FLOPs; norms and element-wise
  ops are not counted). The VAE and the text encoders are left out: DPO reads cached latents and embeddings, and
  GRPO caches the text; the VAE decode of a rollout costs time but no counted FLOPs (MFU is then a lower bound).
* A pass with gradients costs ``F * (1 + backward_factor)`` with ``backward_factor = 2`` (the usual convention:
  gradients of the activations and of the weights). With LoRA the frozen weights get no gradient, so the kernels
  run about ``F`` in backward: the convention counts the work a full fine-tune of the same step would do.
* A pass without gradients (the DPO reference, the KL reference, rollout sampling) costs ``F``; CFG doubles it.
* ``MFU = step FLOPs / step seconds / peak``, with the device's dense (no sparsity) peak at the compute dtype.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

BACKWARD_FACTOR = 2.0

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s, fp32 on the CUDA cores (no TF32). The vendor
# datasheets quote bf16/fp16 with sparsity; the dense figure is half of it. An entry matches when each of its words
# is a word of the device name ("NVIDIA A100-SXM4-80GB" has A100, "NVIDIA L40S" is not an L4); the first match wins.
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H100", "NVL"), {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),  # NVIDIA H100 datasheet (H100 NVL column)
    (("H100", "PCIe"), {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),  # NVIDIA H100 datasheet (H100 PCIe)
    (("H100",), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # NVIDIA H100 datasheet (H100 SXM)
    (("H200", "NVL"), {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),  # NVIDIA H200 datasheet (H200 NVL)
    (("H200",), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # NVIDIA H200 datasheet (H200 SXM)
    (("B200",), {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),  # NVIDIA DGX B200 / HGX B200 datasheet, per GPU
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),  # NVIDIA A100 datasheet (SXM and PCIe alike)
    (("L40S",), {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),  # NVIDIA L40S datasheet
    (("L4",), {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),  # NVIDIA L4 datasheet
    (("A10",), {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),  # NVIDIA A10 datasheet
    # GeForce: fp16/bf16 with fp32 accumulation (what PyTorch uses), NVIDIA Ada / Ampere GA102 whitepapers
    (("RTX", "4090"), {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    (("RTX", "3090"), {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
]


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The dense peak of ``device_name`` (``torch.cuda.get_device_name()``) at ``dtype`` (bf16, fp16 or fp32),
    or ``None`` for a device not in :data:`PEAK_TFLOPS` (pass the figure yourself: ``--peak_tflops``)."""
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    name = set(re.split(r"[\s\-_]+", device_name))
    for words, peaks in PEAK_TFLOPS:
        if name.issuperset(words):
            return peaks[dtype]
    return None


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running ``fn()`` (forward, and backward if ``fn`` calls it), by ``FlopCounterMode``. Adds the
    formulas of the CPU flash-attention kernels, which PyTorch's table leaves out."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    }
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return int(counter.get_total_flops())


def denoiser_forward_flops(model, resolution: int, num_frames: int | None = None, prompt: str = "a photo") -> int:
    """``F``: FLOPs of one denoiser forward of :class:`~visalign.models.DiffusionModel` ``model`` on one sample
    at ``resolution`` (and ``num_frames``), through the family's own ``predict`` (no CFG)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = model.encode_prompt([prompt])
        x = model.prepare_latents(1, resolution, resolution, num_frames, g).to(model.device, model.dtype)
        t = torch.full((1,), model.num_train_timesteps // 2, device=model.device, dtype=torch.float32)
        return count_flops(lambda: model.predict(x, t, cond))


def preference_step_flops(forward: float, pairs: int, reference: bool, backward_factor: float = BACKWARD_FACTOR):
    """FLOPs of one Diffusion-DPO / MaPO step on ``pairs`` pairs: the policy's forward and backward on winner and
    loser (``2 * pairs`` samples), and the reference forward on both when the loss needs it (not MaPO)."""
    samples = 2 * pairs
    return samples * forward * (1 + backward_factor) + (samples * forward if reference else 0.0)


def grpo_rollout_flops(
    forward: float, samples: int, steps: int, trained_steps: int, cfg: bool, kl: bool,
    backward_factor: float = BACKWARD_FACTOR,
) -> dict[str, float]:  # fmt: skip
    """FLOPs of one GRPO rollout and its update: ``steps`` sampling forwards per sample, then per sample and
    trained step a policy forward and backward (and a reference forward with ``kl``); CFG doubles every pass."""
    width = 2 if cfg else 1
    rollout = samples * steps * width * forward
    update = samples * trained_steps * width * forward * (1 + backward_factor + (1 if kl else 0))
    return {"rollout": rollout, "update": update, "total": rollout + update}


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over ``peak`` TFLOP/s (``None`` without a peak)."""
    return None if not peak else flops / seconds / (peak * 1e12)
