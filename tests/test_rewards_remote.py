"""Remote rewards through real HTTP servers on 127.0.0.1: ``visalign serve-reward`` and ``remote:URL``.

The remote reward equals the local one (exactly with float32 media, on the 8-bit media with PNG); images,
videos, components and validity survive the wire; server-side errors come back as one clear error; a stopped,
silent or slow server fails within the timeout (an error, or ``valid=False``), never a hang.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reward_models import RewardError, RewardInputError, build_random_reward, build_reward
from reward_models.base import Reward, RewardSpec
from reward_models.remote import RemoteReward, TransportError, request_json
from reward_models.serving import ENCODINGS, RewardServer, decode_media, encode_media, quantize
from visalign.toyworld import render_images, render_videos

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle on the top", "a yellow circle"]


def _media(b=4, h=40, w=52):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clip():
    return build_random_reward("clip")


@pytest.fixture(scope="module")
def clip_server(clip):
    with RewardServer(clip) as server:
        yield server


# ----------------------------------------------------------------------------------------------- wire format
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_media_round_trip(encoding):
    images = _media(3, 9, 7)
    videos = torch.rand(2, 3, 3, 8, 6, generator=torch.Generator().manual_seed(1))
    for media in (images, videos):
        decoded = decode_media(encode_media(media, encoding))
        assert decoded.dtype == torch.float32 and decoded.shape == media.shape
        assert torch.equal(decoded, quantize(media, encoding))
    assert torch.equal(quantize(images, "f32"), images)
    assert (quantize(images, "png") - images).abs().max() <= 0.5 / 255 + 1e-7


def test_bad_media_payloads_are_clear_errors():
    good = encode_media(_media(2), "png")
    with pytest.raises(RewardInputError, match="list 2 PNGs"):
        decode_media({**good, "data": good["data"][:1]})
    with pytest.raises(RewardInputError, match="cannot decode png"):
        decode_media({**good, "data": ["not base64!", good["data"][1]]})
    raw = encode_media(_media(2), "f16")
    with pytest.raises(RewardInputError, match="cannot decode f16"):
        decode_media({**raw, "shape": [3, 3, 40, 52]})
    with pytest.raises(RewardInputError, match="encoding must be one of"):
        decode_media({**raw, "encoding": "jpeg"})
    with pytest.raises(RewardInputError, match=r"shape must be \[B, 3, H, W\]"):
        decode_media({**raw, "shape": [2, 3]})


# ----------------------------------------------------------------------------------------------- equality
def test_remote_equals_local_through_a_real_server(clip, clip_server):
    media = _media()
    local = clip(media, PROMPTS)

    exact = build_reward(f"remote({clip_server.url}, encoding=f32)")
    assert isinstance(exact, RemoteReward)
    assert exact.spec.name == f"remote({clip_server.url})" and exact.served_spec == clip.spec
    assert exact.spec.needs_prompt and not exact.spec.differentiable
    out = exact(media, PROMPTS)
    assert torch.equal(out.scores, local.scores) and torch.equal(out.valid, local.valid)
    assert out.components.keys() == local.components.keys()

    png = build_reward(f"remote:{clip_server.url}")  # the sugar of the spec grammar; PNG by default
    assert png.encoding == "png"
    torch.testing.assert_close(
        png(media, PROMPTS).scores, clip(quantize(media, "png"), PROMPTS).scores, rtol=0, atol=1e-6
    )
    half = build_reward(f"remote({clip_server.url}, encoding=f16, batch_size=3)")  # two requests
    torch.testing.assert_close(
        half(media, PROMPTS).scores, clip(quantize(media, "f16"), PROMPTS).scores, rtol=0, atol=1e-6
    )
    assert png.health()["reward"] == "clip"


def test_videos_components_and_validity_survive_the_wire():
    oracle = build_reward("oracle")
    captions = ["a red circle on the left", "a blue square", "a flying car"]  # the last is outside the grammar
    images, _ = render_images(captions[:2], seed=0)
    images = torch.cat([images, images[:1]])
    video_captions = ["a red circle moving left", "a blue square moving up"]
    videos, _ = render_videos(video_captions, seed=0)
    with RewardServer(oracle) as server:
        remote = build_reward(f"remote:{server.url}")
        assert remote.spec.modalities == ("image", "video") and remote.spec.needs_prompt
        for media, prompts in ((images, captions), (videos, video_captions)):
            local, far = oracle(media, prompts), remote(media, prompts)
            torch.testing.assert_close(far.scores, local.scores)
            assert torch.equal(far.valid, local.valid)
            assert far.components.keys() == local.components.keys()
            for name, value in local.components.items():  # NaN (no position named) crosses as null
                torch.testing.assert_close(far.components[name], value, equal_nan=True)
        assert remote(images, captions).valid.tolist() == [True, True, False]


# ----------------------------------------------------------------------------------------------- errors
def test_health_spec_and_server_side_errors(clip_server):
    url = clip_server.url
    health = request_json(url + "/health", timeout=5)
    assert health["status"] == "ok" and health["reward"] == "clip" and health["dtype"] == "float32"
    spec = request_json(url + "/spec", timeout=5)
    assert spec["protocol"] == "visalign-reward/1" and spec["spec"]["name"] == "clip"
    assert spec["spec"]["modalities"] == ["image"] and spec["batch_size"] == 16

    with pytest.raises(TransportError, match="HTTP 404.*unknown path /nope") as e:
        request_json(url + "/nope", timeout=5)
    assert e.value.status == 404 and not e.value.retryable
    media = encode_media(_media(2), "f32")
    with pytest.raises(TransportError, match="HTTP 400.*got 2 media but 1 prompts"):
        request_json(url + "/score", {"media": media, "prompts": ["one"]}, timeout=5)
    bad = encode_media(_media(2) * 2, "f32")  # pixels in [0, 2]
    with pytest.raises(TransportError, match=r"HTTP 400.*must be in \[0, 1\]"):
        request_json(url + "/score", {"media": bad, "prompts": ["a", "b"]}, timeout=5)
    with pytest.raises(TransportError, match="HTTP 400.*'media'"):
        request_json(url + "/score", {"prompts": []}, timeout=5)

    remote = build_reward(f"remote:{url}")
    with pytest.raises(RewardInputError, match="needs one prompt per sample"):  # checked before sending
        remote(_media(2))
    with pytest.raises(RewardInputError, match="scores images, not videos"):
        remote(torch.rand(1, 2, 3, 8, 8), ["x"])


def test_server_rejection_is_an_input_error_even_when_errors_are_tolerated(clip_server):
    class NoPrompts(RemoteReward):  # a client that skips its own validation, as a foreign client might
        def forward(self, media, prompts=None):
            return self.score_batch(media, prompts)

    remote = NoPrompts(clip_server.url, on_error="invalid")
    with pytest.raises(RewardInputError, match="rejected the input.*needs one prompt per sample"):
        remote(_media(2), None)


def test_unreachable_server_at_construction_says_how_to_start_one():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"connection refused.*visalign serve-reward --reward SPEC"):
        build_reward(f"remote:http://127.0.0.1:{port}")
    assert time.monotonic() - start < 2
    with pytest.raises(RewardError, match="needs an http"):
        build_reward("remote:127.0.0.1:8765")


def test_stopped_server_fails_fast_with_a_clear_error_or_invalid():
    server = RewardServer(build_reward("oracle")).start()
    remote = build_reward(f"remote({server.url}, timeout=2)")
    tolerant = build_reward(f"remote({server.url}, timeout=2, on_error=invalid)")
    media, _ = render_images(PROMPTS, seed=0)
    names = tolerant(media, PROMPTS).components.keys()  # learns the component names
    server.close()

    start = time.monotonic()
    with pytest.raises(RewardError, match="connection refused"):
        remote(media, PROMPTS)
    out = tolerant(media, PROMPTS)
    assert time.monotonic() - start < 2
    assert not out.valid.any() and out.scores.isnan().all() and out.scores.shape == (4,)
    assert out.components.keys() == names == {"object", "color_ok", "shape_ok", "position_ok"}
    assert all(value.isnan().all() for value in out.components.values())


class _SlowReward(Reward):
    def __init__(self, delay: float):
        super().__init__(RewardSpec("slow", needs_prompt=False, differentiable=False))
        self.delay = delay

    def score_batch(self, media, prompts):
        time.sleep(self.delay)
        return media.mean(dim=(1, 2, 3))


def test_silent_or_slow_server_times_out():
    # a port that accepts connections but never answers: the spec request times out
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(RewardError, match="no response .* within 0.3 s"):
            RemoteReward(f"http://127.0.0.1:{port}", timeout=0.3)
        assert time.monotonic() - start < 1.5

    # a server that answers /spec at once but takes 3 s per batch
    with RewardServer(_SlowReward(3.0)) as server:
        remote = RemoteReward(server.url, timeout=0.3)
        start = time.monotonic()
        with pytest.raises(RewardError, match="no response .* within 0.3 s"):
            remote(_media(1))
        tolerant = RemoteReward(server.url, timeout=0.3, on_error="invalid", retries=1, backoff=0.05)
        out = tolerant(_media(1))
        assert not out.valid.any() and math.isnan(float(out.scores[0]))
        assert time.monotonic() - start < 2.5  # 0.3 + 2 x 0.3 + backoff, not 3 x 3 s


# ----------------------------------------------------------------------------------------------- the command
def test_serve_reward_command_serves_until_stopped():
    command = [sys.executable, "-m", "apps.serve_reward", "--reward", "oracle", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving oracle at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        remote = build_reward(f"remote({url}, timeout=10)")
        images, _ = render_images(PROMPTS, seed=3)
        local = build_reward("oracle")(images, PROMPTS)
        out = remote(images, PROMPTS)
        assert torch.equal(out.scores, local.scores) and out.valid.all()
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "stopped" in stdout, stderr
    with pytest.raises(RewardError, match="connection refused"):
        remote(images, PROMPTS)


def test_serve_reward_config_errors():
    from apps.serve_reward import ServeRewardConfig, build_server
    from visalign.errors import ConfigError

    with pytest.raises(ConfigError, match="port must be in 0..65535"):
        ServeRewardConfig(reward="oracle", port=70000)
    with RewardServer(build_reward("oracle")) as busy:
        port = int(busy.url.rsplit(":", 1)[1])
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            build_server(ServeRewardConfig(reward="oracle", port=port, device="cpu"))
