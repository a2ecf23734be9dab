"""MCP server of the Data Collector: read-only Reddit tools over a snapshot, a dump folder or Reddit's API.

Run it with ``python -m fl_crew_reddit.main serve-mcp [--backend snapshot|dump|live] [--dump-dir PATH]``: the CLI
reads the settings (environment / ``.env``), builds the backend and calls `serve`; this module itself reads no
settings. It speaks MCP over stdio (stdout is the protocol, every log line goes to stderr) or, with
``--transport streamable-http``, over HTTP at ``http://HOST:PORT/mcp``. HTTP binds to 127.0.0.1 by default: the
server has no authentication, so any other address is refused unless ``--allow-remote`` is given, and then it warns
on every start.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import warnings
from typing import Annotated, Literal

from mcp.server.fastmcp import FastMCP
from mcp.types import ToolAnnotations
from pydantic import Field

from fl_crew_reddit.reddit.backends import RedditBackend
from fl_crew_reddit.reddit.schemas import PostComments, SearchResults, SubredditInfo, SubredditPosts, UserData
from fl_crew_reddit.reddit.settings import BACKEND_NAMES
from fl_crew_reddit.reddit.tool_names import RedditTool

logger = logging.getLogger(__name__)

SERVER_NAME = "fl-crew-reddit"
MAX_LIMIT = 1000

SubredditName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^(/?r/)?[A-Za-z0-9_-]+$",
                                     description="Subreddit name, case-insensitive, with or without r/ "
                                                 "(e.g. 'books' or 'r/Sports').")]
PostLimit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"How many posts to return (1-{MAX_LIMIT}).")]
CommentLimit = Annotated[int, Field(ge=1, le=MAX_LIMIT,
                                    description=f"How many comments to return (1-{MAX_LIMIT}).")]
Sort = Annotated[Literal["new", "top", "hot"],
                 Field(description="new: newest first; top: highest score first; hot: Reddit's hot ranking.")]
Query = Annotated[str, Field(min_length=1, max_length=512,
                             description="Words that must all appear in a post's title or text (case-insensitive).")]
PostId = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^(t3_)?[A-Za-z0-9_]+$",
                              description="Post id, with or without the t3_ prefix.")]
Username = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^(/?u/)?[A-Za-z0-9_-]+$",
                                description="Reddit username, with or without u/.")]

_READ_ONLY = dict(readOnlyHint=True, destructiveHint=False, idempotentHint=True)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
HTTP_PATH = "/mcp"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def build_server(backend: RedditBackend, *, name: str = SERVER_NAME, open_world: bool = False,
                 host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> FastMCP:
    """A FastMCP server exposing `backend` as read-only tools that return the models of `schemas.py`.

    `open_world` marks the tools as reaching outside the server (true for a live API backend, false for files).
    A backend `LookupError` / `ValueError` becomes an MCP tool error (`isError`) with its message. `host` and
    `port` matter only for HTTP; on a loopback host the SDK also turns on DNS-rebinding protection.
    """
    with warnings.catch_warnings():  # the SDK's own settings model warns about its `lifespan` field
        warnings.filterwarnings("ignore", message=".*has an incomplete definition.*")
        mcp = FastMCP(name, instructions=(
            "Read-only access to Reddit posts and comments for the federated fine-tuning data collector. "
            f"Backend: {backend!r}. Call list_subreddits first to see what exists."), log_level="WARNING",
            host=host, port=port, streamable_http_path=HTTP_PATH)
    annotations = ToolAnnotations(openWorldHint=open_world, **_READ_ONLY)

    @mcp.tool(name=RedditTool.LIST_SUBREDDITS, title="List subreddits", annotations=annotations)
    def list_subreddits() -> list[str]:
        """Names of the subreddits this server can serve."""
        return backend.list_subreddits()

    @mcp.tool(name=RedditTool.COLLECT_SUBREDDIT_POSTS, title="Collect subreddit posts", annotations=annotations)
    def collect_subreddit_posts(subreddit: SubredditName, limit: PostLimit = 25, sort: Sort = "new") -> SubredditPosts:
        """Posts of one subreddit (title, text, score, time, local image paths), sorted by `sort`."""
        return backend.subreddit_posts(subreddit, limit=limit, sort=sort)

    @mcp.tool(name=RedditTool.SEARCH_REDDIT_POSTS, title="Search Reddit posts", annotations=annotations)
    def search_reddit_posts(query: Query, subreddit: SubredditName | None = None,
                            limit: PostLimit = 25) -> SearchResults:
        """Posts whose title or text contains every word of `query`, best matches first; all subreddits when
        `subreddit` is omitted."""
        return backend.search_posts(query, subreddit=subreddit, limit=limit)

    @mcp.tool(name=RedditTool.COLLECT_POST_COMMENTS, title="Collect post comments", annotations=annotations)
    def collect_post_comments(post_id: PostId, limit: CommentLimit = 100) -> PostComments:
        """A post and its comments in thread order (each parent before its replies); `parent_id` links a reply
        to the comment (t1_) or post (t3_) it answers."""
        return backend.post_comments(post_id, limit=limit)

    @mcp.tool(name=RedditTool.COLLECT_USER_DATA, title="Collect user data", annotations=annotations)
    def collect_user_data(username: Username, limit: PostLimit = 25) -> UserData:
        """The newest posts and comments by one user (empty lists when the source has none, e.g. anonymised
        dumps)."""
        return backend.user_data(username, limit=limit)

    @mcp.tool(name=RedditTool.COLLECT_SUBREDDIT_INFO, title="Collect subreddit info", annotations=annotations)
    def collect_subreddit_info(subreddit: SubredditName) -> SubredditInfo:
        """How many posts and comments a subreddit has, their time span and its description."""
        return backend.subreddit_info(subreddit)

    return mcp


def add_server_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's command-line flags; none carries a secret (REDDIT_CLIENT_ID / SECRET come by environment)."""
    parser.add_argument("--backend", choices=list(BACKEND_NAMES), default=None,
                        help="where records come from (default: REDDIT_BACKEND, else snapshot)")
    parser.add_argument("--dump-dir", default=None,
                        help="folder of <subreddit>/submissions.jsonl + comments.jsonl (default: REDDIT_DUMP_DIR)")
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio",
                        help="MCP transport: stdio (default) or streamable-http at http://HOST:PORT/mcp")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"HTTP address to bind (default {DEFAULT_HOST}; others need --allow-remote)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding HTTP to a non-loopback address (the server has no authentication)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO",
                        help="level of the log written to stderr")
    return parser


def check_server_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (through `parser.error`, exit 2) a port out of range, or an unauthenticated non-loopback bind."""
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port (1-65535)")
    if args.transport == "streamable-http" and not is_loopback(args.host) and not args.allow_remote:
        parser.error(f"--host {args.host} is not a loopback address: the MCP server has no authentication, so "
                     "anyone who can reach that address could read its data. Bind to 127.0.0.1 (default), or pass "
                     "--allow-remote if you really mean it (e.g. behind a firewall or an authenticating proxy).")


def log_to_stderr(level: str) -> None:
    """Every log line to stderr: on stdio, stdout is the MCP protocol itself."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # the SDK logs every request at INFO
        logging.getLogger("mcp").setLevel(logging.WARNING)


def serve(backend: RedditBackend, *, transport: str = "stdio", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          open_world: bool = False) -> None:
    """Serve `backend` over `transport` until stdin closes (stdio) or the process is stopped (HTTP)."""
    server = build_server(backend, open_world=open_world, host=host, port=port)
    where = transport
    if transport == "streamable-http":
        where = f"streamable HTTP at http://{_url_host(host)}:{port}{HTTP_PATH}"
        if not is_loopback(host):
            logger.warning("!!! SERVING WITHOUT AUTHENTICATION ON A NON-LOOPBACK ADDRESS (%s): anyone who can reach "
                           "it can read this server's Reddit data. Put it behind a firewall or an authenticating "
                           "proxy. !!!", host)
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logger.info("serving %d subreddits from %r over %s", len(backend.list_subreddits()), backend, where)
    server.run(transport=transport)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
