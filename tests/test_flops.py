"""The FLOP counter and the step bookkeeping behind the benchmarks' MFU: exact values against the formulas."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from visalign.flops import (
    count_flops,
    denoiser_forward_flops,
    grpo_rollout_flops,
    mfu,
    peak_tflops,
    preference_step_flops,
)


def test_linear_forward_is_2mnk_and_backward_doubles_it_only_for_trained_weights():
    layer, x = torch.nn.Linear(16, 8), torch.randn(4, 16, requires_grad=True)
    forward = 2 * 4 * 16 * 8
    assert count_flops(lambda: layer(x)) == forward
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward  # grads of input and weight
    layer.requires_grad_(False)  # a frozen base weight (LoRA): only the input's gradient is computed
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * forward


def test_conv_forward_is_2_b_cout_hw_cin_kk():
    conv, x = torch.nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 10, 10)
    assert count_flops(lambda: conv(x)) == 2 * 2 * 8 * (10 * 10) * 3 * (3 * 3)


@pytest.mark.parametrize("kernel", ["default", "math"])
def test_attention_is_4_bh_lsd_forward(kernel):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, lq, s, d = 2, 4, 16, 12, 8
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k, v = torch.randn(b, h, s, d, requires_grad=True), torch.randn(b, h, s, d, requires_grad=True)
    forward = 4 * b * h * lq * s * d  # q k^T and (softmax) v: two matmuls of 2 * lq * s * d each
    # default: the CPU flash kernel (a formula added by count_flops); math: decomposed into matmuls
    with sdpa_kernel([SDPBackend.MATH]) if kernel == "math" else contextlib.nullcontext():
        assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == forward
        total = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    # backward: the gradients of q, k, v and of the scores (2x forward); the flash kernel also recomputes q k^T
    assert total == forward + (2 * forward if kernel == "math" else 2.5 * forward)


def test_denoiser_forward_counts_one_sample():
    model = tiny_model("sd")
    per_sample = denoiser_forward_flops(model, 32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = model.encode_prompt(["a", "b"])
        x, t = model.prepare_latents(2, 32, 32, None, g), torch.full((2,), 500.0)
        assert count_flops(lambda: model.predict(x, t, cond)) == 2 * per_sample
    assert per_sample > 0


def test_step_bookkeeping_follows_the_documented_convention():
    f = 10.0
    # DPO: policy forward + backward (2x) on 2 samples per pair, reference forward on both
    assert preference_step_flops(f, pairs=3, reference=True) == 6 * (f + 2 * f) + 6 * f == 240.0
    assert preference_step_flops(f, pairs=3, reference=False) == 180.0  # MaPO: no reference pass
    assert preference_step_flops(f, pairs=1, reference=True, backward_factor=1.0) == 6 * f  # LoRA kernels
    out = grpo_rollout_flops(f, samples=8, steps=10, trained_steps=9, cfg=True, kl=True)
    assert out["rollout"] == 8 * 10 * 2 * f  # CFG: two forwards per sampling step
    assert out["update"] == 8 * 9 * 2 * (f + 2 * f + f)  # policy forward + backward, KL reference forward
    assert out["total"] == out["rollout"] + out["update"]
    assert grpo_rollout_flops(f, 8, 10, 2, cfg=False, kl=False)["update"] == 8 * 2 * 3 * f


def test_peaks_by_device_name_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.0  # not the L4's
    assert peak_tflops("NVIDIA GeForce RTX 4090", "fp32") == 82.6
    assert peak_tflops("NVIDIA A10G", "bf16") is None  # not an A10: no guess
    assert peak_tflops("cpu", "fp32") is None
    assert mfu(1e12, 2.0, 1.0) == 0.5
    assert mfu(1e12, 2.0, None) is None
