"""Sandbox environment variables inside kernels: fetched from envd, set with a cell per runtime."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENVD_TIMEOUT_SECONDS = 5.0


class EnvdUnavailableError(Exception):
    """envd answered with an error; the fetch should be tried again on the next execution."""


def is_valid_name(name: str) -> bool:
    return bool(ENV_NAME.match(name))


def get_envd_envs(envd_url: str, access_token: str | None) -> tuple[int, bytes]:
    """``GET /envs`` on envd with the caller's token: (status, body). Raises OSError when envd
    cannot be reached. The one place this server talks to envd (env vars and token checks)."""
    request = urllib.request.Request(f"{envd_url.rstrip('/')}/envs")  # noqa: S310 - the URL is envd's, built here
    if access_token is not None:
        request.add_header("X-Access-Token", access_token)
    # envd is on loopback: never go through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=ENVD_TIMEOUT_SECONDS) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def _fetch_envs_blocking(envd_url: str, access_token: str | None) -> dict[str, str] | None:
    try:
        status, body = get_envd_envs(envd_url, access_token)
    except OSError:
        return None
    if status != 200:
        raise EnvdUnavailableError(f"envd answered {status} on /envs")
    payload = json.loads(body or b"{}")
    if not isinstance(payload, dict):
        raise EnvdUnavailableError("envd /envs did not return a JSON object")
    return {str(k): str(v) for k, v in payload.items() if isinstance(k, str) and is_valid_name(k)}


async def fetch_sandbox_envs(envd_url: str, access_token: str | None) -> dict[str, str] | None:
    """The sandbox's env vars, or None when no envd listens (the server then runs without one)."""
    if not envd_url:
        return None
    return await asyncio.to_thread(_fetch_envs_blocking, envd_url, access_token)


def set_code(runtime: str, envs: dict[str, str]) -> str:
    """Code that sets ``envs`` in a kernel of the given runtime ("" when the runtime has no way)."""
    if not envs:
        return ""
    literal = json.dumps(envs)
    if runtime == "python":
        return f"__import__('os').environ.update({literal})"
    if runtime == "node":
        return f"Object.assign(process.env, {literal});"
    if runtime == "deno":
        return f"for (const [k, v] of Object.entries({literal})) Deno.env.set(k, v);"
    if runtime == "bash":
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in envs.items())
    if runtime == "r":
        pairs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in envs.items())
        return f"invisible(Sys.setenv({pairs}))"
    if runtime == "java":
        # A JVM cannot change its environment: E2B's server sets system properties instead.
        return "\n".join(f"System.setProperty({json.dumps(k)}, {json.dumps(v)});" for k, v in envs.items())
    return ""


def unset_code(runtime: str, names: list[str]) -> str:
    if not names:
        return ""
    literal = json.dumps(names)
    if runtime == "python":
        return f"[__import__('os').environ.pop(k, None) for k in {literal}]"
    if runtime == "node":
        return f"for (const k of {literal}) delete process.env[k];"
    if runtime == "deno":
        return f"for (const k of {literal}) Deno.env.delete(k);"
    if runtime == "bash":
        return "unset " + " ".join(names)
    if runtime == "r":
        return f"invisible(Sys.unsetenv(c({', '.join(json.dumps(n) for n in names)})))"
    if runtime == "java":
        return "\n".join(f"System.clearProperty({json.dumps(n)});" for n in names)
    return ""


def reset_code(runtime: str, names: list[str], sandbox_envs: dict[str, str]) -> str:
    """Code that undoes per-call env vars: back to the sandbox value, or unset (as E2B does)."""
    restore = {name: sandbox_envs[name] for name in names if name in sandbox_envs}
    remove = [name for name in names if name not in sandbox_envs]
    return "\n".join(part for part in (set_code(runtime, restore), unset_code(runtime, remove)) if part)
