"""Synchronous client of a Reddit MCP server over stdio (a command it starts) or streamable HTTP (a URL).

    with RedditMCPClient(command, env) as client:    # or fl_crew_reddit.data_source.open_mcp_client(config)
        posts = client.collect_subreddit_posts("books", limit=50)

The asyncio loop of the MCP SDK runs in a background thread; every sync method submits a coroutine to it and waits
at most `timeout_s` (connecting: `connect_timeout_s`). A stdio server that dies is started again, at most
`max_restarts` times per client, and the call is retried (every tool is read-only, so a retry is safe); an HTTP
session that breaks is reopened the same way; with a `token` every HTTP request carries
`Authorization: Bearer <token>` (the server's REDDIT_MCP_TOKEN). With a `tool_map` (see `tool_map.py`) the typed
methods call a third-party server's tools and map its results into our schemas. A stdio server's stderr goes to a
log file (`stderr_log`), never to the console.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import McpError
from mcp.types import CONNECTION_CLOSED
from pydantic import BaseModel, SecretStr, ValidationError

from fl_crew_reddit.redact import mask_url_credentials
from fl_crew_reddit.reddit.schemas import PostComments, SearchResults, SubredditInfo, SubredditPosts, UserData
from fl_crew_reddit.reddit.tool_map import ToolMap, ToolMapError, load_tool_map, map_result, translate_call
from fl_crew_reddit.reddit.tool_names import RedditTool

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
_SESSION_GONE_CODES = {CONNECTION_CLOSED, 32600}  # the SDK's "Connection closed" and "Session terminated"


class RedditMCPError(RuntimeError):
    """A tool call failed: the server answered with a tool error, timed out, or the session broke."""

    def __init__(self, tool: str, message: str):
        super().__init__(f"{tool}: {message}")
        self.tool = tool
        self.message = message


class RedditMCPSessionLost(RedditMCPError):
    """The server can answer nothing more: it never started, its session closed, or it died again after its restarts.
    A collector stops here; any other RedditMCPError concerns one call."""


class RedditMCPToolError(RedditMCPError):
    """The server answered this call with a tool error; `argument_refused` when its argument rules refused the call
    (FastMCP reports a failed argument validation), which no retry can fix."""

    def __init__(self, tool: str, message: str):
        super().__init__(tool, message)
        self.argument_refused = bool(_ARGUMENT_REFUSED.search(message))


_ARGUMENT_REFUSED = re.compile(r"validation error", re.IGNORECASE)


class _SessionLost(Exception):
    """The server process or HTTP session is gone; the call may be retried on a new one."""


@dataclass
class _Connection:
    """One transport + session, held open by its `runner` task until `stop` is set; `dead` is set when it ends."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    dead: asyncio.Event = field(default_factory=asyncio.Event)
    session: ClientSession | None = None
    runner: concurrent.futures.Future | None = None
    init_scope: anyio.CancelScope | None = None
    transport_error: BaseException | None = None


class RedditMCPClient:
    """Calls the Reddit tools of an MCP server synchronously, over stdio (`command`) or streamable HTTP (`url`).

    `command` is any MCP server command line (this package's: `fl_crew_reddit.data_source.server_command`). `env`
    is the child's whole environment, given by the caller so that settings and secrets travel by environment, never
    on the command line; None leaves it to the MCP SDK's safe default (PATH, HOME and the like, no secrets).
    `tool_map` (a ToolMap, a preset name or a mapping file) adapts a third-party server. `token` (str or SecretStr,
    HTTP only) is sent as a bearer token and never logged.
    """

    def __init__(self, command: list[str] | None = None, env: Mapping[str, str] | None = None,
                 timeout_s: float = 60, *, url: str | None = None, connect_timeout_s: float | None = None,
                 max_restarts: int = 2, tool_map: ToolMap | str | Path | None = None,
                 stderr_log: str | Path | None = None, cwd: str | Path | None = None,
                 token: str | SecretStr | None = None):
        if command is not None and url is not None:
            raise ValueError("give a stdio command or an HTTP url, not both")
        if token is not None and url is None:
            raise ValueError("a bearer token is for an HTTP url, not a stdio command")
        self._token = token if isinstance(token, SecretStr) or token is None else SecretStr(token)
        if self._token is not None and url.startswith("http://") and not _is_loopback_url(url):
            logger.warning("the bearer token goes to %s over plain HTTP: anyone on the way can read it (use https)",
                           mask_url_credentials(url))
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"url {mask_url_credentials(url)!r} must start with http:// or https://")
        self.url = url
        self.command = list(command or [])
        if url is None and not self.command:
            raise ValueError("give a stdio server command or an HTTP url")
        self.env = dict(env) if env is not None else None
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else timeout_s)
        self.max_restarts = int(max_restarts)
        self.restarts = 0
        self.tool_map = load_tool_map(tool_map) if isinstance(tool_map, (str, Path)) else tool_map
        self.skipped: Counter = Counter()  # records of a mapped server's results that could not be read, by reason
        self.cwd = str(cwd) if cwd is not None else None
        if stderr_log is None:
            handle, name = tempfile.mkstemp(prefix="reddit_mcp_server_", suffix=".log")
            os.close(handle)
            stderr_log = name
        self.stderr_log = Path(stderr_log)
        self.stderr_log.parent.mkdir(parents=True, exist_ok=True)

        self._errlog = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conn: _Connection | None = None
        self._closed = False
        self.server_info = None
        self._start()

    @property
    def target(self) -> str:
        """What this client talks to, for messages (the URL, or the command line), URL credentials masked: a
        command line may carry a URL too (a proxy to a remote server)."""
        return mask_url_credentials(self.url or " ".join(self.command))

    def _start(self) -> None:
        self._errlog = open(self.stderr_log, "a", encoding="utf-8")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reddit-mcp-client", daemon=True)
        self._thread.start()
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        logger.info("MCP session open with %s at %s", self.server_info.serverInfo.name,
                    self.target if self.url else f"stdio (log: {self.stderr_log})")

    def _connect(self) -> None:
        """Open a transport and a session; RedditMCPError says why when it cannot within `connect_timeout_s`."""
        ready: concurrent.futures.Future = concurrent.futures.Future()
        conn = self._conn = asyncio.run_coroutine_threadsafe(self._new_connection(), self._loop).result()
        conn.runner = asyncio.run_coroutine_threadsafe(self._serve(conn, ready), self._loop)
        try:
            self.server_info = ready.result(timeout=self.connect_timeout_s + 5)
        except BaseException as error:  # noqa: BLE001 - any startup failure is reported with its cause
            self._end(conn)
            cause = _unwrap(error)
            if isinstance(cause, (concurrent.futures.TimeoutError, TimeoutError)):
                reason = f"no answer to initialize within {self.connect_timeout_s:g} s"
            elif isinstance(cause, McpError) and cause.error.code in _SESSION_GONE_CODES:
                reason = f"the server closed the connection before answering initialize: {cause.error.message}"
            elif isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 401:
                reason = ("401 Unauthorized: the server wants a bearer token; REDDIT_MCP_TOKEN is "
                          + ("wrong" if self._token else "unset"))
            else:
                reason = _describe(error)
            where = f"; server log {self.stderr_log}:\n{self._log_tail()}" if not self.url else ""
            action = "connect to" if self.url else "start"
            raise RedditMCPSessionLost("startup", f"could not {action} {self.target} ({reason}){where}") from error

    @staticmethod
    async def _new_connection() -> _Connection:
        return _Connection()  # its events belong to the client's loop

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[tuple[Any, Any]]:
        if self.url:
            timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
            headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"} if self._token else None
            async with create_mcp_http_client(headers=headers, timeout=timeout) as http:
                async with streamable_http_client(self.url, http_client=http) as (read, write, _session_id):
                    yield read, write
        else:
            params = StdioServerParameters(command=self.command[0], args=self.command[1:], env=self.env,
                                           cwd=self.cwd)
            async with stdio_client(params, errlog=self._errlog) as (read, write):
                yield read, write

    async def _serve(self, conn: _Connection, ready: concurrent.futures.Future) -> None:
        """Hold the transport and the session open in one task until `conn.stop` is set or the transport fails."""

        async def on_message(message) -> None:
            if isinstance(message, Exception):  # the transport reports its failures here
                conn.transport_error = message
                logger.warning("MCP transport error from %s: %s", self.target, _describe(message))
                if conn.init_scope is not None and not ready.done():
                    conn.init_scope.cancel()

        try:
            async with self._transport() as (read, write):
                async with ClientSession(read, write, read_timeout_seconds=timedelta(seconds=self.timeout_s),
                                         message_handler=on_message) as session:
                    with anyio.move_on_after(self.connect_timeout_s) as conn.init_scope:
                        init = await session.initialize()
                    if conn.init_scope.cancelled_caught:
                        raise conn.transport_error or TimeoutError(
                            f"no answer to initialize within {self.connect_timeout_s:g} s")
                    conn.session = session
                    if not ready.done():
                        ready.set_result(init)
                    await conn.stop.wait()
        except BaseException as error:  # noqa: BLE001 - reported to the starter, or logged after start
            if not ready.done():
                ready.set_exception(error)
            elif not conn.stop.is_set():
                logger.warning("MCP session with %s ended: %s", self.target, _describe(error))
            if not isinstance(error, Exception):
                raise
        finally:
            conn.session = None
            conn.dead.set()
            if not ready.done():
                ready.set_exception(RuntimeError("the server exited before initialize"))

    def _end(self, conn: _Connection | None) -> None:
        """Stop one connection and wait (bounded) for its transport to close."""
        if conn is None or self._loop is None or not self._loop.is_running():
            return
        self._loop.call_soon_threadsafe(conn.stop.set)
        if conn.runner is not None:
            try:
                conn.runner.result(timeout=10)
            except BaseException:  # noqa: BLE001 - shutting down; the log has the details
                conn.runner.cancel()

    def _reconnect(self, tool: str, why: str) -> None:
        """Start the server (stdio) or session (HTTP) again after it was lost; bounded by `max_restarts`."""
        if self.restarts >= self.max_restarts:
            raise RedditMCPSessionLost(tool, f"the MCP server {self.target} is gone ({why}) and was already restarted "
                                       f"{self.restarts} time(s), the most allowed (REDDIT_MCP_MAX_RESTARTS)"
                                       + ("" if self.url else f"; server log {self.stderr_log}:\n{self._log_tail()}"))
        self.restarts += 1
        logger.warning("MCP server %s is gone (%s); %s it (%d of at most %d) and retrying %s", self.target, why,
                       "reconnecting to" if self.url else "restarting", self.restarts, self.max_restarts, tool)
        self._end(self._conn)
        self._connect()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            if self._errlog is not None and not self._errlog.closed:
                self._errlog.flush()
            text = self.stderr_log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(unreadable)"
        return "\n".join(text[-lines:])

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """End the session and the server process; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and loop.is_running():
            self._end(self._conn)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if loop is not None and not loop.is_running():
            loop.close()
        if self._errlog is not None:
            self._errlog.close()

    def __enter__(self) -> RedditMCPClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort if the owner forgot close()
        try:
            if hasattr(self, "_closed"):
                self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ calls
    def _run(self, tool: str, request: Callable[[ClientSession], Awaitable[Any]]) -> Any:
        """Run `request` on the session; if the server or session is gone, reconnect (bounded) and retry."""
        while True:
            try:
                return self._run_once(tool, request)
            except _SessionLost as lost:
                if self._closed:
                    raise RedditMCPSessionLost(tool, "the MCP session is closed") from None
                self._reconnect(tool, str(lost))

    def _run_once(self, tool: str, request: Callable[[ClientSession], Awaitable[Any]]) -> Any:
        conn = self._conn
        if self._closed or self._loop is None or conn is None:
            raise RedditMCPSessionLost(tool, f"the MCP session is closed; server log {self.stderr_log}")
        if conn.session is None or conn.dead.is_set():
            raise _SessionLost("its session had ended")
        future = asyncio.run_coroutine_threadsafe(self._guarded(conn, request), self._loop)
        try:
            return future.result(timeout=self.timeout_s + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RedditMCPError(tool, f"no answer within {self.timeout_s:g} s") from None
        except _SessionLost:
            raise
        except McpError as error:
            if error.error.code in _SESSION_GONE_CODES:
                raise _SessionLost(error.error.message) from error
            raise RedditMCPError(tool, error.error.message) from error
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream) as error:
            raise _SessionLost(f"{type(error).__name__}") from error
        except (OSError, RuntimeError, asyncio.CancelledError, concurrent.futures.CancelledError) as error:
            raise RedditMCPError(tool, f"session failed ({_describe(error)}); server log {self.stderr_log}") from error

    @staticmethod
    async def _guarded(conn: _Connection, request: Callable[[ClientSession], Awaitable[Any]]) -> Any:
        """`request`, abandoned as soon as the connection dies (a dead stdio server never answers)."""
        call = asyncio.ensure_future(request(conn.session))
        watch = asyncio.ensure_future(conn.dead.wait())
        try:
            await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if call.done():
            return call.result()
        call.cancel()
        raise _SessionLost("the server process or HTTP session ended" + (
            f" ({_describe(conn.transport_error)})" if conn.transport_error else ""))

    def list_tools(self) -> list[str]:
        """Names of the server's tools."""
        result = self._run("list_tools", lambda session: session.list_tools())
        return [tool.name for tool in result.tools]

    def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call any tool by its own name (no mapping); return its structured result, or its text parsed as JSON
        (a JSON array comes back as {"result": [...]}). Raises RedditMCPError."""
        name = str(name)  # a RedditTool goes on the wire as its plain string
        arguments = {key: value for key, value in (arguments or {}).items() if value is not None}
        result = self._run(name, lambda session: session.call_tool(
            name, arguments, read_timeout_seconds=timedelta(seconds=self.timeout_s)))
        texts = [block.text for block in result.content if getattr(block, "type", None) == "text"]
        if result.isError:
            message = "\n".join(texts) or "tool error without a message"
            raise RedditMCPToolError(name, message.removeprefix(f"Error executing tool {name}: "))
        if result.structuredContent is not None:
            return result.structuredContent
        if len(texts) == 1:
            try:
                parsed = json.loads(texts[0])
            except json.JSONDecodeError:
                raise RedditMCPError(name, f"result is neither structured nor JSON: {texts[0][:200]!r}") from None
            return parsed if isinstance(parsed, dict) else {"result": parsed}
        try:
            return {"result": [json.loads(text) for text in texts]}
        except json.JSONDecodeError:
            raise RedditMCPError(name, "result is neither structured nor JSON") from None

    def _call_ours(self, tool: str, arguments: dict[str, Any]) -> Any:
        """Call our `tool`, through the tool map when there is one; the result as our model (or list)."""
        if self.tool_map is None:
            return self.call_tool(tool, arguments)
        route = self.tool_map.tools.get(tool)
        if route is None:
            offered = ", ".join(self.tool_map.tools) or "none"
            hint = "; name the subreddits in SUBREDDITS" if tool == RedditTool.LIST_SUBREDDITS else ""
            raise RedditMCPError(tool, f"the server mapped by {self.tool_map.name!r} has no tool for this "
                                       f"(mapped: {offered}){hint}")
        skipped: Counter = Counter()
        try:
            their_tool, their_arguments = translate_call(route, tool, arguments)
            data = self.call_tool(their_tool, their_arguments)
            result = map_result(route, tool, arguments, data, skipped)
        except ToolMapError as error:
            raise RedditMCPError(tool, f"{error} (tool map {self.tool_map.name!r})") from error
        if skipped:
            self.skipped.update(skipped)
            logger.warning("%s via %s: left out %s", tool, their_tool, dict(skipped))
        return result

    def _call_model(self, name: str, model: type[ModelT], arguments: dict[str, Any]) -> ModelT:
        data = self._call_ours(name, arguments)
        if isinstance(data, model):
            return data
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise RedditMCPError(name, f"result does not match {model.__name__}: {error}") from error

    def list_subreddits(self) -> list[str]:
        data = self._call_ours(RedditTool.LIST_SUBREDDITS, {})
        return list(data) if isinstance(data, list) else list(data.get("result", []))

    def collect_subreddit_posts(self, subreddit: str, limit: int = 25, sort: str = "new") -> SubredditPosts:
        return self._call_model(RedditTool.COLLECT_SUBREDDIT_POSTS, SubredditPosts,
                                {"subreddit": subreddit, "limit": limit, "sort": sort})

    def search_reddit_posts(self, query: str, subreddit: str | None = None, limit: int = 25) -> SearchResults:
        return self._call_model(RedditTool.SEARCH_REDDIT_POSTS, SearchResults,
                                {"query": query, "subreddit": subreddit, "limit": limit})

    def collect_post_comments(self, post_id: str, limit: int = 100) -> PostComments:
        return self._call_model(RedditTool.COLLECT_POST_COMMENTS, PostComments, {"post_id": post_id, "limit": limit})

    def collect_user_data(self, username: str, limit: int = 25) -> UserData:
        return self._call_model(RedditTool.COLLECT_USER_DATA, UserData, {"username": username, "limit": limit})

    def collect_subreddit_info(self, subreddit: str) -> SubredditInfo:
        return self._call_model(RedditTool.COLLECT_SUBREDDIT_INFO, SubredditInfo, {"subreddit": subreddit})


def _is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unwrap(error: BaseException) -> BaseException:
    """The single exception inside the (nested) exception groups anyio task groups raise."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    """A one-line cause, unwrapping the exception groups anyio task groups raise."""
    error = _unwrap(error)
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
