"""Mutable daemon state set by ``POST /init`` (and the environment at start-up)."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field

DEFAULT_TEMPLATE_USER = "user"


def _default_username() -> str:
    configured = os.environ.get("ENVD_DEFAULT_USER")
    if configured:
        return configured
    try:
        pwd.getpwnam(DEFAULT_TEMPLATE_USER)
    except KeyError:
        return "root"
    return DEFAULT_TEMPLATE_USER


@dataclass
class EnvdState:
    """What the host told envd: sandbox env vars, access token, default user and workdir."""

    init_secret: str | None = None
    access_token: str | None = None
    default_user: str = field(default_factory=_default_username)
    default_workdir: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> EnvdState:
        return cls(init_secret=os.environ.get("ENVD_INIT_SECRET") or None)
