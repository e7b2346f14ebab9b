"""What every judge shares: the question template, the scoring math, and the pointwise/pairwise protocol.

A judge reads the probabilities of answer tokens after a message of text parts and images (no generation).
Pointwise: ``P("Yes")`` (VQAScore, Lin et al. 2024, Eq. 1), optionally renormalised over the two answers, or the
expected rating over level tokens (G-Eval, Liu et al. 2023, Eq. 1). Pairwise: both orders, averaged, so position
bias cancels (MT-Bench / Zheng et al. 2023). :class:`JudgeReward` is the base of the local VLM judge
(:mod:`reward_models.vlm_judge`) and the OpenAI-compatible remote judge (:mod:`reward_models.openai_judge`).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .base import Reward, RewardInputError, RewardOutput, RewardSpec, RewardSpecError, check_prompts, media_modality

VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
RATING_QUESTION = (
    'How well does this image match the description "{prompt}"? Rate it on a scale from 1 (not at all) to '
    "{levels} (perfectly). Answer with a single digit."
)
PAIR_QUESTION = (
    'Which image matches the description "{prompt}" better? Answer 1 for the first image or 2 for the second image.'
)
PAIR_LABELS = ("First image:", "Second image:")
MODES = ("yes", "rating")

# One part of a judge message: text, or the index of an image slot (0: first image, 1: second image).
Part = str | int


# ----------------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class JudgeTemplate:
    """What the judge is asked and which answers are read.

    Attributes:
        mode: ``"yes"`` (P(yes)) or ``"rating"`` (expected rating over ``1..levels``).
        question: pointwise question; ``{prompt}`` and ``{levels}`` are filled in (default per mode).
        pair_question: pairwise question (``{prompt}`` filled in).
        system: system message (``None``: the model's chat template default).
        yes, no: answer strings of ``yes`` mode.
        levels: number of rating levels (2-9: each level must be one digit, i.e. one token).
        choices: answers meaning "first image" and "second image" in pairwise mode.
        normalize: ``yes`` mode: ``P(yes) / (P(yes) + P(no))`` instead of ``P(yes)``.
    """

    mode: str = "yes"
    question: str | None = None
    pair_question: str = PAIR_QUESTION
    system: str | None = None
    yes: str = "Yes"
    no: str = "No"
    levels: int = 5
    choices: tuple[str, str] = ("1", "2")
    normalize: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise RewardSpecError(f"judge mode must be one of {MODES}, got {self.mode!r}")
        if not 2 <= int(self.levels) <= 9:
            raise RewardSpecError(f"levels must be 2..9 (one digit each), got {self.levels}")
        if self.question is None:
            object.__setattr__(self, "question", VQASCORE_QUESTION if self.mode == "yes" else RATING_QUESTION)
        if len(self.choices) != 2 or self.choices[0] == self.choices[1]:
            raise RewardSpecError(f"choices must be two different answers, got {self.choices}")
        for name in ("question", "pair_question"):
            text = getattr(self, name)
            fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            unknown = fields - {"prompt", "levels"}
            if unknown:
                raise RewardSpecError(f"{name} may use {{prompt}} and {{levels}}, not {sorted(unknown)}: {text!r}")

    @property
    def answers(self) -> tuple[str, ...]:
        """Pointwise answers whose probabilities are read (``yes``: (yes, no); ``rating``: "1".."L")."""
        if self.mode == "yes":
            return (self.yes, self.no)
        return tuple(str(k) for k in range(1, self.levels + 1))

    @property
    def needs_prompt(self) -> bool:
        return "{prompt}" in self.question

    @property
    def nominal_range(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.mode == "yes" else (1.0, float(self.levels))

    def pointwise_parts(self, prompt: str | None) -> list[Part]:
        """Image first, then the question (the VQAScore / Qwen-VL convention)."""
        return [0, self.question.format(prompt=prompt or "", levels=self.levels)]

    def pairwise_parts(self, prompt: str | None) -> list[Part]:
        question = self.pair_question.format(prompt=prompt or "", levels=self.levels)
        return [PAIR_LABELS[0], 0, PAIR_LABELS[1], 1, question]

    def score(self, probs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pointwise scores from answer probabilities ``[B, len(answers)]`` (float32): ``(scores [B], components)``."""
        mass = probs.sum(-1)
        if self.mode == "yes":
            p_yes, p_no = probs[:, 0], probs[:, 1]
            score = yes_probability(p_yes, p_no, self.normalize)
            return score, {"p_no": p_no, "answer_mass": mass}
        values = torch.arange(1, self.levels + 1, dtype=probs.dtype, device=probs.device)
        return expected_rating(probs, values), {"answer_mass": mass}


def yes_probability(p_yes: torch.Tensor, p_no: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """VQAScore: ``P(yes)``, or ``P(yes) / (P(yes) + P(no))`` when ``normalize``. Shapes ``[B]`` -> ``[B]``."""
    if not normalize:
        return p_yes
    return p_yes / (p_yes + p_no).clamp_min(torch.finfo(p_yes.dtype).tiny)


def expected_rating(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_k v_k p_k / sum_k p_k`` (G-Eval Eq. 1): ``probs [B, L]``, ``values [L]`` -> ``[B]``."""
    mass = probs.sum(-1).clamp_min(torch.finfo(probs.dtype).tiny)
    return (probs * values).sum(-1) / mass


def pairwise_preference(
    probs_ab: torch.Tensor, probs_ba: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Position-debiased preference of the first item over the second.

    Args:
        probs_ab: ``[B, 2]`` probabilities of the answers ("1", "2") with the first item shown first.
        probs_ba: ``[B, 2]`` the same with the order swapped (the first item shown second).

    Returns:
        ``P(first > second) = 1/2 [P_AB(1) + P_BA(2)]`` ``[B]`` (each order renormalised over its two answers),
        and components ``first_shown_first``, ``first_shown_second`` (the one-order verdicts) and
        ``position_bias`` (``1/2 [P_AB(1) + P_BA(1)] - 1/2``).
    """
    tiny = torch.finfo(probs_ab.dtype).tiny
    ab = probs_ab / probs_ab.sum(-1, keepdim=True).clamp_min(tiny)
    ba = probs_ba / probs_ba.sum(-1, keepdim=True).clamp_min(tiny)
    first_shown_first, first_shown_second = ab[:, 0], ba[:, 1]
    score = 0.5 * (first_shown_first + first_shown_second)
    bias = 0.5 * (ab[:, 0] + ba[:, 0]) - 0.5
    return score, {
        "first_shown_first": first_shown_first,
        "first_shown_second": first_shown_second,
        "position_bias": bias,
    }


# ----------------------------------------------------------------------------------------------- judge base
class JudgeReward(Reward):
    """A judge: pointwise scores through the reward protocol, and :meth:`compare` for pairs.

    Subclasses implement :meth:`answer_probs`: the probabilities of given answers after a message made of
    text parts and images.

    Args:
        spec: metadata (``needs_prompt`` and ``nominal_range`` follow the template).
        template: :class:`JudgeTemplate`.
        batch_size: samples (or pairs) per chunk.
    """

    min_mass: float = 0.0  # samples with less probability on the answers are invalid

    def __init__(self, spec: RewardSpec, template: JudgeTemplate, batch_size: int = 8):
        spec = replace(spec, needs_prompt=template.needs_prompt, nominal_range=template.nominal_range)
        super().__init__(spec, batch_size)
        self.template = template

    def answer_probs(
        self, slots: list[torch.Tensor], parts: list[list[Part]], answers: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Probabilities of ``answers`` as the first answer token.

        Args:
            slots: image slots, each ``[b, 3, H, W]`` in ``[0, 1]``; a part ``k`` (int) of sample ``i`` is
                ``slots[k][i]``.
            parts: per sample, the user message as text parts and slot indices, in order.
            answers: answer strings.

        Returns:
            ``probs [b, len(answers)]`` float32 (not renormalised; NaN where no answer could be read),
            ``valid [b]`` bool, and extra ``[b]`` components of pointwise scores.
        """
        raise NotImplementedError

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        prompts = prompts or [None] * media.shape[0]
        parts = [self.template.pointwise_parts(p) for p in prompts]
        probs, valid, extra = self.answer_probs([media], parts, self.template.answers)
        scores, components = self.template.score(probs)
        valid = valid & (components["answer_mass"] >= self.min_mass)
        return RewardOutput(scores, {**components, **extra}, valid)

    # ---------------------------------------------------------------- pairwise
    def compare(self, first: torch.Tensor, second: torch.Tensor, prompts: Sequence[str] | None = None) -> RewardOutput:
        """``P(first preferred over second)`` per pair, judged in both orders (see the module docstring).

        Args:
            first, second: images ``[B, 3, H, W]`` in ``[0, 1]`` (the two may differ in size).
            prompts: ``B`` prompts (when the pair question uses ``{prompt}``).

        Returns:
            :class:`RewardOutput`: scores in ``[0, 1]`` (0.5 = tie), the one-order verdicts and the position bias
            as components, ``valid`` where both orders could be judged; on ``first.device``.
        """
        for media in (first, second):
            if media_modality(media, self.spec.name) != "image":
                raise RewardInputError(f"{self.spec.name}.compare takes images [B, 3, H, W]; got videos")
        if first.shape[0] != second.shape[0]:
            raise RewardInputError(
                f"compare needs as many first as second images, got {first.shape[0]} and {second.shape[0]}"
            )
        pair_spec = replace(self.spec, needs_prompt="{prompt}" in self.template.pair_question)
        prompts = check_prompts(prompts, first.shape[0], pair_spec)
        if first.shape[0] == 0:
            return RewardOutput(torch.zeros(0, device=first.device))
        grad = torch.is_grad_enabled() and self.spec.differentiable and (first.requires_grad or second.requires_grad)
        outputs = []
        with torch.set_grad_enabled(grad):
            for start in range(0, first.shape[0], self.batch_size):
                stop = start + self.batch_size
                chunk = None if prompts is None else prompts[start:stop]
                outputs.append(self.compare_batch(first[start:stop], second[start:stop], chunk))
        return RewardOutput.cat(outputs).to(first.device)

    def compare_batch(self, first: torch.Tensor, second: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        """One chunk of :meth:`compare`: both orders in one call when the images have the same size."""
        b = first.shape[0]
        parts = [self.template.pairwise_parts(p) for p in (prompts or [None] * b)]
        choices = self.template.choices
        if first.shape == second.shape:
            slots = [torch.cat([first, second]), torch.cat([second, first])]
            probs, valid, _ = self.answer_probs(slots, parts + parts, choices)
            probs_ab, probs_ba, valid = probs[:b], probs[b:], valid[:b] & valid[b:]
        else:
            probs_ab, valid_ab, _ = self.answer_probs([first, second], parts, choices)
            probs_ba, valid_ba, _ = self.answer_probs([second, first], parts, choices)
            valid = valid_ab & valid_ba
        scores, components = pairwise_preference(probs_ab.float(), probs_ba.float())
        return RewardOutput(scores, components, valid)
