"""The Data Collector's stage: pull posts and their comment threads for each subreddit through the MCP client.

Writes one JSON file per subreddit to `data/collected/<run>/` — the raw material the preprocessor reads. Raw data
stays on this machine; it is split per client before any training starts.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field

from fl_crew_reddit.reddit.client import RedditMCPClient

log = logging.getLogger(__name__)


class SubredditCollection(BaseModel):
    subreddit: str
    num_posts: int
    num_comments: int
    path: str
    skipped: dict[str, int] = Field(default_factory=dict,
                                    description="source records the server left out while reading, by reason")


class CollectionReport(BaseModel):
    subreddits: list[SubredditCollection]
    server: str


def collect(client: RedditMCPClient, subreddits: list[str], posts_per_subreddit: int, out_dir: Path,
            comments_per_post: int = 500) -> CollectionReport:
    """Collect `posts_per_subreddit` newest posts of each subreddit with their comments; empty list = all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = subreddits or client.list_subreddits()
    collected = []
    for name in names:
        mapping_skips_before = Counter(getattr(client, "skipped", {}))  # records a tool map could not read
        info = client.collect_subreddit_info(name)
        posts = client.collect_subreddit_posts(info.name, limit=min(posts_per_subreddit, 1000), sort="new").posts
        comments = []
        for post in posts:
            if post.num_comments == 0:
                continue
            comments.extend(client.collect_post_comments(post.id, limit=comments_per_post).comments)
        path = out_dir / f"{info.name}.json"
        payload = {"subreddit": info.name, "info": info.model_dump(), "posts": [p.model_dump() for p in posts],
                   "comments": [c.model_dump() for c in comments]}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        skipped = dict(Counter(info.skipped) + (Counter(getattr(client, "skipped", {})) - mapping_skips_before))
        collected.append(SubredditCollection(subreddit=info.name, num_posts=len(posts), num_comments=len(comments),
                                             path=str(path), skipped=skipped))
        log.info("Collected r/%s: %d posts, %d comments%s", info.name, len(posts), len(comments),
                 f"; the source skipped {skipped}" if skipped else "")
    info = getattr(client, "server_info", None)
    server = getattr(getattr(info, "serverInfo", None), "name", None) or "mcp"
    return CollectionReport(subreddits=collected, server=server)


def load_collected(report: CollectionReport) -> list[dict]:
    return [json.loads(Path(item.path).read_text(encoding="utf-8")) for item in report.subreddits]
