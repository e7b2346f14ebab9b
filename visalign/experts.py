"""Timestep-segment experts: one LoRA per timestep interval, switched on and off at every sampling step.

AlignHuman (Liang et al. 2025, "timestep-segment preference optimisation") observed that early, high-noise
denoising steps decide layout and motion while late steps decide fidelity, trained one LoRA expert per interval on
its own preference data, and activates each only while the sampler is inside its interval. This module holds the
inference side and the file format; ``trainers/timestep_segment.py`` trains the experts.

* **Manifest** (``experts.json``): the base model the experts were trained on (with a signature of its denoiser),
  and per expert its adapter name, its LoRA folder (relative to the manifest, Diffusers format) and its interval.
  Intervals are in scheduler timesteps and half-open, ``[t_min, t_max)``; an interval that ends at ``T``
  (``num_train_timesteps``) also holds ``t = T``, where flow samplers start. Flow families use ``t = 1000 sigma``,
  so an interval "by sigma" ``[s0, s1)`` is ``[1000 s0, 1000 s1)``.
* **Switching**: :class:`SegmentSwitcher` is the ``step_callback`` of :meth:`DiffusionModel.sample`; before each
  step it activates the expert whose interval holds the step's timestep and switches every adapter off outside
  all intervals (there the model is exactly the base).
* **Early-step skipping** (AlignHuman's fast path, 100 -> 30 NFEs): fidelity is settled by the late steps, so the
  steps above ``skip_above`` can be thinned to every ``stride``-th one; the sampler then takes bigger steps there
  (same ODE solver on a coarser grid) and the function evaluations fall. :func:`skip_indices` says which steps stay.
* :class:`ExpertsView` wraps a model so that everything that samples (``generate``, ``evaluate_variants``, the
  trainers' evaluation) samples with the experts; ``set_adapters(name)`` on it picks a named switching plan
  (all experts, some of them, with or without skipping) or any ordinary adapter.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import VisalignError

MANIFEST_NAME = "experts.json"
MANIFEST_FORMAT = "visalign-experts"
MANIFEST_VERSION = 1
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_NAMES = ("default",)  # the adapter name every trainer trains under


class ExpertsError(VisalignError):
    """A bad manifest, interval or expert set (the message names the file, the expert and the fix)."""


# ----------------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Expert:
    """One expert: adapter ``name``, LoRA folder ``path`` (relative to the manifest) and ``[t_min, t_max)``."""

    name: str
    path: str
    t_min: float
    t_max: float
    data: str | None = None  # the preference data it was trained on (informative)

    def holds(self, t: float, num_train_timesteps: int = 1000) -> bool:
        """Whether timestep ``t`` is inside the interval (the top one, ending at ``T``, also holds ``T``)."""
        return self.t_min <= t < self.t_max or (t == self.t_max == num_train_timesteps)


def parse_interval(spec: str, units: str = "timestep", num_train_timesteps: int = 1000) -> tuple[float, float]:
    """``"600:1000"`` (timesteps) or ``"0.6:1"`` (``units="sigma"``, flow models) -> ``(t_min, t_max)`` timesteps."""
    if units not in ("timestep", "sigma"):
        raise ExpertsError(f"interval units must be 'timestep' or 'sigma', got {units!r}")
    low, sep, high = str(spec).partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = float(low), float(high)
    except ValueError:
        example = "0.6:1" if units == "sigma" else "600:1000"
        raise ExpertsError(f"interval {spec!r} must look like LOW:HIGH, e.g. {example!r}") from None
    if units == "sigma":
        if not 0 <= a <= 1 or not 0 <= b <= 1:
            raise ExpertsError(f"sigma interval {spec!r} must lie in [0, 1]")
        a, b = a * num_train_timesteps, b * num_train_timesteps
    return a, b


def validate_experts(experts: list[Expert], num_train_timesteps: int = 1000, source: str = "experts") -> None:
    """Raise :class:`ExpertsError` for a bad name, an empty or out-of-range interval, or two overlapping ones."""
    if not experts:
        raise ExpertsError(f"{source}: no experts")
    seen: set[str] = set()
    for e in experts:
        if not _NAME_RE.match(e.name) or e.name in RESERVED_NAMES:
            raise ExpertsError(
                f"{source}: expert name {e.name!r} is not usable as an adapter name; use letters, digits, '_' or "
                f"'-' (not {', '.join(RESERVED_NAMES)})"
            )
        if e.name in seen:
            raise ExpertsError(f"{source}: two experts are named {e.name!r}; names must be unique")
        seen.add(e.name)
        if not (math.isfinite(e.t_min) and math.isfinite(e.t_max)) or e.t_min >= e.t_max:
            raise ExpertsError(
                f"{source}: expert {e.name!r} has an empty interval [{e.t_min:g}, {e.t_max:g}); need t_min < t_max"
            )
        if e.t_min < 0 or e.t_max > num_train_timesteps:
            raise ExpertsError(
                f"{source}: expert {e.name!r} interval [{e.t_min:g}, {e.t_max:g}) leaves [0, {num_train_timesteps}]"
            )
    ordered = sorted(experts, key=lambda e: e.t_min)
    for a, b in zip(ordered, ordered[1:]):
        if b.t_min < a.t_max:
            raise ExpertsError(
                f"{source}: intervals of {a.name!r} [{a.t_min:g}, {a.t_max:g}) and {b.name!r} "
                f"[{b.t_min:g}, {b.t_max:g}) overlap; at most one expert may be active at a timestep"
            )


def expert_at(experts: list[Expert], t: float, num_train_timesteps: int = 1000) -> Expert | None:
    """The expert whose interval holds ``t`` (``None`` outside every interval)."""
    for e in experts:
        if e.holds(t, num_train_timesteps):
            return e
    return None


# ----------------------------------------------------------------------------------------------- base model
def _base_parameters(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The denoiser's own parameters under their names without LoRA (peft renames ``x.weight`` to
    ``x.base_layer.weight`` and adds ``lora_*`` parameters)."""
    return [(n.replace(".base_layer", ""), p) for n, p in denoiser.named_parameters() if "lora_" not in n]


def base_signature(model) -> dict[str, Any]:
    """What identifies the base the experts fit: family, denoiser class, a hash of its config, and the mean and
    std of three of its weight tensors (robust to the dtype it was loaded in)."""
    denoiser = model.denoiser
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    params = _base_parameters(denoiser)
    probes = {}
    for name, p in (params[0], params[len(params) // 2], params[-1]):
        x = p.detach().float()
        probes[name] = [float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0]
    return {"family": model.family, "denoiser": type(denoiser).__name__, "config_sha256": digest, "weights": probes}


def signature_mismatch(expected: dict[str, Any], actual: dict[str, Any], rtol: float = 1e-2) -> str | None:
    """What differs between two :func:`base_signature` results (``None``: the same base)."""
    for key, what in (("family", "model family"), ("denoiser", "denoiser class"), ("config_sha256", "architecture")):
        if expected.get(key) != actual.get(key):
            return f"its {what} differs ({expected.get(key)} vs {actual.get(key)})"
    if set(expected.get("weights", {})) != set(actual.get("weights", {})):
        return "its weights differ (other parameter names)"
    for name, (mean, std) in expected["weights"].items():
        m, s = actual["weights"][name]
        scale = max(abs(std), 1e-8)
        if abs(m - mean) > rtol * scale or abs(s - std) > rtol * scale:
            return f"its weights differ ({name}: mean/std {mean:.4g}/{std:.4g} vs {m:.4g}/{s:.4g})"
    return None


# ----------------------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """An ``experts.json``: the experts, the base they were trained on, and where the file lives."""

    experts: list[Expert]
    base_model: str | None = None
    base_signature: dict[str, Any] | None = None
    num_train_timesteps: int = 1000
    directory: Path | None = None  # where relative expert paths start (the manifest's folder)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def source(self) -> str:
        return str(self.directory / MANIFEST_NAME) if self.directory else "experts manifest"

    def expert_dir(self, expert: Expert) -> Path:
        path = Path(expert.path)
        return path if path.is_absolute() or self.directory is None else self.directory / path

    def validate(self, check_files: bool = True) -> None:
        """Intervals and names (:func:`validate_experts`) and, with ``check_files``, that every LoRA exists."""
        validate_experts(self.experts, self.num_train_timesteps, self.source)
        if check_files:
            for e in self.experts:
                folder = self.expert_dir(e)
                if not (folder / LORA_WEIGHT_NAME).is_file():
                    raise ExpertsError(
                        f"{self.source}: expert {e.name!r} names the adapter folder {folder}, which holds no "
                        f"{LORA_WEIGHT_NAME}; fix its 'path' or export the expert again"
                    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "base_model": self.base_model,
            "base_signature": self.base_signature,
            "num_train_timesteps": self.num_train_timesteps,
            "interval_convention": "[t_min, t_max) in scheduler timesteps; flow models: t = 1000 * sigma",
            "experts": [
                {"name": e.name, "path": e.path, "t_min": e.t_min, "t_max": e.t_max, "data": e.data}
                for e in self.experts
            ],
            **self.extras,
        }

    def write(self, directory: str | os.PathLike) -> Path:
        """Validate (intervals only) and write ``DIR/experts.json`` atomically."""
        directory = Path(directory)
        validate_experts(self.experts, self.num_train_timesteps, str(directory / MANIFEST_NAME))
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, directory / MANIFEST_NAME)
        self.directory = directory
        return directory / MANIFEST_NAME

    @classmethod
    def read(cls, path: str | os.PathLike, check_files: bool = True) -> Manifest:
        """Read and validate an ``experts.json`` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ExpertsError(f"experts manifest not found: {path} (pass an {MANIFEST_NAME} or its folder)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExpertsError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from e
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ExpertsError(f'{path} is not a visalign experts manifest (no "format": "{MANIFEST_FORMAT}")')
        if data.get("version") != MANIFEST_VERSION:
            raise ExpertsError(f"{path}: manifest version {data.get('version')!r} is not {MANIFEST_VERSION}")
        rows = data.get("experts")
        if not isinstance(rows, list):
            raise ExpertsError(f"{path}: 'experts' must be a list of {{name, path, t_min, t_max}}")
        experts = []
        for i, row in enumerate(rows):
            missing = [k for k in ("name", "path", "t_min", "t_max") if not isinstance(row, dict) or k not in row]
            if missing:
                raise ExpertsError(f"{path}: experts[{i}] lacks {', '.join(missing)}")
            try:
                t_min, t_max = float(row["t_min"]), float(row["t_max"])
            except (TypeError, ValueError):
                raise ExpertsError(f"{path}: experts[{i}] t_min and t_max must be numbers") from None
            experts.append(Expert(str(row["name"]), str(row["path"]), t_min, t_max, row.get("data")))
        known = {"format", "version", "base_model", "base_signature", "num_train_timesteps", "interval_convention",
                 "experts"}  # fmt: skip
        manifest = cls(
            experts=experts,
            base_model=data.get("base_model"),
            base_signature=data.get("base_signature"),
            num_train_timesteps=int(data.get("num_train_timesteps", 1000)),
            directory=path.parent,
            extras={k: v for k, v in data.items() if k not in known},
        )
        manifest.validate(check_files=check_files)
        return manifest


def check_base(manifest: Manifest, model) -> None:
    """Raise :class:`ExpertsError` when ``model`` is not the base the experts were trained on."""
    if manifest.num_train_timesteps != model.num_train_timesteps:
        raise ExpertsError(
            f"{manifest.source}: intervals are over {manifest.num_train_timesteps} timesteps but {model.source} "
            f"has {model.num_train_timesteps}: the experts were made for another base model"
        )
    if manifest.base_signature is None:
        return
    problem = signature_mismatch(manifest.base_signature, base_signature(model))
    if problem:
        raise ExpertsError(
            f"{manifest.source}: the experts were trained on {manifest.base_model!r} but {model.source!r} is another "
            f"base model: {problem}. Load the base they were made for (or, to apply them anyway, e.g. on a "
            "fine-tune of it, call load_experts(..., check=False))"
        )


def load_experts(model, manifest: Manifest | str | os.PathLike, check: bool = True) -> Manifest:
    """Load every expert of a manifest onto ``model`` as a named adapter; the model is left on the base (all off).

    Args:
        model: a :class:`~visalign.models.DiffusionModel`.
        manifest: a :class:`Manifest`, an ``experts.json`` or its folder.
        check: refuse experts trained on another base model (:func:`check_base`).
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.read(manifest)
    else:
        manifest.validate()
    if check:
        check_base(manifest, model)
    taken = [n for n in manifest.names if n in model.adapter_names]
    if taken:
        raise ExpertsError(f"{manifest.source}: adapters named {taken} are already loaded on this model")
    for e in manifest.experts:
        model.load_lora(manifest.expert_dir(e), adapter_name=e.name)
    model.set_adapters(None)
    return manifest


# ----------------------------------------------------------------------------------------------- switching
class SegmentSwitcher:
    """``step_callback(model, index, t)`` that activates the expert whose interval holds ``t`` before each step.

    Args:
        experts: the experts (their intervals must not overlap).
        enabled: names of the experts that may be switched on (per-interval toggles); ``None``: all. A disabled
            expert's interval runs the base model.
        num_train_timesteps: ``T`` of the scheduler (the top interval holds ``t = T``).

    Attributes:
        active: the adapter active at each step of the last sampling run (``None``: the base).
    """

    def __init__(self, experts: list[Expert], enabled=None, num_train_timesteps: int = 1000):
        validate_experts(list(experts), num_train_timesteps)
        names = [e.name for e in experts]
        unknown = sorted(set(enabled or ()) - set(names))
        if unknown:
            raise ExpertsError(f"cannot enable {unknown}: not among the experts {names}")
        self.experts = [e for e in experts if enabled is None or e.name in enabled]
        self.num_train_timesteps = num_train_timesteps
        self.active: list[str | None] = []
        self._current: object = object()  # nothing set yet

    def __call__(self, model, index: int, t) -> None:
        if index == 0:
            self.active = []
            self._current = object()
            missing = [e.name for e in self.experts if e.name not in model.adapter_names]
            if missing:
                raise ExpertsError(
                    f"experts {missing} are not loaded on this model (adapters: {model.adapter_names or 'none'}); "
                    "load them with visalign.experts.load_experts"
                )
        expert = expert_at(self.experts, float(t), self.num_train_timesteps)
        name = expert.name if expert else None
        if name != self._current:  # switching walks every LoRA layer: only when the expert changes
            model.set_adapters(name)
            self._current = name
        self.active.append(name)


class DiffusersExpertsCallback:
    """The switcher for a plain Diffusers pipeline whose experts were loaded with ``load_lora_weights``.

    Diffusers' ``callback_on_step_end`` runs *after* step ``i``, so this sets the adapter of step ``i + 1``;
    :meth:`prepare` sets the one of the first step before the call::

        for e in manifest.experts:
            pipe.load_lora_weights(manifest.expert_dir(e), adapter_name=e.name)
        switch = DiffusersExpertsCallback(manifest)
        switch.prepare(pipe, num_inference_steps=30)
        image = pipe(prompt, num_inference_steps=30, callback_on_step_end=switch).images[0]
    """

    def __init__(self, manifest: Manifest, enabled=None):
        self.experts = [e for e in manifest.experts if enabled is None or e.name in enabled]
        self.num_train_timesteps = manifest.num_train_timesteps

    def _activate(self, pipe, t: float) -> None:
        expert = expert_at(self.experts, t, self.num_train_timesteps)
        if expert is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(expert.name)

    def prepare(self, pipe, num_inference_steps: int, **set_timesteps_kwargs) -> None:
        """Activate the expert of the first step (on a copy of the pipeline's scheduler, as its call sets it)."""
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
        self._activate(pipe, float(scheduler.timesteps[0]))

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        timesteps = pipe.scheduler.timesteps
        if i + 1 < len(timesteps):
            self._activate(pipe, float(timesteps[i + 1]))
        return callback_kwargs


# ----------------------------------------------------------------------------------------------- skipping
def skip_indices(timesteps, skip_above: float, stride: int) -> list[int]:
    """Indices of the steps to keep: every step with ``t < skip_above``, and every ``stride``-th step (starting
    with the first, noisiest one) among those with ``t >= skip_above``.

    >>> skip_indices([900, 700, 500, 300, 100], skip_above=500, stride=2)
    [0, 2, 3, 4]
    """
    if stride < 1:
        raise ExpertsError(f"skip stride must be >= 1, got {stride}")
    values = [float(t) for t in timesteps]
    early = [i for i, t in enumerate(values) if t >= skip_above]
    kept_early = set(early[::stride])
    return [i for i, t in enumerate(values) if t < skip_above or i in kept_early]


@functools.lru_cache(maxsize=1)
def _ddim_grid_scheduler_class():  # defined on first use: importing this module does not import Diffusers
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class GridDDIMScheduler(DDIMScheduler):
        """DDIM (eta = 0) on an arbitrary descending grid: each step goes to the next timestep of the grid.

        ``DDIMScheduler.step`` assumes a uniform grid (``prev = t - T // steps``); the update itself is
        :func:`visalign.sde.ddim_step` at eta = 0, which equals ``DDIMScheduler.step`` bit for bit in fp32.
        """

        def set_grid(self, timesteps: torch.Tensor) -> None:
            self.timesteps = timesteps.clone()
            self.num_inference_steps = len(timesteps)
            values = [int(t) for t in timesteps]
            self._next = dict(zip(values, values[1:]))

        def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                 variance_noise=None, return_dict=True):  # fmt: skip
            from .sde import ddim_step

            t = int(timestep)
            prev = self._next.get(t, -1)
            alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
            out = ddim_step(
                model_output,
                sample,
                self.alphas_cumprod[t],
                alpha_prev,
                eta=0.0,
                prediction_type=self.config.prediction_type,
                noise=torch.zeros_like(sample, dtype=torch.float32),  # eta = 0: no draw from the global RNG
            )
            prev_sample = out.mean.to(sample.dtype)
            if not return_dict:
                return (prev_sample,)
            return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=None)

    return GridDDIMScheduler


def subsample_scheduler(scheduler, keep: list[int]):
    """A copy of an inference ``scheduler`` (``set_timesteps`` applied) that visits only ``timesteps[keep]``.

    Sigma-indexed schedulers (flow-matching Euler, Euler) keep their own step on the thinned sigmas; DDIM gets
    :class:`GridDDIMScheduler`. Other schedulers raise :class:`ExpertsError`.
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if not keep or keep[0] != 0:
        raise ExpertsError("a thinned grid must keep the first (noisiest) step")
    index = torch.tensor(keep, dtype=torch.long)
    if isinstance(scheduler, DDIMScheduler):
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            raise ExpertsError("step skipping with DDIM needs clip_sample=False and thresholding=False")
        grid = _ddim_grid_scheduler_class().from_config(scheduler.config)
        grid.set_grid(scheduler.timesteps[index.to(scheduler.timesteps.device)])
        return grid
    if isinstance(scheduler, (FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler)):
        thinned = copy.deepcopy(scheduler)
        sigmas = scheduler.sigmas
        thinned.timesteps = scheduler.timesteps[index.to(scheduler.timesteps.device)]
        thinned.sigmas = torch.cat([sigmas[index.to(sigmas.device)], sigmas[-1:]])
        thinned.num_inference_steps = len(keep)
        thinned._step_index = None
        return thinned
    raise ExpertsError(
        f"step skipping supports DDIM, Euler and flow-matching Euler schedulers, not {type(scheduler).__name__}"
    )


@contextlib.contextmanager
def skipping(model, skip_above: float, stride: int):
    """Within the block, ``model.sample`` (deterministic path) thins the steps at ``t >= skip_above`` to every
    ``stride``-th one (:func:`skip_indices`); the returned ``SampleOutput.timesteps`` are the visited ones.

    The model's ``inference_scheduler`` is wrapped on the instance for the duration of the block (the sampling
    loop has no grid argument; see the module docs).
    """
    if stride == 1:
        yield
        return
    make = model.inference_scheduler

    def thinned(steps, latents, sde=None):
        if sde is not None:
            raise ExpertsError("step skipping applies to deterministic sampling, not to a stochastic sampler")
        scheduler = make(steps, latents, sde)
        return subsample_scheduler(scheduler, skip_indices(scheduler.timesteps, skip_above, stride))

    model.inference_scheduler = thinned
    try:
        yield
    finally:
        del model.inference_scheduler  # back to the class's method


# ----------------------------------------------------------------------------------------------- a switching view
@dataclass(frozen=True)
class SwitchPlan:
    """How to sample with the experts: which may switch on (``None``: all; empty: none, the base) and the
    early-step skipping (``stride`` 1: none; ``skip_above`` ``None``: the top of the lowest expert's interval)."""

    enabled: frozenset[str] | None = None
    stride: int = 1
    skip_above: float | None = None


class ExpertsView:
    """A :class:`~visalign.models.DiffusionModel` that samples with its experts switched per step.

    Every attribute not defined here is the wrapped model's, so the view goes wherever a model samples
    (:func:`visalign.evaluation.generate`, :func:`~visalign.evaluation.evaluate_variants`, ...).
    ``set_adapters(name)`` with a plan name selects that plan; any other value (an adapter name, ``None``) turns
    switching off and goes to the model, as for a plain model.

    Args:
        model: the model, with the experts loaded (:func:`load_experts`).
        manifest: the experts.
        plans: name -> :class:`SwitchPlan`; default ``{"experts": SwitchPlan()}``. The first is active.

    Attributes:
        steps_taken: plan or adapter name -> denoising steps per sample in its last sampling run.
    """

    def __init__(self, model, manifest: Manifest, plans: dict[str, SwitchPlan] | None = None):
        self.model = model
        self.manifest = manifest
        self.plans = dict(plans or {"experts": SwitchPlan()})
        for name, plan in self.plans.items():
            unknown = sorted(set(plan.enabled or ()) - set(manifest.names))
            if unknown:
                raise ExpertsError(f"plan {name!r} enables {unknown}, not among the experts {manifest.names}")
            if plan.stride < 1:
                raise ExpertsError(f"plan {name!r}: skip stride must be >= 1, got {plan.stride}")
        self.mode: str | None = next(iter(self.plans))
        self.steps_taken: dict[str | None, int] = {}
        self.last_active: list[str | None] = []
        self._adapter: str | None = None  # the adapter(s) set while no plan is active

    def __getattr__(self, name: str):  # only reached for names the view does not define
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def set_adapters(self, names, weights=None) -> None:
        if isinstance(names, str) and names in self.plans:
            self.mode = names
            _all_off(self.model)
            return
        self.mode = None
        self.model.set_adapters(names, weights)
        self._adapter = names if isinstance(names, str) or names is None else ",".join(names)

    def skip_above(self, plan: SwitchPlan) -> float:
        """Where skipping starts: the plan's, else the top of the lowest expert's interval (the fidelity path)."""
        if plan.skip_above is not None:
            return plan.skip_above
        return min(self.manifest.experts, key=lambda e: e.t_min).t_max

    def sample(self, prompts, **kw):
        if self.mode is None:
            out = self.model.sample(prompts, **kw)
            self.steps_taken[self._adapter] = len(out.timesteps)
            return out
        if kw.get("step_callback") is not None:
            raise ExpertsError("sampling with experts sets the step callback itself; pass none")
        plan = self.plans[self.mode]
        switcher = SegmentSwitcher(self.manifest.experts, plan.enabled, self.manifest.num_train_timesteps)
        try:
            with skipping(self.model, self.skip_above(plan), plan.stride):
                out = self.model.sample(prompts, step_callback=switcher, **kw)
        finally:
            _all_off(self.model)
        self.steps_taken[self.mode] = len(out.timesteps)
        self.last_active = list(switcher.active)
        out.extras["experts_active"] = list(switcher.active)
        return out


def _all_off(model) -> None:
    if model.adapter_names:  # a model without adapters is the base already (peft refuses to disable nothing)
        model.set_adapters(None)


def function_evaluations(steps: int, model, guidance: float | None) -> int:
    """Denoiser evaluations per sample: one per step, two with classifier-free guidance (as usually counted)."""
    guidance = model.default_guidance if guidance is None else guidance
    return steps * (2 if model.uses_cfg(guidance) else 1)
