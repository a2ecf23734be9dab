"""The federated round loop as a CrewAI Flow with typed state.

collect → preprocess → evaluate the base model → [train each client → aggregate → evaluate] × rounds → finish.
In direct mode (no agent LLM) each step calls its agent's tool itself and logs which agent did what; in LLM-driven
mode the agent gets the step's task and chooses the tool's arguments, within guards (fl_crew_reddit/crew/llm_mode.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from crewai.flow.flow import Flow, listen, or_, router, start
from pydantic import BaseModel, Field

from fl_crew_reddit.crew.agents import FLCrew
from fl_crew_reddit.crew.llm_mode import run_step
from fl_crew_reddit.evaluation.selection import best_round_record
from fl_crew_reddit.history import AgentStep

log = logging.getLogger(__name__)
progress = logging.getLogger("fl_crew_reddit.progress")


class FLState(BaseModel):
    total_rounds: int = 1
    round: int = 0
    resumed: bool = Field(False, description="continue after the workspace's restored round")
    resume_stage: str = Field("", description="the restored state's stage: collecting, collected, preprocessed, "
                                              "round or finished")
    round_started: float = 0.0
    actions: list[str] = Field(default_factory=list, description="agent → tool calls, in order")


class FederatedFlow(Flow[FLState]):
    def __init__(self, crew: FLCrew, num_rounds: int, on_round: Callable[[dict], None] | None = None,
                 resume_after_round: int | None = None, resume_stage: str = "round"):
        super().__init__()
        self.crew = crew
        self.workspace = crew.workspace
        self.workspace.planned_rounds = num_rounds
        self.on_round = on_round
        self.state.total_rounds = num_rounds
        if resume_after_round is not None:
            self.state.resumed = True
            self.state.round = resume_after_round
            self.state.resume_stage = resume_stage

    def _call(self, agent, tool_name: str, **arguments):
        """One agent step; recorded in the history as an AgentStep (direct, llm, or fallback and why)."""
        if not self.crew.llm_driven:
            self.state.actions.append(f"{agent.role} → {tool_name}({arguments})")
            log.info("%s calls %s(%s)", agent.role, tool_name, arguments)
            self.workspace.record_agent_step(AgentStep(round=self.state.round, role=agent.role, tool=tool_name,
                                                       outcome="direct", arguments=arguments))
            return self.crew.tool(agent, tool_name).invoke(**arguments)
        # The agent's LLM chooses the arguments; run_step falls back to the direct call itself and records the step.
        outcome = run_step(self.crew, agent, tool_name, arguments, round_number=self.state.round)
        self.state.actions.append(f"{agent.role} → {tool_name}({outcome.step.arguments}) [{outcome.step.outcome}]")
        if outcome.answer and tool_name == "evaluate_model" and arguments["round"] >= 1:
            self.workspace.rounds[-1].analysis = outcome.answer.strip()  # the evaluator's analysis of the round
        return outcome.result

    @start()
    def begin(self):
        log.info("Flow starts %s", f"with the state saved {self.state.resume_stage} {self.state.round}"
                 if self.state.resumed else "a new run")

    @router(begin)
    def choose_start(self):
        """Where a run continues: the stage after the newest saved one (a stop while collecting collects the rest)."""
        if not self.state.resumed or self.state.resume_stage == "collecting":
            return "fresh_run"
        if self.state.resume_stage in ("collected", "preprocessed"):
            return f"resume_{self.state.resume_stage}"
        return "resume_run" if self.state.round < self.state.total_rounds else "resume_finish"

    @listen("fresh_run")
    def collect_data(self):
        report = self._call(self.crew.data_collector, "collect_reddit_data")
        progress.info("Collected %s", ", ".join(f"r/{s.subreddit}: {s.num_posts} posts, {s.num_comments} comments"
                                                for s in report.subreddits))
        if self.workspace.config.federation != "flower":  # the sites collect and preprocess in one step
            self.workspace.save_state(0, self.state.total_rounds, stage="collected")

    @listen(or_(collect_data, "resume_collected"))
    def preprocess_data(self):
        report = self._call(self.crew.data_preprocessor, "preprocess_reddit_data")
        progress.info("Preprocessed %d examples for %d clients (%s); dropped %s", report.num_examples,
                      len(report.clients), ", ".join(f"{c.name}: {c.num_train} train/{c.num_validation} validation/"
                                                     f"{c.num_test} test" for c in report.clients),
                      report.dropped or "nothing")
        pairs = report.preference_pairs
        if pairs:
            progress.info("Preference pairs %s (%s); left out %s%s", pairs.get("built") or "none",
                          ", ".join(f"{c.name}: {c.num_train_pairs} train/{c.num_validation_pairs} validation/"
                                    f"{c.num_test_pairs} test" for c in report.clients),
                          pairs.get("dropped") or "nothing",
                          "; scores are placeholders: no votes pairs" if pairs.get("scores_placeholder") else "")
        self.workspace.save_state(0, self.state.total_rounds, stage="preprocessed")

    @listen(or_(preprocess_data, "resume_preprocessed"))
    def evaluate_base(self):
        base = self._call(self.crew.evaluator, "evaluate_model", round=0)
        progress.info("Base model: perplexity %.2f (validation %s), BLEU %.2f, ROUGE-L %.3f", base.perplexity,
                      _ppl(base.validation_perplexity), base.bleu, base.rouge_l)
        self.workspace.save_state(0, self.state.total_rounds)
        self.workspace.save_history()
        self.workspace.write_scalars(0)

    @listen(or_(evaluate_base, "next_round", "resume_run"))
    def train_clients(self):
        self.state.round += 1
        self.state.round_started = time.perf_counter()
        round_number = self.state.round
        self.workspace.start_round(round_number)
        selected = self.workspace.select_clients(round_number)
        if len(selected) < len(self.workspace.client_names):
            log.info("Round %d: %d of %d clients sampled: %s", round_number, len(selected),
                     len(self.workspace.client_names), ", ".join(selected))
        self.workspace.dispatch_training(round_number, selected)  # trainer processes (TRAINER_DEVICES) start now
        for index, client in enumerate(selected):  # results in client order: the same aggregate as one by one
            agent = self.crew.trainer_for(index)
            try:
                self._call(agent, "train_local_adapter", client=client, round=round_number)
            except Exception as error:  # a failing client is left out of the round, not the run
                reason = f"training failed: {type(error).__name__}: {error}"
                log.exception("Round %d: %s %s", round_number, client, reason)
                self.workspace.record_client_failure(client, reason)

    @listen(train_clients)
    def aggregate_updates(self):
        self._call(self.crew.aggregator, "aggregate_adapters", round=self.state.round)

    @listen(aggregate_updates)
    def evaluate_round(self):
        round_number = self.state.round
        metrics = self._call(self.crew.evaluator, "evaluate_model", round=round_number)
        record = self.workspace.rounds[-1]
        record.seconds = time.perf_counter() - self.state.round_started
        self.workspace.save_state(round_number, self.state.total_rounds)
        self.workspace.save_history()
        self.workspace.write_scalars(round_number)  # only now that the round's state is saved: no duplicate steps
        losses = ", ".join(f"{c.name} {c.train_loss:.3f}" for c in record.clients)
        skipped = f", skipped {', '.join(record.skipped)}" if record.skipped else ""
        privacy = f" | DP {record.privacy.mode}: ε = {record.privacy.epsilon:.2f} (δ = {record.privacy.delta:g})" \
            if record.privacy else ""
        progress.info("Round %d/%d: perplexity %.2f (base %.2f), validation %s, BLEU %.2f, ROUGE-L %.3f | train loss "
                      "%s%s%s | %.0fs", round_number, self.state.total_rounds, metrics.perplexity,
                      self.workspace.base_metrics.perplexity, _ppl(metrics.validation_perplexity), metrics.bleu,
                      metrics.rouge_l, losses, skipped, privacy, record.seconds)
        if self.on_round:
            self.on_round(record.model_dump(by_alias=True))

    @router(evaluate_round)
    def decide_next(self):
        if self.state.round < self.state.total_rounds:
            log.info("State saved after round %d; continue with: python -m fl_crew_reddit.main --resume %s",
                     self.state.round, self.workspace.paths.run_id)
        return "next_round" if self.state.round < self.state.total_rounds else "all_rounds_done"

    @listen(or_("all_rounds_done", "resume_finish"))
    def run_baselines(self):
        best = best_round_record(self.workspace.rounds)
        federated = f"{best.global_.perplexity:.2f} at round {best.round}" if best else "—"
        baselines = self.workspace.config.baselines
        if baselines and self.workspace.config.federation == "flower":
            progress.info("Baselines %s skipped: they train on all clients' data in one place, and in "
                          "FEDERATION=flower that data never leaves the sites", ", ".join(baselines))
            baselines = []
        for baseline in baselines:
            if baseline in self.workspace.baselines:  # finished before a stop
                continue
            result = self._call(self.crew.evaluator, "train_and_evaluate_baseline", baseline=baseline)
            progress.info("Baseline %s: test perplexity %.2f at its best checkpoint on validation (federated %s)",
                          baseline, result.perplexity, federated)
            self.workspace.save_history()

    @listen(run_baselines)
    def finish(self):
        self.workspace.save_state(self.state.total_rounds, self.state.total_rounds, stage="finished")
        return self.workspace.run_history()


def _ppl(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "—"
