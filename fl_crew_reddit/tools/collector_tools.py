"""Data Collector's tool: collect posts and comment threads through the Reddit MCP server."""
from __future__ import annotations

from pydantic import BaseModel, Field

from fl_crew_reddit.reddit.collector import CollectionReport
from fl_crew_reddit.tools.base import WorkspaceTool


class CollectRedditDataArgs(BaseModel):
    subreddits: list[str] | None = Field(None, description="Subreddit names without r/; null: the configured SUBREDDITS")
    posts_per_subreddit: int | None = Field(None, ge=1, le=1000, description="Newest posts to collect per subreddit")


class CollectRedditDataTool(WorkspaceTool):
    name: str = "collect_reddit_data"
    description: str = ("Collect posts and their comment threads for subreddits through the Reddit MCP server "
                        "and store them for preprocessing.")
    args_schema: type[BaseModel] = CollectRedditDataArgs

    def execute(self, arguments: CollectRedditDataArgs) -> CollectionReport:
        return self.workspace.collect(arguments.subreddits, arguments.posts_per_subreddit)
