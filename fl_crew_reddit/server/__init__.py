"""The federation's server side: sampling, fit config, update screening, aggregation and server-optimizer state.

Nothing here holds client data or a model; both engines (in-process and Flower) drive the same strategy object."""
from fl_crew_reddit.server.strategy import AggregationOutcome, ClientUpdate, FederatedStrategy, StrategySettings

__all__ = ["AggregationOutcome", "ClientUpdate", "FederatedStrategy", "StrategySettings"]
