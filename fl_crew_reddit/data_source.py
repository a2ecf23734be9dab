"""The data source wired to the settings: FLCrewRedditConfig -> `reddit/`'s settings, backend, server and client.

`reddit/` knows no config module (tests/test_layers.py checks it); this module is the one place that knows both,
so the CLI (`serve-mcp`, `collect`) and the workspace build the data source the same way. Secrets reach our MCP
server process by environment only, never on its command line.
"""
from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fl_crew_reddit.config import ConfigError, FLCrewRedditConfig, process_environment
from fl_crew_reddit.reddit.settings import LiveCredentials, RedditSourceSettings

if TYPE_CHECKING:  # pragma: no cover
    from fl_crew_reddit.reddit.backends import RedditBackend
    from fl_crew_reddit.reddit.client import RedditMCPClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the fl_crew_reddit package
# Our server is the CLI's `serve-mcp`, which reads the settings in the child as `run` does in the parent.
SERVER_CLI = ("-m", "fl_crew_reddit.main", "serve-mcp", "--transport", "stdio")
SECRET_VARIABLES = {"reddit_client_id": "REDDIT_CLIENT_ID", "reddit_client_secret": "REDDIT_CLIENT_SECRET"}


def reddit_source_settings(config: FLCrewRedditConfig) -> RedditSourceSettings:
    """The data source's settings from the run's settings (the dump index goes under data/cache/dump-index)."""

    def secret(value) -> str:
        return value.get_secret_value() if value is not None else ""

    return RedditSourceSettings(
        backend=config.reddit_backend, dump_dir=config.reddit_dump_dir,
        dump_subreddits=tuple(config.reddit_dump_subreddits), dump_after=config.reddit_dump_after,
        dump_before=config.reddit_dump_before, dump_min_score=config.reddit_dump_min_score,
        dump_cache_dir=config.data_dir / "cache" / "dump-index", subreddits=tuple(config.subreddits),
        credentials=LiveCredentials(secret(config.reddit_client_id), secret(config.reddit_client_secret)),
        user_agent=config.reddit_user_agent, max_retries=config.reddit_max_retries,
        timeout_s=config.reddit_timeout_s)


def make_source_backend(config: FLCrewRedditConfig) -> RedditBackend:
    """The backend REDDIT_BACKEND names, built from `config` (live: the credentials are checked here)."""
    from fl_crew_reddit.reddit.backends import make_backend

    return make_backend(reddit_source_settings(config))


def check_subreddits(config: FLCrewRedditConfig, names: list[str] | None = None,
                     variable: str = "SUBREDDITS") -> None:
    """Raise ConfigError naming the subreddits the data source does not have, where it can list them at start
    without connecting to anything or reading dump contents: the snapshot, or a dump of per-subreddit files.

    `names` (named `variable` in the message) replaces SUBREDDITS and AGENT_COLLECT_ALLOWLIST. Not checked here:
    a third-party MCP server (REDDIT_MCP_URL / REDDIT_MCP_COMMAND), Reddit's API (it cannot list subreddits),
    monthly RS_/RC_ files (indexed on first use, which is the collection's work) and FEDERATION=flower (each site
    has its own data); the collector reports an unknown name there.
    """
    if config.reddit_mcp_url or config.reddit_mcp_command or config.federation == "flower":
        return
    if config.reddit_backend not in ("snapshot", "dump"):
        return
    wanted = ({variable: names} if names is not None
              else {"SUBREDDITS": config.subreddits, "AGENT_COLLECT_ALLOWLIST": config.agent_collect_allowlist})
    if not any(wanted.values()):
        return
    backend = make_source_backend(config)
    if config.reddit_backend == "dump":
        from fl_crew_reddit.reddit.dump_files import find_monthly_files

        if any(find_monthly_files(Path(config.reddit_dump_dir).expanduser())):
            return
    available = backend.list_subreddits()
    known = {name.lower() for name in available}
    for setting, values in wanted.items():
        unknown = [name for name in values if name.removeprefix("r/").lower() not in known]
        if unknown:
            where = "the embedded snapshot" if config.reddit_backend == "snapshot" else str(config.reddit_dump_dir)
            raise ConfigError(f"{setting}: no subreddit {', '.join(unknown)} in {where}; available: "
                              f"{', '.join(available) or 'none'}")


def server_command(backend: str | None = None, dump_dir: str | Path | None = None,
                   python: str | None = None) -> list[str]:
    """The command line that starts this package's MCP server on stdio; only non-secret flags."""
    command = [python or sys.executable, *SERVER_CLI]
    if backend:
        command += ["--backend", backend]
    if dump_dir is not None:
        command += ["--dump-dir", str(Path(dump_dir).expanduser().resolve())]
    return command


def with_project_path(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with this project on PYTHONPATH, so `-m fl_crew_reddit...` works from any working folder."""
    paths = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def server_environment(config: FLCrewRedditConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our server's environment: `base` (default: this process's), the Reddit secrets of `config`, PYTHONPATH."""
    env = dict(process_environment() if base is None else base)
    for field_name, variable in SECRET_VARIABLES.items():
        secret = getattr(config, field_name, None)
        if secret is not None:
            env[variable] = secret.get_secret_value()
    return with_project_path(env)


def open_mcp_client(config: FLCrewRedditConfig, timeout_s: float | None = None, **kwargs) -> RedditMCPClient:
    """The MCP client the settings ask for: REDDIT_MCP_URL, else REDDIT_MCP_COMMAND, else this package's server
    with the backend and dump folder of `config`; REDDIT_MCP_TOOL_MAP adapts a third-party server.

    A stdio server's stderr goes to `config.logs_dir / reddit_mcp_server.log` unless `stderr_log` is given.
    """
    from fl_crew_reddit.reddit.client import RedditMCPClient

    kwargs.setdefault("stderr_log", config.logs_dir / "reddit_mcp_server.log")
    kwargs.setdefault("connect_timeout_s", config.reddit_mcp_connect_timeout_s)
    kwargs.setdefault("max_restarts", config.reddit_mcp_max_restarts)
    kwargs.setdefault("tool_map", config.reddit_mcp_tool_map)
    timeout_s = config.reddit_mcp_timeout_s if timeout_s is None else timeout_s
    if config.reddit_mcp_url:
        return RedditMCPClient(url=config.reddit_mcp_url, timeout_s=timeout_s, token=config.reddit_mcp_token,
                               **kwargs)
    if config.reddit_mcp_command:  # a third-party server sees this process's environment, not our secrets
        return RedditMCPClient(shlex.split(config.reddit_mcp_command), process_environment(), timeout_s, **kwargs)
    dump_dir = config.reddit_dump_dir if config.reddit_backend == "dump" else None
    return RedditMCPClient(server_command(config.reddit_backend, dump_dir), server_environment(config), timeout_s,
                           **kwargs)
