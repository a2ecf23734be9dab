"""The typed run history: what history.json holds (one pydantic model shared by the flow, report, TensorBoard, CLI)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class AgentStep(BaseModel):
    """One agent step of the Flow: who called which tool, and whether the LLM's call was used or fell back (why)."""

    round: int = Field(..., ge=0, description="0: collection, preprocessing and the base model; N: round N")
    role: str
    tool: str
    outcome: Literal["direct", "llm", "fallback"] = Field(
        ..., description="direct: no agent LLM; llm: the LLM's call was accepted; fallback: the direct call ran")
    reason: str | None = Field(None, description="why the step fell back to the direct call")
    arguments: dict = Field(default_factory=dict, description="the arguments the tool ran with")
