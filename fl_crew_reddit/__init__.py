"""fl_crew_reddit: federated LoRA fine-tuning of an LLM on Reddit data, run by a CrewAI crew.

    from fl_crew_reddit import FLCrewRedditConfig, FLCrewRedditManager
    result = FLCrewRedditManager(FLCrewRedditConfig()).run_federated_learning(num_rounds=3)

Heavy modules (torch, crewai) load on first use, so `python -m fl_crew_reddit.main serve-mcp` starts fast.
"""
import fl_crew_reddit._quiet  # noqa: F401  (offline / no-telemetry defaults, before any module loads crewai or flwr)
from fl_crew_reddit.config import FLCrewRedditConfig, load_config

__all__ = ["FLCrewRedditConfig", "FLCrewRedditManager", "FLRunResult", "load_config"]


def __getattr__(name: str):
    if name in ("FLCrewRedditManager", "FLRunResult"):
        from fl_crew_reddit.crew import manager as crew_manager

        return getattr(crew_manager, name)
    raise AttributeError(name)
