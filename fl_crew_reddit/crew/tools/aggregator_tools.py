"""Aggregator's tool: screen the clients' adapter updates and combine them into the new global adapter."""
from __future__ import annotations

from typing import get_args

from pydantic import BaseModel, Field

from fl_crew_reddit.config import AggregationMethod
from fl_crew_reddit.crew.tools.base import WorkspaceTool
from fl_crew_reddit.workspace import RoundAggregate


class AggregateAdaptersArgs(BaseModel):
    round: int = Field(..., ge=1, description="Federated round number")
    method: AggregationMethod | None = Field(
        None, description=f"One of {', '.join(get_args(AggregationMethod))}; null: AGGREGATION_METHOD")


class AggregateAdaptersTool(WorkspaceTool):
    name: str = "aggregate_adapters"
    description: str = ("Check every client's adapter update (keys, shapes, dtypes, finite values, norm), leave out "
                        "bad ones and combine the rest into the new global LoRA adapter.")
    args_schema: type[BaseModel] = AggregateAdaptersArgs

    def execute(self, arguments: AggregateAdaptersArgs) -> RoundAggregate:
        return self.workspace.aggregate(arguments.round, arguments.method)
