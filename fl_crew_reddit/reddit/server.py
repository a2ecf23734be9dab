"""MCP server of the Data Collector: read-only Reddit tools over a snapshot, a dump folder or Reddit's API.

Run it with ``python -m fl_crew_reddit.main serve-mcp [--backend snapshot|dump|live] [--dump-dir PATH]``: the CLI
reads the settings (environment / ``.env``), builds the backend and calls `serve`; this module itself reads no
settings. It speaks MCP over stdio (stdout is the protocol, every log line goes to stderr) or, with
``--transport streamable-http``, over HTTP at ``http://HOST:PORT/mcp``.

Over HTTP every request passes `GuardedMCPApp` (ASGI, around the SDK's Starlette app) before the SDK sees it:

- Host and Origin must name one of the allowed hosts *with the server's port* (else 421 / 403): on a loopback bind
  (127.0.0.1, any 127.x.y.z, ::1, localhost) its own spellings ``127.0.0.1``, ``localhost``, ``[::1]`` and the bound
  address; plus every ``--allowed-host NAME[:PORT]``. A missing Origin is a non-browser client and passes. This
  replaces the SDK's own DNS-rebinding check, which covers 127.0.0.1 / localhost / ::1 only and any port.
- HTTP binds to loopback unless ``--allow-remote`` is given, and that needs ``--allowed-host`` and a bearer token
  (REDDIT_MCP_TOKEN); without both the CLI refuses (exit 2). With a token set every request must carry
  ``Authorization: Bearer <token>`` (compared in constant time, never logged), else 401.
- A request body over ``--max-request-bytes`` (default 1 MiB) gets 413; only a POSTed ``initialize`` opens a
  session (stray GETs / POSTs without a session id get 400 instead of leaving an orphan session in the SDK); at most
  ``--max-sessions`` sessions are open (more get 503 with Retry-After); a session without a request for
  ``--session-idle-timeout`` seconds is closed (a running call keeps it open), and sessions the SDK terminated
  (client DELETE) are dropped from its table, which 1.28.1 keeps forever otherwise.
- ``GET /health`` (same checks) answers ``{"status": "ok", "sessions": N, ...}``.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from mcp.server.fastmcp import FastMCP
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import Field, SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
HEALTH_PATH = "/health"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_SESSIONS = 64
DEFAULT_SESSION_IDLE_TIMEOUT_S = 600.0
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,62}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


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
    `port` matter only for HTTP, where `guarded_http_app` wraps the server (the SDK's own Host check is off).
    """
    with warnings.catch_warnings():  # the SDK's own settings model warns about its `lifespan` field
        warnings.filterwarnings("ignore", message=".*has an incomplete definition.*")
        mcp = FastMCP(name, instructions=(
            "Read-only access to Reddit posts and comments for the federated fine-tuning data collector. "
            f"Backend: {backend!r}. Call list_subreddits first to see what exists."), log_level="WARNING",
            host=host, port=port, streamable_http_path=HTTP_PATH,
            # Host / Origin are checked by GuardedMCPApp, for every loopback spelling and with the port
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
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
    """The server's command-line flags; none carries a secret (REDDIT_CLIENT_ID / SECRET and REDDIT_MCP_TOKEN come
    by environment)."""
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
                        help="allow binding HTTP to a non-loopback address; needs --allowed-host and a bearer "
                             "token in REDDIT_MCP_TOKEN")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                        help="a Host / Origin name clients use to reach the server (repeatable or comma-separated; "
                             "the port defaults to --port); loopback names are always allowed")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help=f"largest HTTP request body; larger gets 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                        help=f"most MCP sessions open at once; more get 503 (default {DEFAULT_MAX_SESSIONS})")
    parser.add_argument("--session-idle-timeout", type=float, default=DEFAULT_SESSION_IDLE_TIMEOUT_S,
                        metavar="SECONDS", help="close an HTTP session without a request for this long (default "
                                                f"{DEFAULT_SESSION_IDLE_TIMEOUT_S:g})")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO",
                        help="level of the log written to stderr")
    return parser


def check_server_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (through `parser.error`, exit 2) a port out of range, a bad limit or allowed host, a non-loopback bind
    without --allow-remote, or --allow-remote without --allowed-host. The token is checked by `http_guard`."""
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port (1-65535)")
    if args.transport != "streamable-http":
        return
    if args.max_request_bytes < 1024:
        parser.error(f"--max-request-bytes {args.max_request_bytes} is too small (at least 1024)")
    if args.max_sessions < 1:
        parser.error(f"--max-sessions {args.max_sessions} must be at least 1")
    if not 0 < args.session_idle_timeout <= 86400:
        parser.error(f"--session-idle-timeout {args.session_idle_timeout:g} must be in (0, 86400] seconds")
    for value in _allowed_host_values(args):
        try:
            split_host_port(value, args.port)
        except ValueError as error:
            parser.error(f"--allowed-host {value!r} is not NAME[:PORT] ({error})")
    if not is_loopback(args.host) and not args.allow_remote:
        parser.error(f"--host {args.host} is not a loopback address: anyone who can reach that address could read "
                     "this server's data. Bind to 127.0.0.1 (default), or pass --allow-remote with --allowed-host "
                     "and a bearer token in REDDIT_MCP_TOKEN (and put TLS in front of it).")
    if args.allow_remote and not _allowed_host_values(args):
        parser.error("--allow-remote needs --allowed-host NAME[:PORT] (the names clients use to reach this server, "
                     "repeatable or comma-separated): any other Host or Origin is refused.")


def http_guard(parser: argparse.ArgumentParser, args: argparse.Namespace,
               token: SecretStr | str | None) -> HttpGuard | None:
    """The HTTP guard the flags and the token (REDDIT_MCP_TOKEN) ask for; None for stdio. --allow-remote without a
    token is refused through `parser.error` (exit 2)."""
    if args.transport != "streamable-http":
        return None
    secret = token.get_secret_value() if isinstance(token, SecretStr) else token
    if args.allow_remote and not secret:
        parser.error("--allow-remote needs a bearer token: set REDDIT_MCP_TOKEN (e.g. to the output of "
                     "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) here and for the clients.")
    return HttpGuard.for_bind(args.host, args.port, extra_hosts=_allowed_host_values(args), token=secret or None,
                              max_request_bytes=args.max_request_bytes, max_sessions=args.max_sessions,
                              session_idle_timeout_s=args.session_idle_timeout)


def _allowed_host_values(args: argparse.Namespace) -> list[str]:
    return [part.strip() for value in args.allowed_host for part in value.split(",") if part.strip()]


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """('name', port) from 'NAME', 'NAME:PORT', '[v6]' or '[v6]:PORT' (also a bare v6 address), lower-cased, an IPv6
    address in brackets; ValueError when it is not a host name or address, or the port is not 1-65535."""
    text = value.strip().lower()
    port_text = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("unbalanced brackets")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        host = text
    else:
        host, _, port_text = text.partition(":")
        port_text = port_text if ":" in text else None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host.rstrip(".")):
            raise ValueError("not a host name or IP address") from None
        host = host.rstrip(".")
    else:
        host = f"[{address.compressed}]" if address.version == 6 else address.compressed
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not 1-65535")
    return host, int(port_text)


@dataclass(frozen=True)
class HttpGuard:
    """What `GuardedMCPApp` enforces: the (host, port) pairs allowed in Host / Origin, the bearer token, limits."""

    allowed: frozenset[tuple[str, int]]
    token: SecretStr | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_sessions: int = DEFAULT_MAX_SESSIONS
    session_idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S

    @classmethod
    def for_bind(cls, host: str, port: int, *, extra_hosts: list[str] = (), token: SecretStr | str | None = None,
                 **limits: Any) -> HttpGuard:
        """Loopback names and an IP address bound to, each with `port`, plus `extra_hosts` (NAME[:PORT])."""
        names = set(LOOPBACK_NAMES)
        try:
            bound = split_host_port(host if ":" not in host or host.startswith("[") else f"[{host}]", port)[0]
        except ValueError:
            bound = None
        if bound is not None and bound not in ("0.0.0.0", "[::]"):
            names.add(bound)
        allowed = {(name, port) for name in names} | {split_host_port(value, port) for value in extra_hosts}
        if isinstance(token, str):
            token = SecretStr(token)
        return cls(frozenset(allowed), token, **limits)

    def describe(self) -> str:
        """For the start line: never the token itself."""
        hosts = ", ".join(sorted(f"{host}:{port}" for host, port in self.allowed))
        auth = "bearer token required" if self.token else "no bearer token (REDDIT_MCP_TOKEN unset)"
        return (f"{auth}; Host/Origin allowed: {hosts}; request body <= {self.max_request_bytes} bytes; at most "
                f"{self.max_sessions} sessions, closed after {self.session_idle_timeout_s:g} s idle")


def _error(status: int, message: str, code: int = -32600, headers: dict[str, str] | None = None):
    """A JSON-RPC error body like the SDK's own, as a raw ASGI response."""
    body = json.dumps({"jsonrpc": "2.0", "id": "server-error", "error": {"code": code, "message": message}}).encode()

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
        if status == 413:
            raw.append((b"connection", b"close"))  # the rest of the body is never read
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
    return respond


class GuardedMCPApp:
    """ASGI middleware around FastMCP's streamable-HTTP Starlette app (see the module docstring for what it refuses).

    Sessions are counted in the SDK's session table (`StreamableHTTPSessionManager._server_instances`, mcp 1.28.1);
    idle sessions are closed by the SDK's own idle deadline, which this class holds off while a call runs.
    """

    def __init__(self, app: ASGIApp, manager: StreamableHTTPSessionManager, guard: HttpGuard, path: str = HTTP_PATH):
        self.app = app
        self.manager = manager
        self.guard = guard
        self.path = path
        self._token = guard.token.get_secret_value().encode() if guard.token else None
        self._opening = 0  # new sessions being initialized right now (not yet all in the SDK's table)
        self._busy: Counter[str] = Counter()  # requests running per session id
        self.refused: Counter[str] = Counter()

    # ------------------------------------------------------------------ sessions
    @property
    def _table(self) -> dict[str, Any]:
        return self.manager._server_instances

    def open_sessions(self) -> int:
        """Live sessions, after dropping the ones the SDK terminated (a client's DELETE) but left in its table."""
        for session_id, transport in list(self._table.items()):
            if transport.is_terminated:
                self._table.pop(session_id, None)
                self.manager._session_owners.pop(session_id, None)
        return len(self._table)

    def _hold(self, session_id: str, count: int = 1) -> None:
        """A request of `session_id` runs: no idle deadline until it ends (`_release`)."""
        self._busy[session_id] += count
        transport = self._table.get(session_id)
        if transport is not None and transport.idle_scope is not None:
            transport.idle_scope.deadline = math.inf

    def _release(self, session_id: str) -> None:
        self._busy[session_id] -= 1
        if self._busy[session_id] > 0:
            return
        del self._busy[session_id]
        transport = self._table.get(session_id)
        if transport is not None and transport.idle_scope is not None:
            transport.idle_scope.deadline = anyio.current_time() + self.guard.session_idle_timeout_s

    # ------------------------------------------------------------------ checks
    def _refuse(self, kind: str, detail: str) -> None:
        self.refused[kind] += 1
        count = self.refused[kind]
        if count <= 5 or count % 1000 == 0:
            logger.warning("refused %s (%d so far): %s", kind, count, detail)

    def _host_allowed(self, value: str | None, default_port: int) -> bool:
        if not value:
            return False
        try:
            return split_host_port(value, default_port) in self.guard.allowed
        except ValueError:
            return False

    def _check_headers(self, headers: Headers):
        """The refusal for a bad Host, Origin or bearer token, or None."""
        host = headers.get("host")
        if not self._host_allowed(host, 80):
            self._refuse("host", f"Host {host!r:.80}")
            return _error(421, "Misdirected Request: Host is not one of this server's names (see --allowed-host)")
        origin = headers.get("origin")
        if origin is not None:
            scheme, sep, rest = origin.partition("://")
            scheme = scheme.lower()
            if not (sep and scheme in ("http", "https") and "/" not in rest
                    and self._host_allowed(rest, 443 if scheme == "https" else 80)):
                self._refuse("origin", f"Origin {origin!r:.80}")
                return _error(403, "Forbidden: Origin is not one of this server's names (see --allowed-host)")
        if self._token is not None:
            scheme, _, credentials = headers.get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer"
                    and hmac.compare_digest(credentials.strip().encode(), self._token)):
                self._refuse("token", "missing or wrong bearer token")
                return _error(401, "Unauthorized: send Authorization: Bearer <REDDIT_MCP_TOKEN>",
                              headers={"WWW-Authenticate": 'Bearer realm="mcp", error="invalid_token"'})
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when it is larger than the limit; _ClientGone when the client went away."""
        limit = self.guard.max_request_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (starts the SDK's session manager)
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._check_headers(headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        if path == HEALTH_PATH and method == "GET":
            await self._health(scope, receive, send)
            return
        if path != self.path:
            await self.app(scope, receive, send)
            return
        body = b""
        if method == "POST":
            try:
                body = await self._read_body(scope, receive)
            except _ClientGone:
                return
            if body is None:
                self._refuse("size", f"body over {self.guard.max_request_bytes} bytes")
                await _error(413, f"Content Too Large: a request body may have at most "
                                  f"{self.guard.max_request_bytes} bytes (--max-request-bytes)")(scope, receive, send)
                return
        session_id = headers.get(MCP_SESSION_ID_HEADER)
        if session_id is None:
            await self._new_session(scope, _replay(body, receive), send, method, body)
            return
        if method == "GET":  # the long-lived event stream: not a use that keeps the session open
            await self.app(scope, _replay(body, receive), send)
            return
        self._hold(session_id)
        try:  # the SDK sets the idle deadline when the request comes in; held again once it reads the body
            await self.app(scope, _replay(body, receive, on_read=lambda: self._hold(session_id, 0)), send)
        finally:
            self._release(session_id)

    async def _new_session(self, scope: Scope, receive: Receive, send: Send, method: str, body: bytes) -> None:
        if method != "POST" or not _is_initialize(body):
            await _error(400, "Bad Request: Missing session ID (only an initialize request opens a session)"
                         )(scope, receive, send)
            return
        if self.open_sessions() + self._opening >= self.guard.max_sessions:
            self._refuse("session", f"{self.guard.max_sessions} sessions open")
            retry = max(1, min(60, math.ceil(self.guard.session_idle_timeout_s)))
            await _error(503, f"Service Unavailable: too many MCP sessions ({self.guard.max_sessions} open, "
                              "--max-sessions); close one or retry later", headers={"Retry-After": str(retry)}
                         )(scope, receive, send)
            return
        self._opening += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._opening -= 1

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = json.dumps({"status": "ok", "sessions": self.open_sessions(), "max_sessions": self.guard.max_sessions,
                           "session_idle_timeout_s": self.guard.session_idle_timeout_s}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _replay(body: bytes, receive: Receive, on_read: Callable[[], None] | None = None) -> Receive:
    """A `receive` that gives the already-read body once (calling `on_read`), then waits on the real one (for the
    disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if not pending:
            return await receive()
        if on_read is not None:
            on_read()
        return pending.pop()
    return replayed


def _is_initialize(body: bytes) -> bool:
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("method") == "initialize" and "id" in message


def guarded_http_app(server: FastMCP, guard: HttpGuard) -> GuardedMCPApp:
    """The server's streamable-HTTP app behind `guard`, with the SDK's idle timeout set to the guard's."""
    app = server.streamable_http_app()
    manager = server.session_manager
    manager.session_idle_timeout = guard.session_idle_timeout_s
    return GuardedMCPApp(app, manager, guard, path=server.settings.streamable_http_path)


def log_to_stderr(level: str) -> None:
    """Every log line to stderr: on stdio, stdout is the MCP protocol itself."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # the SDK logs every request at INFO
        logging.getLogger("mcp").setLevel(logging.WARNING)


def serve(backend: RedditBackend, *, transport: str = "stdio", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          open_world: bool = False, guard: HttpGuard | None = None) -> None:
    """Serve `backend` over `transport` until stdin closes (stdio) or the process is stopped (HTTP); over HTTP behind
    `guard` (default: loopback names only, no token, default limits)."""
    server = build_server(backend, open_world=open_world, host=host, port=port)
    if transport != "streamable-http":
        logger.info("serving %d subreddits from %r over %s", len(backend.list_subreddits()), backend, transport)
        server.run(transport=transport)
        return
    import uvicorn

    guard = guard or HttpGuard.for_bind(host, port)
    where = f"streamable HTTP at http://{_url_host(host)}:{port}{HTTP_PATH}"
    if not is_loopback(host):
        logger.warning("!!! SERVING ON A NON-LOOPBACK ADDRESS (%s)%s: anyone who can reach it and has the token can "
                       "read this server's Reddit data; the token travels in clear unless TLS is in front. !!!",
                       host, "" if guard.token else " WITHOUT A TOKEN")
    logger.info("serving %d subreddits from %r over %s", len(backend.list_subreddits()), backend, where)
    logger.info("HTTP guard: %s", guard.describe())
    config = uvicorn.Config(guarded_http_app(server, guard), host=host.strip("[]"), port=port,
                            log_config=None, log_level=logger.getEffectiveLevel(), access_log=False,
                            limit_concurrency=4 * guard.max_sessions + 16, server_header=False)
    uvicorn.Server(config).run()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
