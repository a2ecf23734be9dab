"""Evaluator's tool: held-out perplexity, BLEU and ROUGE-L of the base model or a round's global adapter."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from fl_crew_reddit.crew.tools.base import WorkspaceTool
from fl_crew_reddit.evaluation.evaluator import EvalMetrics


class EvaluateModelArgs(BaseModel):
    round: int = Field(..., ge=0, description="Round whose global adapter to evaluate; 0: the base model")


class EvaluateModelTool(WorkspaceTool):
    task_key = "evaluate_task"
    fixed_arguments = ("round",)
    name: str = "evaluate_model"
    description: str = ("Measure perplexity on the clients' held-out replies and BLEU / ROUGE-L of generated "
                        "replies, for the base model (round 0) or a round's global adapter.")
    args_schema: type[BaseModel] = EvaluateModelArgs

    def execute(self, arguments: EvaluateModelArgs) -> EvalMetrics:
        if arguments.round == 0:
            return self.workspace.evaluate_base()
        return self.workspace.evaluate_round(arguments.round)


class BaselineArgs(BaseModel):
    baseline: Literal["local_only", "centralized"] = Field(
        ..., description="local_only: each client trains alone; centralized: all data pooled; same step budget")


class BaselineResult(BaseModel):
    baseline: str
    perplexity: float
    per_client: dict
    description: str


class TrainBaselineTool(WorkspaceTool):
    task_key = "baseline_task"
    fixed_arguments = ("baseline",)
    name: str = "train_and_evaluate_baseline"
    description: str = ("Train a comparison model on the same step budget as the federated run (local-only or "
                        "centralized) and measure its held-out perplexity, overall and per client.")
    args_schema: type[BaseModel] = BaselineArgs

    def execute(self, arguments: BaselineArgs) -> BaselineResult:
        entry = self.workspace.train_baseline(arguments.baseline)
        return BaselineResult(baseline=arguments.baseline, **entry)
