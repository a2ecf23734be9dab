"""Evaluator's tool: held-out perplexity, BLEU and ROUGE-L of the base model or a round's global adapter."""
from __future__ import annotations

from pydantic import BaseModel, Field

from fl_crew_reddit.evaluation.evaluator import EvalMetrics
from fl_crew_reddit.tools.base import WorkspaceTool


class EvaluateModelArgs(BaseModel):
    round: int = Field(..., ge=0, description="Round whose global adapter to evaluate; 0: the base model")


class EvaluateModelTool(WorkspaceTool):
    name: str = "evaluate_model"
    description: str = ("Measure perplexity on the clients' held-out replies and BLEU / ROUGE-L of generated "
                        "replies, for the base model (round 0) or a round's global adapter.")
    args_schema: type[BaseModel] = EvaluateModelArgs

    def execute(self, arguments: EvaluateModelArgs) -> EvalMetrics:
        if arguments.round == 0:
            return self.workspace.evaluate_base()
        return self.workspace.evaluate_round(arguments.round)
