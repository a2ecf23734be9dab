"""What the data source needs to know, as plain typed values: `reddit/` reads no environment and no config module.

The caller (the config layer, see `fl_crew_reddit.data_source`) fills a `RedditSourceSettings` from its own settings
and hands it to `backends.make_backend`; so this package can be used, and tested, with nothing but these values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_REDDIT_USER_AGENT = "python:fl_crew_reddit:0.1 (read-only collector for federated fine-tuning research)"

BackendName = Literal["snapshot", "dump", "live"]
BACKEND_NAMES: tuple[BackendName, ...] = ("snapshot", "dump", "live")


@dataclass(frozen=True)
class LiveCredentials:
    """A Reddit 'script' app's id and secret; `repr` never shows them, so they cannot leak into a log line."""

    client_id: str = field(default="", repr=False)
    client_secret: str = field(default="", repr=False)

    def __bool__(self) -> bool:
        return bool(self.client_id.strip() and self.client_secret.strip())


@dataclass(frozen=True)
class RedditSourceSettings:
    """Which backend serves Reddit records and how: the data source's whole configuration.

    `backend` snapshot needs nothing else; dump reads `dump_dir` (filtered by `dump_subreddits`, `dump_after` /
    `dump_before` in epoch seconds and `dump_min_score`) and indexes monthly files under `dump_cache_dir`; live
    calls Reddit's API with `credentials`, answering `list_subreddits` with `subreddits`.
    """

    backend: BackendName = "snapshot"
    dump_dir: Path | None = None
    dump_subreddits: tuple[str, ...] = ()
    dump_after: int | None = None
    dump_before: int | None = None
    dump_min_score: int | None = None
    dump_cache_dir: Path | None = None
    subreddits: tuple[str, ...] = ()
    credentials: LiveCredentials = LiveCredentials()
    user_agent: str = DEFAULT_REDDIT_USER_AGENT
    max_retries: int = 4
    timeout_s: float = 16.0

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"unknown REDDIT_BACKEND {self.backend!r}; use {', '.join(BACKEND_NAMES)}")
