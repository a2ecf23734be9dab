"""The Data Collector's stage: pull posts and their comment threads for each subreddit through the MCP client.

Each subreddit gets its newest posts, or, with search queries, the posts matching them first (MCP
`search_reddit_posts`, inside that subreddit) and its newest posts for the rest of its budget. Writes one JSON file
per subreddit to `data/collected/<run>/` — the raw material the preprocessor reads. Raw data stays on this machine;
it is split per client before any training starts.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field

from fl_crew_reddit.reddit.client import RedditMCPClient, RedditMCPError
from fl_crew_reddit.reddit.schemas import RedditPost

log = logging.getLogger(__name__)


class SubredditCollection(BaseModel):
    subreddit: str
    num_posts: int
    num_comments: int
    path: str
    skipped: dict[str, int] = Field(default_factory=dict,
                                    description="source records the server left out while reading, by reason; "
                                                "searches that failed (search_failed)")
    queries: dict[str, int] = Field(default_factory=dict, description="search query -> posts it added here")


class CollectionReport(BaseModel):
    subreddits: list[SubredditCollection]
    server: str


def collect(client: RedditMCPClient, subreddits: list[str], posts_per_subreddit: int, out_dir: Path,
            comments_per_post: int = 500, queries: list[str] | None = None) -> CollectionReport:
    """Collect up to `posts_per_subreddit` posts of each subreddit (empty list = all) with their comments: the
    posts matching `queries` first, then the newest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = subreddits or client.list_subreddits()
    budget = min(posts_per_subreddit, 1000)
    collected = []
    for name in names:
        mapping_skips_before = Counter(getattr(client, "skipped", {}))  # records a tool map could not read
        info = client.collect_subreddit_info(name)
        found, search_skips = search_subreddit(client, info.name, queries or [], budget)
        newest = client.collect_subreddit_posts(info.name, limit=budget, sort="new").posts if \
            sum(map(len, found.values())) < budget else []
        posts = within_budget([post for matches in found.values() for post in matches] + newest, budget)
        kept = {post.id for post in posts}
        found_ids = {query: [post.id for post in matches if post.id in kept] for query, matches in found.items()}
        comments = []
        for post in posts:
            if post.num_comments == 0:
                continue
            comments.extend(client.collect_post_comments(post.id, limit=comments_per_post).comments)
        path = out_dir / f"{info.name}.json"
        payload = {"subreddit": info.name, "info": info.model_dump(), "posts": [p.model_dump() for p in posts],
                   "comments": [c.model_dump() for c in comments], "queries": found_ids}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        skipped = dict(Counter(info.skipped) + (Counter(getattr(client, "skipped", {})) - mapping_skips_before)
                       + search_skips)
        added = {query: len(ids) for query, ids in found_ids.items()}
        collected.append(SubredditCollection(subreddit=info.name, num_posts=len(posts), num_comments=len(comments),
                                             path=str(path), skipped=skipped, queries=added))
        log.info("Collected r/%s: %d posts, %d comments%s%s", info.name, len(posts), len(comments),
                 f"; found by search {added}" if added else "", f"; the source skipped {skipped}" if skipped else "")
    info = getattr(client, "server_info", None)
    server = getattr(getattr(info, "serverInfo", None), "name", None) or "mcp"
    return CollectionReport(subreddits=collected, server=server)


def search_subreddit(client: RedditMCPClient, subreddit: str, queries: list[str],
                     limit: int) -> tuple[dict[str, list[RedditPost]], Counter]:
    """query -> the posts of `subreddit` it matches, best first (each post under its first query only), and the
    searches that failed (`search_failed`), each logged with its reason."""
    found: dict[str, list[RedditPost]] = {}
    seen: set[str] = set()
    skipped: Counter = Counter()
    for query in queries:
        try:
            matches = client.search_reddit_posts(query, subreddit=subreddit, limit=limit).posts
        except RedditMCPError as error:
            skipped["search_failed"] += 1
            log.warning("Search %r in r/%s failed, left out: %s", query, subreddit, error)
            continue
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
