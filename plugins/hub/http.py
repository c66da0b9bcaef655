"""Every request to the Hub bounded in time and size, and huggingface_hub's chatter kept quiet.

huggingface_hub sends many of its requests (model info, file listings) with no timeout at all, so
a Hub that accepts the connection and never answers hangs a merge forever; and it reads a JSON
answer whole, so an endless one fills the memory. Two event hooks on huggingface_hub's shared
HTTP session (its public ``get_session()``; a session the user configured keeps its settings)
fix both for every request it makes, whichever function makes it:

- each request gets a timeout for connecting and for every read (``FUSION_HUB_TIMEOUT``
  seconds, default 60; a shorter one huggingface_hub sets stays), and once a request to a host
  has gone unanswered that long, the retries huggingface_hub would make (five, with growing
  pauses between them, for every file) fail at once with :class:`HubStalled`;
- an answer that is not a file download may be at most ``FUSION_HUB_MAX_METADATA`` bytes
  (default 32 MiB: a model info is a few MB), and a download that announces no length may be
  no longer than the size the Hub gave for the file, else :class:`ResponseTooLarge`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from typing import Any, Iterator

TIMEOUT_ENV = "FUSION_HUB_TIMEOUT"
MAX_METADATA_ENV = "FUSION_HUB_MAX_METADATA"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_METADATA = 32 << 20


class HubStalled(TimeoutError):
    """A host that left a request unanswered for the whole timeout: asking again is futile."""

    def __init__(self, origin: str, limit: float):
        super().__init__(f"{origin} did not answer within {limit:g} s")


class ResponseTooLarge(Exception):
    """A response longer than fusion accepts for it (an endless or absurd body)."""

    def __init__(self, url: str, limit: int):
        super().__init__(f"the response to {url} is longer than {limit} bytes")
        self.url = url
        self.limit = limit


def _number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def timeout() -> float:
    return _number(TIMEOUT_ENV, DEFAULT_TIMEOUT)


def max_metadata() -> int:
    return int(_number(MAX_METADATA_ENV, DEFAULT_MAX_METADATA))


#: Requests sent and not answered (by id): their host and when they were sent; and when each
#: host last answered anything. A host is stalled when a request to it has waited the whole
#: timeout and the host has answered nothing since it was sent (a request that failed at once,
#: refused or reset, is followed by answers to its retries).
_pending: dict[int, tuple[str, float]] = {}
_answered: dict[str, float] = {}
_pending_lock = threading.Lock()


def _origin(url: Any) -> str:
    return f"{url.scheme}://{url.host}:{url.port}"


def _bound_time(request: Any) -> None:
    limit = timeout()
    origin, now = _origin(request.url), time.monotonic()
    with _pending_lock:
        heard = _answered.get(origin, float("-inf"))
        if any(o == origin and now - t >= limit and heard < t for o, t in _pending.values()):
            raise HubStalled(origin, limit)
        _pending[id(request)] = (origin, now)
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        k: limit if given.get(k) is None else min(given[k], limit) for k in ("connect", "read", "write", "pool")
    }


@functools.lru_cache(maxsize=None)
def _limited_stream() -> type:
    import httpx2  # huggingface_hub's HTTP library, imported only once a request is made

    class Limited(httpx2.SyncByteStream):
        """A response body that stops with ResponseTooLarge after ``limit`` bytes."""

        def __init__(self, stream: Any, limit: int, url: str):
            self.stream, self.limit, self.url = stream, limit, url

        def __iter__(self) -> Iterator[bytes]:
            seen = 0
            for chunk in self.stream:
                seen += len(chunk)
                if seen > self.limit:
                    raise ResponseTooLarge(self.url, self.limit)
                yield chunk

        def close(self) -> None:
            self.stream.close()

    return Limited


def _bound_size(response: Any) -> None:
    with _pending_lock:
        _pending.pop(id(response.request), None)
        _answered[_origin(response.request.url)] = time.monotonic()
    headers = response.headers
    is_file = "/resolve/" in response.request.url.path or response.request.url.host != _api_host()
    length = headers.get("Content-Length")
    if is_file and length is not None:
        return  # the HTTP library reads no more than the announced length
    limit = max_metadata()
    if is_file and (headers.get("X-Linked-Size") or "").isdigit():
        limit = max(limit, int(headers["X-Linked-Size"]) + (1 << 16))
    url = str(response.request.url)
    if length is not None and length.isdigit() and int(length) > limit:
        raise ResponseTooLarge(url, limit)
    response.stream = _limited_stream()(response.stream, limit, url)


def _api_host() -> str:
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    return urlsplit(constants.ENDPOINT).hostname or ""


def install() -> None:
    """Add the hooks to huggingface_hub's current session (once; a new session gets them on the
    next call), at the start of each resolution."""
    from huggingface_hub.utils import get_session

    with _pending_lock:
        _pending.clear()  # a new resolution: earlier silence is forgiven
        _answered.clear()
    session = get_session()
    hooks = session.event_hooks
    if _bound_time not in hooks.get("request", []):
        hooks.setdefault("request", []).append(_bound_time)
        hooks.setdefault("response", []).append(_bound_size)
        session.event_hooks = hooks


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """huggingface_hub's warnings (a dozen "Retrying in 1s" lines before a failure) kept out of
    the output while a model resolves; the failure itself becomes fusion's one sentence.
    ``HF_HUB_VERBOSITY`` set by the user keeps them."""
    if os.environ.get("HF_HUB_VERBOSITY"):
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
