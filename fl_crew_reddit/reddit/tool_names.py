"""The names of our Reddit MCP tools: one enum shared by the server, the client and the tool map.

A tool's name is its wire name (what `tools/list` answers and `tools/call` asks for), so it must be spelled the same
in every part; `RedditTool` is a `StrEnum`, so a member is that very string wherever a `str` is expected.
"""
from __future__ import annotations

from enum import StrEnum


class RedditTool(StrEnum):
    """Each read-only tool of `server.build_server`, by the name clients call it."""

    COLLECT_SUBREDDIT_POSTS = "collect_subreddit_posts"
    SEARCH_REDDIT_POSTS = "search_reddit_posts"
    COLLECT_POST_COMMENTS = "collect_post_comments"
    COLLECT_USER_DATA = "collect_user_data"
    COLLECT_SUBREDDIT_INFO = "collect_subreddit_info"
    LIST_SUBREDDITS = "list_subreddits"
