"""FLCrewRedditManager: build the workspace, the crew and the Flow for one run, run it, return a typed result."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from fl_crew_reddit.config import FLCrewRedditConfig, MaskUrlCredentials
from fl_crew_reddit.history import RunHistory
from fl_crew_reddit.runs import RunPaths, new_run_id

log = logging.getLogger(__name__)


class FLRunResult(BaseModel):
    """One run's outcome: its typed history (as history.json holds it; `history["base"]` reads the JSON form),
    where the files are, and the adapters a user keeps."""

    run_id: str
    history: RunHistory
    history_path: str
    log_path: str
    seconds: float

    def perplexities(self) -> list[float]:
        """Global held-out test perplexity per evaluated round."""
        return [r.global_.perplexity for r in self.history.rounds if r.global_ is not None]

    @property
    def global_adapters(self) -> list[str]:
        """The global adapter folder of each aggregated round, in order."""
        return [r.aggregation.adapter_path for r in self.history.rounds if r.aggregation is not None]

    @property
    def final_adapter(self) -> str | None:
        return self.global_adapters[-1] if self.global_adapters else None

    @property
    def best_round(self) -> int | None:
        """The round with the lowest validation perplexity (never chosen on test)."""
        return self.history.best_round

    @property
    def best_adapter(self) -> str | None:
        return self.history.best_adapter

    @property
    def skipped_clients(self) -> dict[int, dict[str, list[str]]]:
        """Round -> client -> reasons it was left out, for the rounds that left any client out."""
        return {r.round: r.skipped for r in self.history.rounds if r.skipped}


class FLCrewRedditManager:
    def __init__(self, config: FLCrewRedditConfig | None = None, agent_llm=None):
        """`agent_llm`: a CrewAI BaseLLM to drive the agents instead of AGENT_LLM_MODEL (unless AGENT_MODE=direct)."""
        self.config = config or FLCrewRedditConfig()
        self.agent_llm = agent_llm

    def run_federated_learning(self, num_rounds: int | None = None, run_id: str | None = None,
                               on_round: Callable[[dict], None] | None = None) -> FLRunResult:
        """Run collect → preprocess → rounds of train/aggregate/evaluate; `on_round` gets each round's record
        in its history.json form."""
        num_rounds = num_rounds or self.config.federation_rounds
        return self._run(run_id or new_run_id(), num_rounds, on_round, resume=False)

    def resume(self, run_id: str | None = None, num_rounds: int | None = None,
               on_round: Callable[[dict], None] | None = None) -> FLRunResult:
        """Continue a stopped run (default: the newest with saved state) after its last completed round.

        Same SEED and settings give the same final global adapter as a run that was never stopped.
        """
        from fl_crew_reddit.run_state import find_run

        asked = run_id
        run_id, why = find_run(Path(self.config.fl_crew_reddit_dir).resolve(), run_id, num_rounds)
        # the CLI names the run it picked itself (it needs the id first); a caller who named none learns it here
        (log if asked else logging.getLogger("fl_crew_reddit.progress")).info("Resuming run %s: %s", run_id, why)
        return self._run(run_id, num_rounds, on_round, resume=True)

    def _run(self, run_id: str, num_rounds: int | None, on_round, resume: bool) -> FLRunResult:
        from fl_crew_reddit.crew.agents import FLCrew
        from fl_crew_reddit.crew.flow import FederatedFlow
        from fl_crew_reddit.workspace import FederatedWorkspace

        paths = RunPaths(Path(self.config.fl_crew_reddit_dir).resolve(), run_id).create()
        handler = self._log_to_file(paths.log_file)
        started = time.perf_counter()
        workspace = None
        try:
            log.info("Run %s: %s with settings %s", paths.run_id, "resume" if resume else "start",
                     self.config.public_settings())
            workspace = FederatedWorkspace(self.config, paths)
            _ = workspace.model  # a base model that cannot load stops the run here, before any collection
            after_round, stage = None, "round"
            if resume:
                state = workspace.restore()
                after_round, stage = state.round, state.stage
                num_rounds = num_rounds or state.total_rounds
                _warn_on_changed_settings(state.settings, self.config.public_settings())
                if stage == "finished" and after_round < num_rounds:
                    workspace.baselines = {}  # more rounds: the baselines get the longer run's budget
            workspace.plan_privacy(num_rounds)  # DP: the accountant's plan, or a refusal, before any data work
            flow = FederatedFlow(FLCrew(workspace, llm=self.agent_llm), num_rounds=num_rounds, on_round=on_round,
                                 resume_after_round=after_round, resume_stage=stage)
            _silence_crewai_panels()
            if stage != "finished" or after_round < num_rounds:
                flow.kickoff()
            history = workspace.run_history()
        finally:
            if workspace is not None:
                workspace.close()  # TensorBoard event files
            logging.getLogger("fl_crew_reddit").removeHandler(handler)
            handler.close()
        return FLRunResult(run_id=paths.run_id, history=history, history_path=str(paths.history),
                           log_path=str(paths.log_file), seconds=time.perf_counter() - started)

    @staticmethod
    def _log_to_file(path: Path) -> logging.Handler:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(MaskUrlCredentials())  # user:password of URL settings never reach the log
        package_logger = logging.getLogger("fl_crew_reddit")
        package_logger.setLevel(logging.INFO)
        package_logger.addHandler(handler)
        return handler


def _warn_on_changed_settings(saved: dict, current: dict) -> None:
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and k != "fl_crew_reddit_dir"}
    if changed:
        log.warning("Resuming with settings that differ from the run's start (results may differ from an "
                    "uninterrupted run): %s", changed)


def _silence_crewai_panels() -> None:
    """CrewAI prints a panel per Flow step; our own progress lines and the log file say the same, shorter."""
    from crewai.events.utils.console_formatter import set_suppress_console_output

    set_suppress_console_output(True)
