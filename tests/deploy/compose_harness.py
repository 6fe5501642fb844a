"""The containerised stack for tests and bench: images built once per inputs, compose up/down with podman.

``built_images()`` runs images/build.sh (it skips images whose inputs did not change).
``ComposeStack(profiles)`` is one `podman-compose -p <unique project>` of deploy/compose.yaml on free
host ports with fresh secrets: ``up()`` then ``wait_healthy()`` (podman's healthchecks, run by hand:
no systemd timers here), ``sdk_env``, ``containers()``, ``down()``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stack.harness import clean_environ, free_ports

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
CONTAINERS_CONF = REPO / "deploy" / "containers.conf"
BUILD_SCRIPT = REPO / "images" / "build.sh"
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"
SERVICES = ("nats", "e2b-sandbox", "e2b-mcp-server", "e2b-surf", "e2b-desktop")


def podman_env() -> dict[str, str]:
    return {**clean_environ(), "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr[-2000:]}")
    return done


def built_images() -> None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing or not PODMAN_COMPOSE.exists():
        raise AssertionError(f"missing {missing or 'podman-compose in the venv'}: make test-sysdeps venv")
    done = subprocess.run(
        [str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=1800,
        env={**podman_env(), "PY": sys.executable},
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"images/build.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def templates_dir() -> str:
    return os.environ.get("E2B_TEMPLATES_DIR") or "/var/lib/pmoves-e2b/templates"


class ComposeStack:
    def __init__(self, profiles: tuple[str, ...] = ("e2b",), extra_env: dict[str, str] | None = None) -> None:
        self.project = f"pmoves-e2b-test-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.profiles = profiles
        self.secrets_dir = Path(tempfile.mkdtemp(prefix="pmoves-deploy-secrets-"))
        subprocess.run([sys.executable, str(REPO / "deploy" / "make_secrets.py"), str(self.secrets_dir)],
                       check=True, capture_output=True, env=clean_environ())  # fmt: skip
        sandbox, mcp, surf, desktop = free_ports(4)
        self.ports = {"e2b-sandbox": sandbox, "e2b-mcp-server": mcp, "e2b-surf": surf, "e2b-desktop": desktop}
        self.env = {
            **podman_env(),
            "E2B_SECRETS_DIR": str(self.secrets_dir),
            "E2B_TEMPLATES_HOST_DIR": templates_dir(),
            "E2B_SANDBOX_PUBLISH_PORT": str(sandbox),
            "E2B_MCP_PUBLISH_PORT": str(mcp),
            "E2B_SURF_PUBLISH_PORT": str(surf),
            "E2B_DESKTOP_PUBLISH_PORT": str(desktop),
            **(extra_env or {}),
        }
        self.api_key = (self.secrets_dir / "E2B_API_KEY").read_text().strip()

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        profiles = [arg for p in self.profiles for arg in ("--profile", p)]
        command = [str(PODMAN_COMPOSE), "-f", str(COMPOSE_FILE), "-p", self.project, *profiles, *args]
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['e2b-sandbox']}"

    @property
    def sdk_env(self) -> dict[str, str]:
        return {"E2B_API_KEY": self.api_key, "E2B_API_URL": self.sandbox_url, "E2B_SANDBOX_URL": self.sandbox_url}

    def containers(self) -> dict[str, dict]:  # type: ignore[type-arg]
        """Service name -> `podman inspect` of this project's containers (all states)."""
        ids = podman("ps", "-aq", "--no-trunc", "--filter", f"label=io.podman.compose.project={self.project}")
        found = {}
        for cid in ids.stdout.split():
            info = json.loads(podman("inspect", cid).stdout)[0]
            found[info["Config"]["Labels"]["com.docker.compose.service"]] = info
        return found

    def up(self) -> None:
        self.compose("up", "-d")

    def wait_healthy(self, services: tuple[str, ...], timeout: float = 120) -> float:
        """Seconds until every service's healthcheck passes."""
        start = time.monotonic()
        pending = set(services)
        while pending:
            containers = self.containers()
            for name in sorted(pending):
                cid = containers.get(name, {}).get("Id")
                if cid and podman("healthcheck", "run", cid, check=False).returncode == 0:
                    pending.discard(name)
            if pending and time.monotonic() - start > timeout:
                logs = {n: podman("logs", "--tail", "20", c["Id"], check=False).stdout[-1500:]
                        for n, c in self.containers().items() if n in pending}  # fmt: skip
                raise AssertionError(f"not healthy after {timeout:.0f} s: {sorted(pending)}\n{logs}")
            time.sleep(0.2)
        return time.monotonic() - start

    def down(self) -> None:
        self.compose("down", "--volumes", timeout=180)

    def cleanup(self) -> None:
        if self.containers():
            self.down()
        shutil.rmtree(self.secrets_dir, ignore_errors=True)
