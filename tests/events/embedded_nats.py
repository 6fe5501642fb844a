"""The embedded nats-server as the supervisor runs it (``events.embedded.server_args``), on free
ports in a test's own data dir; stopped and started again on the same ports and JetStream store."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import httpx
from stack.harness import free_ports

from pmoves_e2b.config import Settings, load_settings
from pmoves_e2b.events.embedded import server_args


class EmbeddedNats:
    def __init__(self, data_dir: Path) -> None:
        port, monitor = free_ports(2)
        self.settings: Settings = load_settings(
            e2b_data_dir=data_dir,
            e2b_nats_port=port,
            e2b_nats_monitor_port=monitor,
            e2b_nats_password=secrets.token_hex(16),
        )
        self.log_path = data_dir / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once it answers health with JetStream up."""
        self.settings.nats_store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(server_args(self.settings), stdout=log, stderr=subprocess.STDOUT)
        health = f"http://127.0.0.1:{self.settings.e2b_nats_monitor_port}/healthz?js-enabled-only=true"
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(health, timeout=0.5, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"embedded nats-server did not start; its log: {self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
