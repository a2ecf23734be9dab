"""The Data Collector's source of Reddit records: backends (snapshot, dump, live), an MCP server and its client.

This package imports nothing of fl_crew_reddit outside itself and reads no environment: its settings arrive as
values (`settings.RedditSourceSettings`). Every export loads on first use, so that importing one small module
(`reddit.settings`, `reddit.tool_names`) does not load the dump readers or the MCP SDK.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fl_crew_reddit.reddit.backends import DumpBackend, RedditBackend, SnapshotBackend, make_backend
    from fl_crew_reddit.reddit.client import RedditMCPClient, RedditMCPError
    from fl_crew_reddit.reddit.schemas import (
        PostComments,
        RedditComment,
        RedditPost,
        SearchResults,
        SubredditInfo,
        SubredditPosts,
        UserData,
    )
    from fl_crew_reddit.reddit.server import build_server
    from fl_crew_reddit.reddit.settings import RedditSourceSettings
    from fl_crew_reddit.reddit.tool_names import RedditTool

_LAZY = {
    **dict.fromkeys(("DumpBackend", "RedditBackend", "SnapshotBackend", "make_backend"),
                    "fl_crew_reddit.reddit.backends"),
    **dict.fromkeys(("PostComments", "RedditComment", "RedditPost", "SearchResults", "SubredditInfo",
                     "SubredditPosts", "UserData"), "fl_crew_reddit.reddit.schemas"),
    "RedditMCPClient": "fl_crew_reddit.reddit.client",
    "RedditMCPError": "fl_crew_reddit.reddit.client",
    "build_server": "fl_crew_reddit.reddit.server",
    "RedditSourceSettings": "fl_crew_reddit.reddit.settings",
    "RedditTool": "fl_crew_reddit.reddit.tool_names",
}

__all__ = [
    "DumpBackend", "RedditBackend", "SnapshotBackend", "make_backend",
    "PostComments", "RedditComment", "RedditPost", "SearchResults", "SubredditInfo", "SubredditPosts", "UserData",
    "RedditMCPClient", "RedditMCPError", "build_server", "RedditSourceSettings", "RedditTool",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
