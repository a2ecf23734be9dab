"""LLM-driven mode: each Flow step hands its agent the step's task from fl_crew_reddit/crew/config/tasks.yaml, the agent's LLM chooses
the tool's arguments and calls the tool; the heavy work stays inside the tool.

A wrong answer cannot corrupt the run. The tool's args_schema validates the arguments, then the step's StepGuard
checks them against what the step allows (the collector's allow-list and budget, the trainer's client and round,
the aggregator's rule, the evaluator's round) before any work runs, and lets the work run at most once per step.
If the agent fails, makes no accepted call, or its call fails a guard, the step falls back to the direct call with
the Flow's own arguments and the reason is logged.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import fl_crew_reddit._quiet  # noqa: F401  (before crewai)
from crewai import LLM, Task
from crewai.llm import SUPPORTED_NATIVE_PROVIDERS
from crewai.llms.base_llm import BaseLLM
from pydantic import BaseModel

from fl_crew_reddit.config import ConfigError, FLCrewRedditConfig
from fl_crew_reddit.crew.tools.collector_tools import MAX_QUERIES, MAX_QUERY_CHARS

log = logging.getLogger(__name__)

ROBUST_RULES = ("krum", "multi_krum", "median", "trimmed_mean", "bulyan")
TASK_OF_TOOL = {"collect_reddit_data": "collect_task", "preprocess_reddit_data": "preprocess_task",
                "train_local_adapter": "train_task", "aggregate_adapters": "aggregate_task",
                "evaluate_model": "evaluate_task", "train_and_evaluate_baseline": "baseline_task"}
# Arguments the agent must pass exactly as the Flow asked: it restates them, it does not choose them.
FIXED_ARGUMENTS = {"train_local_adapter": ("client", "round"), "aggregate_adapters": ("round",),
                   "evaluate_model": ("round",), "train_and_evaluate_baseline": ("baseline",)}


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
    try:
        return LLM(model=model, **options)
    except Exception as error:  # e.g. a provider whose SDK is not installed
        if config.agent_mode == "llm":
            raise ConfigError(f"AGENT_LLM_MODEL={model!r} cannot be used: {error}") from None
        log.warning("Agent LLM %s cannot be used (%s); the Flow calls the tools directly", model, error)
        return None


def allowed_subreddits(config: FLCrewRedditConfig) -> list[str]:
    """AGENT_COLLECT_ALLOWLIST, else SUBREDDITS; empty: any subreddit the backend has."""
    return config.agent_collect_allowlist or config.subreddits


class StepRefused(ValueError):
    """The step's guard refused the agent's call; CrewAI shows the message to the agent as the tool's error."""


@dataclass
class StepGuard:
    """What one Flow step lets its agent do. The agent's tool calls `run`, which checks before doing any work."""

    role: str
    tool_name: str
    check: Callable[[BaseModel], str | None]
    arguments: BaseModel | None = None
    result: BaseModel | None = None
    error: Exception | None = None
    refusals: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # parallel native tool calls

    def run(self, tool, arguments: BaseModel) -> BaseModel:
        with self._lock:
            if self.arguments is not None:
                raise StepRefused(f"{self.tool_name} already ran in this step: give your final answer")
            reason = (f"this step calls {self.tool_name}, not {tool.name}" if tool.name != self.tool_name
                      else self.check(arguments))
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


def step_check(config: FLCrewRedditConfig, tool_name: str, direct: BaseModel) -> Callable[[BaseModel], str | None]:
    """The step-level guard: None if the agent's (schema-valid) arguments are allowed, else the reason."""

    def check(arguments: BaseModel) -> str | None:
        for name in FIXED_ARGUMENTS.get(tool_name, ()):
            if getattr(arguments, name) != getattr(direct, name):
                return f"{name} must be {getattr(direct, name)!r} in this step, not {getattr(arguments, name)!r}"
        if tool_name == "collect_reddit_data":
            allowed = allowed_subreddits(config)
            chosen = arguments.subreddits or config.subreddits
            if allowed and not chosen:
                return f"name the subreddits to collect, from {', '.join(allowed)}"
            outside = [name for name in chosen or [] if allowed and name not in allowed]
            if outside:
                return f"{', '.join(outside)} outside the allow-list {', '.join(allowed)}"
            if (arguments.posts_per_subreddit or 0) > config.posts_per_subreddit:
                return (f"posts_per_subreddit={arguments.posts_per_subreddit} is over the budget of "
                        f"{config.posts_per_subreddit}")
        if tool_name == "aggregate_adapters":
            method = arguments.method or config.aggregation_method
            if method != config.aggregation_method:
                if not config.agent_may_switch_aggregation:
                    return (f"the rule is AGGREGATION_METHOD={config.aggregation_method} "
                            "(AGENT_MAY_SWITCH_AGGREGATION is off)")
                if method not in ROBUST_RULES:
                    return f"{method} is not a robust rule; switch only to one of {', '.join(ROBUST_RULES)}"
        return None

    return check


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


def build_task(crew, agent, tool_name: str, arguments: dict) -> Task:
    spec = crew.tasks_config[TASK_OF_TOOL[tool_name]]
    inputs = task_inputs(crew.workspace, arguments)
    return Task(description=spec["description"].format(**inputs).strip(),
                expected_output=spec["expected_output"].format(**inputs).strip(), agent=agent)


@dataclass
class StepOutcome:
    result: BaseModel
    arguments: dict
    via: str  # "LLM" or "direct"
    answer: str | None = None  # the agent's final answer (LLM only)


def run_step(crew, agent, tool_name: str, arguments: dict) -> StepOutcome:
    """Let `agent` do one Flow step with its LLM; fall back to the direct call if that fails. Work runs once."""
    tool = crew.tool(agent, tool_name)
    direct = tool.args_schema.model_validate(arguments)
    guard = StepGuard(agent.role, tool_name, step_check(crew.workspace.config, tool_name, direct))
    task = build_task(crew, agent, tool_name, arguments)
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
    if guard.result is not None:
        if agent_error:
            log.warning("%s: %s after its tool call; the tool's result stands", agent.role, agent_error)
        return StepOutcome(guard.result, _shown(guard.arguments), "LLM", answer if not agent_error else None)
    if guard.error is not None:
        if guard.arguments == direct:
            raise guard.error  # the direct call has the same arguments: it would fail the same way
        reason = f"{tool_name}({_shown(guard.arguments)}) raised {type(guard.error).__name__}: {guard.error}"
    else:
        no_call = (f"its {tool_name} arguments failed the tool's schema" if task.tools_errors
                   else f"it made no call of {tool_name}")
        reason = "; ".join(filter(None, [guard.refusals[-1] if guard.refusals else None, agent_error])) or no_call
    log.warning("%s: LLM step failed (%s); falling back to the direct call", agent.role, reason)
    log.info("%s calls %s(%s)", agent.role, tool_name, arguments)
    return StepOutcome(tool.invoke(**arguments), arguments, "direct")
