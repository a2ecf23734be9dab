"""A post's media references → stored images: local files or web URLs; images, gallery items, or videos.

A post names its media as `image_paths` (local files, resolved by the snapshot / dump backend), `image_urls` (web
images of a live post: the image, each gallery item, or a video's still preview) and `video_url` (a live video).
Images are normalised and stored by content hash (`images.py`); a video gives VIDEO_KEYFRAMES keyframes
(`video.py`, PyAV; a web video is read by seeking, bounded in time), and a video that cannot be read leaves its
preview image in its place. Web images are fetched through `fl_crew_reddit.reddit.media_fetch` (size cap,
timeout, content-type check). Each reference is
resolved once per run however many examples share it, and every reference that yields nothing is counted by
reason in `dropped` and logged.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from fl_crew_reddit.preprocessing.images import (
    SKIP_IMAGE_BROKEN,
    SKIP_IMAGE_MISSING,
    ImageRejected,
    StoredImage,
    fit_and_encode,
    store_image_bytes,
    store_png,
)
from fl_crew_reddit.preprocessing.video import VideoRejected, is_video_reference, video_keyframes

log = logging.getLogger(__name__)

MAX_IMAGES_PER_POST = 20  # Reddit's own gallery limit; keyframes of one video count as one reference

SKIP_REMOTE_NOT_FETCHED = "remote_image_not_fetched"
SKIP_OVER_IMAGE_CAP = "images_over_per_post_cap"
VIDEO_HOSTS = ("v.redd.it",)

Fetch = Callable[[str], bytes]


@dataclass(frozen=True)
class MediaSettings:
    max_image_size: int = 224
    video_keyframes: int = 4
    video_max_seconds: float = 10.0
    fetch_max_bytes: int = 10_000_000  # defaults as FLCrewRedditConfig's MAX_IMAGE_BYTES, IMAGE_FETCH_TIMEOUT_S
    fetch_timeout_s: float = 15.0

    @classmethod
    def from_settings(cls, settings) -> MediaSettings:
        """From any object with the FLCrewRedditConfig field names (the config itself)."""
        return cls(max_image_size=settings.max_image_size, video_keyframes=settings.video_keyframes,
                   fetch_max_bytes=settings.max_image_bytes, fetch_timeout_s=settings.image_fetch_timeout_s)


def is_web_reference(reference: str) -> bool:
    return urlparse(reference).scheme in ("http", "https")


def is_video(reference: str) -> bool:
    return is_video_reference(urlparse(reference).path if is_web_reference(reference) else reference) or \
        urlparse(reference).netloc.lower() in VIDEO_HOSTS


def web_fetcher(settings: MediaSettings) -> tuple[Fetch | None, type[Exception] | None]:
    """`fetch_image` bound to the settings' limits, and its error type; (None, None) when it is not installed."""
    try:
        from fl_crew_reddit.reddit.media_fetch import MediaFetchError, fetch_image
    except ImportError:
        return None, None

    def fetch(url: str) -> bytes:
        return fetch_image(url, max_bytes=settings.fetch_max_bytes, timeout_s=settings.fetch_timeout_s)

    return fetch, MediaFetchError


class MediaStore:
    """Resolves media references into stored images under `image_dir`, once each; counts skips in `dropped`."""

    def __init__(self, image_dir: Path, settings: MediaSettings, dropped: Counter, *,
                 fetch: Fetch | None = None, fetch_error: type[Exception] | None = None):
        self.image_dir = Path(image_dir)
        self.settings = settings
        self.dropped = dropped
        if fetch is None:
            fetch, fetch_error = web_fetcher(settings)
        self._fetch = fetch
        self._fetch_error = fetch_error or Exception
        self._resolved: dict[str, list[StoredImage]] = {}
        self._said_no_fetcher = False

    def post_images(self, image_paths: list[str], image_urls: list[str] = (),
                    video_url: str | None = None) -> list[StoredImage]:
        """All images of one post, in order and without repeats: its local files (images, a video's keyframes),
        then a web video's keyframes or, when there are none, its web images (gallery items, or the still preview
        that stands in for a video)."""
        images: list[StoredImage] = []

        def add(found: list[StoredImage]) -> None:
            for image in found:
                if image not in images:
                    images.append(image)

        for reference in image_paths:
            add(self._resolve(reference))
        frames = self._resolve(video_url) if video_url else []
        add(frames)
        if not frames:
            for url in image_urls:
                add(self._resolve(url))
        if len(images) > MAX_IMAGES_PER_POST:
            self._skip(SKIP_OVER_IMAGE_CAP, f"a post with {len(images)} images",
                       f"only the first {MAX_IMAGES_PER_POST} kept", count=len(images) - MAX_IMAGES_PER_POST)
            images = images[:MAX_IMAGES_PER_POST]
        return images

    # --- one reference ------------------------------------------------------------------------------------------
    def _resolve(self, reference: str) -> list[StoredImage]:
        if reference not in self._resolved:
            self._resolved[reference] = self._load(reference)
        return self._resolved[reference]

    def _load(self, reference: str) -> list[StoredImage]:
        if is_video(reference):  # a local file, or a web video that PyAV reads by seeking (bounded in time)
            return self._keyframes(reference)
        if is_web_reference(reference):
            data = self._fetch_bytes(reference)
            return self._store(reference, data) if data is not None else []
        try:
            data = Path(reference).read_bytes()
        except FileNotFoundError:
            self._skip(SKIP_IMAGE_MISSING, reference, "no such file")
            return []
        except OSError as error:
            self._skip(SKIP_IMAGE_BROKEN, reference, str(error))
            return []
        return self._store(reference, data)

    def _store(self, reference: str, data: bytes) -> list[StoredImage]:
        try:
            return [store_image_bytes(data, self.image_dir, self.settings.max_image_size)]
        except ImageRejected as rejected:
            self._skip(rejected.reason, reference, str(rejected))
            return []

    def _keyframes(self, reference: str) -> list[StoredImage]:
        source = reference if is_web_reference(reference) else Path(reference)
        if isinstance(source, Path) and not source.is_file():
            self._skip(SKIP_IMAGE_MISSING, reference, "no such file")
            return []
        try:
            frames = video_keyframes(source, self.settings.video_keyframes,
                                     max_seconds=self.settings.video_max_seconds)
        except VideoRejected as rejected:
            self._skip(rejected.reason, reference, str(rejected))
            return []
        stored = [store_png(fit_and_encode(frame, self.settings.max_image_size), self.image_dir) for frame in frames]
        return list(dict.fromkeys(stored))  # two keyframes that look alike are one image

    def _fetch_bytes(self, url: str) -> bytes | None:
        if self._fetch is None:
            if not self._said_no_fetcher:
                log.warning("Web images are not fetched: fl_crew_reddit.reddit.media_fetch is not available; each "
                            "is counted as %s", SKIP_REMOTE_NOT_FETCHED)
                self._said_no_fetcher = True
            self.dropped[SKIP_REMOTE_NOT_FETCHED] += 1
            return None
        try:
            return self._fetch(url)
        except self._fetch_error as error:
            reason = getattr(error, "reason", type(error).__name__)
            self._skip(f"image_fetch_{reason}", url, str(error))
            return None

    def _skip(self, reason: str, reference: str, detail: str, count: int = 1) -> None:
        self.dropped[reason] += count
        log.warning("Media %s left out (%s): %s", reference, reason, detail)
