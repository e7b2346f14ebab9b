"""``openai-judge``: the VLM judge of :mod:`reward_models.vlm_judge` over an OpenAI-compatible chat-completions API.

Works with any server that speaks ``POST {base_url}/chat/completions`` with image inputs: OpenAI, vLLM /
SGLang / TGI serving a Qwen-VL model (``vllm serve Qwen/Qwen2.5-VL-7B-Instruct`` then
``openai-judge(http://127.0.0.1:8000/v1, model=Qwen/Qwen2.5-VL-7B-Instruct)``), and so on.

One request per sample (pairwise: two, one per order), sent ``concurrency`` at a time. Each request carries the
images as base64 PNG data URLs (8-bit, lossless for 8-bit media), the question of the same
:class:`~reward_models.judging.JudgeTemplate` as ``vlm-judge``, ``temperature=0`` and, unless
``logprobs=False``, ``logprobs=true, top_logprobs=K``. Answers are read:

1. from the ``top_logprobs`` of the first non-blank answer token when the server returns them: the probability
   of each answer sums its variants (``"Yes"``, ``" yes"``, ``"YES"``); then the scores are exactly those of
   ``vlm-judge`` (P(yes), expected rating, two-order pairwise preference), over the top-K tokens listed;
2. otherwise from the text: its first word or number (after an optional ``Answer:``/``Rating:`` label) must be
   one of the answers; it then counts as probability 1.

An answer that cannot be read either way gives ``valid=False`` and a NaN score (it is not asked again: at
temperature 0 the same question gets the same answer). Requests time out after ``timeout`` seconds per socket
operation and are retried up to ``retries`` times on connection errors, timeouts, 408/409/429 and 5xx
(exponential backoff from ``backoff`` seconds, or the server's ``Retry-After``). A request that still fails
raises :class:`~reward_models.base.RewardError` (``on_error="raise"``, default) or gives ``valid=False``
(``on_error="invalid"``). Component ``from_logprobs`` is 1 where the answer came from logprobs.

The API key is read from the environment variable named by ``api_key_env`` (default ``OPENAI_API_KEY``;
none is sent when it is unset, as local servers need none), never from the spec string.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .base import RewardError, RewardSpecError
from .judging import PAIR_QUESTION, JudgeReward, JudgeTemplate, Part
from .remote import ON_ERROR, TransportError, _base_url, request_json, with_retries
from .serving import png_base64
from .specs import BUILTIN_SPECS

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
_LABEL = re.compile(r"^\W*(?:answer|rating|score|verdict)\s*[:\-]\s*", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]+|\d+")


def normalize_answer(text: str) -> str:
    """The comparable form of an answer or token: stripped of spaces and punctuation, lower case."""
    return re.sub(r"[\W_]+", "", text).lower()


def answer_from_text(text: str, answers: Sequence[str]) -> int | None:
    """Index of the answer that the text starts with (after an optional ``Answer:`` label), else ``None``.

    Only the first word or number counts, so ``"On a scale of 1 to 5: 4"`` is unreadable rather than read as 1.
    """
    match = _WORD.search(_LABEL.sub("", text or ""))
    if match is None:
        return None
    keys = [normalize_answer(a) for a in answers]
    word = match.group(0).lower()
    return keys.index(word) if word in keys else None


def answer_from_logprobs(choice: dict, answers: Sequence[str]) -> list[float] | None:
    """Probabilities of ``answers`` at the first non-blank token of a chat-completions choice.

    Reads ``choice["logprobs"]["content"][k]["top_logprobs"]``; variants of an answer (case, spaces,
    punctuation) add up. ``None`` when the server sent no logprobs or none of the answers is among them.
    """
    content = (choice.get("logprobs") or {}).get("content") or []
    first = next((t for t in content if isinstance(t, dict) and str(t.get("token", "")).strip()), None)
    if first is None:
        return None
    candidates = first.get("top_logprobs") or [first]
    keys = [normalize_answer(a) for a in answers]
    probs = [0.0] * len(answers)
    for cand in candidates:
        key = normalize_answer(str(cand.get("token", "")))
        if key in keys and cand.get("logprob") is not None:
            probs[keys.index(key)] += math.exp(float(cand["logprob"]))
    return probs if sum(probs) > 0 else None


def read_answer(response: dict, answers: Sequence[str]) -> tuple[list[float] | None, bool]:
    """``(probabilities of answers or None, whether they came from logprobs)`` of a chat-completions response."""
    try:
        choice = response["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None, False
    probs = answer_from_logprobs(choice, answers)
    if probs is not None:
        return probs, True
    text = ((choice.get("message") or {}).get("content")) or ""
    if isinstance(text, list):  # content parts
        text = " ".join(str(p.get("text", "")) for p in text if isinstance(p, dict))
    index = answer_from_text(str(text), answers)
    if index is None:
        return None, False
    return [1.0 if k == index else 0.0 for k in range(len(answers))], False


class ChatClient:
    """``POST {base_url}/chat/completions`` with a timeout and bounded retries.

    Args:
        base_url: the API root (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``).
        api_key: bearer token (``None``: no ``Authorization`` header).
        timeout: seconds per socket operation.
        retries: extra tries on retryable failures.
        backoff: first wait between tries (doubles each time; the server's ``Retry-After`` wins).
        max_backoff: longest wait.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ):
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise RewardSpecError(f"need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}")
        self.base_url = _base_url(base_url)
        self.url = self.base_url + "/chat/completions"
        self.api_key = api_key
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff

    def __call__(self, payload: dict) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        result, _ = with_retries(
            lambda: request_json(self.url, payload, timeout=self.timeout, headers=headers),
            self.retries,
            self.backoff,
            self.max_backoff,
        )
        return result

    def __repr__(self) -> str:
        return f"ChatClient({self.url!r}, timeout={self.timeout}, retries={self.retries})"


class RandomChatEndpoint:
    """An offline stand-in for a chat-completions server with random "weights" (for tests and benchmarks).

    Each request gets a deterministic answer: a seeded hash of its messages draws logits over a fixed set of
    candidate tokens (``Yes``, ``No``, digits), returned as ``top_logprobs``, with the most likely one as text.
    Same request, same answer, so scores do not depend on batching.
    """

    TOKENS = ("Yes", "No", *[str(k) for k in range(1, 10)])

    def __init__(self, seed: int = 0, scale: float = 2.0):
        self.seed, self.scale = seed, scale
        self.requests = 0

    def __call__(self, payload: dict) -> dict:
        self.requests += 1
        digest = hashlib.sha256(f"{self.seed}:{json.dumps(payload['messages'], sort_keys=True)}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        logprobs = (self.scale * torch.randn(len(self.TOKENS), generator=gen, dtype=torch.float64)).log_softmax(0)
        top = sorted(zip(self.TOKENS, logprobs.tolist()), key=lambda t: -t[1])
        answer, logprob = top[0]
        first = {"token": answer, "logprob": logprob, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": answer},
            "logprobs": {"content": [first]},
        }
        return {"object": "chat.completion", "model": payload.get("model", "random"), "choices": [choice]}


class OpenAIJudge(JudgeReward):
    """A judge behind a chat-completions API (see the module docstring).

    Args:
        client: ``payload -> response`` (:class:`ChatClient`, or :class:`RandomChatEndpoint` offline); raises
            :class:`~reward_models.remote.TransportError` on failure.
        model: the ``model`` field of each request.
        template: :class:`~reward_models.judging.JudgeTemplate`.
        logprobs: ask for ``logprobs`` / ``top_logprobs`` (turn off for servers that reject them).
        top_logprobs: how many alternatives per token to ask for.
        max_tokens: answer length limit.
        concurrency: requests in flight at once.
        on_error: ``"raise"`` or ``"invalid"`` for requests that fail after their retries.
        min_mass: samples whose answers get less probability than this (from logprobs) are invalid.
        batch_size: samples per chunk.
    """

    def __init__(
        self,
        client: Callable[[dict], dict],
        model: str,
        template: JudgeTemplate | None = None,
        *,
        logprobs: bool = True,
        top_logprobs: int = 20,
        max_tokens: int = 8,
        concurrency: int = 8,
        on_error: str = "raise",
        min_mass: float = 0.0,
        batch_size: int = 16,
    ):
        if on_error not in ON_ERROR:
            raise RewardSpecError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if concurrency < 1 or max_tokens < 1:
            raise RewardSpecError(f"concurrency and max_tokens must be >= 1, got {concurrency} and {max_tokens}")
        super().__init__(BUILTIN_SPECS["openai-judge"], template or JudgeTemplate(), batch_size)
        self.client, self.model = client, model
        self.logprobs, self.top_logprobs, self.max_tokens = bool(logprobs), int(top_logprobs), int(max_tokens)
        self.concurrency, self.on_error, self.min_mass = int(concurrency), on_error, float(min_mass)

    def payload(self, slots: list[torch.Tensor], parts: list[Part], index: int) -> dict:
        """The chat-completions request of sample ``index``."""
        content = []
        for part in parts:
            if isinstance(part, int):
                url = "data:image/png;base64," + png_base64(slots[part][index])
                content.append({"type": "image_url", "image_url": {"url": url}})
            else:
                content.append({"type": "text", "text": part})
        messages = [{"role": "user", "content": content}]
        if self.template.system is not None:
            messages.insert(0, {"role": "system", "content": self.template.system})
        payload = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        if self.logprobs:
            payload.update(logprobs=True, top_logprobs=self.top_logprobs)
        return payload

    def _ask(self, payload: dict) -> dict | TransportError:
        try:
            return self.client(payload)
        except TransportError as e:
            return e

    def answer_probs(self, slots, parts, answers):
        slots = [s.detach().cpu() for s in slots]
        payloads = [self.payload(slots, p, i) for i, p in enumerate(parts)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(payloads))) as pool:
            responses = list(pool.map(self._ask, payloads))
        failures = [r for r in responses if isinstance(r, TransportError)]
        if failures and self.on_error == "raise":
            tries = getattr(failures[0], "attempts", 1)
            raise RewardError(
                f"openai-judge: {len(failures)} of {len(responses)} requests failed (after {tries} "
                f"tries): {failures[0]}"
            )
        probs, valid, from_logprobs = [], [], []
        for response in responses:
            read, used_logprobs = (
                (None, False) if isinstance(response, TransportError) else read_answer(response, answers)
            )
            probs.append(read if read is not None else [math.nan] * len(answers))
            valid.append(read is not None)
            from_logprobs.append(float(used_logprobs))
        extra = {"from_logprobs": torch.tensor(from_logprobs)}
        return torch.tensor(probs, dtype=torch.float32), torch.tensor(valid, dtype=torch.bool), extra

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, model={self.model!r}, client={self.client!r}, mode={self.template.mode!r}"


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


def load_openai_judge(
    base_url: str = DEFAULT_BASE_URL,
    model: str = DEFAULT_MODEL,
    mode: str = "yes",
    question: str | None = None,
    pair_question: str | None = None,
    system: str | None = None,
    yes: str = "Yes",
    no: str = "No",
    levels: int = 5,
    normalize: bool = False,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    logprobs: bool = True,
    top_logprobs: int = 20,
    max_tokens: int = 8,
    concurrency: int = 8,
    on_error: str = "raise",
    min_mass: float = 0.0,
    batch_size: int = 16,
) -> OpenAIJudge:
    """``openai-judge(BASE_URL, model=NAME, ...)``: a judge behind an OpenAI-compatible endpoint.

    Args:
        base_url: API root (``https://api.openai.com/v1``; vLLM: ``http://127.0.0.1:8000/v1``).
        model: model name sent with each request.
        mode, question, pair_question, system, yes, no, levels, normalize: the judge template (as ``vlm-judge``).
        api_key_env: environment variable holding the API key (unset: no key is sent).
        timeout, retries, backoff: per-request timeout (s), extra tries, first backoff (s).
        logprobs, top_logprobs, max_tokens, concurrency, on_error, min_mass, batch_size: see :class:`OpenAIJudge`.
    """
    template = _template(mode, question, pair_question, system, yes, no, levels, normalize)
    client = ChatClient(base_url, os.environ.get(api_key_env) or None, timeout, retries, backoff)
    return OpenAIJudge(
        client,
        model,
        template,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        max_tokens=max_tokens,
        concurrency=concurrency,
        on_error=on_error,
        min_mass=min_mass,
        batch_size=batch_size,
    ).freeze()


def random_openai_judge(
    size: str = "tiny", mode: str = "yes", levels: int = 5, normalize: bool = False, seed: int = 0
) -> OpenAIJudge:
    """``openai-judge`` answering from :class:`RandomChatEndpoint` (offline; ``size`` has no effect)."""
    template = _template(mode, None, None, None, "Yes", "No", levels, normalize)
    return OpenAIJudge(RandomChatEndpoint(seed), "random", template).freeze()
