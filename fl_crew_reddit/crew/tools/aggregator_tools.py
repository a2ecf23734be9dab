"""Aggregator's tool: screen the clients' adapter updates and combine them into the new global adapter."""
from __future__ import annotations

from typing import get_args

from pydantic import BaseModel, Field

from fl_crew_reddit.config import AggregationMethod
from fl_crew_reddit.crew.tools.base import Step, WorkspaceTool
from fl_crew_reddit.workspace import RoundAggregate

# The rules the aggregator agent may switch a round to (AGENT_MAY_SWITCH_AGGREGATION) when updates look anomalous.
ROBUST_RULES = ("krum", "multi_krum", "median", "trimmed_mean", "bulyan")


class AggregateAdaptersArgs(BaseModel):
    round: int = Field(..., ge=1, description="Federated round number")
    method: AggregationMethod | None = Field(
        None, description=f"One of {', '.join(get_args(AggregationMethod))}; null: AGGREGATION_METHOD")


class AggregateAdaptersTool(WorkspaceTool):
    task_key = "aggregate_task"
    fixed_arguments = ("round",)
    name: str = "aggregate_adapters"
    description: str = ("Check every client's adapter update (keys, shapes, dtypes, finite values, norm), leave out "
                        "bad ones and combine the rest into the new global LoRA adapter.")
    args_schema: type[BaseModel] = AggregateAdaptersArgs

    def guard(self, arguments: AggregateAdaptersArgs, step: Step) -> str | None:
        """AGGREGATION_METHOD, or with AGENT_MAY_SWITCH_AGGREGATION one of the robust rules."""
        reason = super().guard(arguments, step)
        if reason:
            return reason
        config = self.workspace.config
        method = arguments.method or config.aggregation_method
        if method == config.aggregation_method:
            return None
        if not config.agent_may_switch_aggregation:
            return f"the rule is AGGREGATION_METHOD={config.aggregation_method} (AGENT_MAY_SWITCH_AGGREGATION is off)"
        if method not in ROBUST_RULES:
            return f"{method} is not a robust rule; switch only to one of {', '.join(ROBUST_RULES)}"
        return None

    def execute(self, arguments: AggregateAdaptersArgs) -> RoundAggregate:
        return self.workspace.aggregate(arguments.round, arguments.method)
