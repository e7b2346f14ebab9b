"""LoRA adapters and the reference model, shared by every :class:`~visalign.models.DiffusionModel` family.

Adapters live on the denoiser through Diffusers' peft integration; they are saved in the Diffusers LoRA format
(with peft's metadata), so an exported folder loads with ``pipe.load_lora_weights`` in plain Diffusers. The
reference for DPO and KL terms is the same network with every adapter off, or a frozen copy (full fine-tuning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import ModelError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_EXPECTED = f"a Diffusers-format LoRA: a folder with {LORA_WEIGHT_NAME}, or a .safetensors file"


def lora_file(path: str | os.PathLike) -> Path:
    """The weights file of the LoRA at ``path`` (a folder or a ``.safetensors`` file), checked to be readable.

    Cheap (it reads the file's header only), so commands call it before loading a model. Raises :class:`ModelError`
    naming the path and what a LoRA is when it is missing, a training checkpoint, or not a safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if path.is_dir() and not file.exists() and (path / "trainable.safetensors").exists():
        raise ModelError(
            f"{path} is a training checkpoint, not a LoRA: export it first with "
            f"`visalign export --checkpoint {path} --out DIR`, then load DIR"
        )
    if not file.exists():
        raise ModelError(f"LoRA not found: {file} (expected {LORA_EXPECTED})")
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error type for a file that is not safetensors
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{file} is not a LoRA: not a safetensors file ({reason}); expected {LORA_EXPECTED}") from e
    return file


class _SkipNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No LoRA keys associated to" not in record.getMessage()


@contextlib.contextmanager
def quiet_lora_load():
    """Diffusers' notices that a denoiser-only LoRA has no text-encoder keys, and peft's that a model holds more than
    one adapter, silenced while a visalign LoRA loads: both are by design (the file's keys were checked first)."""
    loggers = [logging.getLogger(f"diffusers.loaders.{name}") for name in ("lora_base", "lora_pipeline", "peft")]
    notice = _SkipNotice()
    for logger in loggers:
        logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


class LoraMixin:
    """LoRA and reference methods of :class:`~visalign.models.DiffusionModel` (which supplies ``denoiser``,
    ``denoiser_name``, ``pipe``, ``family``, ``device``, ``source`` and ``default_lora_targets``)."""

    compatible_lora_families: ClassVar[tuple[str, ...]] = ()

    def add_lora(
        self,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: str | list[str] | tuple[str, ...] | None = None,
        adapter_name: str = "default",
        dropout: float = 0.0,
    ) -> list[torch.nn.Parameter]:
        """Add a LoRA adapter to the denoiser (B = 0 at init, so the model is unchanged); returns its params.

        ``target_modules``: module names, or one comma-separated string (a config's ``lora_targets``).
        """
        from peft import LoraConfig

        if isinstance(target_modules, str):
            target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            target_modules=list(target_modules or self.default_lora_targets),
            lora_dropout=dropout,
            init_lora_weights=True,
        )
        self.denoiser.add_adapter(config, adapter_name=adapter_name)
        self.denoiser.set_adapter(adapter_name)
        params = self.lora_parameters(adapter_name)
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def lora_parameters(self, adapter_name: str = "default") -> list[torch.nn.Parameter]:
        return [p for n, p in self.denoiser.named_parameters() if "lora_" in n and f".{adapter_name}." in n]

    @property
    def adapter_names(self) -> list[str]:
        peft_config = getattr(self.denoiser, "peft_config", None) or {}
        return list(peft_config)

    def set_adapters(self, names: str | list[str] | None, weights: float | list[float] | None = None) -> None:
        """Activate the named adapter(s); ``None`` disables every adapter (the base model)."""
        if names is None:
            if self.adapter_names:  # a model without adapters already is the base
                self.denoiser.disable_adapters()
            return
        self.denoiser.enable_adapters()
        self.denoiser.set_adapters(names, weights)

    def set_reference(self, module: torch.nn.Module | None, offload: bool = False) -> None:
        """Use a frozen copy of the denoiser as the reference (full fine-tuning); ``None`` goes back to
        "LoRA disabled". With ``offload`` the copy waits on the CPU and visits the device for each reference pass."""
        if module is not None:
            module.requires_grad_(False).eval()
            module.to("cpu" if offload else self.device)
        self._reference, self._offload_reference = module, offload

    def shard(self, apply) -> None:
        """Shard the denoiser, and a frozen reference copy kept on the device, with ``apply`` (the trainer's FSDP2
        sharding, :func:`visalign.sharding.shard_module`); :meth:`lora_parameters` then returns the sharded ones."""
        apply(self.denoiser)
        reference = getattr(self, "_reference", None)
        if reference is not None and not self._offload_reference:
            apply(reference)

    def save_pipeline(self, directory: str | os.PathLike) -> None:
        """The pipeline with its current denoiser weights, in Diffusers format. A sharded denoiser is gathered
        whole first (a collective: every process calls this; the main process writes)."""
        from ..distributed import process_state
        from ..sharding import full_state, is_sharded

        denoiser = self.denoiser
        if not any(is_sharded(p) for p in denoiser.parameters()):
            self.pipe.save_pretrained(directory, safe_serialization=True)
            return
        whole = full_state(denoiser.state_dict())
        if not process_state().is_main_process:
            return
        plain = type(denoiser).from_config(denoiser.config)
        plain.load_state_dict(whole)
        setattr(self.pipe, self.denoiser_name, plain)
        try:
            self.pipe.save_pretrained(directory, safe_serialization=True)
        finally:
            setattr(self.pipe, self.denoiser_name, denoiser)

    @contextlib.contextmanager
    def reference(self):
        """The reference model for DPO/KL terms: the frozen copy when one is set, else the LoRA switched off."""
        ref = getattr(self, "_reference", None)
        if ref is None:
            with self.lora_disabled():
                yield
            return
        policy = self.denoiser
        if self._offload_reference:
            ref.to(self.device)
        setattr(self.pipe, self.denoiser_name, ref)
        try:
            yield
        finally:
            setattr(self.pipe, self.denoiser_name, policy)
            if self._offload_reference:
                ref.to("cpu")

    @contextlib.contextmanager
    def lora_disabled(self):
        """The reference model: the same network with every adapter switched off."""
        if not self.adapter_names:
            yield
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def fuse_lora(self) -> None:
        """Fold the active adapter into the denoiser's weights and remove every adapter: the model becomes base +
        LoRA with no peft layers left, to save as a new base (the next round of iterative DPO, or serving)."""
        if not self.adapter_names:
            raise ModelError(f"this {self.family} model has no LoRA adapter to fuse")
        self.denoiser.fuse_lora()
        self.denoiser.unload_lora()

    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's weights under peft's keys (no adapter name in them): what checkpoints store."""
        from peft.utils import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name))

    def load_lora_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
        """Set the adapter's weights from :meth:`lora_state_dict`'s keys; keys the adapter lacks are an error."""
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.denoiser, state, adapter_name=adapter_name)
        if result.unexpected_keys or not state:
            raise ModelError(
                f"the LoRA state does not fit this {self.family} adapter {adapter_name!r} "
                f"(unexpected keys: {list(result.unexpected_keys)[:3] or 'none'}, tensors: {len(state)})"
            )

    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Save one adapter in Diffusers format (with its LoRA metadata), atomically.

        The folder loads with ``pipe.load_lora_weights(directory)`` in plain Diffusers.
        """
        if adapter_name not in self.adapter_names:
            raise ModelError(f"no LoRA adapter named {adapter_name!r}; present: {self.adapter_names or 'none'}")
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        from ..sharding import full_state

        state = full_state(self.lora_state_dict(adapter_name))  # a sharded adapter gathered whole
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        metadata = self.denoiser.peft_config[adapter_name].to_dict()
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            type(self.pipe).save_lora_weights(
                tmp,
                **{
                    f"{self.denoiser_name}_lora_layers": state,
                    f"{self.denoiser_name}_lora_adapter_metadata": metadata,
                },
                safe_serialization=True,
            )
            (tmp / "visalign_lora.json").write_text(
                json.dumps({"family": self.family, "base_model": self.source, "adapter_name": adapter_name}, indent=2)
            )
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load a Diffusers-format LoRA (folder or ``.safetensors`` file) as ``adapter_name`` and activate it."""
        path = Path(path)
        file = lora_file(path)
        self._check_lora_family(path, file)
        with quiet_lora_load():
            self.pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        self.denoiser.set_adapter(adapter_name)

    def _check_lora_family(self, path: Path, file: Path) -> None:
        from safetensors import safe_open

        info = path / "visalign_lora.json" if path.is_dir() else None
        if info is not None and info.exists():
            family = json.loads(info.read_text()).get("family")
            if family and family != self.family and family not in self.compatible_lora_families:
                raise ModelError(f"LoRA {path} was trained for the {family} family; this model is {self.family}")
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
        prefixes = {k.split(".", 1)[0] for k in keys}
        module_names = {n for n, _ in self.denoiser.named_modules()}
        ours = [k.split(".", 1)[1] for k in keys if k.split(".", 1)[0] == self.denoiser_name]
        targets = {k.split(".lora_")[0] for k in ours if ".lora_" in k}
        if not targets or not targets <= module_names:
            missing = sorted(targets - module_names)[:3]
            raise ModelError(
                f"LoRA {path} does not fit this {self.family} {self.denoiser_name} "
                f"(key prefixes {sorted(prefixes)}, unknown modules {missing}): it was made for another model family"
            )

    compatible_lora_families: ClassVar[tuple[str, ...]] = ()
