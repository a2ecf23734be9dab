"""Where Reddit records come from: Reddit dump files (Pushshift / Arctic Shift), or the snapshot embedded in the
package.

`DumpBackend` reads a folder holding any mix of these layouts; each file may be plain JSON lines, `.gz` or `.zst`
(zstandard with the long window the dumps use), and is streamed, never loaded whole (see `dump_files`)::

    <root>/<subreddit>/submissions.jsonl   one post a line: id, subreddit, title, selftext, created_utc, score,
                                           num_comments, optional author, url, permalink, is_video, image_paths
                                           (also submissions.jsonl.zst, submissions.zst, submissions.jsonl.gz)
    <root>/<subreddit>/comments.jsonl      one comment a line: id, link_id (t3_<post id>), parent_id (t3_… or
                                           t1_<comment id>), subreddit, body, created_utc, score, optional author
    <root>/<subreddit>/images/…            optional images or videos named by a post's relative `url` or `image_paths`
    <root>/<subreddit>/about.json          optional: {"public_description": "..."} for `subreddit_info`
    <root>/<subreddit>_submissions.zst     the per-subreddit torrents' flat layout (and _comments.zst)
    <root>/RS_YYYY-MM.zst, RC_YYYY-MM.zst  whole monthly submissions / comments of every subreddit (also in
                                           <root>/submissions/ and <root>/comments/); indexed once, see below

A monthly file is scanned once: the scan counts each subreddit's records and copies the lines of the subreddits
asked for into a small per-subreddit extract in the cache folder, which later queries (and later processes) read
instead. Only the subreddits asked for are held in memory.

Reading is tolerant: a line that is not valid UTF-8 or JSON, longer than `max_line_bytes`, a record missing a
required field or with a field of the wrong type (an id that is not a string is refused, never turned into one),
and a duplicate id are skipped and counted by reason in `backend.skipped`; a compressed file that is corrupt or cut
short is counted once (`corrupt_file`) and its lines before the break are kept. Each file with skipped lines is
logged once, naming the first line of each reason. Nothing crashes, nothing is dropped silently.
"""
from __future__ import annotations

import abc
import heapq
import json
import logging
import math
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ValidationError

from fl_crew_reddit.reddit.dump_files import (
    CHUNK_BYTES,
    COMMENTS,
    EXTRACT_ALL_UP_TO,
    MAX_LINE_BYTES,
    SKIP_EMPTY_FILE,
    SKIP_LINE_TOO_LONG,
    SKIP_MISSING_FIELDS,
    SUBMISSIONS,
    MonthlyFile,
    find_monthly_files,
    flat_subreddit_files,
    is_blank,
    monthly_name,
    parse_line,
    read_lines,
    subreddit_file,
    until_failure,
)
from fl_crew_reddit.reddit.schemas import (
    PostComments,
    RedditComment,
    RedditPost,
    SearchResults,
    SubredditInfo,
    SubredditPosts,
    UserData,
)
from fl_crew_reddit.reddit.settings import RedditSourceSettings

logger = logging.getLogger(__name__)

Sort = Literal["new", "top", "hot"]
SORTS: tuple[str, ...] = ("new", "top", "hot")

SUBMISSIONS_FILE = "submissions.jsonl"
COMMENTS_FILE = "comments.jsonl"
ABOUT_FILE = "about.json"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv"})  # preprocessing takes keyframes (PyAV)
SNAPSHOT_DIR = Path(__file__).resolve().parent / "snapshot"

# Reasons a record (or a file, or a media reference) is skipped; the keys of `DumpBackend.skipped`. The reasons a
# line cannot be read at all (invalid_utf8, invalid_json, not_an_object, missing_fields, line_too_long, empty_file)
# come from dump_files.
SKIP_INVALID_FIELDS = "invalid_fields"
SKIP_DUPLICATE_ID = "duplicate_id"
SKIP_MEDIA_OUTSIDE = "media_outside_folder"
SKIP_MEDIA_MISSING = "media_missing"
SKIP_UNSUPPORTED_FILE = "unsupported_compression"
# Reasons a valid record is left out by a filter; the keys of `DumpBackend.filtered`.
FILTER_BEFORE_RANGE = "created_before_after"
FILTER_AFTER_RANGE = "created_at_or_after_before"
FILTER_LOW_SCORE = "score_below_min_score"

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


def _search_rank(post: RedditPost, terms: list[str]) -> int | None:
    """How well a post matches: title hits count double; None unless every term is in the title or text."""
    title, text = post.title.lower(), post.selftext.lower()
    if not all(term in title or term in text for term in terms):
        return None
    return sum(2 * title.count(term) + text.count(term) for term in terms)


def _unique_by_id(items: Iterable[tuple], id_at: int) -> Iterator[tuple]:
    """`items` with a repeated id (at position `id_at`) left out: the first one wins, as in a load."""
    seen: set[str] = set()
    for item in items:
        if item[id_at] not in seen:
            seen.add(item[id_at])
            yield item


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

    def threads(self, subreddits: list[str], posts_per_subreddit: int, comments_per_post: int = 500) -> list[dict]:
        """The newest posts of each subreddit and their comments, one {"posts", "comments"} dict per subreddit: the
        shape of the collector's files, which `preprocessing.pipeline.build_examples` reads."""
        collected = []
        for name in subreddits:
            posts = self.subreddit_posts(name, limit=posts_per_subreddit, sort="new").posts
            comments = [c for post in posts for c in self.post_comments(post.id, limit=comments_per_post).comments]
            collected.append({"posts": [p.model_dump() for p in posts], "comments": [c.model_dump() for c in comments]})
        return collected


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
    skipped: Counter = field(default_factory=Counter)  # this subreddit's skips by reason, for subreddit_info


@dataclass
class _Source:
    """Where one subreddit's records are: its own files (folder or flat layout) and/or the monthly files."""

    name: str  # as spelled on disk (folder, file) or in the monthly records
    folder: Path  # media references resolve inside it; about.json is read from it
    files: dict[str, list[Path]] = field(default_factory=lambda: {SUBMISSIONS: [], COMMENTS: []})
    in_monthly: bool = False


class DumpBackend(RedditBackend):
    """Reads Reddit dump files in any of the layouts of the module docstring (plain, .gz or .zst).

    A subreddit is loaded on first use and kept: posts indexed by id, comments by the post they belong to; only
    the subreddits asked for are held in memory. Subreddit names are case-insensitive (`Sports` on disk answers
    `sports` and `r/sports`). Filters: `subreddits` (only these are served), `after` / `before` (created_utc in
    [after, before)) and `min_score` (posts and comments below it are left out); what they leave out is counted
    in `filtered`, apart from `skipped`, which maps each reason a line (or file, or media reference) was bad to
    how many it dropped. Monthly files are indexed once under `cache_dir` (see `dump_files.MonthlyFile`), which
    the caller names: a folder of dumps with monthly files and no `cache_dir` raises ValueError on first use.
    """

    def __init__(self, root: str | Path, *, subreddits: Iterable[str] | None = None, after: int | None = None,
                 before: int | None = None, min_score: int | None = None, cache_dir: str | Path | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES, chunk_bytes: int = CHUNK_BYTES):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"Reddit dump folder {root} does not exist or is not a folder (expected "
                                    f"<subreddit>/{SUBMISSIONS_FILE}[.zst|.gz] or RS_YYYY-MM.zst / RC_YYYY-MM.zst "
                                    "inside)")
        if after is not None and before is not None and after >= before:
            raise ValueError(f"the time range is empty: after={after} is not before before={before}")
        self.root = root.resolve()
        self.subreddit_filter = frozenset(_normalize_subreddit(s) for s in subreddits or () if s.strip()) or None
        self.after, self.before, self.min_score = after, before, min_score
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.max_line_bytes, self.chunk_bytes = max_line_bytes, chunk_bytes
        self.skipped: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()
        self.reports: list[_FileReport] = []
        self._loaded: dict[str, _Subreddit] = {}
        self._local: dict[str, _Source] | None = None
        self._sources_by_key: dict[str, _Source] | None = None
        self._monthly: list[MonthlyFile] | None = None
        self._pending: dict[Path, _FileReport] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @property
    def scan_passes(self) -> int:
        """Full reads of monthly files so far (0 when every index and extract came from the cache)."""
        return sum(monthly.passes for monthly in self._monthly or ())

    # ------------------------------------------------------------------ discovery and loading
    def _wanted(self, key: str) -> bool:
        return self.subreddit_filter is None or key in self.subreddit_filter

    def _discover(self) -> dict[str, _Source]:
        """Per-subreddit files (folder and flat layouts): found by name, nothing read."""
        if self._local is None:
            local: dict[str, _Source] = {}
            for child in sorted(self.root.iterdir()):
                if not child.is_dir() or child.name.startswith(".") or monthly_name(child) is not None:
                    continue
                files = {kind: [path] for kind in (SUBMISSIONS, COMMENTS)
                         if (path := subreddit_file(child, kind)) is not None}
                if not files:
                    continue
                key = child.name.lower()
                if key in local:
                    logger.warning("%s: folders %s and %s differ only in case; using %s",
                                   self.root, local[key].name, child.name, local[key].name)
                    continue
                local[key] = _Source(name=child.name, folder=child, files={SUBMISSIONS: [], COMMENTS: [], **files})
            for name, files in flat_subreddit_files(self.root).items():
                source = local.setdefault(name.lower(), _Source(name=name, folder=self.root))
                for kind, path in files.items():
                    source.files[kind].append(path)
            self._local = {key: source for key, source in local.items() if self._wanted(key)}
        return self._local

    def _monthly_files(self, kind: str | None = None) -> list[MonthlyFile]:
        if self._monthly is None:
            paths, unsupported = find_monthly_files(self.root)
            for path in unsupported:
                logger.warning("%s: only .zst, .gz and plain JSON lines are read; recompress it with "
                               "`zstd --long=31` (skipped)", path)
                self.skipped[SKIP_UNSUPPORTED_FILE] += 1
            if paths and self.cache_dir is None:
                raise ValueError(f"{self.root} holds monthly dump files ({paths[0].name}, ...): they are indexed "
                                 "once into a cache folder, so give the DumpBackend a cache_dir")
            extract_all = 0 if self.subreddit_filter else EXTRACT_ALL_UP_TO  # with a filter: only its subreddits
            self._monthly = [MonthlyFile(path, self.cache_dir, chunk_bytes=self.chunk_bytes,
                                         max_line_bytes=self.max_line_bytes, extract_all_up_to=extract_all)
                             for path in paths]
        return [monthly for monthly in self._monthly if kind is None or monthly.kind == kind]

    def _open_scope(self) -> bool:
        """Monthly files and no subreddit filter: 'every subreddit' is too many to load, so cross-subreddit
        queries stream the files instead."""
        return bool(self._monthly_files()) and self.subreddit_filter is None

    def _sources(self, wanted: Iterable[str] = ()) -> dict[str, _Source]:
        """Every subreddit this backend serves; the first call indexes the monthly files (extracting `wanted`
        and the filtered subreddits on the way, so they need no second pass)."""
        with self._lock:
            if self._sources_by_key is None:
                sources = {key: _Source(source.name, source.folder, {k: list(v) for k, v in source.files.items()})
                           for key, source in self._discover().items()}
                extract = set(wanted) | set(self.subreddit_filter or ())
                for monthly in self._monthly_files():
                    self._count_index_skips(monthly, monthly.index(extract))
                    for key, entry in monthly.subreddits().items():
                        if self._wanted(key):
                            sources.setdefault(key, _Source(name=entry["name"], folder=self.root)).in_monthly = True
                for key in sorted(set(self.subreddit_filter or ()) - set(sources)):
                    logger.warning("subreddit %s (filter) is not in %s", key, self.root)
                self._sources_by_key = dict(sorted(sources.items()))
            return self._sources_by_key

    def _count_index_skips(self, monthly: MonthlyFile, index: dict) -> None:
        """Lines of a monthly file that belong to no subreddit (bad JSON, no subreddit field...): counted once."""
        report = self._report_for(monthly.path)
        for reason, (count, first) in index["skipped"].items():
            report.counts[reason] += count
            report.first_line.setdefault(reason, first)
        self._flush_report(monthly.path)

    def list_subreddits(self) -> list[str]:
        return [source.name for source in self._sources().values()]

    def _subreddit(self, subreddit: str) -> _Subreddit:
        key = _normalize_subreddit(subreddit)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            sources = self._sources({key})
            if key not in sources:
                available = ", ".join(self.list_subreddits()) or "none"
                limited = (f" (the subreddit filter allows {', '.join(sorted(self.subreddit_filter))})"
                           if self.subreddit_filter else "")
                raise LookupError(f"unknown subreddit {subreddit!r} in {self.root}; available: {available}{limited}")
            data = self._load(key, sources[key])
            self._loaded[key] = data
            return data

    def _all_subreddits(self) -> list[_Subreddit]:
        return [self._subreddit(name) for name in self.list_subreddits()]

    def _streams(self, key: str, source: _Source, kind: str) -> list[tuple[Path, Iterator, bool]]:
        """(file the line numbers refer to, its lines, whether it is a whole file) for one kind of record."""
        streams = [(path, read_lines(path, chunk_bytes=self.chunk_bytes, max_line_bytes=self.max_line_bytes), True)
                   for path in source.files[kind]]
        if source.in_monthly:
            batch = {key} | set(self.subreddit_filter or ())  # one extraction pass serves the whole filter
            for monthly in self._monthly_files(kind):
                if key in monthly.subreddits():
                    monthly.ensure_extracted(batch)
                    streams.append((monthly.path, monthly.lines_of(key), False))
        return streams

    def _load(self, key: str, source: _Source) -> _Subreddit:
        data = _Subreddit(name=source.name, folder=source.folder)
        first_report = len(self.reports)
        origins: list[Path] = []
        post_streams = self._streams(key, source, SUBMISSIONS)
        if not post_streams:
            logger.warning("%s has no %s: subreddit %s has no posts", source.folder, SUBMISSIONS_FILE, source.name)
        for origin, lines, whole in post_streams:
            origins.append(origin)
            for line_no, post in self._read_records(origin, lines, RedditPost, _POST_REQUIRED, data, whole):
                if self._filter_out(post):
                    continue
                if post.id in data.posts:
                    self._report_for(origin).skip(SKIP_DUPLICATE_ID, line_no)
                    continue
                self._resolve_media(post, data.folder, origin, line_no)
                data.posts[post.id] = post
                if post.author:
                    data.posts_by_author[post.author.lower()].append(post)
        comment_streams = self._streams(key, source, COMMENTS)
        if not comment_streams:
            logger.warning("%s has no %s: subreddit %s has no comments", source.folder, COMMENTS_FILE, source.name)
        seen: set[str] = set()
        for origin, lines, whole in comment_streams:
            origins.append(origin)
            for line_no, comment in self._read_records(origin, lines, RedditComment, _COMMENT_REQUIRED, data,
                                                       whole):
                if self._filter_out(comment):
                    continue
                if comment.id in seen:
                    self._report_for(origin).skip(SKIP_DUPLICATE_ID, line_no)
                    continue
                seen.add(comment.id)
                data.comments_by_link[_bare_id(comment.link_id, "t3_")].append(comment)
                data.num_comments += 1
                if comment.author:
                    data.comments_by_author[comment.author.lower()].append(comment)
        data.description = self._read_description(source.folder) if source.folder != self.root else ""
        for path in origins:
            self._flush_report(path)
        for report in self.reports[first_report:]:
            data.skipped.update(report.counts)
        logger.info("loaded r/%s from %s: %d posts, %d comments", data.name, source.folder, len(data.posts),
                    data.num_comments)
        return data

    def _filter_reason(self, record: RedditPost | RedditComment) -> str | None:
        """Why the time range or the score filter leaves the record out; None when it stays."""
        if self.after is not None and record.created_utc < self.after:
            return FILTER_BEFORE_RANGE
        if self.before is not None and record.created_utc >= self.before:
            return FILTER_AFTER_RANGE
        if self.min_score is not None and record.score < self.min_score:
            return FILTER_LOW_SCORE
        return None

    def _filter_out(self, record: RedditPost | RedditComment) -> bool:
        """True, counted in `filtered`, when a filter leaves the record out."""
        reason = self._filter_reason(record)
        if reason is not None:
            self.filtered[reason] += 1
        return reason is not None

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

    def _read_records(self, path: Path, lines: Iterable[tuple[int, bytes | None]], model: type[BaseModel],
                      required: tuple[str, ...], data: _Subreddit, whole_file: bool = True,
                      report: _FileReport | None = None):
        """Yield (line number, validated record) of one stream of lines; count and skip every bad line.

        `whole_file`: the lines are a whole file, so none at all means an empty file (a monthly extract may
        rightly be empty). `report` defaults to the pending report of `path`."""
        report = report if report is not None else self._report_for(path)
        any_line = False
        failures: list[tuple[str, int]] = []
        for line_no, raw in until_failure(lines, path, failures):
            if raw is None:
                any_line = True
                report.skip(SKIP_LINE_TOO_LONG, line_no)
                continue
            if is_blank(raw):
                continue
            any_line = True
            record, reason = parse_line(raw)
            if record is None:
                report.skip(reason, line_no)
                continue
            if any(record.get(name) in (None, "") for name in required):
                report.skip(SKIP_MISSING_FIELDS, line_no)
                continue
            try:
                yield line_no, model.model_validate(self._clean(record, model, data))
            except (ValidationError, TypeError, ValueError, OverflowError):
                report.skip(SKIP_INVALID_FIELDS, line_no)
        for reason, line_no in failures:
            any_line = True
            report.skip(reason, line_no)
        if whole_file and not any_line:
            report.skip(SKIP_EMPTY_FILE, 0)

    @staticmethod
    def _clean(record: dict[str, Any], model: type[BaseModel], data: _Subreddit) -> dict[str, Any]:
        """Fit a dump record to the model: nulls of defaulted fields dropped, timestamps and counts written as
        numeric strings or floats (older dumps) made integers, prefixes added. Ids must be strings: one of another
        type raises TypeError (counted as invalid_fields), never becomes a string."""
        fields = model.model_fields
        clean = {key: value for key, value in record.items()
                 if key in fields and not (value is None and fields[key].default is not None)}
        for name in _INT_FIELDS:
            value = clean.get(name)
            if isinstance(value, (float, str)) and not isinstance(value, bool):
                clean[name] = int(float(value))  # "1424304000" / 1424304000.0 in older dumps
        if not clean.get("subreddit"):
            clean["subreddit"] = data.name
        ids = ("id", "link_id", "parent_id") if model is RedditComment else ("id",)
        wrong = [name for name in ids if clean.get(name) is not None and type(clean[name]) is not str]
        if wrong:
            raise TypeError(f"{', '.join(wrong)} must be a string")
        if model is RedditComment:
            link_id = clean["link_id"]
            clean["link_id"] = link_id if link_id.startswith("t3_") else f"t3_{link_id}"
            parent = clean.get("parent_id") or clean["link_id"]
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
        if candidate.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
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
        if subreddit:
            data = self._subreddit(subreddit)
            candidates: Iterable[RedditPost] = data.posts.values()
        else:
            needles = [term.encode() for term in terms if term.isascii()]  # JSON keeps ASCII words as they are
            candidates = self._every(SUBMISSIONS, lambda line: all(n in line.lower() for n in needles))
        matches = ((rank, post.created_utc, post.id, post) for post in candidates
                   if (rank := _search_rank(post, terms)) is not None)
        best = heapq.nlargest(max(limit, 0), _unique_by_id(matches, 2), key=lambda item: item[:3])
        return SearchResults(query=query, subreddit=data.name if subreddit else None,
                             posts=[post.model_copy(deep=True) for *_, post in best])

    def _every(self, kind: str, keep_line) -> Iterator[RedditPost | RedditComment]:
        """Every post (or comment) this backend serves. With monthly files and no subreddit filter they are too
        many to load: the per-subreddit files are loaded and the monthly files streamed, passing over lines
        `keep_line` refuses unparsed. Otherwise every subreddit is loaded (and kept)."""
        local = [key for key, source in self._sources().items() if not source.in_monthly]
        keys = local if self._open_scope() else list(self._sources())
        for key in keys:
            data = self._subreddit(key)
            if kind == SUBMISSIONS:
                yield from data.posts.values()
            else:
                yield from (c for replies in data.comments_by_link.values() for c in replies)
        if self._open_scope():
            yield from self._stream_monthly(kind, keep_line)

    def _stream_monthly(self, kind: str, keep_line) -> Iterator[RedditPost | RedditComment]:
        """Records of the monthly files of `kind`, read and filtered as a load reads them, in bounded memory.
        Bad lines are not counted again here: the index pass and the loads count them."""
        model, required = (RedditPost, _POST_REQUIRED) if kind == SUBMISSIONS else (RedditComment, _COMMENT_REQUIRED)
        holder = _Subreddit(name="", folder=self.root)
        for monthly in self._monthly_files(kind):
            logger.info("%s: streaming for a query across all subreddits (set REDDIT_DUMP_SUBREDDITS to serve "
                        "such queries from the cache)", monthly.path.name)
            scratch = Path(f"{monthly.path}#query")
            lines = ((line_no, line) for line_no, line in read_lines(monthly.path, chunk_bytes=self.chunk_bytes,
                                                                     max_line_bytes=self.max_line_bytes)
                     if line is not None and keep_line(line))
            for line_no, record in self._read_records(scratch, lines, model, required, holder, whole_file=False,
                                                      report=_FileReport(scratch)):
                if not record.subreddit or self._filter_reason(record) is not None:
                    continue
                if isinstance(record, RedditPost):
                    self._resolve_media(record, self.root, scratch, line_no)
                    self._pending.pop(scratch, None)
                yield record

    def _find_post(self, post_id: str) -> tuple[_Subreddit, RedditPost]:
        bare = _bare_id(post_id, "t3_")
        with self._lock:
            for data in list(self._loaded.values()):
                if bare in data.posts:
                    return data, data.posts[bare]
            if not self._open_scope():
                for data in self._all_subreddits():
                    if bare in data.posts:
                        return data, data.posts[bare]
            else:  # find which subreddit has it, then load that one only
                needle = f'"{bare}"'.encode()
                for post in self._every(SUBMISSIONS, lambda line: needle in line):
                    if post.id == bare:
                        data = self._subreddit(post.subreddit)
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
        kept = [c.model_copy(deep=True) for c in ordered[:max(limit, 0)]]
        return PostComments(post=post.model_copy(deep=True), comments=kept, total_comments=len(ordered))

    def user_data(self, username: str, limit: int = 25) -> UserData:
        key = username.strip().removeprefix("/u/").removeprefix("u/").lower()
        needle = f'"{key}"'.encode() if key.isascii() else b""

        def newest(kind: str) -> list:
            if self._open_scope():
                records = (r for r in self._every(kind, lambda line: needle in line.lower())
                           if r.author and r.author.lower() == key)
            else:
                records = (r for data in self._all_subreddits() for r in
                           (data.posts_by_author if kind == SUBMISSIONS else data.comments_by_author).get(key, ()))
            return heapq.nlargest(max(limit, 0), _unique_by_id(((r.created_utc, r.id, r) for r in records), 1),
                                  key=lambda item: item[:2])

        return UserData(username=username, posts=[p.model_copy(deep=True) for *_, p in newest(SUBMISSIONS)],
                        comments=[c.model_copy(deep=True) for *_, c in newest(COMMENTS)])

    def subreddit_info(self, subreddit: str) -> SubredditInfo:
        data = self._subreddit(subreddit)
        times = [p.created_utc for p in data.posts.values()]
        times += [c.created_utc for replies in data.comments_by_link.values() for c in replies]
        return SubredditInfo(name=data.name, num_posts=len(data.posts), num_comments=data.num_comments,
                             first_created_utc=min(times) if times else None,
                             last_created_utc=max(times) if times else None,
                             description=data.description, skipped=dict(data.skipped))


class SnapshotBackend(DumpBackend):
    """The small Reddit snapshot embedded in the package (`fl_crew_reddit/reddit/snapshot/`): runs offline."""

    def __init__(self, root: str | Path | None = None):
        super().__init__(SNAPSHOT_DIR if root is None else root)


def make_backend(settings: RedditSourceSettings) -> RedditBackend:
    """The backend `settings.backend` names (snapshot, dump or live), built from `settings` alone."""
    backend = settings.backend
    if backend == "snapshot":
        return SnapshotBackend()
    if backend == "dump":
        if settings.dump_dir is None:
            raise ValueError("REDDIT_BACKEND=dump needs REDDIT_DUMP_DIR (a folder of <subreddit>/submissions.jsonl)")
        return DumpBackend(settings.dump_dir, subreddits=settings.dump_subreddits, after=settings.dump_after,
                           before=settings.dump_before, min_score=settings.dump_min_score,
                           cache_dir=settings.dump_cache_dir)
    if backend == "live":  # Reddit's API: imported here so that snapshot / dump runs never load PRAW
        from fl_crew_reddit.reddit.live_backend import LiveRedditBackend

        live = LiveRedditBackend.from_settings(settings)
        live.verify_credentials()  # wrong credentials fail here, at start, with one clear message
        return live
    raise ValueError(f"unknown REDDIT_BACKEND {backend!r}; use snapshot, dump or live")
