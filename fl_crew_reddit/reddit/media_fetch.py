"""Download one image of a live Reddit post, bounded in size and time, or say in one word why not.

The preprocessing stage calls `fetch_image` for each URL in `RedditPost.image_urls` (live backend) and counts
each `MediaFetchError.reason` as a skip; decoding and verifying the bytes (Pillow) happens there, not here.
"""
from __future__ import annotations

import time
from urllib.parse import urlparse

import requests
import urllib3

from fl_crew_reddit.reddit.settings import DEFAULT_REDDIT_USER_AGENT

# Why an image was not fetched; the values of `MediaFetchError.reason`.
TOO_LARGE = "too_large"          # Content-Length or the streamed body is above max_bytes
NOT_AN_IMAGE = "not_an_image"    # Content-Type is not image/* (an HTML page, a video), or the body is empty
TIMEOUT = "timeout"              # connect / read timeout, or the whole download took longer than timeout_s
HTTP_ERROR = "http_error"        # a non-2xx status, a connection error, or a URL that is not http(s)
FETCH_SKIP_REASONS = (TOO_LARGE, NOT_AN_IMAGE, TIMEOUT, HTTP_ERROR)

CHUNK_BYTES = 64 * 1024


class MediaFetchError(Exception):
    """An image URL gave no usable bytes; `reason` is one of FETCH_SKIP_REASONS, `message` says what happened."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _is_timeout(error: requests.RequestException) -> bool:
    return isinstance(error, requests.Timeout) or any(isinstance(arg, urllib3.exceptions.TimeoutError)
                                                      for arg in error.args)


def fetch_image(url: str, *, max_bytes: int, timeout_s: float, session: requests.Session | None = None) -> bytes:
    """The bytes behind `url` when it answers 2xx with an image/* content type within `max_bytes` and `timeout_s`.

    Raises MediaFetchError(reason, message) otherwise. The body is streamed, so a lying or missing Content-Length
    cannot make it read more than `max_bytes` + one chunk; `timeout_s` bounds each socket wait and the whole download.
    """
    if max_bytes <= 0 or timeout_s <= 0:
        raise ValueError(f"max_bytes and timeout_s must be positive (got {max_bytes}, {timeout_s})")
    if urlparse(url).scheme not in ("http", "https"):
        raise MediaFetchError(HTTP_ERROR, f"{url!r} is not an http(s) URL")
    http = session or requests.Session()
    deadline = time.monotonic() + timeout_s
    try:
        # 1. ask, without reading the body yet
        try:
            response = http.get(url, stream=True, timeout=(timeout_s, timeout_s),
                                headers={"User-Agent": DEFAULT_REDDIT_USER_AGENT, "Accept": "image/*"})
        except requests.RequestException as error:
            if _is_timeout(error):
                raise MediaFetchError(TIMEOUT, f"{url}: no answer within {timeout_s:g} s") from error
            raise MediaFetchError(HTTP_ERROR, f"{url}: {type(error).__name__}") from error
        with response:
            # 2. status, type and announced size
            if not 200 <= response.status_code < 300:
                raise MediaFetchError(HTTP_ERROR, f"{url}: HTTP {response.status_code}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not content_type.startswith("image/"):
                raise MediaFetchError(NOT_AN_IMAGE, f"{url}: content type {content_type or 'missing'!r}, not image/*")
            announced = response.headers.get("Content-Length", "")
            if announced.isdigit() and int(announced) > max_bytes:
                raise MediaFetchError(TOO_LARGE, f"{url}: {int(announced)} bytes announced, cap {max_bytes}")
            # 3. stream the body under both caps
            body = bytearray()
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    body += chunk
                    if len(body) > max_bytes:
                        raise MediaFetchError(TOO_LARGE, f"{url}: more than {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise MediaFetchError(TIMEOUT, f"{url}: download took longer than {timeout_s:g} s")
            except requests.RequestException as error:
                if _is_timeout(error):  # requests wraps a streamed read timeout in a ConnectionError
                    raise MediaFetchError(TIMEOUT, f"{url}: read stalled for {timeout_s:g} s") from error
                raise MediaFetchError(HTTP_ERROR, f"{url}: body broke off ({type(error).__name__})") from error
    finally:
        if session is None:
            http.close()
    if not body:
        raise MediaFetchError(NOT_AN_IMAGE, f"{url}: empty body")
    return bytes(body)
