"""LLM-driven mode, offline: a scripted CrewAI BaseLLM drives the five agents through a real round (tiny model),
once with ReAct text and once with native function calls; wrong arguments fall back to the direct call."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from crewai.llms.base_llm import BaseLLM
from pydantic import Field

from fl_crew_reddit.config import ConfigError, FLCrewRedditConfig, load_config
from fl_crew_reddit.crew.llm_mode import build_agent_llm

SUBREDDITS = ["cooking", "gardening", "learnpython"]
QUERY = "garlic"  # matches r/cooking's oldest post (ck01) and r/gardening's gd03: neither is among the 15 newest


class ScriptedLLM(BaseLLM):
    """Reads its task like an LLM would, calls the agent's tool once, then answers. `bad`: arguments to send instead."""

    native: bool = False
    bad: dict[str, dict] = Field(default_factory=dict)
    roles: list[str] = Field(default_factory=list)

    def supports_function_calling(self) -> bool:
        return self.native

    def call(self, messages, tools=None, callbacks=None, available_functions=None, from_task=None, from_agent=None,
             response_model=None, **kwargs):
        self.roles.append(from_agent.role)
        observed = _tool_output(messages)
        if observed is not None:
            perplexity = re.search(r'"perplexity":\s*([\d.]+)', observed)
            answer = f"Perplexity is {perplexity.group(1)}; training helped." if perplexity else "Done."
            return answer if self.native else f"Thought: I have the result.\nFinal Answer: {answer}"
        tool, arguments = _plan(from_task.description, [t.name for t in from_agent.tools])
        arguments = {**arguments, **self.bad.get(tool, {})}
        if self.native:
            return [{"id": f"call_{len(self.roles)}", "type": "function",
                     "function": {"name": tool, "arguments": json.dumps(arguments)}}]
        return f"Thought: I call {tool}.\nAction: {tool}\nAction Input: {json.dumps(arguments)}"


def _tool_output(messages) -> str | None:
    """The tool's answer once the agent has called it (a tool message, or a ReAct Observation), else None."""
    for message in messages[2:]:
        content = str(message.get("content") or "")
        if message.get("role") == "tool":
            return content
        if message.get("role") == "assistant" and "Observation:" in content:
            return content.split("Observation:", 1)[1]
    return None


def _plan(description: str, tools: list[str]) -> tuple[str, dict]:
    round_number = int(re.search(r"[Rr]ound (\d+)", description).group(1)) if "ound" in description else None
    if "train_and_evaluate_baseline" in tools and "baseline" in description:
        return "train_and_evaluate_baseline", {"baseline": re.search(r'baseline "(\w+)"', description).group(1)}
    tool = tools[0]
    arguments = {"collect_reddit_data": {"subreddits": SUBREDDITS, "posts_per_subreddit": 15,
                                         **({"queries": [QUERY]} if "queries" in description else {})},
                 "preprocess_reddit_data": {},
                 "train_local_adapter": {"client": re.search(r'client "([\w-]+)"', description).group(1) if
                                         "client \"" in description else None, "round": round_number},
                 "aggregate_adapters": {"round": round_number},
                 "evaluate_model": {"round": round_number}}[tool]
    if tool == "aggregate_adapters" and "you may pass method" in description:
        arguments["method"] = "median"  # switching is allowed: this script always prefers a robust rule
    return tool, arguments


@pytest.fixture()
def work_done(monkeypatch):
    """How often each piece of heavy work ran."""
    from fl_crew_reddit.workspace import FederatedWorkspace

    counts = Counter()
    for name in ("collect", "preprocess", "train_client", "aggregate", "evaluate_base", "evaluate_round"):
        def counted(self, *args, _original=getattr(FederatedWorkspace, name), _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(FederatedWorkspace, name, counted)
    return counts


def _run_one_round(config, llm):
    from fl_crew_reddit import FLCrewRedditManager

    result = FLCrewRedditManager(config, agent_llm=llm).run_federated_learning(num_rounds=1)
    return result, Path(result.log_path).read_text()


def _fast(config, **update):
    return config.model_copy(update={"eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 8,
                                     "agent_mode": "llm", "agent_collect_allowlist": SUBREDDITS, **update})


FLOW_STEPS = [(0, "Reddit Data Collector", "collect_reddit_data"), (0, "Data Preprocessor", "preprocess_reddit_data"),
              (0, "Model Evaluator", "evaluate_model"), (1, "Model Trainer 1", "train_local_adapter"),
              (1, "Model Trainer 2", "train_local_adapter"), (1, "Model Trainer 3", "train_local_adapter"),
              (1, "Federated Aggregator", "aggregate_adapters"), (1, "Model Evaluator", "evaluate_model")]
ONCE_EACH = {"collect": 1, "preprocess": 1, "train_client": 3, "aggregate": 1, "evaluate_base": 1, "evaluate_round": 1}


@pytest.mark.e2e
@pytest.mark.parametrize("native, may_switch", [(False, True), (True, False)], ids=["react-text", "native-calls"])
def test_a_scripted_llm_drives_every_agent_through_a_round(tiny_config, work_done, native, may_switch):
    llm = ScriptedLLM(model="scripted", native=native)
    result, log_text = _run_one_round(_fast(tiny_config, agent_may_switch_aggregation=may_switch), llm)

    assert "Agents: LLM-driven (scripted)" in log_text and "falling back" not in log_text
    for line in ["Reddit Data Collector calls collect_reddit_data({'subreddits': ['cooking', 'gardening', "
                 "'learnpython'], 'posts_per_subreddit': 15, 'queries': ['garlic']}) [LLM]",
                 "Data Preprocessor calls preprocess_reddit_data({}) [LLM]",
                 "Model Evaluator calls evaluate_model({'round': 0}) [LLM]",
                 "Model Evaluator calls evaluate_model({'round': 1}) [LLM]"]:
        assert line in log_text
    for trainer, client in [(1, 0), (2, 1), (3, 2)]:
        assert f"Model Trainer {trainer} calls train_local_adapter({{'client': 'client-{client}', 'round': 1}}) [LLM]" \
            in log_text
    assert re.search(r"Federated Aggregator calls aggregate_adapters\(\{'round': 1.*\}\) \[LLM\]", log_text)
    assert set(llm.roles) == {"Reddit Data Collector", "Data Preprocessor", "Model Trainer 1", "Model Trainer 2",
                              "Model Trainer 3", "Federated Aggregator", "Model Evaluator"}
    assert dict(work_done) == ONCE_EACH  # the heavy work ran exactly once per step

    history = result.history
    assert [(s["subreddit"], s["num_posts"]) for s in history["collection"]["subreddits"]] == \
        [(name, 15) for name in SUBREDDITS]  # the agent's budget, search matches included
    # The agent's query added matching posts, with their comments, ahead of the newest ones.
    assert [s["queries"] for s in history["collection"]["subreddits"]] == [{QUERY: 3}, {QUERY: 1}, {QUERY: 0}]
    cooking = json.loads(Path(history["collection"]["subreddits"][0]["path"]).read_text())
    post_ids = [post["id"] for post in cooking["posts"]]
    assert post_ids[:3] == cooking["queries"][QUERY] == ["ck01", "ck29", "ck23"]
    assert "ck18" not in post_ids  # the 15th newest post gave way to the oldest, found by the search
    assert any(comment["link_id"] == "t3_ck01" for comment in cooking["comments"])
    [record] = history["rounds"]
    assert [c["name"] for c in record["clients"]] == ["client-0", "client-1", "client-2"]
    assert record["aggregation"]["method"] == ("median" if may_switch else "weighted_average")
    assert record["global"]["perplexity"] < history["base"]["perplexity"]
    assert record["analysis"] == f"Perplexity is {record['global']['perplexity']}; training helped."
    # One agent step per Flow step, each the LLM's accepted call, with the arguments it chose.
    assert [(s["round"], s["role"], s["tool"], s["outcome"], s["reason"]) for s in history["agent_steps"]] == \
        [(round_number, role, tool, "llm", None) for round_number, role, tool in FLOW_STEPS]
    assert history["agent_steps"][0]["arguments"] == {"subreddits": SUBREDDITS, "posts_per_subreddit": 15,
                                                      "queries": [QUERY]}
    assert history["agent_steps"][3]["arguments"] == {"client": "client-0", "round": 1}


@pytest.mark.e2e
def test_invalid_llm_arguments_fall_back_to_the_direct_call(tiny_config, work_done):
    llm = ScriptedLLM(model="scripted", native=False, bad={
        "collect_reddit_data": {"subreddits": ["askreddit"]},  # outside the allow-list
        "train_local_adapter": {"round": -1},  # fails the tool's schema
        "aggregate_adapters": {"method": "median"},  # AGENT_MAY_SWITCH_AGGREGATION is off
        "evaluate_model": {"round": 7}})  # not the round the Flow asked for
    result, log_text = _run_one_round(_fast(tiny_config), llm)

    for role, reason in [("Reddit Data Collector", "askreddit outside the allow-list cooking, gardening, learnpython"),
                         ("Model Trainer 1", "its train_local_adapter arguments failed the tool's schema"),
                         ("Federated Aggregator", "the rule is AGGREGATION_METHOD=weighted_average"),
                         ("Model Evaluator", "round must be 0 in this step, not 7"),
                         ("Model Evaluator", "round must be 1 in this step, not 7")]:
        assert f"{role}: LLM step failed ({reason}" in log_text
    assert "falling back to the direct call" in log_text
    assert "Data Preprocessor calls preprocess_reddit_data({}) [LLM]" in log_text  # the valid step stays LLM-driven
    assert "askreddit" not in json.dumps(result.history["collection"])  # a refused call never did any work
    assert dict(work_done) == ONCE_EACH

    history = result.history
    assert [s["subreddit"] for s in history["collection"]["subreddits"]] == SUBREDDITS
    assert all(s["num_posts"] == 20 for s in history["collection"]["subreddits"])  # the direct call's budget
    assert all(s["queries"] == {} for s in history["collection"]["subreddits"])  # the refused call's query too
    [record] = history["rounds"]
    assert [c["name"] for c in record["clients"]] == ["client-0", "client-1", "client-2"]
    assert record["aggregation"]["method"] == "weighted_average" and record["skipped"] == {}
    assert record["global"]["perplexity"] < history["base"]["perplexity"] and record["analysis"] is None
    steps = history["agent_steps"]
    assert [(s["round"], s["role"], s["tool"]) for s in steps] == FLOW_STEPS
    assert [s["outcome"] for s in steps] == ["fallback", "llm", "fallback", "fallback", "fallback", "fallback",
                                             "fallback", "fallback"]
    assert steps[0]["reason"] == "askreddit outside the allow-list cooking, gardening, learnpython"
    assert steps[0]["arguments"] == {}  # the direct call's arguments: the refused ones never ran
    assert steps[3]["reason"] == "its train_local_adapter arguments failed the tool's schema"
    assert steps[3]["arguments"] == {"client": "client-0", "round": 1}
    assert steps[6]["reason"].startswith("the rule is AGGREGATION_METHOD=weighted_average")
    assert steps[7]["reason"] == "round must be 1 in this step, not 7"


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("OPENAI_API_KEY", "AGENT_MODE", "AGENT_LLM_BASE_URL", "AGENT_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)


class FailingWorkspace:
    """Enough of a workspace for one step: training always fails, collecting r/gardening alone fails."""

    def __init__(self, config):
        self.config, self._pending, self.rounds, self.base_metrics, self.calls = config, {}, [], None, Counter()
        self.collected, self.steps = [], []

    def record_agent_step(self, step):
        self.steps.append(step)

    def train_client(self, client, round_number):
        self.calls["train_client"] += 1
        raise RuntimeError("CUDA out of memory")

    def collect(self, subreddits, posts_per_subreddit, queries=None):
        from fl_crew_reddit.reddit.collector import CollectionReport

        self.calls["collect"] += 1
        self.collected.append((subreddits, posts_per_subreddit, queries))
        if subreddits == ["gardening"]:
            raise KeyError("r/gardening is private")
        return CollectionReport(subreddits=[], server="fake")


def test_failing_work_runs_once_and_falls_back_only_when_the_llm_chose_other_arguments(clean_env, caplog):
    from fl_crew_reddit.crew.agents import FLCrew
    from fl_crew_reddit.crew.llm_mode import run_step

    workspace = FailingWorkspace(FLCrewRedditConfig(agent_collect_allowlist=SUBREDDITS))
    chooses_gardening = ScriptedLLM(model="scripted", bad={"collect_reddit_data": {"subreddits": ["gardening"]}})
    crew = FLCrew(workspace, llm=chooses_gardening)
    with pytest.raises(RuntimeError, match="out of memory"):  # the Flow's own arguments: fails like the direct call
        run_step(crew, crew.model_trainers[0], "train_local_adapter", {"client": "client-0", "round": 1})
    outcome = run_step(crew, crew.data_collector, "collect_reddit_data", {})
    assert (outcome.step.outcome, outcome.step.arguments) == ("fallback", {})
    assert workspace.calls == {"train_client": 1, "collect": 2}
    reason = ("collect_reddit_data({'subreddits': ['gardening'], 'posts_per_subreddit': 15, 'queries': ['garlic']}) "
              "raised KeyError: 'r/gardening is private'")
    assert f"LLM step failed ({reason}); falling back to the direct call" in caplog.text
    # Both steps are recorded, the failing one too: its work ran once, as the LLM asked (its own arguments).
    assert [(s.role, s.outcome, s.reason, s.arguments) for s in workspace.steps] == [
        ("Model Trainer 1", "llm", None, {"client": "client-0", "round": 1}),
        ("Reddit Data Collector", "fallback", reason, {})]


@pytest.mark.parametrize("bad, reason", [
    ({"queries": ["garlic " * 20]}, "its collect_reddit_data arguments failed the tool's schema"),  # 140 characters
    ({"queries": ["garlic", "basil", "rice", "soil", "pandas", "tomato"]},  # six: over the limit of five
     "its collect_reddit_data arguments failed the tool's schema"),
    ({"subreddits": ["cooking", "askreddit"]}, "askreddit outside the allow-list cooking, gardening, learnpython"),
], ids=["over-long-query", "too-many-queries", "outside-allow-list"])
def test_a_collector_query_outside_the_rules_is_refused_and_the_direct_call_runs(clean_env, caplog, bad, reason):
    from fl_crew_reddit.crew.agents import FLCrew
    from fl_crew_reddit.crew.llm_mode import run_step

    workspace = FailingWorkspace(FLCrewRedditConfig(agent_collect_allowlist=SUBREDDITS))
    crew = FLCrew(workspace, llm=ScriptedLLM(model="scripted", bad={"collect_reddit_data": bad}))
    outcome = run_step(crew, crew.data_collector, "collect_reddit_data", {})
    assert (outcome.step.outcome, outcome.step.arguments) == ("fallback", {})
    assert outcome.step.reason.startswith(reason)
    assert workspace.collected == [(None, None, None)]  # only the direct call ran: no query, no other subreddit
    assert f"Reddit Data Collector: LLM step failed ({reason}" in caplog.text


def test_agent_mode_decides_whether_an_llm_drives_the_agents(clean_env, monkeypatch):
    scripted = ScriptedLLM(model="scripted")
    assert build_agent_llm(FLCrewRedditConfig()) is None  # auto, nothing reachable: direct
    assert build_agent_llm(FLCrewRedditConfig(agent_mode="direct"), scripted) is None
    assert build_agent_llm(FLCrewRedditConfig(), scripted) is scripted
    local = build_agent_llm(FLCrewRedditConfig(agent_llm_model="Qwen/Qwen2.5-7B-Instruct",
                                               agent_llm_base_url="http://localhost:8000/v1"))
    assert (local.model, local.base_url) == ("Qwen/Qwen2.5-7B-Instruct", "http://localhost:8000/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert build_agent_llm(load_config()).model == "gpt-4"
    monkeypatch.setenv("AGENT_COLLECT_ALLOWLIST", "r/cooking, gardening")
    assert load_config().agent_collect_allowlist == ["cooking", "gardening"]


def test_agent_mode_llm_without_a_reachable_llm_stops_at_start(clean_env, monkeypatch):
    monkeypatch.setenv("AGENT_MODE", "llm")
    with pytest.raises(ConfigError, match="AGENT_MODE=llm needs .*OPENAI_API_KEY.*AGENT_LLM_BASE_URL"):
        load_config()
    monkeypatch.setenv("AGENT_LLM_BASE_URL", "http://localhost:11434/v1")
    assert load_config().agent_mode == "llm"


def test_each_tool_carries_its_task_and_its_guard(clean_env):
    from types import SimpleNamespace

    from fl_crew_reddit.crew.agents import FLCrew

    config = FLCrewRedditConfig(agent_collect_allowlist=SUBREDDITS, posts_per_subreddit=20,
                                agent_may_switch_aggregation=True)
    crew = FLCrew(FailingWorkspace(config), llm=ScriptedLLM(model="scripted"))
    tasks = {tool.name: tool.task_key for agent in [crew.data_collector, crew.data_preprocessor, crew.aggregator,
                                                    crew.evaluator, *crew.model_trainers] for tool in agent.tools}
    assert tasks == {"collect_reddit_data": "collect_task", "preprocess_reddit_data": "preprocess_task",
                     "train_local_adapter": "train_task", "aggregate_adapters": "aggregate_task",
                     "evaluate_model": "evaluate_task", "train_and_evaluate_baseline": "baseline_task"}

    def guard(agent, name, direct, chosen):
        tool = crew.tool(agent, name)
        step = SimpleNamespace(role=agent.role, direct=tool.args_schema.model_validate(direct))
        return tool.guard(tool.args_schema.model_validate(chosen), step)

    trainer = crew.model_trainers[1]
    asked = {"client": "client-1", "round": 2}
    assert guard(trainer, "train_local_adapter", asked, asked) is None
    assert guard(trainer, "train_local_adapter", asked, {"client": "client-0", "round": 2}) == \
        "client must be 'client-1' in this step, not 'client-0'"
    assert guard(crew.data_collector, "collect_reddit_data", {}, {"subreddits": ["cooking"], "queries": ["rice"]}) \
        is None
    assert guard(crew.data_collector, "collect_reddit_data", {}, {"posts_per_subreddit": 5}) == \
        "name the subreddits to collect, from cooking, gardening, learnpython"  # SUBREDDITS is empty: all
    assert guard(crew.data_collector, "collect_reddit_data", {}, {"subreddits": ["cooking"],
                                                                  "posts_per_subreddit": 21}) == \
        "posts_per_subreddit=21 is over the budget of 20"
    aggregate = {"round": 1}
    assert guard(crew.aggregator, "aggregate_adapters", aggregate, {"round": 1, "method": "krum"}) is None
    assert guard(crew.aggregator, "aggregate_adapters", aggregate, {"round": 1, "method": "fedadam"}) == \
        "fedadam is not a robust rule; switch only to one of krum, multi_krum, median, trimmed_mean, bulyan"
    assert guard(crew.aggregator, "aggregate_adapters", aggregate, {"round": 2, "method": "krum"}) == \
        "round must be 1 in this step, not 2"
    assert guard(crew.evaluator, "train_and_evaluate_baseline", {"baseline": "centralized"},
                 {"baseline": "local_only"}) == "baseline must be 'centralized' in this step, not 'local_only'"


@pytest.mark.parametrize("edit, problem", [
    (lambda agents, tasks: tasks["train_task"].update(agent="aggregator"),
     "tasks.yaml train_task names agent aggregator, but train_local_adapter is agent model_trainer's tool"),
    (lambda agents, tasks: agents["evaluator"]["tools"].append("delete_everything"),
     "agent evaluator lists an unknown tool delete_everything"),
    (lambda agents, tasks: tasks.pop("baseline_task"), "tool train_and_evaluate_baseline does baseline_task, "
                                                       "which tasks.yaml lacks"),
], ids=["task-names-another-agent", "unknown-tool", "missing-task"])
def test_agents_tasks_and_tools_must_agree(clean_env, tmp_path, edit, problem):
    import yaml

    from fl_crew_reddit.crew.agents import CONFIG_DIR, FLCrew, load_yaml

    agents, tasks = load_yaml("agents.yaml"), load_yaml("tasks.yaml")
    FLCrew(FailingWorkspace(FLCrewRedditConfig()), config_dir=CONFIG_DIR)  # the shipped files agree
    edit(agents, tasks)
    (tmp_path / "agents.yaml").write_text(yaml.safe_dump(agents))
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    with pytest.raises(ValueError, match="agents.yaml and tasks.yaml disagree") as error:
        FLCrew(FailingWorkspace(FLCrewRedditConfig()), config_dir=tmp_path)
    assert problem in str(error.value)


def test_a_direct_step_is_recorded_as_direct(clean_env):
    from fl_crew_reddit.crew.agents import FLCrew
    from fl_crew_reddit.crew.flow import FederatedFlow

    workspace = FailingWorkspace(FLCrewRedditConfig())
    crew = FLCrew(workspace)  # nothing reachable: direct
    flow = FederatedFlow(crew, num_rounds=1)
    flow._call(crew.data_collector, "collect_reddit_data")
    with pytest.raises(RuntimeError, match="out of memory"):
        flow._call(crew.model_trainers[0], "train_local_adapter", client="client-0", round=1)
    assert [(s.round, s.role, s.tool, s.outcome, s.reason, s.arguments) for s in workspace.steps] == [
        (0, "Reddit Data Collector", "collect_reddit_data", "direct", None, {}),
        (0, "Model Trainer 1", "train_local_adapter", "direct", None, {"client": "client-0", "round": 1})]
