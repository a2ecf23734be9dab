"""Synchronous client of the Reddit MCP server: one stdio session kept open for many calls.

    with RedditMCPClient.for_config(config) as client:
        posts = client.collect_subreddit_posts("books", limit=50)

The asyncio loop of the MCP SDK runs in a background thread; every sync method submits a coroutine to it and
waits at most `timeout_s`. The server's stderr goes to a log file (`stderr_log`), never to the console.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError
from pydantic import BaseModel, ValidationError

from fl_crew_reddit.reddit.schemas import PostComments, SearchResults, SubredditInfo, SubredditPosts, UserData

if TYPE_CHECKING:  # pragma: no cover
    from fl_crew_reddit.config import FLCrewRedditConfig

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the fl_crew_reddit package
SERVER_MODULE = "fl_crew_reddit.reddit.server"
_SECRET_ENV = {"reddit_client_id": "REDDIT_CLIENT_ID", "reddit_client_secret": "REDDIT_CLIENT_SECRET"}


def _with_project_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this project on PYTHONPATH, so `-m fl_crew_reddit...` works from any working folder."""
    paths = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


class RedditMCPError(RuntimeError):
    """A tool call failed: the server answered with a tool error, timed out, or the session broke."""

    def __init__(self, tool: str, message: str):
        super().__init__(f"{tool}: {message}")
        self.tool = tool
        self.message = message


def server_command(backend: str | None = None, dump_dir: str | Path | None = None,
                   python: str | None = None) -> list[str]:
    """The command that starts this package's MCP server with the given backend."""
    command = [python or sys.executable, "-m", SERVER_MODULE]
    if backend:
        command += ["--backend", backend]
    if dump_dir is not None:
        command += ["--dump-dir", str(Path(dump_dir).expanduser().resolve())]
    return command


class RedditMCPClient:
    """Starts an MCP server over stdio and calls its Reddit tools synchronously.

    `command` is any MCP server command line; by default this package's server (`server_command()`), which
    then reads REDDIT_BACKEND / REDDIT_DUMP_DIR from the environment. `env` is the child's environment (default:
    this process's environment, so settings and secrets travel by environment, never on the command line).
    """

    def __init__(self, command: list[str] | None = None, env: dict[str, str] | None = None,
                 timeout_s: float = 60, *, stderr_log: str | Path | None = None,
                 cwd: str | Path | None = None):
        self.command = list(command) if command else server_command()
        if not self.command:
            raise ValueError("command must not be empty")
        child_env = dict(os.environ if env is None else env)
        self.env = _with_project_path(child_env) if command is None else child_env
        self.timeout_s = float(timeout_s)
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
        self._session: ClientSession | None = None
        self._stop: asyncio.Event | None = None
        self._runner: concurrent.futures.Future | None = None
        self._closed = False
        self.server_info = None
        self._start()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_config(cls, config: "FLCrewRedditConfig", timeout_s: float = 60, **kwargs) -> "RedditMCPClient":
        """A client of this package's server with the backend and dump folder of `config`.

        The environment is passed through, plus the Reddit secrets of `config` (by environment only); the
        server's stderr goes to `config.logs_dir / reddit_mcp_server.log` unless `stderr_log` is given.
        """
        dump_dir = config.reddit_dump_dir if config.reddit_backend == "dump" else None
        env = dict(os.environ)
        for name, variable in _SECRET_ENV.items():
            secret = getattr(config, name, None)
            if secret is not None:
                env[variable] = secret.get_secret_value()
        kwargs.setdefault("stderr_log", config.logs_dir / "reddit_mcp_server.log")
        return cls(server_command(config.reddit_backend, dump_dir), _with_project_path(env), timeout_s, **kwargs)

    def _start(self) -> None:
        self._errlog = open(self.stderr_log, "a", encoding="utf-8")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reddit-mcp-client", daemon=True)
        self._thread.start()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._runner = asyncio.run_coroutine_threadsafe(self._serve(ready), self._loop)
        try:
            self.server_info = ready.result(timeout=self.timeout_s)
        except BaseException as error:  # noqa: BLE001 - any startup failure closes everything
            self.close()
            if isinstance(error, concurrent.futures.TimeoutError):
                reason = f"no answer to initialize within {self.timeout_s:g} s"
            else:
                reason = f"{type(error).__name__}: {error}"
            raise RedditMCPError("startup", f"could not start {' '.join(self.command)} ({reason}); "
                                            f"server log {self.stderr_log}:\n{self._log_tail()}") from error
        logger.info("MCP session open with %s (log: %s)", self.server_info.serverInfo.name, self.stderr_log)

    async def _serve(self, ready: concurrent.futures.Future) -> None:
        """Hold the stdio transport and the session open in one task until `close()` sets the stop event."""
        self._stop = asyncio.Event()
        params = StdioServerParameters(command=self.command[0], args=self.command[1:], env=self.env, cwd=self.cwd)
        try:
            async with stdio_client(params, errlog=self._errlog) as (read, write):
                async with ClientSession(read, write,
                                         read_timeout_seconds=timedelta(seconds=self.timeout_s)) as session:
                    init = await session.initialize()
                    self._session = session
                    if not ready.done():
                        ready.set_result(init)
                    await self._stop.wait()
        except BaseException as error:  # noqa: BLE001 - reported to the starter, or logged after start
            if not ready.done():
                ready.set_exception(error)
            elif not self._closed:
                logger.warning("MCP session with %s ended: %s", self.command[0], error)
            if not isinstance(error, Exception):
                raise
        finally:
            self._session = None
            if not ready.done():
                ready.set_exception(RuntimeError("the server exited before initialize"))

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
            if self._stop is not None:
                loop.call_soon_threadsafe(self._stop.set)
            if self._runner is not None:
                try:
                    self._runner.result(timeout=10)
                except BaseException:  # noqa: BLE001 - shutting down; the log has the details
                    self._runner.cancel()
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if loop is not None and not loop.is_running():
            loop.close()
        if self._errlog is not None:
            self._errlog.close()

    def __enter__(self) -> "RedditMCPClient":
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
        session = self._session
        if self._closed or session is None or self._loop is None:
            raise RedditMCPError(tool, f"the MCP session is closed; server log {self.stderr_log}")
        future = asyncio.run_coroutine_threadsafe(request(session), self._loop)
        try:
            return future.result(timeout=self.timeout_s + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RedditMCPError(tool, f"no answer within {self.timeout_s:g} s") from None
        except McpError as error:
            raise RedditMCPError(tool, error.error.message) from error
        except (OSError, RuntimeError, asyncio.CancelledError, concurrent.futures.CancelledError) as error:
            raise RedditMCPError(tool, f"session failed ({type(error).__name__}: {error}); "
                                       f"server log {self.stderr_log}") from error

    def list_tools(self) -> list[str]:
        """Names of the server's tools."""
        result = self._run("list_tools", lambda session: session.list_tools())
        return [tool.name for tool in result.tools]

    def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call any tool; return its structured result (or its text parsed as JSON). Raises RedditMCPError."""
        arguments = {key: value for key, value in (arguments or {}).items() if value is not None}
        result = self._run(name, lambda session: session.call_tool(
            name, arguments, read_timeout_seconds=timedelta(seconds=self.timeout_s)))
        texts = [block.text for block in result.content if getattr(block, "type", None) == "text"]
        if result.isError:
            message = "\n".join(texts) or "tool error without a message"
            raise RedditMCPError(name, message.removeprefix(f"Error executing tool {name}: "))
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

    def _call_model(self, name: str, model: type[ModelT], arguments: dict[str, Any]) -> ModelT:
        data = self.call_tool(name, arguments)
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise RedditMCPError(name, f"result does not match {model.__name__}: {error}") from error

    def list_subreddits(self) -> list[str]:
        data = self.call_tool("list_subreddits")
        return list(data.get("result", []))

    def collect_subreddit_posts(self, subreddit: str, limit: int = 25, sort: str = "new") -> SubredditPosts:
        return self._call_model("collect_subreddit_posts", SubredditPosts,
                                {"subreddit": subreddit, "limit": limit, "sort": sort})

    def search_reddit_posts(self, query: str, subreddit: str | None = None, limit: int = 25) -> SearchResults:
        return self._call_model("search_reddit_posts", SearchResults,
                                {"query": query, "subreddit": subreddit, "limit": limit})

    def collect_post_comments(self, post_id: str, limit: int = 100) -> PostComments:
        return self._call_model("collect_post_comments", PostComments, {"post_id": post_id, "limit": limit})

    def collect_user_data(self, username: str, limit: int = 25) -> UserData:
        return self._call_model("collect_user_data", UserData, {"username": username, "limit": limit})

    def collect_subreddit_info(self, subreddit: str) -> SubredditInfo:
        return self._call_model("collect_subreddit_info", SubredditInfo, {"subreddit": subreddit})
