"""The speed levers at tiny size on a CPU: each changes how the step runs, not what it computes."""

from __future__ import annotations

import pytest
import torch
from test_diffusion_dpo import make_config
from tiny import build_tiny_pipeline, tiny_model
from tiny.rewards import Brightness
from torch.utils._python_dispatch import TorchDispatchMode

from trainers.base import Trainer
from trainers.diffusion_dpo import DiffusionDPO
from trainers.grpo import GRPO, GRPOConfig
from visalign.attention import AttentionBackendError
from visalign.config import ConfigError
from visalign.data import PreferenceWriter
from visalign.errors import ModelError
from visalign.models import FAMILIES, load_model
from visalign.speedups import compile_repeated_blocks


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    writer, g = PreferenceWriter(d), torch.Generator().manual_seed(0)
    for i in range(4):
        writer.append(["a red circle", "a blue square"][i % 2], torch.rand(3, 32, 32, generator=g),
                      torch.rand(3, 32, 32, generator=g))  # fmt: skip
    return d


def dpo_task(tiny_pipeline_dir, pairs, tmp_path, **kw):
    task = DiffusionDPO(make_config(tiny_pipeline_dir("sd"), tmp_path, pairs, **kw))
    with torch.no_grad():  # a non-zero LoRA, so policy and reference differ
        for p in task.params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return task


def grpo_task(tmp_path, **kw):
    out = str(tmp_path / "g")
    cfg = GRPOConfig(model="tiny-sd3", reward="brightness", prompts="a red circle", output_dir=out, batch_size=2,
                     group_size=2, steps=3, resolution=32, lora_rank=4, report_to="none", **kw)  # fmt: skip
    return GRPO(cfg, model=tiny_model("sd3"), reward=Brightness())


def loss_and_grads(task):
    """Policy and reference errors, loss and LoRA gradients of one DPO step on the first two pairs."""
    batch = task.collate([task.encoded[0], task.encoded[1]])
    errors, ref_errors = task.errors(batch)
    loss, _ = task.loss(batch)
    loss.backward()
    grads = [p.grad.clone() for p in task.params]
    for p in task.params:
        p.grad = None
    return errors.detach(), ref_errors, loss.detach(), grads


def assert_same_step(a, b):
    """Same errors to float tolerance; the loss and gradients carry beta = 5000 x 1/2 times their difference."""
    for x, y in zip(a[:2], b[:2]):
        torch.testing.assert_close(x, y, atol=1e-7, rtol=1e-5)
    assert a[2].item() == pytest.approx(b[2].item(), abs=3e-4) and abs(a[2].item() - 0.6931) > 1e-2
    for ga, gb in zip(a[3], b[3]):
        torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-3)


def compiled_blocks(module):
    return [m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def test_compile_option_compiles_each_repeated_block(tiny_pipeline_dir, pairs, tmp_path):
    unet = DiffusionDPO(make_config(tiny_pipeline_dir("sd"), tmp_path, pairs, compile=True)).model.denoiser
    assert {type(m).__name__ for m in compiled_blocks(unet)} == {"BasicTransformerBlock"}  # diffusers' own list
    assert len(compiled_blocks(unet)) == 4  # down 1, mid 1, up 2
    grpo = grpo_task(tmp_path, compile=True)
    transformer = grpo.model.denoiser  # SD3 names no _repeated_blocks: its _no_split_modules
    assert len(compiled_blocks(transformer)) == len(transformer.transformer_blocks) == 2


def test_traced_blocks_give_the_eager_loss_and_gradients(tiny_pipeline_dir, pairs, tmp_path):
    """The graph capture (Dynamo + AOT autograd, LoRA on and off, grad and no-grad) without inductor's codegen."""
    eager = loss_and_grads(dpo_task(tiny_pipeline_dir, pairs, tmp_path / "a"))
    task = dpo_task(tiny_pipeline_dir, pairs, tmp_path / "b")
    assert compile_repeated_blocks(task.model.denoiser, backend="aot_eager") == 4
    assert_same_step(loss_and_grads(task), eager)


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager(tiny_pipeline_dir, pairs, tmp_path):
    eager = loss_and_grads(dpo_task(tiny_pipeline_dir, pairs, tmp_path / "a"))
    task = dpo_task(tiny_pipeline_dir, pairs, tmp_path / "b", compile=True)
    assert_same_step(loss_and_grads(task), eager)


def test_channels_last_keeps_the_step_and_is_for_unets(tiny_pipeline_dir, pairs, tmp_path):
    eager = loss_and_grads(dpo_task(tiny_pipeline_dir, pairs, tmp_path / "a"))
    task = dpo_task(tiny_pipeline_dir, pairs, tmp_path / "b", channels_last=True)
    convs = [m.weight for m in task.model.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert sum(not w.is_contiguous() for w in convs) >= 4  # the 3x3 kernels (a 1x1 kernel is both layouts)
    assert_same_step(loss_and_grads(task), eager)
    with pytest.raises(ConfigError, match="sd3: channels_last is for UNet denoisers"):
        grpo_task(tmp_path, channels_last=True)


def test_fused_adamw_takes_the_same_steps(tiny_pipeline_dir, pairs, tmp_path):
    weights = {}
    for fused in (False, True):
        task = dpo_task(tiny_pipeline_dir, pairs, tmp_path / str(fused), fused_adam=fused, max_steps=2)
        start = {k: v.clone() for k, v in task.state_dict().items()}
        trainer = Trainer(task)
        assert trainer.optimizer.param_groups[0]["fused"] is (True if fused else None)
        trainer.train()
        weights[fused] = task.state_dict()
    # An Adam step moves a weight by up to about lr; the two kernels round g / (sqrt(v) + eps) differently, which
    # shows where a gradient is near eps (3e-6 after two steps on some CPUs): they agree to 1% of a step.
    lr, steps = task.config.learning_rate, 2
    for k, v in weights[True].items():
        torch.testing.assert_close(v, weights[False][k], atol=0.01 * lr * steps, rtol=0)
    moved = max(float((v - start[k]).abs().max()) for k, v in weights[True].items())
    assert moved > 0.25 * lr  # the steps are many times the tolerance


class Ops(TorchDispatchMode):
    """Names of the aten ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **kwargs or {})


def predict_ops(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = model.encode_prompt(["a red circle"])
        x, t = model.prepare_latents(1, 32, 32, None, g), torch.full((1,), 500.0)
        with Ops() as ops:
            out = model.predict(x, t, cond)
    return out, ops.names


def test_sdpa_backend_runs_the_named_kernel_in_the_denoiser_only(tiny_pipeline_dir):
    flash = "_scaled_dot_product_flash_attention_for_cpu"
    default_out, default_ops = predict_ops(load_model(tiny_pipeline_dir("sd")))
    math_model = load_model(tiny_pipeline_dir("sd"), attention="sdpa-math")
    math_out, math_ops = predict_ops(math_model)
    assert flash in default_ops and flash not in math_ops and "bmm" in math_ops
    torch.testing.assert_close(math_out, default_out, atol=1e-5, rtol=1e-4)
    with Ops() as ops, torch.no_grad():  # the text encoder's attention is not forced onto the math kernel
        math_model.encode_prompt(["a red circle"])
    assert flash in ops.names
    with pytest.raises(AttentionBackendError, match="'sdpa-efficient' needs a CUDA device"):
        load_model(tiny_pipeline_dir("sd"), attention="sdpa-efficient")
    with pytest.raises(ModelError, match="choose one of sdpa, sdpa-flash"):
        FAMILIES["sd"](build_tiny_pipeline("sd")).set_attention("flash")
