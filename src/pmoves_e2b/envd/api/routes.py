"""``/health``, ``/envs``, ``/metrics`` and ``/init``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..auth import INIT_SECRET_HEADER, secrets_equal
from .http import HTTPError, Request, Send, send_json, send_response
from .metrics import MetricsSampler

if TYPE_CHECKING:
    from ..state import EnvdState

INIT_BODY_LIMIT = 1 << 20


async def health(send: Send) -> None:
    await send_response(send, 204)


async def envs(state: EnvdState, send: Send) -> None:
    await send_json(send, 200, state.env_vars)


async def metrics(sampler: MetricsSampler, send: Send) -> None:
    await send_json(send, 200, sampler.sample())


def _string_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise HTTPError(400, f"{field} must be an object of strings")
    return value


def _optional_string(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise HTTPError(400, f"{field} must be a string")
    return value or None


async def init(state: EnvdState, request: Request, send: Send) -> None:
    """Host-only configuration: env vars, access token, default user and workdir."""
    if state.init_secret is not None and not secrets_equal(state.init_secret, request.headers.get(INIT_SECRET_HEADER)):
        raise HTTPError(401, "init requires the host's init secret")
    body = await request.json(INIT_BODY_LIMIT)
    if not isinstance(body, dict):
        raise HTTPError(400, "init body must be a JSON object")
    env_vars = _string_map(body.get("envVars"), "envVars")
    token = _optional_string(body, "accessToken")
    user = _optional_string(body, "defaultUser")
    workdir = _optional_string(body, "defaultWorkdir")
    state.env_vars.update(env_vars)
    if token is not None:
        state.access_token = token
    if user is not None:
        state.default_user = user
    if workdir is not None:
        state.default_workdir = workdir
    state.save()
    await send_response(send, 204)
