"""Secrets for deploy/compose.yaml: one file each in DIR (default deploy/secrets), kept if present.

    .venv/bin/python deploy/make_secrets.py [DIR]

Files are root:65532 mode 0440 (the services run as uid/gid 65532 and read them as *_FILE from
/run/secrets). nats.conf holds the NATS users (each service its own, with its subjects; `pmoves`
for PMOVES' clients, password E2B_NATS_PASSWORD), derived as the embedded server does.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pmoves_e2b.config import generate_secret, load_settings
from pmoves_e2b.events import embedded

RUNTIME_GID = 65532
NATS_HOST = "nats:4222"
GENERATED = (
    "E2B_API_KEY",
    "E2B_MCP_SERVER_TOKEN",
    "E2B_DESKTOP_AUTH_TOKEN",
    "E2B_SURF_AUTH_TOKEN",
    "E2B_NATS_PASSWORD",
)


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o440)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    if os.geteuid() == 0:
        os.chown(path, 0, RUNTIME_GID)
    os.chmod(path, 0o440)


def make_secrets(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o750)  # noqa: S103 - group 65532 (the services) reads the secrets
    if os.geteuid() == 0:
        os.chown(directory, 0, RUNTIME_GID)
    written = []
    for name in GENERATED:
        path = directory / name
        if not path.exists():
            _write(path, generate_secret(name) + "\n")
            written.append(path)
    password = (directory / "E2B_NATS_PASSWORD").read_text().strip()
    with tempfile.TemporaryDirectory() as data:
        settings = load_settings(e2b_data_dir=Path(data), e2b_nats_password=password)
        _write(directory / "nats.conf", embedded.write_config(settings).read_text())
        for user in embedded.SERVICE_USERS:
            url = embedded.client_url(settings, user).replace(f"@127.0.0.1:{settings.e2b_nats_port}", f"@{NATS_HOST}")
            _write(directory / f"NATS_URL.{user}", url + "\n")
    written += [directory / "nats.conf", *(directory / f"NATS_URL.{u}" for u in embedded.SERVICE_USERS)]
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "secrets"
    for path in make_secrets(target):
        print(f"wrote {path}")
