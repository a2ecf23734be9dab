"""A stand-in for the third-party `mcp-server-reddit` (Hawstein/mcp-server-reddit) that runs offline.

Same tool names, arguments and result shape as the real server: one text block of JSON (no structured content) —
a list of Post {id, title, author, score, subreddit, url (the permalink), created_at (ISO 8601), comment_count,
post_type, content}, PostDetail {post, comments}, Comment {id, author, body, score, replies}, SubredditInfo
{name, subscriber_count, description} — and its failures as tool errors. Its records come from one subreddit
folder of our snapshot (`<dir>/submissions.jsonl`, `<dir>/comments.jsonl`), reshaped the way the real server
reshapes Reddit's API. Run: `python tests/fake_mcp_server_reddit.py fl_crew_reddit/reddit/snapshot/cooking`.
"""
from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from mcp.server.fastmcp import FastMCP
from pydantic import Field

FOLDER = Path(sys.argv[1] if len(sys.argv) > 1 else "fl_crew_reddit/reddit/snapshot/cooking")
POSTS = [json.loads(line) for line in (FOLDER / "submissions.jsonl").read_text(encoding="utf-8").splitlines()]
COMMENTS = [json.loads(line) for line in (FOLDER / "comments.jsonl").read_text(encoding="utf-8").splitlines()]
SUBREDDIT = POSTS[0]["subreddit"]

mcp = FastMCP("mcp-reddit", log_level="WARNING")
Limit = Annotated[int, Field(ge=1, le=100)]


def _post(record: dict) -> dict:
    permalink = f"https://www.reddit.com/r/{record['subreddit']}/comments/{record['id']}/"
    text = bool(record.get("selftext"))
    return {"id": record["id"], "title": record["title"], "author": record.get("author") or "[deleted]",
            "score": record["score"], "subreddit": record["subreddit"], "url": permalink,
            "created_at": datetime.fromtimestamp(record["created_utc"], UTC).astimezone().isoformat(),
            "comment_count": record["num_comments"], "post_type": "text" if text else "link",
            "content": record["selftext"] if text else permalink}


def _comment_tree(parent: str, depth: int) -> list[dict]:
    if depth <= 0:
        return []
    children = sorted((c for c in COMMENTS if c["parent_id"] == parent), key=lambda c: -c["score"])
    return [{"id": c["id"], "author": c.get("author") or "[deleted]", "body": c["body"], "score": c["score"],
             "replies": _comment_tree(f"t1_{c['id']}", depth - 1)} for c in children]


def _find(subreddit_name: str) -> None:
    if subreddit_name.lower() != SUBREDDIT.lower():
        raise ValueError(f"Error processing mcp-server-reddit query: 404 Not Found: r/{subreddit_name}")


def _text(result) -> str:
    return json.dumps(result, indent=2)


@mcp.tool(structured_output=False)
def get_subreddit_info(subreddit_name: str) -> str:
    """Get information about a subreddit"""
    _find(subreddit_name)
    return _text({"name": SUBREDDIT, "subscriber_count": 123456, "description": f"r/{SUBREDDIT} (offline copy)"})


def _listing(subreddit_name: str, limit: int, key) -> str:
    _find(subreddit_name)
    return _text([_post(p) for p in sorted(POSTS, key=key)[:limit]])


@mcp.tool(structured_output=False)
def get_subreddit_new_posts(subreddit_name: str, limit: Limit = 10) -> str:
    """Get new posts from a specific subreddit"""
    return _listing(subreddit_name, limit, lambda p: -p["created_utc"])


@mcp.tool(structured_output=False)
def get_subreddit_top_posts(subreddit_name: str, limit: Limit = 10, time: str = "") -> str:
    """Get top posts from a specific subreddit"""
    return _listing(subreddit_name, limit, lambda p: -p["score"])


@mcp.tool(structured_output=False)
def get_subreddit_hot_posts(subreddit_name: str, limit: Limit = 10) -> str:
    """Get hot posts from a specific subreddit"""
    return _listing(subreddit_name, limit, lambda p: -(math.log10(max(abs(p["score"]), 1)) + p["created_utc"] / 45000))


@mcp.tool(structured_output=False)
def get_post_comments(post_id: str, limit: Limit = 10) -> str:
    """Get comments from a post"""
    return _text(_comment_tree(f"t3_{post_id}", 3)[:limit])


@mcp.tool(structured_output=False)
def get_post_content(post_id: str, comment_limit: Limit = 10,
                     comment_depth: Annotated[int, Field(ge=1, le=10)] = 3) -> str:
    """Get detailed content of a specific post"""
    post = next((p for p in POSTS if p["id"] == post_id), None)
    if post is None:
        raise ValueError(f"Error processing mcp-server-reddit query: 404 Not Found: post {post_id}")
    return _text({"post": _post(post), "comments": _comment_tree(f"t3_{post_id}", comment_depth)[:comment_limit]})


if __name__ == "__main__":
    mcp.run()
