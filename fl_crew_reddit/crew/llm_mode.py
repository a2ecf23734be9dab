"""LLM-driven mode: each Flow step hands its agent the step's task from fl_crew_reddit/crew/config/tasks.yaml, the
agent's LLM chooses the tool's arguments and calls the tool; the heavy work stays inside the tool.

A wrong answer cannot corrupt the run. The tool's args_schema validates the arguments, then the tool's own `guard`
checks them against what the step allows (the collector's allow-list and budget, the trainer's client and round,
the aggregator's rule, the evaluator's round: see crew/tools/) before any work runs, and the step's StepGuard lets
the work run at most once. If the agent fails, makes no accepted call, or its call fails a guard, the step falls
back to the direct call with the Flow's own arguments and the reason is logged. Every step is recorded in the run's
history as an AgentStep (outcome llm or fallback, and why).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from crewai import LLM, Task
from crewai.llm import SUPPORTED_NATIVE_PROVIDERS
from crewai.llms.base_llm import BaseLLM
from pydantic import BaseModel

from fl_crew_reddit.config import ConfigError, FLCrewRedditConfig, mask_url_credentials
from fl_crew_reddit.crew.tools.aggregator_tools import ROBUST_RULES
from fl_crew_reddit.crew.tools.base import WorkspaceTool
from fl_crew_reddit.crew.tools.collector_tools import MAX_QUERIES, MAX_QUERY_CHARS, allowed_subreddits
from fl_crew_reddit.history import AgentStep

log = logging.getLogger(__name__)


def build_agent_llm(config: FLCrewRedditConfig, llm: BaseLLM | None = None) -> BaseLLM | None:
    """The agents' LLM in LLM-driven mode (`llm` if one is given), or None: the Flow calls the tools directly."""
    if config.agent_mode == "direct":
        return None
    if llm is not None:
        return llm
    if not config.agent_llm_reachable:
        if config.agent_mode == "llm":
            raise ConfigError("AGENT_MODE=llm needs a reachable AGENT_LLM_MODEL: set OPENAI_API_KEY or "
                              "AGENT_LLM_BASE_URL")
        return None
    model, base_url = config.agent_llm_model, config.agent_llm_base_url
    options: dict[str, Any] = {}
    if base_url:
        options["base_url"] = base_url
        if model.split("/", 1)[0] not in SUPPORTED_NATIVE_PROVIDERS:
            options["custom_openai"] = True  # any OpenAI-compatible server: vLLM, llama.cpp, Ollama's /v1
    key = config.openai_api_key.get_secret_value() if config.openai_api_key else None
    options["api_key"] = key or ("not-needed" if base_url else None)
    if config.agent_llm_max_tokens is not None:
        options["max_tokens"] = config.agent_llm_max_tokens
    try:
        return LLM(model=model, **options)
    except Exception as error:  # e.g. a provider whose SDK is not installed
        reason = mask_url_credentials(str(error))  # AGENT_LLM_BASE_URL may carry user:password
        if config.agent_mode == "llm":
            raise ConfigError(f"AGENT_LLM_MODEL={model!r} cannot be used: {reason}") from None
        log.warning("Agent LLM %s cannot be used (%s); the Flow calls the tools directly", model, reason)
        return None


class StepRefused(ValueError):
    """The step's guard refused the agent's call; CrewAI shows the message to the agent as the tool's error."""


@dataclass
class StepGuard:
    """What one Flow step lets its agent do. The agent's tool calls `run`, which asks the tool's `guard` before doing
    any work, and runs the work at most once."""

    role: str
    tool: WorkspaceTool  # the tool this step calls
    direct: BaseModel  # the Flow's own arguments: what the direct call runs with
    arguments: BaseModel | None = None
    result: BaseModel | None = None
    error: Exception | None = None
    refusals: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # parallel native tool calls

    def run(self, tool: WorkspaceTool, arguments: BaseModel) -> BaseModel:
        with self._lock:
            if self.arguments is not None:
                raise StepRefused(f"{self.tool.name} already ran in this step: give your final answer")
            reason = (f"this step calls {self.tool.name}, not {tool.name}" if tool.name != self.tool.name
                      else tool.guard(arguments, self))
            if reason:
                if reason not in self.refusals:  # CrewAI may retry the same call: log it once
                    self.refusals.append(reason)
                    log.warning("%s: refused %s(%s): %s", self.role, tool.name, _shown(arguments), reason)
                raise StepRefused(reason)
            self.arguments = arguments
        log.info("%s calls %s(%s) [LLM]", self.role, tool.name, _shown(arguments))
        try:
            self.result = tool.execute(arguments)
        except Exception as error:
            self.error = error
            raise
        return self.result


def _shown(arguments: BaseModel) -> dict:
    return arguments.model_dump(exclude_unset=True)


def _answered(answer: str | None, limit: int = 120) -> str:
    """What the agent answered instead of calling its tool, shortened to one line for the log and the history."""
    text = " ".join((answer or "").split())
    if not text:
        return ""
    shown = text if len(text) <= limit else text[:limit] + "…"
    return f"; it answered {shown!r}"


def task_inputs(workspace, arguments: dict) -> dict:
    """The values of fl_crew_reddit/crew/config/tasks.yaml's placeholders for one step."""
    cfg = workspace.config
    allowed = allowed_subreddits(cfg)
    pending = workspace._pending  # this round's client results, before aggregation
    skipped = workspace.rounds[-1].skipped if workspace.rounds else {}
    updates = [f"{c.name}: {c.num_examples} examples, train loss {c.train_loss:.3f}" for c in pending.values()]
    updates += [f"{name} left out ({'; '.join(reasons)})" for name, reasons in skipped.items()]
    reference = []
    if workspace.base_metrics is not None:
        reference.append(f"The base model's held-out perplexity is {workspace.base_metrics.perplexity:.2f}.")
    scored = [r for r in workspace.rounds if r.global_ is not None]
    if scored:
        reference.append(f"Round {scored[-1].round}'s global adapter scored {scored[-1].global_.perplexity:.2f}.")
    return {
        "allowed_subreddits": (", ".join(allowed) if allowed
                               else "any subreddit the backend has (subreddits null: all of them)"),
        "posts_per_subreddit": cfg.posts_per_subreddit, "max_queries": MAX_QUERIES,
        "max_query_chars": MAX_QUERY_CHARS, "num_clients": cfg.clients_count,
        "partition": cfg.partition, "local_epochs": cfg.local_epochs, "aggregation_method": cfg.aggregation_method,
        "aggregation_choice": (
            f"If the updates look anomalous you may pass method as one of {', '.join(ROBUST_RULES)}; otherwise "
            "leave method null." if cfg.agent_may_switch_aggregation
            else "Leave method null: the settings fix the rule."),
        "updates": "; ".join(updates) or "none reported", "reference": " ".join(reference), **arguments}


def build_task(crew, agent, tool: WorkspaceTool, arguments: dict) -> Task:
    """The tool's task from tasks.yaml (`tool.task_key`), its placeholders filled for this step."""
    spec = crew.tasks_config[tool.task_key]
    inputs = task_inputs(crew.workspace, arguments)
    return Task(description=spec["description"].format(**inputs).strip(),
                expected_output=spec["expected_output"].format(**inputs).strip(), agent=agent)


@dataclass
class StepOutcome:
    result: BaseModel
    step: AgentStep  # recorded in the run's history: outcome llm or fallback, the reason, the arguments used
    answer: str | None = None  # the agent's final answer (when its tool call was used)


def run_step(crew, agent, tool_name: str, arguments: dict, round_number: int = 0) -> StepOutcome:
    """Let `agent` do one Flow step with its LLM; fall back to the direct call if that fails. Work runs once.

    The step is recorded (workspace.record_agent_step) before its result is returned or its work's error raised.
    """
    tool = crew.tool(agent, tool_name)
    guard = StepGuard(agent.role, tool, tool.args_schema.model_validate(arguments))
    task = build_task(crew, agent, tool, arguments)
    answer, agent_error = None, None
    for each in agent.tools:
        each._llm_step = guard
    try:
        answer = str(agent.execute_task(task))
    except Exception as error:  # the LLM or CrewAI failed; what the tool did is kept below
        agent_error = f"the agent raised {type(error).__name__}: {error}"
    finally:
        for each in agent.tools:
            each._llm_step = None

    def record(outcome: str, used: dict, reason: str | None = None) -> AgentStep:
        step = AgentStep(round=round_number, role=agent.role, tool=tool_name, outcome=outcome,
                         reason=mask_url_credentials(reason) if reason else None, arguments=used)
        crew.workspace.record_agent_step(step)
        return step

    if guard.result is not None:
        if agent_error:
            log.warning("%s: %s after its tool call; the tool's result stands", agent.role,
                        mask_url_credentials(agent_error))
        step = record("llm", _shown(guard.arguments))
        return StepOutcome(guard.result, step, answer if not agent_error else None)
    if guard.error is not None:
        if guard.arguments == guard.direct:
            record("llm", _shown(guard.arguments))  # the LLM's call ran and failed; the direct call would too
            raise guard.error
        reason = f"{tool_name}({_shown(guard.arguments)}) raised {type(guard.error).__name__}: {guard.error}"
    else:
        no_call = (f"its {tool_name} arguments failed the tool's schema" if task.tools_errors
                   else f"it made no call of {tool_name}{_answered(answer)}")
        reason = "; ".join(filter(None, [guard.refusals[-1] if guard.refusals else None, agent_error])) or no_call
    log.warning("%s: LLM step failed (%s); falling back to the direct call", agent.role,
                mask_url_credentials(reason))
    log.info("%s calls %s(%s)", agent.role, tool_name, arguments)
    step = record("fallback", arguments, reason)
    return StepOutcome(tool.invoke(**arguments), step)
