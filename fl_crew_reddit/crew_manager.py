"""FLCrewRedditManager: build the workspace, the crew and the Flow for one run, run it, return a typed result."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from fl_crew_reddit.config import FLCrewRedditConfig
from fl_crew_reddit.runs import RunPaths, new_run_id

log = logging.getLogger(__name__)


class FLRunResult(BaseModel):
    run_id: str
    history: dict
    global_adapters: list[str]
    final_adapter: str | None
    history_path: str
    log_path: str
    seconds: float
    skipped_clients: dict[int, dict[str, list[str]]]

    def perplexities(self) -> list[float]:
        return [r["global"]["perplexity"] for r in self.history["rounds"] if r.get("global")]


class FLCrewRedditManager:
    def __init__(self, config: FLCrewRedditConfig | None = None):
        self.config = config or FLCrewRedditConfig()

    def run_federated_learning(self, num_rounds: int | None = None, run_id: str | None = None,
                               on_round: Callable[[dict], None] | None = None) -> FLRunResult:
        """Run collect → preprocess → rounds of train/aggregate/evaluate; `on_round` gets each round's record."""
        from fl_crew_reddit.agents import FLCrew
        from fl_crew_reddit.flow import FederatedFlow
        from fl_crew_reddit.workspace import FederatedWorkspace

        num_rounds = num_rounds or self.config.federation_rounds
        paths = RunPaths(Path(self.config.fl_crew_reddit_dir).resolve(), run_id or new_run_id()).create()
        handler = self._log_to_file(paths.log_file)
        started = time.perf_counter()
        try:
            log.info("Run %s: settings %s", paths.run_id, self.config.public_settings())
            workspace = FederatedWorkspace(self.config, paths)
            flow = FederatedFlow(FLCrew(workspace), num_rounds=num_rounds, on_round=on_round)
            _silence_crewai_panels()
            flow.kickoff()
            history = workspace.history()
        finally:
            logging.getLogger("fl_crew_reddit").removeHandler(handler)
            handler.close()
        adapters = [r["aggregation"]["adapter_path"] for r in history["rounds"] if r.get("aggregation")]
        return FLRunResult(
            run_id=paths.run_id, history=history, global_adapters=adapters,
            final_adapter=adapters[-1] if adapters else None, history_path=str(paths.history),
            log_path=str(paths.log_file), seconds=time.perf_counter() - started,
            skipped_clients={r["round"]: r["skipped"] for r in history["rounds"] if r["skipped"]})

    @staticmethod
    def _log_to_file(path: Path) -> logging.Handler:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger = logging.getLogger("fl_crew_reddit")
        package_logger.setLevel(logging.INFO)
        package_logger.addHandler(handler)
        return handler


def _silence_crewai_panels() -> None:
    """CrewAI prints a panel per Flow step; our own progress lines and the log file say the same, shorter."""
    from crewai.events.utils.console_formatter import set_suppress_console_output

    set_suppress_console_output(True)
