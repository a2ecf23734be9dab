"""Shared base of the crew's tools: validated arguments, a structured result for the Flow, a short text for an LLM.

Each tool also says which task of config/tasks.yaml it does (`task_key`) and what an agent may pass it in one Flow
step (`fixed_arguments`, `guard`): the LLM-driven mode (crew/llm_mode.py) asks the tool before any work runs.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

from crewai.tools import BaseTool
from pydantic import BaseModel, PrivateAttr

from fl_crew_reddit.workspace import FederatedWorkspace


class Step(Protocol):
    """What a tool's guard sees of the Flow step it is called in (crew/llm_mode.py StepGuard)."""

    role: str
    direct: BaseModel  # the arguments the Flow asked for: what the direct call runs with


class WorkspaceTool(BaseTool):
    """A CrewAI tool bound to one run's FederatedWorkspace. `invoke` validates and returns a pydantic result."""

    task_key: ClassVar[str]  # its task in config/tasks.yaml
    # Arguments an agent must pass exactly as the Flow asked: it restates them, it does not choose them.
    fixed_arguments: ClassVar[tuple[str, ...]] = ()

    _workspace: FederatedWorkspace = PrivateAttr()
    # Set by llm_mode while an agent works on one Flow step: it admits (or refuses) the agent's call before any
    # work runs and keeps the structured result for the Flow.
    _llm_step: Any = PrivateAttr(default=None)

    def __init__(self, workspace: FederatedWorkspace, **data: Any):
        super().__init__(**data)
        self._workspace = workspace

    @property
    def workspace(self) -> FederatedWorkspace:
        return self._workspace

    def guard(self, arguments: BaseModel, step: Step) -> str | None:
        """None if an agent may run this tool with `arguments` (already valid for args_schema) in `step`, else the
        reason, which the agent is shown. Tools with their own rules extend this."""
        for name in self.fixed_arguments:
            asked, chosen = getattr(step.direct, name), getattr(arguments, name)
            if chosen != asked:
                return f"{name} must be {asked!r} in this step, not {chosen!r}"
        return None

    def invoke(self, **arguments: Any) -> BaseModel:
        """Validate `arguments` against `args_schema` (a wrong value raises ValidationError), then do the work."""
        validated = self.args_schema.model_validate(arguments)
        return self.execute(validated)

    def execute(self, arguments: BaseModel) -> BaseModel:  # pragma: no cover - every tool overrides it
        raise NotImplementedError

    def _run(self, **arguments: Any) -> str:
        """The agent's path: the same validation, plus the step's guard when an LLM chose the arguments."""
        validated = self.args_schema.model_validate(arguments)
        result = self._llm_step.run(self, validated) if self._llm_step is not None else self.execute(validated)
        return result.model_dump_json(exclude={"samples"} if hasattr(result, "samples") else None)[:4000]
