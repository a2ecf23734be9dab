"""The Data Collector's source of Reddit records: backends (snapshot, dump), an MCP server and its client.

Backends and schemas import light; the MCP server and client (which import the MCP SDK) load on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fl_crew_reddit.reddit.backends import DumpBackend, RedditBackend, SnapshotBackend, make_backend
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
    from fl_crew_reddit.reddit.client import RedditMCPClient, RedditMCPError, server_command
    from fl_crew_reddit.reddit.server import build_server

_LAZY = {
    "RedditMCPClient": "fl_crew_reddit.reddit.client",
    "RedditMCPError": "fl_crew_reddit.reddit.client",
    "server_command": "fl_crew_reddit.reddit.client",
    "build_server": "fl_crew_reddit.reddit.server",
}

__all__ = [
    "DumpBackend", "RedditBackend", "SnapshotBackend", "make_backend",
    "PostComments", "RedditComment", "RedditPost", "SearchResults", "SubredditInfo", "SubredditPosts", "UserData",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
