"""The OCI bundle of one gVisor sandbox: its config.json (the rootfs is the overlay the backend
mounts from the template's layers, the same ones the ns backend uses)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pmoves_e2b.sandbox.backends.ns.backend import CAPABILITIES

HOSTNAME = "e2b"  # as in ns sandboxes


def config(
    rootfs: Path,
    argv: tuple[str, ...],
    env: dict[str, str],
    memory_mb: int,
    nofile: int,
    nproc: int,
    netns_path: Path,
) -> dict[str, Any]:
    """root inside is gVisor's root: the sentry, not the host kernel, checks its capabilities
    (Docker's default set, as in ns), and the sentry itself runs unprivileged in its own
    namespaces under a seccomp filter of runsc's."""
    caps = list(CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": list(argv),
            "env": [f"{key}={value}" for key, value in env.items()],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile},
                {"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": HOSTNAME,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
            # POSIX shared memory for every user (gVisor's memory, inside the sandbox's limit)
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["mode=1777"]},  # noqa: S108 - the sandbox's own
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
        ],
        "linux": {
            # netstack copies the sandbox netns's interfaces (its veth) into the sentry
            "namespaces": [
                *({"type": t} for t in ("pid", "ipc", "uts", "mount")),
                {"type": "network", "path": str(netns_path)},
            ],
            # gVisor's view of the machine (/proc/meminfo); the host's memory cgroup enforces it
            "resources": {"memory": {"limit": memory_mb * 1024 * 1024}},
        },
    }


def write(bundle_dir: Path, data: dict[str, Any]) -> None:
    bundle_dir.mkdir(mode=0o700, exist_ok=True)
    (bundle_dir / "config.json").write_text(json.dumps(data))
