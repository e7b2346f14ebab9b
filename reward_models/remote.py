"""``remote``: a reward served by ``visalign serve-reward`` (:mod:`reward_models.serving`), called over HTTP.

``build_reward("remote:http://127.0.0.1:8765")`` fetches the served reward's spec from ``/spec`` (modalities,
prompts, nominal range) and scores each chunk of ``batch_size`` media with one ``POST /score``. The result is
the served reward's, computed where it lives: device and dtype are the server's (``.to()`` here moves nothing),
and scores come back on the media's device. Scores never carry gradients.

Every request has a timeout (seconds per socket operation: connecting, sending, and each wait for the answer),
so a stopped or stuck server never hangs the caller: a refused connection fails at once, a silent server after
``timeout``. Failures raise :class:`~reward_models.base.RewardError` naming the URL and the cause
(``on_error="raise"``, default) or return ``valid=False`` with NaN scores for the chunk (``on_error="invalid"``).
Bad input reported by the server (HTTP 400) always raises :class:`~reward_models.base.RewardInputError`.

Also the small HTTP client shared with :mod:`reward_models.openai_judge`: :func:`request_json`,
:func:`with_retries`, :class:`TransportError`.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch

from .base import Reward, RewardError, RewardInputError, RewardOutput, RewardSpec, RewardSpecError
from .serving import ENCODINGS, PROTOCOL, encode_media, output_from_json, spec_from_json

T = TypeVar("T")
RETRYABLE_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ON_ERROR = ("raise", "invalid")


# ----------------------------------------------------------------------------------------------- HTTP client
class TransportError(RewardError):
    """An HTTP exchange that failed: unreachable server, timeout, error status, or a body that is not JSON.

    Attributes:
        status: the HTTP status (``None`` when no response came).
        retryable: whether trying again may help (connection problems, timeouts, 408/409/425/429/5xx).
        retry_after: seconds the server asked to wait (``Retry-After``), if any.
        body: the decoded JSON error body, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        body: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.body = body


def _opener(url: str) -> urllib.request.OpenerDirector:
    # loopback never goes through an http_proxy from the environment
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in LOOPBACK:
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _error_message(body: dict | None, raw: bytes) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI: {"error": {"message": ..., "type": ...}}
            return str(error.get("message") or error)
        if error is not None:
            return str(error)
    return raw[:300].decode("utf-8", "replace").strip()


def request_json(url: str, payload: dict | None = None, *, timeout: float, headers: dict | None = None) -> dict:
    """``GET`` (no payload) or ``POST`` JSON to ``url`` and return the decoded JSON response.

    Args:
        timeout: seconds per socket operation (connect, send, each wait for data).
        headers: extra request headers (e.g. ``Authorization``).

    Raises:
        TransportError: no connection, timeout, a status >= 400 (message from the body's ``error``), or a
            response that is not JSON.
    """
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if payload is None else "POST")
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with _opener(url).open(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        raw = e.read() or b""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        retry_after = e.headers.get("Retry-After") if e.headers else None
        try:
            retry_after = None if retry_after is None else max(0.0, float(retry_after))
        except ValueError:  # an HTTP date: use our own backoff
            retry_after = None
        raise TransportError(
            f"HTTP {e.code} from {url}: {_error_message(body, raw)}",
            status=e.code,
            retryable=e.code in RETRYABLE_STATUS,
            retry_after=retry_after,
            body=body,
        ) from None
    except TimeoutError as e:
        raise TransportError(f"no response from {url} within {timeout:g} s", retryable=True) from e
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise TransportError(f"no connection to {url} within {timeout:g} s", retryable=True) from e
        if isinstance(reason, ConnectionRefusedError):
            raise TransportError(
                f"cannot connect to {url}: connection refused (is the server running?)", retryable=True
            ) from e
        raise TransportError(f"cannot reach {url}: {reason}", retryable=True) from e
    except (ConnectionError, http.client.HTTPException, OSError) as e:  # reset, closed mid-response
        raise TransportError(f"connection to {url} failed: {type(e).__name__}: {e}", retryable=True) from e
    try:
        return json.loads(raw)
    except ValueError:
        raise TransportError(f"{url} answered with a body that is not JSON: {raw[:200]!r}", retryable=True) from None


def with_retries(
    call: Callable[[], T], retries: int, backoff: float, max_backoff: float = 30.0, sleep=time.sleep
) -> tuple[T, int]:
    """Run ``call`` with up to ``retries`` more tries on retryable :class:`TransportError` s.

    The wait before try ``k + 1`` is the server's ``Retry-After`` when given, else ``backoff * 2**k`` (exponential
    backoff), capped at ``max_backoff``. Returns ``(result, attempts)``; re-raises the last error.
    """
    for attempt in range(retries + 1):
        try:
            return call(), attempt + 1
        except TransportError as e:
            if not e.retryable or attempt == retries:
                e.attempts = attempt + 1
                raise
            delay = e.retry_after if e.retry_after is not None else backoff * 2**attempt
            sleep(min(delay, max_backoff))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------- the reward
def _base_url(url: str) -> str:
    url = str(url).strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RewardSpecError(f"remote needs an http(s) URL such as http://127.0.0.1:8765, got {url!r}")
    return url


def _call(url: str, payload: dict | None, timeout: float, retries: int, backoff: float) -> dict:
    result, _ = with_retries(lambda: request_json(url, payload, timeout=timeout), retries, backoff)
    return result


def fetch_spec(url: str, timeout: float = 10.0, retries: int = 0, backoff: float = 0.5) -> RewardSpec:
    """The spec of the reward served at ``url`` (``GET /spec``).

    Raises:
        RewardError: no server answers there (the message says how to start one), or it speaks another protocol.
    """
    try:
        info = _call(_base_url(url) + "/spec", None, timeout, retries, backoff)
    except TransportError as e:
        raise RewardError(
            f"remote reward: {e}. Start a server with `visalign serve-reward --reward SPEC "
            "--port PORT` and pass its URL"
        ) from None
    if not isinstance(info, dict) or info.get("protocol") != PROTOCOL:
        raise RewardError(f"{url} does not speak {PROTOCOL!r}; is it a visalign reward server of the same version?")
    return spec_from_json(info["spec"])


class RemoteReward(Reward):
    """A reward computed by a ``visalign serve-reward`` server.

    Args:
        url: the server's base URL (``http://127.0.0.1:8765``).
        timeout: seconds per socket operation of each request.
        encoding: media encoding on the wire: ``"png"`` (8-bit, default), ``"f16"`` or ``"f32"`` (exact).
        on_error: ``"raise"`` (default) or ``"invalid"`` (``valid=False``, NaN scores) when the server cannot be
            reached or fails.
        retries: extra tries on connection problems, timeouts and 5xx answers (with exponential backoff).
        backoff: first wait between tries, in seconds.
        batch_size: media per request.

    Raises:
        RewardError: the server cannot be reached to read its spec (the message says how to start one).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        encoding: str = "png",
        on_error: str = "raise",
        retries: int = 0,
        backoff: float = 0.5,
        batch_size: int = 16,
    ):
        if encoding not in ENCODINGS:
            raise RewardSpecError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if on_error not in ON_ERROR:
            raise RewardSpecError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if timeout <= 0 or retries < 0:
            raise RewardSpecError(f"timeout must be > 0 and retries >= 0, got {timeout} and {retries}")
        url = _base_url(url)
        served = fetch_spec(url, timeout, retries, backoff)
        about = f"{served.name} served at {url}" + (f": {served.description}" if served.description else "")
        super().__init__(replace(served, name=f"remote({url})", differentiable=False, description=about), batch_size)
        self.url, self.served_spec = url, served
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.encoding, self.on_error = encoding, on_error
        self._component_names: list[str] = []
        self._server = None  # a server this reward owns (random_remote), closed with it

    def _request(self, path: str, payload: dict | None = None) -> dict:
        return _call(self.url + path, payload, self.timeout, self.retries, self.backoff)

    def health(self) -> dict:
        """``GET /health`` of the server."""
        return self._request("/health")

    def score_batch(self, media: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        payload = {"media": encode_media(media, self.encoding), "prompts": prompts}
        n = media.shape[0]
        try:
            out = output_from_json(self._request("/score", payload))
        except TransportError as e:
            if e.status == 400:
                raise RewardInputError(
                    f"{self.spec.name}: the server rejected the input: {_error_message(e.body, b'')}"
                ) from None
            if self.on_error == "raise":
                raise RewardError(f"{self.spec.name}: {e}") from None
            nan = torch.full((n,), math.nan)
            return RewardOutput(nan, {k: nan.clone() for k in self._component_names}, torch.zeros(n, dtype=torch.bool))
        except (KeyError, TypeError, ValueError) as e:
            raise RewardError(f"{self.spec.name}: malformed /score response ({type(e).__name__}: {e})") from None
        if len(out) != n:
            raise RewardError(f"{self.spec.name}: the server returned {len(out)} scores for {n} media")
        self._component_names = list(out.components)
        return out

    def close(self) -> None:
        """Stop the server this reward started itself (:func:`random_remote`); no-op otherwise."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def extra_repr(self) -> str:
        return f"url={self.url!r}, served={self.served_spec.name!r}, encoding={self.encoding!r}"


def load_remote(
    url: str,
    timeout: float = 60.0,
    encoding: str = "png",
    on_error: str = "raise",
    retries: int = 0,
    batch_size: int = 16,
) -> RemoteReward:
    """``remote:URL`` (or ``remote(URL, encoding=f32, timeout=10)``): a reward served by ``visalign serve-reward``."""
    return RemoteReward(
        url, timeout=timeout, encoding=encoding, on_error=on_error, retries=retries, batch_size=batch_size
    ).freeze()


def random_remote(size: str = "tiny", reward: str = "clip", encoding: str = "f32", timeout: float = 30.0):
    """A random-weight ``reward`` served in a background thread on a free loopback port, and its remote.

    The server stops when the returned reward is closed or garbage collected.
    """
    from .registry import build_random_reward
    from .serving import RewardServer

    server = RewardServer(build_random_reward(reward, size)).start()
    remote = RemoteReward(server.url, timeout=timeout, encoding=encoding).freeze()
    remote._server = server
    weakref.finalize(remote, server.close)
    return remote
