"""Entry points of the Flower app: the ServerApp and ClientApp defined in fl_crew_reddit.federation.flower."""
from fl_crew_reddit.federation.flower import client_app, server_app

__all__ = ["client_app", "server_app"]
