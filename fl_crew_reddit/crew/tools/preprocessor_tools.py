"""Data Preprocessor's tool: clean threads into chat examples and split them into one shard per client."""
from __future__ import annotations

from pydantic import BaseModel

from fl_crew_reddit.crew.tools.base import WorkspaceTool
from fl_crew_reddit.preprocessing.pipeline import PreprocessReport


class PreprocessRedditDataArgs(BaseModel):
    """No arguments: the collected data and the settings decide everything."""


class PreprocessRedditDataTool(WorkspaceTool):
    task_key = "preprocess_task"
    name: str = "preprocess_reddit_data"
    description: str = ("Clean the collected Reddit threads, build prompt/reply examples in the base model's chat "
                        "template and write one train/test shard per federated client.")
    args_schema: type[BaseModel] = PreprocessRedditDataArgs

    def execute(self, arguments: PreprocessRedditDataArgs) -> PreprocessReport:
        return self.workspace.preprocess()
