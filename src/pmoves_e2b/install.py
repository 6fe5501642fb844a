"""``pmoves-e2b install`` / ``uninstall``: the systemd unit of the supervisor on a plain VM.

One unit, ``pmoves-e2b.service``, runs ``pmoves-e2b up --foreground`` (the supervisor: NATS and the
four services); its settings come from an EnvironmentFile (0600, kept on re-install so an upgrade
keeps the operator's edits). Install records what it wrote in a manifest next to the env file, and
uninstall removes exactly that (and the directories install made, when empty). The data dir is the
service's, not install's: it is never created or removed here (docs/deploy.md: backup).

Hardening is chosen for what e2b-sandbox does as root (namespaces, overlay mounts, loop devices,
cgroups, nftables, /proc/sys) and for sandboxes outliving a restart; each option's reason is written
into the unit as a comment (``UNIT_TEMPLATE``) so the file on the host explains itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "pmoves-e2b.service"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_DIR = Path("etc/pmoves-e2b")
ENV_FILE_NAME = "pmoves-e2b.env"
MANIFEST_NAME = "install-manifest.json"
DEFAULT_DATA_DIR = Path("/var/lib/pmoves-e2b")

UNIT_TEMPLATE = """\
# Written by `pmoves-e2b install`; `pmoves-e2b uninstall` removes it. Guide: docs/deploy.md.
[Unit]
Description=pmoves-e2b: self-hosted E2B-compatible sandboxes (NATS + e2b-sandbox, mcp, surf, desktop)
After=network-online.target
Wants=network-online.target
# Give up after 5 failed starts in 5 minutes (a broken config should not spin forever).
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=simple
EnvironmentFile={env_file}
Environment=E2B_DATA_DIR={data_dir}
WorkingDirectory=/
ExecStart={python} -m pmoves_e2b.cli up --foreground
# The supervisor restarts a dead service itself (backoff); this restarts the supervisor.
Restart=on-failure
RestartSec=2
# The supervisor gives each component 10 s after SIGTERM, then SIGKILL.
TimeoutStopSec=60
# Sandboxes are not tied to the services: a restart or upgrade must not kill them (e2b-sandbox
# re-adopts them from its database on start). control-group/mixed would SIGKILL every process
# left in the unit's cgroup, i.e. every sandbox. `pmoves-e2b down` is how they all end.
KillMode=process
# e2b-sandbox makes each sandbox's cgroups under its own (cgroup2 leaf for kill/freeze, v1 limits):
# the subtree is the service's to manage, not systemd's.
Delegate=yes
# Each sandbox has its own pids limit; the unit's would count every sandbox's processes.
TasksMax=infinity
LimitNOFILE=1048576
# Hardening that leaves e2b-sandbox working. Kept: no setuid gains (nothing here needs one; sandboxes
# already run with no_new_privs), no realtime scheduling, no personality changes (all inherited by
# sandboxes as seccomp filters). Left out on purpose, with why:
#  PrivateTmp/ProtectSystem/ProtectHome/ReadWritePaths/PrivateDevices/ProtectKernel*/ProtectControlGroups/
#  ProtectProc/PrivateMounts: each gives the service its own mount namespace; sandbox overlays and loop
#  mounts made in it would be invisible to the next start (no re-adoption, no cleanup), and e2b-sandbox
#  writes /sys/fs/cgroup, /proc/sys (host tables), /dev/loop*, /run/pmoves-e2b.
#  ProtectClock/DeviceAllow: a device cgroup would refuse loop devices and each sandbox's /dev nodes.
#  RestrictNamespaces/CapabilityBoundingSet narrower than root's/PrivateNetwork/IPAddressDeny: it makes
#  user, mount, pid, net namespaces, veths and nft rules, and sandboxes get Docker's default capabilities.
#  RestrictSUIDSGID/SystemCallArchitectures=native/MemoryDenyWriteExecute: inherited by every sandbox, they
#  would break apt (setuid files), 32-bit binaries and every JIT (Node, Chromium, Deno) inside sandboxes.
NoNewPrivileges=yes
RestrictRealtime=yes
LockPersonality=yes
UMask=0077

[Install]
WantedBy=multi-user.target
"""

ENV_TEMPLATE = """\
# pmoves-e2b settings (read by {unit}; mode 0600: secrets may go here). Every E2B_* setting of
# README.md works here; a secret can also be a file: NAME_FILE=/path. Restart after editing:
#   systemctl restart pmoves-e2b   (sandboxes keep running)
# Generated secrets (E2B_API_KEY, tokens, E2B_NATS_PASSWORD) live in $E2B_DATA_DIR/secrets/.
E2B_BIND={bind}
E2B_DOMAIN={domain}
LOG_FORMAT=json
# Public host routing ({{port}}-{{id}}.E2B_DOMAIN): wildcard DNS + a TLS reverse proxy (docs/deploy.md).
# PMOVES' NATS instead of the embedded server:
#NATS_URL=nats://user:password@nats:4222
"""


class InstallError(RuntimeError):
    """Something install or uninstall refuses to do (one line for the CLI)."""


@dataclass(frozen=True)
class Layout:
    """Where install writes, under ``root`` ("/" on a real host, a temp dir in tests)."""

    root: Path

    @property
    def unit(self) -> Path:
        return self.root / UNIT_DIR / UNIT_NAME

    @property
    def config_dir(self) -> Path:
        return self.root / CONFIG_DIR

    @property
    def env_file(self) -> Path:
        return self.config_dir / ENV_FILE_NAME

    @property
    def manifest(self) -> Path:
        return self.config_dir / MANIFEST_NAME

    def on_host(self, path: Path) -> Path:
        """The path as the installed system sees it (without ``root``)."""
        return Path("/") / path.relative_to(self.root)


def render_unit(python: str, env_file: Path, data_dir: Path) -> str:
    for name, value in (("python", python), ("env file", str(env_file)), ("data dir", str(data_dir))):
        if not value.startswith("/") or any(c in value for c in " \n\"'\\%$"):
            raise InstallError(f"{name} must be an absolute path without spaces, quotes, % or $: {value!r}")
    return UNIT_TEMPLATE.format(python=python, env_file=env_file, data_dir=data_dir)


def render_env(bind: str, domain: str) -> str:
    for name, value in (("bind", bind), ("domain", domain)):
        if not value or any(c.isspace() or c in "\"'\\$#" for c in value):
            raise InstallError(f"--{name} must be one word without quotes, $ or #: {value!r}")
    return ENV_TEMPLATE.format(unit=UNIT_NAME, bind=bind, domain=domain)


def _systemd_running(layout: Layout) -> bool:
    return layout.root == Path("/") and Path("/run/systemd/system").is_dir()


def _systemctl(*args: str) -> None:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError(f"systemctl {' '.join(args)} failed: {done.stderr.strip()}")


def _read_manifest(layout: Layout) -> dict[str, list[str]] | None:
    try:
        data = json.loads(layout.manifest.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InstallError(f"cannot read {layout.manifest}: {exc}") from None
    return {"files": list(data.get("files", [])), "dirs": list(data.get("dirs", []))}


def _make_dirs(path: Path, made: list[str]) -> None:
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
        made.append(str(directory))


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install(
    root: Path = Path("/"),
    *,
    data_dir: Path = DEFAULT_DATA_DIR,
    bind: str = "127.0.0.1",
    domain: str = "e2b.localhost",
    python: str = sys.executable,
    start: bool = True,
) -> list[Path]:
    """Write the unit and the env file under ``root``; return what was written.

    A re-install (an upgrade) rewrites the unit and keeps the env file. Files install did not write
    are never overwritten."""
    layout = Layout(root.resolve())
    manifest = _read_manifest(layout)
    owned = set(manifest["files"]) if manifest else set()
    for path in (layout.unit, layout.env_file):
        if path.exists() and str(path) not in owned:
            raise InstallError(f"{path} exists and was not written by pmoves-e2b install; move it away first")
    unit_text = render_unit(python, layout.on_host(layout.env_file), data_dir)
    env_text = render_env(bind, domain)
    made_dirs: list[str] = list(manifest["dirs"]) if manifest else []
    files: list[str] = list(manifest["files"]) if manifest else []
    _make_dirs(layout.unit.parent, made_dirs)
    _make_dirs(layout.config_dir, made_dirs)
    if str(layout.config_dir) in made_dirs:
        os.chmod(layout.config_dir, 0o700)
    written: list[Path] = []
    _write(layout.unit, unit_text, 0o644)
    written.append(layout.unit)
    if not layout.env_file.exists():
        _write(layout.env_file, env_text, 0o600)
        written.append(layout.env_file)
    for path in (layout.unit, layout.env_file):
        if str(path) not in files:
            files.append(str(path))
    _write(layout.manifest, json.dumps({"files": files, "dirs": made_dirs}, indent=2) + "\n", 0o600)
    if _systemd_running(layout):
        _systemctl("daemon-reload")
        if start:
            _systemctl("enable", "--now", UNIT_NAME)
    return written


def uninstall(root: Path = Path("/")) -> list[Path]:
    """Stop and remove what install wrote (files, then the dirs it made if empty); return it.

    Stopping the unit stops the services; sandboxes are not ended (`pmoves-e2b down` first for that),
    and the data dir stays."""
    layout = Layout(root.resolve())
    manifest = _read_manifest(layout)
    if manifest is None:
        raise InstallError(f"nothing to uninstall: no {layout.manifest}")
    if _systemd_running(layout) and layout.unit.exists():
        _systemctl("disable", "--now", UNIT_NAME)
    removed: list[Path] = []
    for name in manifest["files"]:
        path = Path(name)
        if path.exists():
            path.unlink()
            removed.append(path)
    layout.manifest.unlink()
    removed.append(layout.manifest)
    for name in reversed(manifest["dirs"]):
        directory = Path(name)
        try:
            directory.rmdir()
            removed.append(directory)
        except FileNotFoundError:
            pass
        except OSError:
            break  # not empty: something else lives there now; keep it and its parents
    if _systemd_running(layout):
        _systemctl("daemon-reload")
    return removed
