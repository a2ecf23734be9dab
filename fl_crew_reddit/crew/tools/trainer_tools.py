"""Model Trainer's tool: fine-tune the global LoRA adapter on one client's private shard."""
from __future__ import annotations

from pydantic import BaseModel, Field

from fl_crew_reddit.crew.tools.base import WorkspaceTool
from fl_crew_reddit.workspace import ClientRoundResult


class TrainLocalAdapterArgs(BaseModel):
    client: str = Field(..., description="Client name, e.g. client-0")
    round: int = Field(..., ge=1, description="Federated round number")


class TrainLocalAdapterTool(WorkspaceTool):
    task_key = "train_task"
    fixed_arguments = ("client", "round")  # the Flow assigns clients to trainers and counts the rounds
    name: str = "train_local_adapter"
    description: str = ("Start from the current global LoRA adapter, fine-tune it on one client's own data and "
                        "save the client's adapter for aggregation. Raw data never leaves the client.")
    args_schema: type[BaseModel] = TrainLocalAdapterArgs

    def execute(self, arguments: TrainLocalAdapterArgs) -> ClientRoundResult:
        return self.workspace.train_client(arguments.client, arguments.round)
