"""The Data Collector's stage: pull posts and their comment threads for each subreddit through the MCP client.

Each subreddit gets its newest posts, or, with search queries, the posts matching them first (MCP
`search_reddit_posts`, inside that subreddit) and its newest posts for the rest of its budget. Writes one JSON file
per subreddit to `data/collected/<run>/` — the raw material the preprocessor reads. Raw data stays on this machine;
it is split per client before any training starts.

One bad item never ends the collection, and nothing is left out silently: a subreddit or a post the server refuses
(its argument rules, e.g. a folder named `bad.name` or a post id with a hyphen) or fails on is skipped, logged with
the server's message and counted in that subreddit's `skipped` (`subreddit_refused` / `subreddit_failed`,
`post_refused` / `post_failed`), as are the records a result could not carry (`comment_invalid_id`...) and the
comments beyond the per-thread cap (`comments_over_cap`). Every post's comments are asked for, whatever its
`num_comments` says. Only a server that is gone for good (restarts used up, session closed) ends the collection.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field

from fl_crew_reddit.reddit.client import RedditMCPClient, RedditMCPError, RedditMCPSessionLost, RedditMCPToolError
from fl_crew_reddit.reddit.schemas import RedditComment, RedditPost, SubredditInfo

log = logging.getLogger(__name__)

MAX_COMMENT_LIMIT = 1000  # the most comments one collect_post_comments call may ask for (the server's CommentLimit)

# Reasons a subreddit, a post or comments are left out; keys of SubredditCollection.skipped.
SKIP_SUBREDDIT_REFUSED = "subreddit_refused"  # the server's argument rules refuse the name
SKIP_SUBREDDIT_FAILED = "subreddit_failed"  # any other tool error for this subreddit
SKIP_POST_REFUSED = "post_refused"  # the server's argument rules refuse the post id: the post and its thread go
SKIP_POST_FAILED = "post_failed"  # any other tool error for the post's thread: the post goes too
SKIP_OVER_CAP = "comments_over_cap"  # comments of a thread beyond comments_per_post
SKIP_AT_CAP_UNKNOWN = "threads_at_cap_total_unknown"  # threads cut at the cap by a server that does not say by how many
SKIP_SEARCH_FAILED = "search_failed"



class SubredditCollection(BaseModel):
    subreddit: str
    num_posts: int
    num_comments: int
    path: str
    skipped: dict[str, int] = Field(default_factory=dict,
                                    description="left out, by reason: source records the server skipped while "
                                                "reading, records of its results that could not be read, a refused "
                                                "or failed subreddit or post, comments beyond the per-thread cap, "
                                                "failed searches")
    queries: dict[str, int] = Field(default_factory=dict, description="search query -> posts it added here")


class CollectionReport(BaseModel):
    subreddits: list[SubredditCollection]
    server: str


def session_gone(error: RedditMCPError) -> bool:
    """True when the error means the server can answer nothing more (not one bad item)."""
    return isinstance(error, RedditMCPSessionLost)


def _skip_reason(error: RedditMCPError, refused: str, failed: str) -> str:
    return refused if isinstance(error, RedditMCPToolError) and error.argument_refused else failed


def collected_file(out_dir: Path, name: str) -> Path:
    """`<out_dir>/<name>.json`; a name with other characters than letters, digits, _ and - (a third-party server
    may call a subreddit anything) gets a safe spelling plus a short hash, so the file stays in `out_dir`."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if safe != name or not safe:
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return out_dir / f"{safe}.json"


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def collect(client: RedditMCPClient, subreddits: list[str], posts_per_subreddit: int, out_dir: Path,
            comments_per_post: int = 500, queries: list[str] | None = None) -> CollectionReport:
    """Collect up to `posts_per_subreddit` posts of each subreddit (empty list = all) with up to `comments_per_post`
    comments each: the posts matching `queries` first, then the newest. See the module docstring for what is
    skipped and counted; RedditMCPError only when the server is gone for good."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = subreddits or client.list_subreddits()
    budget = min(posts_per_subreddit, 1000)
    collected = []
    for name in names:
        mapping_skips_before = Counter(getattr(client, "skipped", {}))  # records a tool map could not read
        try:
            info = client.collect_subreddit_info(name)
            found, skipped = search_subreddit(client, info.name, queries or [], budget)
            listing = client.collect_subreddit_posts(info.name, limit=budget, sort="new") if \
                sum(map(len, found.values())) < budget else None
        except RedditMCPError as error:
            if session_gone(error):
                raise
            reason = _skip_reason(error, SKIP_SUBREDDIT_REFUSED, SKIP_SUBREDDIT_FAILED)
            log.warning("r/%s left out (%s): %s", name, reason, error.message)
            path = collected_file(out_dir, name)
            _write(path, {"subreddit": name, "info": SubredditInfo(name=name).model_dump(), "posts": [],
                          "comments": [], "queries": {}})
            collected.append(SubredditCollection(subreddit=name, num_posts=0, num_comments=0, path=str(path),
                                                 skipped={reason: 1}))
            continue
        if listing is not None:
            skipped.update(listing.skipped)
        newest = listing.posts if listing is not None else []
        candidates = within_budget([post for matches in found.values() for post in matches] + newest, budget)
        posts, comments = collect_threads(client, candidates, comments_per_post, skipped)
        kept = {post.id for post in posts}
        found_ids = {query: [post.id for post in matches if post.id in kept] for query, matches in found.items()}
        path = collected_file(out_dir, info.name)
        _write(path, {"subreddit": info.name, "info": info.model_dump(), "posts": [p.model_dump() for p in posts],
                      "comments": [c.model_dump() for c in comments], "queries": found_ids})
        skipped = dict(Counter(info.skipped) + (Counter(getattr(client, "skipped", {})) - mapping_skips_before)
                       + skipped)
        added = {query: len(ids) for query, ids in found_ids.items()}
        collected.append(SubredditCollection(subreddit=info.name, num_posts=len(posts), num_comments=len(comments),
                                             path=str(path), skipped=skipped, queries=added))
        log.info("Collected r/%s: %d posts, %d comments%s%s", info.name, len(posts), len(comments),
                 f"; found by search {added}" if added else "", f"; left out {skipped}" if skipped else "")
    info = getattr(client, "server_info", None)
    server = getattr(getattr(info, "serverInfo", None), "name", None) or "mcp"
    return CollectionReport(subreddits=collected, server=server)


def collect_threads(client: RedditMCPClient, posts: list[RedditPost], comments_per_post: int,
                    skipped: Counter) -> tuple[list[RedditPost], list[RedditComment]]:
    """The posts whose threads could be read, and their comments (up to `comments_per_post` each, asked for
    whatever `num_comments` says). Refused or failed posts, unreadable records and comments beyond the cap are
    counted in `skipped`."""
    limit = max(1, min(comments_per_post, MAX_COMMENT_LIMIT))
    kept: list[RedditPost] = []
    comments: list[RedditComment] = []
    for post in posts:
        try:
            thread = client.collect_post_comments(post.id, limit=limit)
        except RedditMCPError as error:
            if session_gone(error):
                raise
            reason = _skip_reason(error, SKIP_POST_REFUSED, SKIP_POST_FAILED)
            skipped[reason] += 1
            log.warning("Post %r of r/%s left out (%s): %s", post.id, post.subreddit, reason, error.message)
            continue
        kept.append(post)
        thread_comments = thread.comments[:comments_per_post]
        comments.extend(thread_comments)
        skipped.update(thread.skipped)
        if thread.total_comments is not None:
            beyond = max(thread.total_comments - len(thread_comments), 0)
            if beyond:
                skipped[SKIP_OVER_CAP] += beyond
        elif len(thread.comments) >= limit:
            skipped[SKIP_AT_CAP_UNKNOWN] += 1
    if skipped[SKIP_OVER_CAP] or skipped[SKIP_AT_CAP_UNKNOWN]:
        log.info("Threads longer than %d comments (comments_per_post) were cut: %d comments beyond the cap%s",
                 comments_per_post, skipped[SKIP_OVER_CAP],
                 f", {skipped[SKIP_AT_CAP_UNKNOWN]} threads cut by an unknown number" if skipped[SKIP_AT_CAP_UNKNOWN]
                 else "")
    return kept, comments


def search_subreddit(client: RedditMCPClient, subreddit: str, queries: list[str],
                     limit: int) -> tuple[dict[str, list[RedditPost]], Counter]:
    """query -> the posts of `subreddit` it matches, best first (each post under its first query only), and what
    was left out: searches that failed (`search_failed`, each logged with its reason) and unreadable records."""
    found: dict[str, list[RedditPost]] = {}
    seen: set[str] = set()
    skipped: Counter = Counter()
    for query in queries:
        try:
            results = client.search_reddit_posts(query, subreddit=subreddit, limit=limit)
        except RedditMCPError as error:
            if session_gone(error):
                raise
            skipped[SKIP_SEARCH_FAILED] += 1
            log.warning("Search %r in r/%s failed, left out: %s", query, subreddit, error)
            continue
        skipped.update(results.skipped)
        matches = results.posts
        # A third-party server may ignore the subreddit filter: only this subreddit's posts count here.
        found[query] = [post for post in matches if post.subreddit.lower() == subreddit.lower()
                        and post.id not in seen and not seen.add(post.id)]
    return found, skipped


def within_budget(posts: list[RedditPost], budget: int) -> list[RedditPost]:
    """The first `budget` distinct posts (by id), in order."""
    seen: set[str] = set()
    return [post for post in posts if post.id not in seen and not seen.add(post.id)][:budget]


def load_collected(report: CollectionReport) -> list[dict]:
    return [json.loads(Path(item.path).read_text(encoding="utf-8")) for item in report.subreddits]
