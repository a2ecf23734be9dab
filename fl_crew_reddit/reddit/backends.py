"""Where Reddit records come from: a folder in Pushshift dump layout, or the snapshot embedded in the package.

Layout read by `DumpBackend` (the layout of the Pushshift / Arctic Shift monthly dumps split per subreddit)::

    <root>/<subreddit>/submissions.jsonl   one post a line: id, subreddit, title, selftext, created_utc, score,
                                           num_comments, optional author, url, permalink, is_video, image_paths
    <root>/<subreddit>/comments.jsonl      one comment a line: id, link_id (t3_<post id>), parent_id (t3_… or
                                           t1_<comment id>), subreddit, body, created_utc, score, optional author
    <root>/<subreddit>/images/…            optional media, referenced by a post's relative `url` or `image_paths`
    <root>/<subreddit>/about.json          optional: {"public_description": "..."} for `subreddit_info`

Reading is tolerant: a line that is not valid UTF-8 or JSON, a record missing a required field or with a field
of the wrong type, and a duplicate id are skipped and counted by reason in `backend.skipped`; each file with
skipped lines is logged once, naming the first line of each reason. Nothing crashes, nothing is dropped silently.
"""
from __future__ import annotations

import abc
import json
import logging
import math
import re
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ValidationError

from fl_crew_reddit.reddit.schemas import (
    PostComments,
    RedditComment,
    RedditPost,
    SearchResults,
    SubredditInfo,
    SubredditPosts,
    UserData,
)

if TYPE_CHECKING:  # pragma: no cover
    from fl_crew_reddit.config import FLCrewRedditConfig

logger = logging.getLogger(__name__)

Sort = Literal["new", "top", "hot"]
SORTS: tuple[str, ...] = ("new", "top", "hot")

SUBMISSIONS_FILE = "submissions.jsonl"
COMMENTS_FILE = "comments.jsonl"
ABOUT_FILE = "about.json"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"})
SNAPSHOT_DIR = Path(__file__).resolve().parent / "snapshot"

# Reasons a record (or a file, or a media reference) is skipped; the keys of `DumpBackend.skipped`.
SKIP_INVALID_UTF8 = "invalid_utf8"
SKIP_INVALID_JSON = "invalid_json"
SKIP_NOT_AN_OBJECT = "not_an_object"
SKIP_MISSING_FIELDS = "missing_fields"
SKIP_INVALID_FIELDS = "invalid_fields"
SKIP_DUPLICATE_ID = "duplicate_id"
SKIP_EMPTY_FILE = "empty_file"
SKIP_MEDIA_OUTSIDE = "media_outside_folder"
SKIP_MEDIA_MISSING = "media_missing"

_POST_REQUIRED = ("id", "title")
_COMMENT_REQUIRED = ("id", "link_id", "body")
_INT_FIELDS = ("created_utc", "score", "num_comments")
_HOT_EPOCH = 1134028003  # Reddit's "hot" ranking epoch


def _normalize_subreddit(name: str) -> str:
    name = name.strip()
    for prefix in ("/r/", "r/"):
        if name.lower().startswith(prefix):
            name = name[len(prefix):]
    return name.strip("/").lower()


def _bare_id(value: str, prefix: str) -> str:
    """`t3_abc` -> `abc` for prefix `t3_`; an id without the prefix is returned as is."""
    value = value.strip()
    return value[len(prefix):] if value.lower().startswith(prefix) else value


def _hot(post: RedditPost) -> float:
    order = math.log10(max(abs(post.score), 1))
    sign = 1 if post.score > 0 else -1 if post.score < 0 else 0
    return round(sign * order + (post.created_utc - _HOT_EPOCH) / 45000, 7)


class RedditBackend(abc.ABC):
    """Read-only access to Reddit records. Every method returns the models of `schemas.py`.

    Unknown subreddits and posts raise `LookupError` with a message that says what exists.
    """

    @abc.abstractmethod
    def list_subreddits(self) -> list[str]:
        """Names of the subreddits this backend can serve."""

    @abc.abstractmethod
    def subreddit_posts(self, subreddit: str, limit: int = 25, sort: Sort = "new") -> SubredditPosts:
        """Up to `limit` posts of a subreddit, newest first (`new`), best score first (`top`) or by Reddit's
        hot ranking (`hot`)."""

    @abc.abstractmethod
    def search_posts(self, query: str, subreddit: str | None = None, limit: int = 25) -> SearchResults:
        """Posts whose title or text contains every word of `query` (case-insensitive), best matches first."""

    @abc.abstractmethod
    def post_comments(self, post_id: str, limit: int = 100) -> PostComments:
        """A post and up to `limit` of its comments in thread order (a parent before its replies)."""

    @abc.abstractmethod
    def user_data(self, username: str, limit: int = 25) -> UserData:
        """Up to `limit` newest posts and up to `limit` newest comments by a user (empty if none)."""

    @abc.abstractmethod
    def subreddit_info(self, subreddit: str) -> SubredditInfo:
        """Counts and time span of a subreddit."""


@dataclass
class _FileReport:
    """What reading one file skipped: reason -> (count, first line number)."""

    path: Path
    counts: Counter = field(default_factory=Counter)
    first_line: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, line_no: int) -> None:
        self.counts[reason] += 1
        self.first_line.setdefault(reason, line_no)


@dataclass
class _Subreddit:
    name: str  # the folder's name, as spelled on disk
    folder: Path
    posts: dict[str, RedditPost] = field(default_factory=dict)
    comments_by_link: dict[str, list[RedditComment]] = field(default_factory=lambda: defaultdict(list))
    num_comments: int = 0
    posts_by_author: dict[str, list[RedditPost]] = field(default_factory=lambda: defaultdict(list))
    comments_by_author: dict[str, list[RedditComment]] = field(default_factory=lambda: defaultdict(list))
    description: str = ""


class DumpBackend(RedditBackend):
    """Reads a folder in Pushshift dump layout (see the module docstring).

    A subreddit is loaded on first use and kept: posts indexed by id, comments by the post they belong to.
    Subreddit names are case-insensitive (`Sports` on disk answers `sports` and `r/sports`).
    `skipped` maps each skip reason to how many lines (or files, or media references) it dropped.
    """

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"Reddit dump folder {root} does not exist or is not a folder "
                                    f"(expected <subreddit>/{SUBMISSIONS_FILE} inside)")
        self.root = root.resolve()
        self.skipped: Counter[str] = Counter()
        self.reports: list[_FileReport] = []
        self._loaded: dict[str, _Subreddit] = {}
        self._folders: dict[str, Path] | None = None
        self._pending: dict[Path, _FileReport] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # ------------------------------------------------------------------ discovery and loading
    def _discover(self) -> dict[str, Path]:
        if self._folders is None:
            folders: dict[str, Path] = {}
            for child in sorted(self.root.iterdir()):
                if not child.is_dir() or child.name.startswith("."):
                    continue
                if not ((child / SUBMISSIONS_FILE).is_file() or (child / COMMENTS_FILE).is_file()):
                    continue
                key = child.name.lower()
                if key in folders:
                    logger.warning("%s: folders %s and %s differ only in case; using %s",
                                   self.root, folders[key].name, child.name, folders[key].name)
                    continue
                folders[key] = child
            self._folders = folders
        return self._folders

    def list_subreddits(self) -> list[str]:
        return [folder.name for folder in self._discover().values()]

    def _subreddit(self, subreddit: str) -> _Subreddit:
        key = _normalize_subreddit(subreddit)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            folders = self._discover()
            if key not in folders:
                available = ", ".join(self.list_subreddits()) or "none"
                raise LookupError(f"unknown subreddit {subreddit!r} in {self.root}; available: {available}")
            data = self._load(folders[key])
            self._loaded[key] = data
            return data

    def _all_subreddits(self) -> list[_Subreddit]:
        return [self._subreddit(name) for name in self.list_subreddits()]

    def _load(self, folder: Path) -> _Subreddit:
        data = _Subreddit(name=folder.name, folder=folder)
        submissions, comments = folder / SUBMISSIONS_FILE, folder / COMMENTS_FILE
        if submissions.is_file():
            for line_no, post in self._read_records(submissions, RedditPost, _POST_REQUIRED, data):
                if post.id in data.posts:
                    self._report_for(submissions).skip(SKIP_DUPLICATE_ID, line_no)
                    continue
                self._resolve_media(post, data.folder, submissions, line_no)
                data.posts[post.id] = post
                if post.author:
                    data.posts_by_author[post.author.lower()].append(post)
        else:
            logger.warning("%s has no %s: subreddit %s has no posts", folder, SUBMISSIONS_FILE, folder.name)
        if comments.is_file():
            seen: set[str] = set()
            for line_no, comment in self._read_records(comments, RedditComment, _COMMENT_REQUIRED, data):
                if comment.id in seen:
                    self._report_for(comments).skip(SKIP_DUPLICATE_ID, line_no)
                    continue
                seen.add(comment.id)
                data.comments_by_link[_bare_id(comment.link_id, "t3_")].append(comment)
                data.num_comments += 1
                if comment.author:
                    data.comments_by_author[comment.author.lower()].append(comment)
        else:
            logger.warning("%s has no %s: subreddit %s has no comments", folder, COMMENTS_FILE, folder.name)
        data.description = self._read_description(folder)
        for path in (submissions, comments):
            self._flush_report(path)
        logger.info("loaded r/%s from %s: %d posts, %d comments", data.name, folder, len(data.posts),
                    data.num_comments)
        return data

    # ------------------------------------------------------------------ tolerant reading
    def _report_for(self, path: Path) -> _FileReport:
        return self._pending.setdefault(path, _FileReport(path))

    def _flush_report(self, path: Path) -> None:
        report = self._pending.pop(path, None)
        if report is None or not report.counts:
            return
        self.skipped.update(report.counts)
        self.reports.append(report)
        details = ", ".join(f"{reason} x{count} (first at line {report.first_line[reason]})"
                            for reason, count in sorted(report.counts.items()))
        logger.warning("%s: skipped %d: %s", path, sum(report.counts.values()), details)

    def _read_records(self, path: Path, model: type[BaseModel], required: tuple[str, ...], data: _Subreddit):
        """Yield (line number, validated record) of one file; count and skip every bad line."""
        report = self._report_for(path)
        any_line = False
        with path.open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                any_line = True
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    report.skip(SKIP_INVALID_UTF8, line_no)
                    continue
                try:
                    record = json.loads(text)
                except (json.JSONDecodeError, RecursionError):
                    report.skip(SKIP_INVALID_JSON, line_no)
                    continue
                if not isinstance(record, dict):
                    report.skip(SKIP_NOT_AN_OBJECT, line_no)
                    continue
                if any(record.get(name) in (None, "") for name in required):
                    report.skip(SKIP_MISSING_FIELDS, line_no)
                    continue
                try:
                    yield line_no, model.model_validate(self._clean(record, model, data))
                except (ValidationError, TypeError, ValueError, OverflowError):
                    report.skip(SKIP_INVALID_FIELDS, line_no)
        if not any_line:
            report.skip(SKIP_EMPTY_FILE, 0)

    @staticmethod
    def _clean(record: dict[str, Any], model: type[BaseModel], data: _Subreddit) -> dict[str, Any]:
        """Fit a dump record to the model: nulls of defaulted fields dropped, ids as strings, prefixes added."""
        fields = model.model_fields
        clean = {key: value for key, value in record.items()
                 if key in fields and not (value is None and fields[key].default is not None)}
        for name in _INT_FIELDS:
            value = clean.get(name)
            if isinstance(value, (float, str)) and not isinstance(value, bool):
                clean[name] = int(float(value))  # "1424304000" / 1424304000.0 in older dumps
        if not clean.get("subreddit"):
            clean["subreddit"] = data.name
        clean["id"] = str(clean["id"])
        if model is RedditComment:
            link_id = str(clean["link_id"])
            clean["link_id"] = link_id if link_id.startswith("t3_") else f"t3_{link_id}"
            parent = str(clean.get("parent_id") or clean["link_id"])
            clean["parent_id"] = parent if parent[:3] in ("t1_", "t3_") else f"t1_{parent}"
        return clean

    @staticmethod
    def _read_description(folder: Path) -> str:
        about = folder / ABOUT_FILE
        if not about.is_file():
            return ""
        try:
            info = json.loads(about.read_text(encoding="utf-8"))
            return str(info.get("public_description") or info.get("description") or "")
        except (OSError, ValueError, AttributeError) as error:
            logger.warning("%s is unreadable (%s); no description", about, error)
            return ""

    # ------------------------------------------------------------------ media
    def _resolve_media(self, post: RedditPost, folder: Path, source: Path, line_no: int) -> None:
        """Turn relative / file:// media references into absolute paths of files inside the subreddit folder."""
        references = list(post.image_paths)
        if post.url:
            references.append(post.url)
        resolved: list[str] = []
        for reference in references:
            path = self._local_media(reference, folder, source, line_no)
            if path is not None and str(path) not in resolved:
                resolved.append(str(path))
        post.image_paths = resolved

    def _local_media(self, reference: str, folder: Path, source: Path, line_no: int) -> Path | None:
        reference = reference.strip()
        if not reference:
            return None
        parsed = urlparse(reference)
        if parsed.scheme == "file":
            candidate = Path(unquote(parsed.path))
        elif parsed.scheme or parsed.netloc or reference.startswith(("www.", "//")):
            return None  # a web URL: not local media
        else:
            candidate = Path(unquote(reference))
        if candidate.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        base = folder.resolve()
        target = (base / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
        if not target.is_relative_to(base):
            self._media_skip(SKIP_MEDIA_OUTSIDE, source, reference, line_no)
            return None
        if not target.is_file():
            self._media_skip(SKIP_MEDIA_MISSING, source, reference, line_no)
            return None
        return target

    def _media_skip(self, reason: str, source: Path, reference: str, line_no: int) -> None:
        report = self._report_for(source)
        if reason not in report.counts:
            logger.warning("%s line %d: media %r %s", source, line_no, reference,
                           "points outside the subreddit folder; ignored" if reason == SKIP_MEDIA_OUTSIDE
                           else "does not exist; ignored")
        report.skip(reason, line_no)

    # ------------------------------------------------------------------ queries
    def subreddit_posts(self, subreddit: str, limit: int = 25, sort: Sort = "new") -> SubredditPosts:
        data = self._subreddit(subreddit)
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
        posts = list(data.posts.values())
        if sort == "new":
            posts.sort(key=lambda p: p.created_utc, reverse=True)
        elif sort == "top":
            posts.sort(key=lambda p: (p.score, p.created_utc), reverse=True)
        else:
            posts.sort(key=lambda p: (_hot(p), p.created_utc), reverse=True)
        return SubredditPosts(subreddit=data.name, posts=[p.model_copy(deep=True) for p in posts[:max(limit, 0)]])

    def search_posts(self, query: str, subreddit: str | None = None, limit: int = 25) -> SearchResults:
        terms = [term for term in re.findall(r"\w+", query.lower()) if term]
        if not terms:
            raise ValueError("query must contain at least one word")
        sources = [self._subreddit(subreddit)] if subreddit else self._all_subreddits()
        scored: list[tuple[int, int, RedditPost]] = []
        for data in sources:
            for post in data.posts.values():
                title, text = post.title.lower(), post.selftext.lower()
                if all(term in title or term in text for term in terms):
                    rank = sum(2 * title.count(term) + text.count(term) for term in terms)
                    scored.append((rank, post.created_utc, post))
        scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return SearchResults(query=query, subreddit=sources[0].name if subreddit else None,
                             posts=[post.model_copy(deep=True) for _, _, post in scored[:max(limit, 0)]])

    def _find_post(self, post_id: str) -> tuple[_Subreddit, RedditPost]:
        bare = _bare_id(post_id, "t3_")
        with self._lock:
            for data in list(self._loaded.values()) + self._all_subreddits():
                if bare in data.posts:
                    return data, data.posts[bare]
        raise LookupError(f"unknown post {post_id!r}: no subreddit in {self.root} has it")

    def post_comments(self, post_id: str, limit: int = 100) -> PostComments:
        data, post = self._find_post(post_id)
        comments = data.comments_by_link.get(post.id, [])
        children: dict[str, list[RedditComment]] = defaultdict(list)
        for comment in comments:
            children[comment.parent_id].append(comment)
        for replies in children.values():
            replies.sort(key=lambda c: (c.created_utc, c.id))
        ordered: list[RedditComment] = []
        visited: set[str] = set()
        stack = list(reversed(children.get(f"t3_{post.id}", [])))
        while stack:  # depth first: every parent before its replies
            comment = stack.pop()
            if comment.id in visited:
                continue
            visited.add(comment.id)
            ordered.append(comment)
            stack.extend(reversed(children.get(f"t1_{comment.id}", [])))
        # replies whose parent is not in the dump come last, oldest first
        ordered.extend(sorted((c for c in comments if c.id not in visited), key=lambda c: (c.created_utc, c.id)))
        return PostComments(post=post.model_copy(deep=True), comments=[c.model_copy(deep=True) for c in ordered[:max(limit, 0)]])

    def user_data(self, username: str, limit: int = 25) -> UserData:
        key = username.strip().removeprefix("/u/").removeprefix("u/").lower()
        posts: list[RedditPost] = []
        comments: list[RedditComment] = []
        for data in self._all_subreddits():
            posts.extend(data.posts_by_author.get(key, []))
            comments.extend(data.comments_by_author.get(key, []))
        posts.sort(key=lambda p: p.created_utc, reverse=True)
        comments.sort(key=lambda c: c.created_utc, reverse=True)
        return UserData(username=username, posts=[p.model_copy(deep=True) for p in posts[:max(limit, 0)]],
                        comments=[c.model_copy(deep=True) for c in comments[:max(limit, 0)]])

    def subreddit_info(self, subreddit: str) -> SubredditInfo:
        data = self._subreddit(subreddit)
        times = [p.created_utc for p in data.posts.values()]
        times += [c.created_utc for replies in data.comments_by_link.values() for c in replies]
        return SubredditInfo(name=data.name, num_posts=len(data.posts), num_comments=data.num_comments,
                             first_created_utc=min(times) if times else None,
                             last_created_utc=max(times) if times else None,
                             description=data.description)


class SnapshotBackend(DumpBackend):
    """The small Reddit snapshot embedded in the package (`fl_crew_reddit/reddit/snapshot/`): runs offline."""

    def __init__(self, root: str | Path | None = None):
        super().__init__(SNAPSHOT_DIR if root is None else root)


def make_backend(config: "FLCrewRedditConfig") -> RedditBackend:
    """The backend named by `config.reddit_backend` (snapshot, dump or live)."""
    backend = config.reddit_backend
    if backend == "snapshot":
        return SnapshotBackend()
    if backend == "dump":
        if config.reddit_dump_dir is None:
            raise ValueError("REDDIT_BACKEND=dump needs REDDIT_DUMP_DIR (a folder of <subreddit>/submissions.jsonl)")
        return DumpBackend(config.reddit_dump_dir)
    if backend == "live":
        raise NotImplementedError("REDDIT_BACKEND=live (the Reddit API) comes with the live-API issue; "
                                  "use snapshot or dump")
    raise ValueError(f"unknown REDDIT_BACKEND {backend!r}; use snapshot or dump")
