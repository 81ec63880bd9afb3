"""One network probe for the services a run may reach (the Hugging Face Hub, the W&B server): a TCP connection
with a short timeout, so that no network is found in seconds instead of after a library's own retries."""

from __future__ import annotations

import socket
import urllib.parse


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of `url` accepts a TCP connection on its port within `timeout` seconds."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False
