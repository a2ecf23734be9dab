"""Shared base of the crew's tools: validated arguments, a structured result for the Flow, a short text for an LLM."""
from __future__ import annotations

from typing import Any

import fl_crew_reddit._quiet  # noqa: F401  (before crewai)
from crewai.tools import BaseTool
from pydantic import BaseModel, PrivateAttr

from fl_crew_reddit.workspace import FederatedWorkspace


class WorkspaceTool(BaseTool):
    """A CrewAI tool bound to one run's FederatedWorkspace. `invoke` validates and returns a pydantic result."""

    _workspace: FederatedWorkspace = PrivateAttr()

    def __init__(self, workspace: FederatedWorkspace, **data: Any):
        super().__init__(**data)
        self._workspace = workspace

    @property
    def workspace(self) -> FederatedWorkspace:
        return self._workspace

    def invoke(self, **arguments: Any) -> BaseModel:
        """Validate `arguments` against `args_schema` (a wrong value raises ValidationError), then do the work."""
        validated = self.args_schema.model_validate(arguments)
        return self.execute(validated)

    def execute(self, arguments: BaseModel) -> BaseModel:  # pragma: no cover - every tool overrides it
        raise NotImplementedError

    def _run(self, **arguments: Any) -> str:
        result = self.invoke(**arguments)
        return result.model_dump_json(exclude={"samples"} if hasattr(result, "samples") else None)[:4000]
