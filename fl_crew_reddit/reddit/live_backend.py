"""Reddit's live API as a `RedditBackend` (REDDIT_BACKEND=live): PRAW with read-only, application-only OAuth.

Why each part is here:
- One retry policy. Every tool call runs through `LiveRedditBackend._call`, which retries a 429 rate limit and the
  transient failures (5xx, connection errors, timeouts, an expired token) with exponential backoff and jitter, at
  most `max_retries` times, logging each retry. prawcore's own inner retries are switched off, so attempts do not
  multiply and the bound is the one the settings say.
- Clear permanent errors. Wrong credentials (401/403 or an OAuth error from the token endpoint) raise
  `RedditAuthError`, a ValueError naming REDDIT_CLIENT_ID / REDDIT_CLIENT_SECRET and never their values; a banned,
  private, quarantined or missing subreddit, post or user raises `LookupError` (an MCP tool error with its message).
- Pure mapping. `post_from_api` / `comment_from_api` turn the API's fields (a dict, or a PRAW object's `vars`) into
  the models of `schemas.py`; media go to `RedditPost.image_urls` (image posts, gallery items in order, a video's
  preview image) and `video_url` (v.redd.it fallback MP4). Deleted and removed records keep Reddit's
  `[deleted]` / `[removed]` text and a None author, as in the dumps, so preprocessing counts them like any other.
  Whatever cannot be mapped is skipped and counted by reason in `skipped`.
"""
from __future__ import annotations

import html
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlparse

import praw
import prawcore
from praw.models import MoreComments
from pydantic import ValidationError

from fl_crew_reddit.reddit.backends import SORTS, RedditBackend, Sort, _bare_id, _normalize_subreddit
from fl_crew_reddit.reddit.schemas import (
    PostComments,
    RedditComment,
    RedditPost,
    SearchResults,
    SubredditInfo,
    SubredditPosts,
    UserData,
)
from fl_crew_reddit.reddit.settings import DEFAULT_REDDIT_USER_AGENT, RedditSourceSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_BASE_S = 1.0          # wait before the first retry; doubles with each further retry
BACKOFF_MAX_S = 60.0          # no single wait is longer, a server's Retry-After included
COMMENT_SORT = "confidence"   # Reddit's "best": with a comment limit, the thread's best comments come first
MAX_COMMENTS_PER_REQUEST = 500  # the most comments /comments/{id} returns in one answer
MORE_COMMENTS_REQUESTS = 8    # "load more comments" links followed per post (one request each)
INFO_SAMPLE_POSTS = 100       # subreddit_info counts over the newest page: the API reports no totals
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
ACCESS_TOKEN_PATH = "/api/v1/access_token"

# Reasons a record or a part of one is skipped; the keys of `LiveRedditBackend.skipped`.
SKIP_POST_UNMAPPABLE = "post_unmappable"
SKIP_COMMENT_UNMAPPABLE = "comment_unmappable"
SKIP_DUPLICATE_POST = "duplicate_id"                            # the same post on two listing pages
SKIP_GALLERY_ITEM_UNAVAILABLE = "gallery_item_unavailable"      # status failed / unprocessed, or no metadata
SKIP_GALLERY_ITEM_NOT_AN_IMAGE = "gallery_item_not_an_image"    # a video inside a gallery
SKIP_COMMENTS_NOT_EXPANDED = "comments_behind_more_links"       # past MORE_COMMENTS_REQUESTS or the limit

_CREDENTIALS = "REDDIT_CLIENT_ID / REDDIT_CLIENT_SECRET"
_APPS_URL = "https://www.reddit.com/prefs/apps"


class RedditAuthError(ValueError):
    """Reddit refused the app's credentials (a settings error, like ConfigError); the message names the settings,
    never their values."""


class RedditUnavailableError(RuntimeError):
    """A Reddit API call still failed (429 or transient) after every allowed retry."""


# ---------------------------------------------------------------------------------------------- mapping
def _fields(obj: Any) -> Mapping[str, Any]:
    """The API fields of a PRAW object (its attributes set from the JSON), or a plain dict as is."""
    return obj if isinstance(obj, Mapping) else vars(obj)


def _author(value: Any) -> str | None:
    """A username, or None for deleted accounts (PRAW already turns '[deleted]' into None)."""
    name = getattr(value, "name", value)
    return None if name in (None, "", "[deleted]") else str(name)


def _subreddit(value: Any) -> str:
    return str(getattr(value, "display_name", value) or "")


def _id(fields: Mapping[str, Any], name: str) -> str:
    """An id field as the API gives it: a string; anything else is refused (TypeError), never turned into one."""
    value = fields[name]
    if type(value) is not str:
        raise TypeError(f"{name} is a {type(value).__name__}, not a string")
    return value


def _epoch(value: Any) -> int:
    return int(float(value or 0))


def _url(value: Any) -> str | None:
    """A media URL as the API gives it; unescaped in case the response was fetched without raw_json=1."""
    return html.unescape(value) if isinstance(value, str) and value.startswith(("http://", "https://")) else None


def _is_image_url(url: str | None) -> bool:
    return bool(url) and urlparse(url).path.lower().endswith(IMAGE_SUFFIXES)


def _preview_image(data: Mapping[str, Any]) -> str | None:
    images = (data.get("preview") or {}).get("images") or []
    return _url(((images[0] or {}).get("source") or {}).get("url")) if images else None


def _gallery_images(data: Mapping[str, Any], skipped: Counter) -> list[str]:
    """Each gallery item's full-size image URL, in the gallery's order; unusable items counted."""
    metadata = data.get("media_metadata") or {}
    urls = []
    for item in (data.get("gallery_data") or {}).get("items") or []:
        entry = metadata.get(item.get("media_id")) or {}
        if entry.get("status") != "valid":
            skipped[SKIP_GALLERY_ITEM_UNAVAILABLE] += 1
            continue
        source = entry.get("s") or {}
        url = _url(source.get("u")) if entry.get("e") == "Image" else \
            _url(source.get("gif") or source.get("u")) if entry.get("e") == "AnimatedImage" else None
        if url:
            urls.append(url)
        else:
            skipped[SKIP_GALLERY_ITEM_NOT_AN_IMAGE] += 1
    return urls


def _reddit_video(data: Mapping[str, Any]) -> str | None:
    for key in ("secure_media", "media"):
        video = ((data.get(key) or {}).get("reddit_video") or {}).get("fallback_url")
        if video:
            return _url(video)
    return None


def media_from_api(data: Mapping[str, Any]) -> tuple[list[str], str | None, Counter]:
    """(image URLs, video URL, skipped parts) of a post: a direct image, a gallery, a Reddit video and its preview.

    A crosspost carries its media in `crosspost_parent_list[0]`; that is read when the post itself has none.
    """
    skipped: Counter = Counter()
    has_own = data.get("is_gallery") or data.get("is_video") or data.get("post_hint") or _is_image_url(data.get("url"))
    parents = data.get("crosspost_parent_list") or []
    source = parents[0] if not has_own and parents and isinstance(parents[0], Mapping) else data
    images: list[str] = []
    if source.get("is_gallery") or source.get("gallery_data"):
        images = _gallery_images(source, skipped)
    elif source.get("post_hint") == "image" or _is_image_url(_url(source.get("url"))):
        url = _url(source.get("url"))
        images = [url] if url else []
    video = _reddit_video(source)
    if not images and (video or source.get("is_video") or source.get("post_hint") in ("hosted:video", "rich:video")):
        preview = _preview_image(source)
        images = [preview] if preview else []
    return images, video, skipped


def post_from_api(data: Any) -> tuple[RedditPost, Counter]:
    """A submission's API fields (dict or PRAW Submission) as a RedditPost, with the media parts it skipped."""
    fields = _fields(data)
    images, video, skipped = media_from_api(fields)
    post = RedditPost(
        id=_id(fields, "id"), subreddit=_subreddit(fields.get("subreddit")), title=fields["title"],
        selftext=fields.get("selftext") or "", author=_author(fields.get("author")),
        created_utc=_epoch(fields.get("created_utc")), score=int(fields.get("score") or 0),
        num_comments=int(fields.get("num_comments") or 0), url=fields.get("url") or None,
        permalink=fields.get("permalink") or None, is_video=bool(fields.get("is_video")),
        image_urls=images, video_url=video)
    return post, skipped


def comment_from_api(data: Any) -> RedditComment:
    """A comment's API fields (dict or PRAW Comment) as a RedditComment; a deleted one keeps '[deleted]'."""
    fields = _fields(data)
    return RedditComment(
        id=_id(fields, "id"), link_id=_id(fields, "link_id"), parent_id=_id(fields, "parent_id"),
        subreddit=_subreddit(fields.get("subreddit")), body=fields.get("body") or "",
        author=_author(fields.get("author")), created_utc=_epoch(fields.get("created_utc")),
        score=int(fields.get("score") or 0), distinguished=fields.get("distinguished") or None,
        stickied=bool(fields.get("stickied")))


def thread_order(top_level: list[Any]) -> list[Any]:
    """Comments of a PRAW comment forest depth first (each parent before its replies); MoreComments left out."""
    ordered, stack = [], list(reversed(list(top_level)))
    while stack:
        comment = stack.pop()
        if isinstance(comment, MoreComments):
            continue
        ordered.append(comment)
        stack.extend(reversed(list(comment.replies)))
    return ordered


# ---------------------------------------------------------------------------------------------- errors and retries
def backoff_seconds(retry: int, rng: random.Random, retry_after: float | None = None,
                    base: float = BACKOFF_BASE_S, cap: float = BACKOFF_MAX_S) -> float:
    """Wait before retry number `retry` (0-based): exponential with equal jitter, at least Retry-After, at most cap."""
    ceiling = min(cap, base * 2 ** retry)
    wait = ceiling / 2 + rng.uniform(0, ceiling / 2)
    if retry_after:
        wait = max(wait, retry_after)
    return min(wait, cap)


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(error: Exception) -> float | None:
    value = getattr(getattr(error, "response", None), "headers", {}).get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _is_token_request(error: Exception) -> bool:
    return ACCESS_TOKEN_PATH in str(getattr(getattr(error, "response", None), "url", "") or "")


def _is_transient(error: Exception) -> bool:
    if isinstance(error, prawcore.RequestException):  # no answer at all: connection refused / reset, timeouts
        return isinstance(error.original_exception, prawcore.Session.RETRY_EXCEPTIONS)
    if isinstance(error, prawcore.InvalidToken):      # the token expired; prawcore dropped it, the retry gets a new one
        return True
    status = _status(error)
    return status is not None and (status in (408, 429) or status >= 500)


def _is_auth_failure(error: Exception) -> bool:
    if isinstance(error, prawcore.OAuthException):
        return True
    return _is_token_request(error) and _status(error) in (400, 401, 403)


def _auth_message(error: Exception) -> str:
    detail = f"OAuth error {error.error!r}" if isinstance(error, prawcore.OAuthException) \
        else f"HTTP {_status(error)}"
    return (f"Reddit rejected {_CREDENTIALS} ({detail} from {ACCESS_TOKEN_PATH}): check the id (under the app's name) "
            f"and the secret of your 'script' app at {_APPS_URL}")


def _reason(error: Exception) -> str:
    """Reddit's `reason` field of an error body (banned, private, quarantined, ...), or ''."""
    try:
        body = error.response.json()
    except (AttributeError, ValueError):
        return ""
    return str(body.get("reason") or "") if isinstance(body, dict) else ""


def _unavailable_message(error: Exception, what: str) -> str | None:
    """A sentence for a permanent 'not there / not for you' answer, or None if the error is something else."""
    reason = _reason(error)
    if isinstance(error, prawcore.Redirect):
        return f"{what} does not exist (Reddit redirected to {error.path})"
    if isinstance(error, prawcore.NotFound):
        return f"{what} is {reason} (404)" if reason else f"{what} does not exist (404)"
    if isinstance(error, (prawcore.Forbidden, prawcore.InsufficientScope)):
        return f"{what} is {reason} (403)" if reason else f"{what} is not accessible with app-only auth (403)"
    if isinstance(error, prawcore.UnavailableForLegalReasons):
        return f"{what} is unavailable for legal reasons (451)"
    return None


def _describe(error: Exception) -> str:
    status = _status(error)
    if status is not None:
        return f"HTTP {status}"
    original = getattr(error, "original_exception", None)
    return type(original or error).__name__


@dataclass(frozen=True)
class _NoInnerRetry(prawcore.sessions.FiniteRetryStrategy):
    """prawcore's retry strategy with no retries: `LiveRedditBackend._call` is the one retry policy."""

    DEFAULT_RETRIES: ClassVar[int] = 0
    retries: int = 0


# ---------------------------------------------------------------------------------------------- the backend
class LiveRedditBackend(RedditBackend):
    """Reddit's API through PRAW, read-only with application-only OAuth (client id + secret, no user login).

    `subreddits` are what `list_subreddits` answers (SUBREDDITS); other subreddits can still be asked for.
    `retries` counts retries by cause (e.g. `HTTP 429`), `skipped` the records or parts left out by reason.
    `sleep` and `rng` are parameters so that tests can record the waits instead of waiting.
    """

    def __init__(self, client_id: str, client_secret: str, *, subreddits: list[str],
                 user_agent: str = DEFAULT_REDDIT_USER_AGENT, max_retries: int = 4, timeout_s: float = 16.0,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        if not (client_id or "").strip() or not (client_secret or "").strip():
            raise RedditAuthError(f"REDDIT_BACKEND=live needs {_CREDENTIALS}: create a 'script' app at {_APPS_URL}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries}")
        self.subreddits = [_normalize_subreddit(name) for name in subreddits if _normalize_subreddit(name)]
        self.max_retries = max_retries
        self.retries: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._reddit = praw.Reddit(
            client_id=client_id.strip(), client_secret=client_secret.strip(), user_agent=user_agent,
            check_for_updates=False,  # no package-index call at start
            check_for_async=False,    # the MCP server calls backends from its event loop on purpose, like the dump's
            requestor_kwargs={"timeout": timeout_s})
        for core in {id(c): c for c in (self._reddit._read_only_core, self._reddit._core) if c}.values():
            core._retry_strategy_class = _NoInnerRetry  # noqa: SLF001 (see the module docstring)

    @classmethod
    def from_settings(cls, settings: RedditSourceSettings, **kwargs: Any) -> LiveRedditBackend:
        """The backend `settings` describe; `kwargs` (sleep, rng) pass through, for tests."""
        return cls(settings.credentials.client_id, settings.credentials.client_secret,
                   subreddits=list(settings.subreddits), user_agent=settings.user_agent,
                   max_retries=settings.max_retries, timeout_s=settings.timeout_s, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join('r/' + name for name in self.subreddits) or 'no subreddits'})"

    # ------------------------------------------------------------------ calls
    def _call(self, what: str, fetch: Callable[[], T]) -> T:
        """Run `fetch` (which may make several requests) until it succeeds, a permanent error, or the retry cap."""
        for attempt in range(self.max_retries + 1):
            try:
                return fetch()
            except prawcore.PrawcoreException as error:
                if _is_auth_failure(error):
                    raise RedditAuthError(_auth_message(error)) from error
                message = _unavailable_message(error, what)
                if message:
                    raise LookupError(message) from error
                if not _is_transient(error):
                    raise
                cause = _describe(error)
                if attempt == self.max_retries:
                    raise RedditUnavailableError(f"Reddit API: {what} failed after {attempt + 1} attempts "
                                                 f"(last: {cause})") from error
                wait = backoff_seconds(attempt, self._rng, _retry_after(error))
                self.retries[cause] += 1
                logger.warning("Reddit API: %s on %s; retry %d/%d in %.1f s", cause, what, attempt + 1,
                               self.max_retries, wait)
                self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def verify_credentials(self) -> None:
        """Fetch the app-only token now, so that wrong credentials fail at start with one clear message."""
        self._call("the access token", self._reddit.auth.scopes)

    def _posts(self, items, what: str) -> list[RedditPost]:
        """Map listing items; a post seen on an earlier page (new posts shift the pages) is counted, not repeated."""
        posts, seen = [], set()
        for item in items:
            try:
                post, skipped = post_from_api(item)
            except (KeyError, TypeError, ValueError, ValidationError) as error:
                self._skip(SKIP_POST_UNMAPPABLE, what, getattr(item, "id", "?"), error)
                continue
            if post.id in seen:
                self._skip(SKIP_DUPLICATE_POST, what, post.id, None)
                continue
            seen.add(post.id)
            for reason, count in skipped.items():
                self._skip(reason, what, post.id, None, count)
            posts.append(post)
        return posts

    def _comments(self, items, what: str) -> list[RedditComment]:
        comments = []
        for item in items:
            try:
                comments.append(comment_from_api(item))
            except (KeyError, TypeError, ValueError, ValidationError) as error:
                self._skip(SKIP_COMMENT_UNMAPPABLE, what, getattr(item, "id", "?"), error)
        return comments

    def _skip(self, reason: str, what: str, record_id: str, error: Exception | None, count: int = 1) -> None:
        self.skipped[reason] += count
        detail = f": {type(error).__name__}: {error}" if error else ""
        logger.warning("Reddit API %s: %s skipped x%d (%s)%s", what, record_id, count, reason, detail)

    # ------------------------------------------------------------------ the six tools
    def list_subreddits(self) -> list[str]:
        return list(self.subreddits)

    def subreddit_posts(self, subreddit: str, limit: int = 25, sort: Sort = "new") -> SubredditPosts:
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
        name, limit = _normalize_subreddit(subreddit), max(limit, 0)
        what = f"r/{name}"

        def fetch() -> list[RedditPost]:
            listing = self._reddit.subreddit(name)
            items = listing.top(time_filter="all", limit=limit) if sort == "top" else \
                getattr(listing, sort)(limit=limit)
            return self._posts(list(items), what)

        before = Counter(self.skipped)
        posts = self._call(what, fetch) if limit else []
        return SubredditPosts(subreddit=name, posts=posts, skipped=dict(Counter(self.skipped) - before))

    def search_posts(self, query: str, subreddit: str | None = None, limit: int = 25) -> SearchResults:
        if not re.findall(r"\w+", query):
            raise ValueError("query must contain at least one word")
        name = _normalize_subreddit(subreddit) if subreddit else None
        scope = name or "+".join(self.subreddits) or "all"
        what = f"search {query!r} in r/{scope}"

        def fetch() -> list[RedditPost]:
            items = self._reddit.subreddit(scope).search(query, sort="relevance", time_filter="all",
                                                         limit=max(limit, 0))
            return self._posts(list(items), what)

        before = Counter(self.skipped)
        posts = self._call(what, fetch) if limit > 0 else []
        return SearchResults(query=query, subreddit=name, posts=posts, skipped=dict(Counter(self.skipped) - before))

    def post_comments(self, post_id: str, limit: int = 100) -> PostComments:
        bare = _bare_id(post_id, "t3_")
        what = f"post {bare}"

        def fetch() -> tuple[RedditPost, list[RedditComment]]:
            submission = self._reddit.submission(id=bare)  # a fresh object each attempt: replace_more runs once
            submission.comment_sort = COMMENT_SORT
            submission.comment_limit = min(max(limit, 1), MAX_COMMENTS_PER_REQUEST)
            forest = submission.comments  # the request
            have = sum(1 for item in forest.list() if not isinstance(item, MoreComments))
            left = forest.replace_more(limit=0 if have >= limit else MORE_COMMENTS_REQUESTS)
            not_expanded = sum(max(item.count, 0) for item in left)
            posts = self._posts([submission], what)
            if not posts:
                raise LookupError(f"{what} could not be read (see the log)")
            if not_expanded:
                self.skipped[SKIP_COMMENTS_NOT_EXPANDED] += not_expanded
                logger.info("Reddit API %s: %d comments behind 'load more' links not fetched", what, not_expanded)
            return posts[0], self._comments(thread_order(forest), what)

        before = Counter(self.skipped)
        post, comments = self._call(what, fetch)
        # what this thread left out (unreadable comments, comments behind "load more" links) travels with it
        return PostComments(post=post, comments=comments[:max(limit, 0)], total_comments=len(comments),
                            skipped=dict(Counter(self.skipped) - before))

    def user_data(self, username: str, limit: int = 25) -> UserData:
        name = username.strip().removeprefix("/u/").removeprefix("u/")
        what, limit = f"u/{name}", max(limit, 0)

        def fetch() -> tuple[list[RedditPost], list[RedditComment]]:
            redditor = self._reddit.redditor(name)
            if getattr(redditor, "is_suspended", False):  # reading an attribute fetches /user/{name}/about
                raise LookupError(f"{what} is suspended")
            if not limit:
                return [], []
            return (self._posts(list(redditor.submissions.new(limit=limit)), what),
                    self._comments(list(redditor.comments.new(limit=limit)), what))

        posts, comments = self._call(what, fetch)
        return UserData(username=username, posts=posts, comments=comments)

    def subreddit_info(self, subreddit: str) -> SubredditInfo:
        """About the subreddit, with counts and time span over its newest INFO_SAMPLE_POSTS posts: Reddit's API
        reports no total of posts or comments."""
        name = _normalize_subreddit(subreddit)
        what = f"r/{name}"

        def fetch() -> tuple[str, str, list[RedditPost], Counter]:
            about = self._reddit.subreddit(name)
            description = getattr(about, "public_description", "") or ""  # fetches /r/{name}/about
            before = Counter(self.skipped)
            posts = self._posts(list(about.new(limit=INFO_SAMPLE_POSTS)), what)
            return str(about.display_name), description, posts, Counter(self.skipped) - before

        display_name, description, posts, skipped = self._call(what, fetch)
        times = [post.created_utc for post in posts]
        return SubredditInfo(name=display_name, num_posts=len(posts),
                             num_comments=sum(post.num_comments for post in posts),
                             first_created_utc=min(times) if times else None,
                             last_created_utc=max(times) if times else None,
                             description=description, skipped=dict(skipped))

