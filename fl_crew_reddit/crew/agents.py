"""The crew's five roles as CrewAI Agents, built from fl_crew_reddit/crew/config/agents.yaml and handed their tools.

As in CrewAI's project template, agents.yaml lists each agent's `tools` and tasks.yaml names each task's `agent`; each
tool class names the task it does (`task_key`). FLCrew checks at start that the three agree.
"""
from __future__ import annotations

import logging
from pathlib import Path

import yaml
from crewai import Agent
from crewai.llms.base_llm import BaseLLM

from fl_crew_reddit.crew.llm_mode import build_agent_llm
from fl_crew_reddit.crew.tools.aggregator_tools import AggregateAdaptersTool
from fl_crew_reddit.crew.tools.collector_tools import CollectRedditDataTool
from fl_crew_reddit.crew.tools.evaluator_tools import EvaluateModelTool, TrainBaselineTool
from fl_crew_reddit.crew.tools.preprocessor_tools import PreprocessRedditDataTool
from fl_crew_reddit.crew.tools.trainer_tools import TrainLocalAdapterTool
from fl_crew_reddit.workspace import FederatedWorkspace

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent / "config"
TOOL_CLASSES = {tool.model_fields["name"].default: tool for tool in (
    CollectRedditDataTool, PreprocessRedditDataTool, TrainLocalAdapterTool, AggregateAdaptersTool, EvaluateModelTool,
    TrainBaselineTool)}


def load_yaml(name: str, config_dir: Path = CONFIG_DIR) -> dict:
    with (config_dir / name).open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def check_crew_config(agents_config: dict, tasks_config: dict) -> None:
    """Every tool an agent lists exists, and its task is in tasks.yaml naming that agent; else ValueError."""
    problems = []
    for key, spec in agents_config.items():
        for name in spec.get("tools", []):
            tool = TOOL_CLASSES.get(name)
            if tool is None:
                problems.append(f"agent {key} lists an unknown tool {name} (known: {', '.join(TOOL_CLASSES)})")
            elif tool.task_key not in tasks_config:
                problems.append(f"tool {name} does {tool.task_key}, which tasks.yaml lacks")
            elif tasks_config[tool.task_key].get("agent") != key:
                problems.append(f"tasks.yaml {tool.task_key} names agent {tasks_config[tool.task_key].get('agent')}, "
                                f"but {name} is agent {key}'s tool")
    if problems:
        raise ValueError("The crew's agents.yaml and tasks.yaml disagree: " + "; ".join(problems))


class FLCrew:
    """Agents (by role key) and their tools, one set per run.

    `llm` (a CrewAI BaseLLM) replaces AGENT_LLM_MODEL; in LLM-driven mode (`llm_driven`) the agents choose their
    tools' arguments (fl_crew_reddit/crew/llm_mode.py), otherwise the Flow calls the tools directly.
    """

    def __init__(self, workspace: FederatedWorkspace, config_dir: Path = CONFIG_DIR, llm: BaseLLM | None = None):
        self.workspace = workspace
        self.agents_config = load_yaml("agents.yaml", config_dir)
        self.tasks_config = load_yaml("tasks.yaml", config_dir)
        check_crew_config(self.agents_config, self.tasks_config)
        cfg = workspace.config
        self.agent_llm = build_agent_llm(cfg, llm)
        self.llm = self.agent_llm or cfg.agent_llm_model
        log.info("Agents: %s", f"LLM-driven ({self.agent_llm.model})" if self.llm_driven
                 else "direct (the Flow calls the tools)")
        self.inputs = {"subreddits": ", ".join(cfg.subreddits) or "the backend's subreddits",
                       "aggregation_method": cfg.aggregation_method}
        self.data_collector = self._agent("data_collector")
        self.data_preprocessor = self._agent("data_preprocessor")
        self.model_trainers = [self._agent("model_trainer", trainer_id=i + 1) for i in range(cfg.num_trainers)]
        self.aggregator = self._agent("aggregator")
        self.evaluator = self._agent("evaluator")

    def _agent(self, key: str, **extra) -> Agent:
        spec = self.agents_config[key]
        values = {**self.inputs, **extra}
        tools = [TOOL_CLASSES[name](self.workspace) for name in spec.get("tools", [])]
        return Agent(role=spec["role"].format(**values).strip(), goal=spec["goal"].format(**values).strip(),
                     backstory=spec["backstory"].strip(), tools=tools, llm=self.llm, verbose=False,
                     allow_delegation=False, cache=False, max_iter=self.workspace.config.agent_max_iter,
                     max_retry_limit=1)

    @property
    def llm_driven(self) -> bool:
        return self.agent_llm is not None

    @staticmethod
    def tool(agent: Agent, name: str):
        return next(tool for tool in agent.tools if tool.name == name)

    def trainer_for(self, client_index: int) -> Agent:
        return self.model_trainers[client_index % len(self.model_trainers)]
