"""VLM judges: ``vlm-judge`` on a tiny random Qwen2-VL built offline, and ``openai-judge`` against a real
OpenAI-compatible HTTP server on 127.0.0.1 written here with ``http.server``.

vlm-judge: inputs equal Qwen2VLProcessor's; P("Yes") and the expected rating equal a direct computation from the
model's logits; pairwise verdicts are averaged over both orders (swapping the pair gives 1 - p, a pair of the same
image 0.5, while each single order is biased); templates and answers are validated; a saved folder loads back.
openai-judge: the request (PNG data URLs, temperature 0, logprobs, key from the environment), logprob and text
answers, unparsable answers (valid=False, not retried), bounded retries with backoff, timeouts, a stopped
server, and the two-order pairwise protocol.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from reward_models import (
    CheckpointError,
    RewardError,
    RewardInputError,
    RewardSpecError,
    build_random_reward,
    build_reward,
)
from reward_models.judging import JudgeTemplate, expected_rating, pairwise_preference
from reward_models.openai_judge import answer_from_text, load_openai_judge
from reward_models.serving import quantize
from reward_models.vlm_judge import VLMJudge, load_vlm_judge, random_vlm_judge

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle", "a yellow circle on the top"]


def _images(b=4, h=40, w=52, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def judge():
    return random_vlm_judge("tiny")


def _processor_inputs(judge: VLMJudge, images: list[torch.Tensor], parts: list[list]):
    texts = [judge.chat_text(p) for p in parts]
    return judge.processor(
        text=texts, images=images, do_rescale=False, padding=True, padding_side="left", return_tensors="pt"
    )


def _direct_probs(judge: VLMJudge, images, parts, answers):
    """Answer probabilities through the processor and a plain forward (the reference computation)."""
    inputs = _processor_inputs(judge, images, parts)
    with torch.no_grad():
        logits = judge.model(**inputs).logits[:, -1].float()
    ids = [judge.processor.tokenizer.convert_tokens_to_ids(a) for a in answers]
    return logits.softmax(-1)[:, ids]


# ----------------------------------------------------------------------------------------------- vlm-judge
def test_inputs_equal_the_qwen2_vl_processor(judge):
    images = _images()
    parts = [judge.template.pointwise_parts(p) for p in PROMPTS]
    ours = judge.model_inputs([images], parts)
    ref = _processor_inputs(judge, list(images), parts)
    assert ours.keys() == ref.keys()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
    assert ref["image_grid_thw"].tolist() == [[1, 6, 8]] * 4  # 40x52 -> smart_resize 24x32 -> 6x8 patches of 4 px

    # two images per message (pairwise), in order, with a different size in the second slot
    second = _images(4, 64, 48, seed=1)
    pair_parts = [judge.template.pairwise_parts(p) for p in PROMPTS]
    ours = judge.model_inputs([images, second], pair_parts)
    ref = _processor_inputs(judge, [im for pair in zip(images, second) for im in pair], pair_parts)
    for key in ("input_ids", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)


def test_yes_probability_is_vqascore(judge):
    images = _images()
    out = judge(images, PROMPTS)
    parts = [judge.template.pointwise_parts(p) for p in PROMPTS]
    probs = _direct_probs(judge, list(images), parts, ["Yes", "No"])
    torch.testing.assert_close(out.scores, probs[:, 0], rtol=1e-5, atol=1e-7)  # full-vocabulary softmax
    torch.testing.assert_close(out.components["p_no"], probs[:, 1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.components["answer_mass"], probs.sum(-1), rtol=1e-5, atol=1e-7)
    assert 'Does this figure show "a red circle"? Please answer yes or no.' in judge.chat_text(parts[0])
    assert out.valid.all() and len(set(out.scores.tolist())) == 4  # the images are told apart

    normalized = random_vlm_judge("tiny", normalize=True)(images, PROMPTS)
    torch.testing.assert_close(normalized.scores, probs[:, 0] / probs.sum(-1), rtol=1e-5, atol=1e-7)
    # a threshold halfway between two masses, never one of the compared floats (they come from another path)
    mass = probs.sum(-1)
    low, high = mass.sort().values[1:3].tolist()
    assert high - low > 1e-6
    strict = random_vlm_judge("tiny", min_mass=(low + high) / 2)(images, PROMPTS)
    assert strict.valid.tolist() == (mass >= (low + high) / 2).tolist()
    assert strict.valid.sum() == 2


def test_rating_is_the_expected_level():
    judge = build_random_reward("vlm-judge(mode=rating, levels=4)")
    assert judge.spec.nominal_range == (1.0, 4.0)
    images = _images()
    out = judge(images, PROMPTS)
    parts = [judge.template.pointwise_parts(p) for p in PROMPTS]
    assert "from 1 (not at all) to 4 (perfectly)" in parts[0][1]
    probs = _direct_probs(judge, list(images), parts, ["1", "2", "3", "4"])
    expected = (probs * torch.arange(1.0, 5.0)).sum(-1) / probs.sum(-1)
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-6)
    assert ((out.scores >= 1) & (out.scores <= 4)).all()
    assert expected_rating(torch.tensor([[0.0, 0.2, 0.0, 0.6]]), torch.arange(1.0, 5.0)).item() == pytest.approx(3.5)


def test_pairwise_judges_both_orders_and_cancels_position_bias(judge):
    a, b = _images(seed=0), _images(seed=1)
    ab, ba = judge.compare(a, b, PROMPTS), judge.compare(b, a, PROMPTS)
    torch.testing.assert_close(ab.scores + ba.scores, torch.ones(4), rtol=0, atol=1e-6)
    # the one-order verdicts are those of the swapped call, and they are biased: the average is not either one
    torch.testing.assert_close(ab.components["first_shown_first"], 1 - ba.components["first_shown_second"])
    assert ab.components["position_bias"].abs().min() > 0.01
    torch.testing.assert_close(
        ab.scores, 0.5 * (ab.components["first_shown_first"] + ab.components["first_shown_second"])
    )
    # the first image really is shown first: a direct single-order judgement
    parts = [judge.template.pairwise_parts(p) for p in PROMPTS]
    direct = _direct_probs(judge, [im for pair in zip(a, b) for im in pair], parts, ["1", "2"])
    torch.testing.assert_close(ab.components["first_shown_first"], direct[:, 0] / direct.sum(-1), rtol=1e-5, atol=1e-6)
    same = judge.compare(a, a, PROMPTS)
    torch.testing.assert_close(same.scores, torch.full((4,), 0.5), rtol=0, atol=1e-6)
    # images of different sizes go through two calls; batch chunks do not change results
    small = _images(seed=2, h=32, w=32)
    judge.batch_size = 3
    try:
        mixed, swapped = judge.compare(a, small, PROMPTS), judge.compare(small, a, PROMPTS)
    finally:
        judge.batch_size = 8
    torch.testing.assert_close(mixed.scores + swapped.scores, torch.ones(4), rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed.scores, judge.compare(a, small, PROMPTS).scores, rtol=1e-5, atol=1e-6)
    # pure function, exact values
    score, comps = pairwise_preference(torch.tensor([[0.6, 0.2]]), torch.tensor([[0.3, 0.1]]))
    assert score.item() == pytest.approx(0.5 * (0.75 + 0.25)) and comps["position_bias"].item() == pytest.approx(0.25)


def test_templates_and_answers_are_validated(judge):
    aesthetic = random_vlm_judge("tiny", question="Is this image beautiful? Answer yes or no.")
    assert not aesthetic.spec.needs_prompt and aesthetic(_images(2)).scores.shape == (2,)
    with pytest.raises(RewardSpecError, match=r"may use \{prompt\} and \{levels\}"):
        JudgeTemplate(question="Does it show {caption}?")
    with pytest.raises(RewardSpecError, match="levels must be 2..9"):
        JudgeTemplate(mode="rating", levels=10)
    with pytest.raises(RewardSpecError, match="mode must be one of"):
        JudgeTemplate(mode="likert")
    with pytest.raises(RewardSpecError, match="'Absolutely' is 10 tokens"):
        random_vlm_judge("tiny", yes="Absolutely")
    with pytest.raises(RewardInputError, match="needs one prompt per sample"):
        judge.compare(_images(2), _images(2))
    with pytest.raises(RewardError, match="as many first as second"):
        judge.compare(_images(2), _images(3), PROMPTS[:2])
    custom = build_random_reward("vlm-judge(question='Is \"{prompt}\" shown? Answer yes or no.', system=Judge.)")
    text = custom.chat_text(custom.template.pointwise_parts("a cat"))
    assert text.startswith("<|im_start|>system\nJudge.<|im_end|>") and 'Is "a cat" shown?' in text


def test_load_from_a_local_folder(judge, tmp_path):
    judge.model.save_pretrained(tmp_path / "judge")
    judge.processor.save_pretrained(tmp_path / "judge")
    loaded = load_vlm_judge(str(tmp_path / "judge"), load_dtype="fp32")
    images = _images()
    torch.testing.assert_close(loaded(images, PROMPTS).scores, judge(images, PROMPTS).scores, rtol=1e-5, atol=1e-7)
    rating = build_reward(f"vlm-judge({tmp_path / 'judge'}, mode=rating, load_dtype=bf16)")
    assert rating.dtype == torch.bfloat16 and rating.template.mode == "rating"

    with pytest.raises(CheckpointError, match="neither a local folder nor a hub id"):
        build_reward("vlm-judge:/no/such/folder")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CheckpointError, match="is a 'clip' model"):
        load_vlm_judge(str(tmp_path / "clip"))


# ----------------------------------------------------------------------------------------------- fake endpoint
def chat_response(text: str, top: dict[str, float] | None = None) -> dict:
    """A chat-completions response; ``top`` maps tokens to probabilities (sent as logprobs)."""
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if top is not None:
        tops = [{"token": t, "logprob": math.log(p)} for t, p in top.items()]
        choice["logprobs"] = {
            "content": [
                {"token": "\n", "logprob": -0.01, "top_logprobs": []},
                {"token": text, "logprob": tops[0]["logprob"], "top_logprobs": tops},
            ]
        }
    return {"object": "chat.completion", "choices": [choice]}


class FakeChatServer(ThreadingHTTPServer):
    """A real OpenAI-compatible endpoint on 127.0.0.1: ``POST /v1/chat/completions``.

    ``script`` holds actions used one per request before falling back to ``answer(request) -> response``:
    ``("status", code, headers)``, ``("sleep", seconds)`` (then answers), ``("raw", bytes)``.
    """

    daemon_threads = True

    def __init__(self, answer):
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.answer = answer
        self.script: list[tuple] = []
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((dict(self.headers), body))
            action = self.server.script.pop(0) if self.server.script else None
        assert self.path == "/v1/chat/completions"
        if action and action[0] == "status":
            payload = json.dumps({"error": {"message": f"scripted {action[1]}", "type": "server_error"}}).encode()
            self.send_response(action[1])
            for key, value in action[2].items():
                self.send_header(key, value)
        else:
            if action and action[0] == "sleep":
                time.sleep(action[1])
            payload = action[1] if action and action[0] == "raw" else json.dumps(self.server.answer(body)).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout tests)
            pass


@pytest.fixture
def chat_server():
    servers = []

    def start(answer):
        server = FakeChatServer(answer)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _question(body) -> str:
    return body["messages"][-1]["content"][-1]["text"]


def _decoded_images(body) -> list[torch.Tensor]:
    images = []
    for part in body["messages"][-1]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
                images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255)
    return images


# ----------------------------------------------------------------------------------------------- openai-judge
def test_openai_judge_request_and_logprob_answers(chat_server, monkeypatch):
    server = chat_server(lambda body: chat_response("Yes", {"Yes": 0.6, " yes": 0.1, "No": 0.2, "Maybe": 0.05}))
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    judge = build_reward(f"openai-judge({server.base_url}, model=qwen-vl, api_key_env=JUDGE_KEY)")
    images = _images(2)
    out = judge(images, PROMPTS[:2])
    torch.testing.assert_close(out.scores, torch.tensor([0.7, 0.7]))  # variants of "yes" add up
    torch.testing.assert_close(out.components["p_no"], torch.tensor([0.2, 0.2]))
    assert out.valid.all() and out.components["from_logprobs"].tolist() == [1.0, 1.0]

    assert len(server.requests) == 2
    # requests may arrive in any order (they are sent concurrently): take the first prompt's
    headers, body = next((h, b) for h, b in server.requests if '"a red circle"' in _question(b))
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "qwen-vl" and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    assert content[1]["text"] == 'Does this figure show "a red circle"? Please answer yes or no.'
    sent = {_question(b): _decoded_images(b)[0] for _, b in server.requests}
    assert torch.equal(sent[content[1]["text"]], quantize(images[0], "png"))  # lossless 8-bit PNG

    monkeypatch.delenv("JUDGE_KEY")
    normalized = load_openai_judge(server.base_url, model="m", normalize=True, api_key_env="JUDGE_KEY")
    torch.testing.assert_close(normalized(images[:1], PROMPTS[:1]).scores, torch.tensor([0.7 / 0.9]))
    assert "Authorization" not in server.requests[-1][0]


def test_openai_judge_reads_text_answers_and_flags_unparsable_ones(chat_server):
    replies = {
        "a red circle": "Yes.",
        "a blue square on the left": "no",
        "a green triangle": "**Answer: YES**",
        "a yellow circle on the top": "I cannot tell from this picture.",
        "a cat": "",
    }

    def answer(body):
        prompt = _question(body).split('"')[1]
        return chat_response(replies[prompt])

    server = chat_server(answer)
    judge = load_openai_judge(server.base_url, model="m", logprobs=False, retries=3)
    prompts = [*PROMPTS, "a cat"]
    out = judge(_images(5), prompts)
    assert out.valid.tolist() == [True, True, True, False, False]
    assert out.scores[:3].tolist() == [1.0, 0.0, 1.0] and out.scores[3:].isnan().all()
    assert out.components["from_logprobs"].tolist() == [0.0] * 5
    assert len(server.requests) == 5  # an unparsable answer is not asked again
    assert "logprobs" not in server.requests[0][1]

    assert answer_from_text("Rating: 4/5", "12345") == 3
    assert answer_from_text("On a scale of 1 to 5, I'd say 4", "12345") is None  # never misread as 1
    assert answer_from_text("7", "12345") is None
    rating_replies = iter(["4", "Rating: 2", "9"])
    server = chat_server(lambda body: chat_response(next(rating_replies)))
    rating = load_openai_judge(server.base_url, model="m", mode="rating", logprobs=False, concurrency=1)
    out = rating(_images(3), PROMPTS[:3])
    assert out.valid.tolist() == [True, True, False] and out.scores[:2].tolist() == [4.0, 2.0]


def test_openai_judge_expected_rating_from_logprobs(chat_server):
    server = chat_server(lambda body: chat_response("4", {"4": 0.5, "5": 0.3, "3": 0.1, "The": 0.05}))
    judge = load_openai_judge(server.base_url, model="m", mode="rating", levels=5)
    out = judge(_images(1), PROMPTS[:1])
    assert out.scores.item() == pytest.approx((4 * 0.5 + 5 * 0.3 + 3 * 0.1) / 0.9, rel=1e-6)
    assert out.components["answer_mass"].item() == pytest.approx(0.9, rel=1e-6)


def test_openai_judge_retries_with_backoff_then_succeeds(chat_server):
    server = chat_server(lambda body: chat_response("No", {"No": 0.9, "Yes": 0.1}))
    server.script = [("status", 503, {}), ("status", 429, {"Retry-After": "0"}), ("raw", b"<html>oops")]
    judge = load_openai_judge(server.base_url, model="m", retries=3, backoff=0.01)
    start = time.monotonic()
    out = judge(_images(1), PROMPTS[:1])
    assert out.valid.all() and out.scores.item() == pytest.approx(0.1)
    assert len(server.requests) == 4 and time.monotonic() - start < 2


def test_openai_judge_gives_up_after_bounded_retries(chat_server):
    server = chat_server(lambda body: chat_response("Yes"))
    server.script = [("status", 500, {})] * 3
    judge = load_openai_judge(server.base_url, model="m", retries=2, backoff=0.01)
    with pytest.raises(RewardError, match=r"1 of 1 requests failed \(after 3 tries\): HTTP 500 .*scripted 500"):
        judge(_images(1), PROMPTS[:1])
    assert len(server.requests) == 3

    server.script = [("status", 500, {})] * 2
    tolerant = load_openai_judge(
        server.base_url, model="m", retries=1, backoff=0.01, on_error="invalid", concurrency=1
    )
    out = tolerant(_images(2), PROMPTS[:2])  # the first request fails twice, the second is answered
    assert out.valid.tolist() == [False, True] and out.scores[~out.valid].isnan().all()

    server.script = [("status", 400, {})]  # not retryable: a request the server will never accept
    with pytest.raises(RewardError, match="HTTP 400"):
        load_openai_judge(server.base_url, model="m", retries=3, backoff=0.01)(_images(1), PROMPTS[:1])
    assert len(server.requests) == 3 + 3 + 1


def test_openai_judge_times_out_and_reports_a_stopped_server(chat_server):
    server = chat_server(lambda body: chat_response("Yes"))
    server.script = [("sleep", 3.0)] * 2
    judge = load_openai_judge(server.base_url, model="m", timeout=0.3, retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"no response from .*/v1/chat/completions within 0.3 s"):
        judge(_images(1), PROMPTS[:1])
    assert time.monotonic() - start < 1.5

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stopped = load_openai_judge(f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff=0.01, on_error="invalid")
    start = time.monotonic()
    assert not stopped(_images(2), PROMPTS[:2]).valid.any()
    with pytest.raises(RewardError, match="connection refused"):
        load_openai_judge(f"http://127.0.0.1:{port}/v1", model="m", retries=0)(_images(1), PROMPTS[:1])
    assert time.monotonic() - start < 1


def test_openai_judge_pairwise_in_both_orders(chat_server):
    def brighter(body):  # a fair judge: picks the brighter of the two images it is shown
        first, second = _decoded_images(body)
        return chat_response("1" if first.mean() > second.mean() else "2")

    server = chat_server(brighter)
    judge = load_openai_judge(server.base_url, model="m", logprobs=False)
    dark, bright = 0.3 * _images(2), 0.7 + 0.3 * _images(2, seed=1)
    assert judge.compare(bright, dark, PROMPTS[:2]).scores.tolist() == [1.0, 1.0]
    assert judge.compare(dark, bright, PROMPTS[:2]).scores.tolist() == [0.0, 0.0]
    assert len(server.requests) == 8  # two orders per pair
    texts = [p.get("text") for p in server.requests[0][1]["messages"][0]["content"]]
    assert texts[0] == "First image:" and texts[2] == "Second image:" and texts[1] is None and texts[3] is None
    assert texts[4].startswith("Which image matches the description") and "Answer 1 for the first image" in texts[4]

    server = chat_server(lambda body: chat_response("1"))  # maximal position bias: always the first shown
    biased = load_openai_judge(server.base_url, model="m", logprobs=False).compare(bright, dark, PROMPTS[:2])
    assert biased.scores.tolist() == [0.5, 0.5]
    assert biased.components["first_shown_first"].tolist() == [1.0, 1.0]
    assert biased.components["first_shown_second"].tolist() == [0.0, 0.0]
    assert biased.components["position_bias"].tolist() == [0.5, 0.5]
