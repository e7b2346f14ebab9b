"""``vlm-judge``: a vision-language model (Qwen2-VL / Qwen2.5-VL) as a judge, scored from token probabilities.

No text is generated: the judge reads the probabilities of answer tokens at the first answer position (the
greedy / temperature-0 view of the model, without sampling noise).

Pointwise (``forward``), one of two modes:

* ``mode="yes"`` (VQAScore, Lin et al. 2024, Eq. 1): ``score = P("Yes" | image, question)``, the full-vocabulary
  softmax probability of the ``Yes`` token; the default question is VQAScore's
  ``'Does this figure show "{prompt}"? Please answer yes or no.'``. ``normalize=True`` renormalises over the
  two answers: ``P(Yes) / (P(Yes) + P(No))``.
* ``mode="rating"``: the expected rating over level tokens ``"1"..."L"`` (G-Eval, Liu et al. 2023, Eq. 1),
  ``score = sum_k k p_k / sum_k p_k``, in ``[1, L]``.

Components: ``answer_mass`` (probability on the answer tokens: low mass means the template does not suit the
model) and, in ``yes`` mode, ``p_no``. A sample is valid when ``answer_mass >= min_mass`` (default 0: always).

Pairwise (:meth:`JudgeReward.compare`): the model sees both images ("First image:", "Second image:") and answers
``1`` or ``2``. Each pair is judged in **both orders** and the verdicts are averaged (position-bias
cancellation, as MT-Bench / Zheng et al. 2023 swap positions):
``P(first > second) = 1/2 [P_AB("1") + P_BA("2")]`` with each ``P`` renormalised over the two choices. Hence
``compare(a, b) + compare(b, a) = 1`` exactly and ``compare(a, a) = 0.5``. Components hold the one-order
verdicts and ``position_bias = 1/2 [P_AB("1") + P_BA("1")] - 1/2`` (the judge's preference for answer "1").

Templates (``question``, ``pair_question``, ``system``, answer tokens, ``levels``) are options; ``{prompt}``
and ``{levels}`` are filled in. Without ``{prompt}`` in the question the reward needs no prompts (e.g. an
aesthetics question).

Preprocessing is Qwen2-VL's image processor written in torch (``smart_resize`` to multiples of
``patch_size * merge_size`` within ``[min_pixels, max_pixels]``, bicubic with antialias, OpenAI mean/std,
``temporal_patch_size`` copies per patch), so P("Yes") is differentiable with respect to the pixels. Given
float images the processor computes the same pixel values (tested); given PIL/uint8 images it resizes uint8 and
rounds, a fraction of a grey level away. Videos: wrap with ``video(reward=vlm-judge)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import CheckpointError, RewardInputError, RewardSpecError, resolve_dtype
from .judging import PAIR_QUESTION, JudgeReward, JudgeTemplate, Part
from .loading import is_hub_id
from .preprocess import _tv_resize, normalize
from .specs import BUILTIN_SPECS

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


# ----------------------------------------------------------------------------------------------- Qwen2-VL inputs
def qwen_vl_patches(
    images: torch.Tensor,
    *,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    min_pixels: int,
    max_pixels: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL's image processor in torch (differentiable).

    ``smart_resize`` (sides multiples of ``patch_size * merge_size``, area within ``[min_pixels, max_pixels]``),
    resize (antialiased, as the processor's torchvision backend), normalise, and flatten into patches in the
    processor's order (merge windows contiguous, each patch repeated ``temporal_patch_size`` times).

    Args:
        images: ``[b, 3, H, W]`` float in ``[0, 1]``.

    Returns:
        ``patches [b, gh * gw, 3 * temporal_patch_size * patch_size**2]`` and the grid ``(1, gh, gw)``.
    """
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    b, c, height, width = images.shape
    h, w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    x = normalize(_tv_resize(images, (h, w), interpolation), tuple(mean), tuple(std))
    gh, gw, p, m = h // patch_size, w // patch_size, patch_size, merge_size
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return x.reshape(b, gh * gw, c * temporal_patch_size * p * p), (1, gh, gw)


class VLMJudge(JudgeReward):
    """A Qwen2-VL / Qwen2.5-VL model judging from token probabilities.

    Args:
        model: ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
        processor: its processor (tokenizer with the chat template, and the image processor settings).
        template: :class:`JudgeTemplate`.
        min_mass: samples whose answer tokens get less probability than this are invalid.
        batch_size: samples (or pairs) per forward chunk.
    """

    def __init__(
        self, model, processor, template: JudgeTemplate | None = None, min_mass: float = 0.0, batch_size: int = 8
    ):
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise RewardSpecError(f"vlm-judge supports {SUPPORTED_MODEL_TYPES} models, got model_type {model_type!r}")
        super().__init__(BUILTIN_SPECS["vlm-judge"], template or JudgeTemplate(), batch_size)
        self.model = model
        self.processor = processor
        self.min_mass = float(min_mass)
        # the reward's device/dtype are those of the loaded weights (a checkpoint may load in bf16)
        weight = model.get_input_embeddings().weight
        self._anchor = self._anchor.to(device=weight.device, dtype=weight.dtype)
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise RewardSpecError("the judge's tokenizer has no pad token")
        self.image_token = processor.image_token
        self.image_token_id = model.config.image_token_id
        # fail at construction, not at the first batch, when an answer is not one token
        for answer in (*self.template.answers, *self.template.choices):
            self._answer_id(answer)

    def _answer_id(self, answer: str) -> int:
        ids = self.processor.tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise RewardSpecError(
                f"vlm-judge: answer {answer!r} is {len(ids)} tokens for this tokenizer; choose "
                "answers that are a single token (e.g. 'Yes', '1')"
            )
        return ids[0]

    # ---------------------------------------------------------------- inputs
    def pixel_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``[b, 3, H, W]`` in ``[0, 1]`` -> ``(patches [b, n, D], grid)`` with the processor's settings."""
        ip = self.processor.image_processor
        return qwen_vl_patches(
            self.pixels(images),
            patch_size=ip.patch_size,
            merge_size=ip.merge_size,
            temporal_patch_size=ip.temporal_patch_size,
            min_pixels=ip.size.shortest_edge,
            max_pixels=ip.size.longest_edge,
            mean=ip.image_mean,
            std=ip.image_std,
            interpolation="bilinear" if int(ip.resample) == 2 else "bicubic",
        )

    def chat_text(self, parts: list[Part]) -> str:
        """The chat-template text of one user message, ending with the assistant turn's start."""
        content = [{"type": "image"} if isinstance(p, int) else {"type": "text", "text": p} for p in parts]
        messages = [{"role": "user", "content": content}]
        if self.template.system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.template.system}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def model_inputs(self, slots: list[torch.Tensor], parts: list[list[Part]]) -> dict[str, torch.Tensor]:
        """Token ids (left-padded), attention mask, patches and grids of a batch of messages."""
        patches, grids = zip(*(self.pixel_inputs(s) for s in slots))
        merge = self.processor.image_processor.merge_size**2
        texts, pixel_values, grid_rows = [], [], []
        for i, sample in enumerate(parts):
            pieces = self.chat_text(sample).split(self.image_token)
            images = [p for p in sample if isinstance(p, int)]
            if len(pieces) != len(images) + 1:
                raise RewardInputError(
                    f"{self.spec.name}: the message has {len(pieces) - 1} image tokens for "
                    f"{len(images)} images (does a prompt contain {self.image_token!r}?)"
                )
            text = pieces[0]
            for slot, piece in zip(images, pieces[1:]):
                # the processor's expansion: one token per merged patch window
                text += self.image_token * (grids[slot][1] * grids[slot][2] // merge) + piece
                pixel_values.append(patches[slot][i])
                grid_rows.append(grids[slot])
            texts.append(text)
        tok = self.processor.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        device = self.device
        input_ids = tok["input_ids"].to(device)
        return {
            "input_ids": input_ids,
            "attention_mask": tok["attention_mask"].to(device),
            "mm_token_type_ids": (input_ids == self.image_token_id).long(),
            "pixel_values": torch.cat(pixel_values).to(self.dtype),
            "image_grid_thw": torch.tensor(grid_rows, dtype=torch.long, device=device),
        }

    def answer_probs(self, slots, parts, answers):
        inputs = self.model_inputs(slots, parts)
        logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1].float()
        ids = torch.tensor([self._answer_id(a) for a in answers], device=logits.device)
        probs = logits.log_softmax(-1)[:, ids].exp()
        return probs, torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device), {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.template.mode!r}"


# ----------------------------------------------------------------------------------------------- builders
def _template(mode, question, pair_question, system, yes, no, levels, normalize) -> JudgeTemplate:
    return JudgeTemplate(
        mode=mode,
        question=question,
        pair_question=pair_question or PAIR_QUESTION,
        system=system,
        yes=yes,
        no=no,
        levels=int(levels),
        normalize=bool(normalize),
    )


def load_vlm_judge(
    model: str = DEFAULT_MODEL,
    mode: str = "yes",
    question: str | None = None,
    pair_question: str | None = None,
    system: str | None = None,
    yes: str = "Yes",
    no: str = "No",
    levels: int = 5,
    normalize: bool = False,
    min_mass: float = 0.0,
    load_dtype: str | None = "auto",
    attn_implementation: str = "sdpa",
    batch_size: int = 8,
) -> VLMJudge:
    """``vlm-judge`` from a hub id or a local folder (model + processor, as ``save_pretrained`` writes them).

    Args:
        model: Qwen2-VL / Qwen2.5-VL hub id or folder (default ``Qwen/Qwen2.5-VL-7B-Instruct``).
        mode, question, pair_question, system, yes, no, levels, normalize: the :class:`JudgeTemplate`.
        min_mass: minimum probability on the answer tokens for a valid sample.
        load_dtype: dtype the weights are loaded in (``"auto"``: the checkpoint's, bf16 for Qwen; ``"fp32"``...),
            so a 7B model is never materialised in float32 first. ``build_reward(..., dtype=)`` casts afterwards.
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"``.
        batch_size: samples per forward chunk.

    Raises:
        CheckpointError: the model or its processor cannot be found or loaded, or it is not a Qwen2(.5)-VL model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    template = _template(mode, question, pair_question, system, yes, no, levels, normalize)
    source = str(model)
    if not Path(os.path.expanduser(source)).is_dir() and not is_hub_id(source):
        raise CheckpointError(f"vlm-judge model not found: {source} is neither a local folder nor a hub id")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise CheckpointError(f"cannot read the config of vlm-judge model {source!r}: {e}") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"vlm-judge supports Qwen2-VL / Qwen2.5-VL ({SUPPORTED_MODEL_TYPES}); {source} is "
            f"a {config.model_type!r} model"
        )
    dtype = "auto" if load_dtype == "auto" else resolve_dtype(load_dtype)
    try:
        vlm = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
        processor = AutoProcessor.from_pretrained(source)
    except Exception as e:
        raise CheckpointError(f"cannot load vlm-judge model {source!r}: {e}") from e
    return VLMJudge(vlm.eval(), processor, template, min_mass, batch_size).freeze()


# Qwen2-VL-2B/7B-Instruct's chat template (tokenizer_config.json), for processors built in code.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type']"
    " == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in "
    "content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TINY_WORDS = ("Yes", "No", "yes", "no", "image", "First", "Second")


def tiny_qwen_tokenizer():
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer and special tokens, built offline.

    Its vocabulary is the 256 byte symbols, a few merged words (``Yes``, ``No``, ...; digits are single tokens
    in Qwen2's pre-tokenizer) and the Qwen2-VL special tokens: any text round-trips, and the judge's answers
    are single tokens as in the real Qwen tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in TINY_WORDS:
        for variant in (word, "\u0120" + word):  # \u0120: the byte-level symbol of a leading space
            current = variant[0]
            for ch in variant[1:]:
                merges.append((current, ch))
                current += ch
                vocab.setdefault(current, len(vocab))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))


def tiny_qwen_processor(tokenizer=None, *, patch_size: int = 4, min_pixels: int = 16 * 16, max_pixels: int = 32 * 32):
    """A ``Qwen2VLProcessor`` built in code (tiny patches; the Qwen2-VL chat template)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    kwargs = {
        "patch_size": patch_size,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
    }
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kwargs),
        tokenizer=tokenizer or tiny_qwen_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**kwargs),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def random_qwen2_vl(tokenizer, size: str = "tiny", seed: int = 0, initializer_range: float = 0.2):
    """``Qwen2VLForConditionalGeneration`` with random weights: ``"tiny"`` or the Qwen2-VL-2B shape (``"full"``).

    The tiny model uses a large ``initializer_range`` so random answers differ visibly between inputs.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {
        name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("image_pad", "video_pad", "vision_start", "vision_end")
    }
    if size == "tiny":
        text = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": len(tokenizer),
            "initializer_range": initializer_range,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        }
        vision = {
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "initializer_range": initializer_range,
        }
    elif size == "full":  # Qwen2-VL-2B-Instruct
        text = {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        }
        vision = {
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 1536,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
        }
    else:
        raise ValueError(f"unknown size {size!r}; use 'tiny' or 'full'")
    text.update(
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=32768,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=size == "full",
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def random_vlm_judge(
    size: str = "tiny",
    mode: str = "yes",
    question: str | None = None,
    pair_question: str | None = None,
    system: str | None = None,
    yes: str = "Yes",
    no: str = "No",
    levels: int = 5,
    normalize: bool = False,
    min_mass: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
) -> VLMJudge:
    """``vlm-judge`` on a random Qwen2-VL: tiny (tests) or the 2B shape (benchmarks), offline tokenizer."""
    template = _template(mode, question, pair_question, system, yes, no, levels, normalize)
    tokenizer = tiny_qwen_tokenizer()
    if size == "tiny":
        processor = tiny_qwen_processor(tokenizer)
    else:  # the published processor settings (14 px patches, 56*56 to 28*28*1280 pixels)
        processor = tiny_qwen_processor(tokenizer, patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    model = random_qwen2_vl(tokenizer, size, seed)
    return VLMJudge(model, processor, template, min_mass, batch_size).freeze()
