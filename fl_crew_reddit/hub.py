"""Can the Hugging Face Hub be reached? One quick probe, shared by base-model and CLIP loading.

Loading a hub id on a machine without network makes transformers retry for minutes before it fails; a DNS + TCP probe
first fails in seconds with a message that says what to do. The probe takes its settings as values (`HubAccess`);
`fl_crew_reddit.config.hub_access()` reads them from the environment, the one place that does.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubAccess:
    """How this process reaches the Hub: `offline` (HF_HUB_OFFLINE) forbids it, `endpoint` (HF_ENDPOINT) is where."""

    offline: bool = False
    endpoint: str = DEFAULT_ENDPOINT

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the endpoint; the port defaults by scheme (443 for https, 80 for http)."""
        parts = urlsplit(self.endpoint if "//" in self.endpoint else f"https://{self.endpoint}")
        return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def hub_reachable(access: HubAccess | None = None, timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to the Hub's endpoint opens within `timeout_s`; False when offline.

    `access` None means this process's settings (`config.hub_access()`), for callers that hold no config.
    """
    if access is None:
        from fl_crew_reddit.config import hub_access

        access = hub_access()
    host, port = access.address
    if access.offline or not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
