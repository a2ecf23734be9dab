"""Data Collector's tool: collect posts and comment threads through the Reddit MCP server."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from fl_crew_reddit.config import FLCrewRedditConfig
from fl_crew_reddit.crew.tools.base import Step, WorkspaceTool
from fl_crew_reddit.reddit.collector import CollectionReport

MAX_QUERIES = 5  # searches per subreddit: each one is an MCP call, and their posts share the subreddit's budget
MAX_QUERY_CHARS = 100
SearchQuery = Annotated[str, Field(min_length=2, max_length=MAX_QUERY_CHARS, pattern=r"\w",
                                   description="Words that must all appear in a post's title or text")]


class CollectRedditDataArgs(BaseModel):
    subreddits: list[str] | None = Field(None, description="Subreddit names without r/; null: the configured "
                                                           "SUBREDDITS")
    posts_per_subreddit: int | None = Field(None, ge=1, le=1000, description="Posts to collect per subreddit")
    queries: list[SearchQuery] | None = Field(
        None, max_length=MAX_QUERIES,
        description=f"Up to {MAX_QUERIES} search phrases of at most {MAX_QUERY_CHARS} characters: each subreddit's "
                    "posts matching them are collected first (within posts_per_subreddit), then its newest posts; "
                    "null: newest posts only")


def allowed_subreddits(config: FLCrewRedditConfig) -> list[str]:
    """AGENT_COLLECT_ALLOWLIST, else SUBREDDITS; empty: any subreddit the backend has."""
    return config.agent_collect_allowlist or config.subreddits


class CollectRedditDataTool(WorkspaceTool):
    task_key = "collect_task"
    name: str = "collect_reddit_data"
    description: str = ("Collect posts and their comment threads for subreddits through the Reddit MCP server "
                        "(posts matching optional search queries first, then the newest) and store them for "
                        "preprocessing.")
    args_schema: type[BaseModel] = CollectRedditDataArgs

    def guard(self, arguments: CollectRedditDataArgs, step: Step) -> str | None:
        """Subreddits from the allow-list only, at most POSTS_PER_SUBREDDIT posts each (queries: the schema)."""
        config = self.workspace.config
        allowed = allowed_subreddits(config)
        chosen = arguments.subreddits or config.subreddits
        if allowed and not chosen:
            return f"name the subreddits to collect, from {', '.join(allowed)}"
        outside = [name for name in chosen or [] if allowed and name not in allowed]
        if outside:
            return f"{', '.join(outside)} outside the allow-list {', '.join(allowed)}"
        if (arguments.posts_per_subreddit or 0) > config.posts_per_subreddit:
            return (f"posts_per_subreddit={arguments.posts_per_subreddit} is over the budget of "
                    f"{config.posts_per_subreddit}")
        return super().guard(arguments, step)

    def execute(self, arguments: CollectRedditDataArgs) -> CollectionReport:
        return self.workspace.collect(arguments.subreddits, arguments.posts_per_subreddit, queries=arguments.queries)
