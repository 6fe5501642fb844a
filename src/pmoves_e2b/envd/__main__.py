"""``python -m pmoves_e2b.envd --host 0.0.0.0 --port 49983``.

Environment: ``ENVD_INIT_SECRET`` (when set, ``POST /init`` needs header
``X-Envd-Init-Secret`` equal to it), ``ENVD_DEFAULT_USER`` (default ``user`` if it exists, else
``root``). With ``ENVD_ZYGOTE=<fd>`` (set by the host) this process is the template's zygote
(``zygote.py``): it imports everything and makes uvicorn's config, then forks one envd per
sandbox with these options.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pmoves_e2b.envd import ENVD_PORT

if TYPE_CHECKING:
    import uvicorn


def _skip_connectrpc_version_lookup() -> None:
    # connectrpc computes its __version__ (used only in client User-Agents) through
    # importlib.metadata, which costs ~60 ms of envd's start; the server never needs it.
    if "connectrpc._version" not in sys.modules:
        stub = types.ModuleType("connectrpc._version")
        stub.__version__ = "0.12.1"  # type: ignore[attr-defined]  # the pinned version (pyproject)
        sys.modules["connectrpc._version"] = stub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pmoves_e2b.envd", description="E2B-compatible envd")
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 - the sandbox's own interface
    parser.add_argument("--port", type=int, default=ENVD_PORT)
    parser.add_argument("--log-level", default="warning")
    options = parser.parse_args(argv)

    zygote_fd = os.environ.pop("ENVD_ZYGOTE", None)
    if zygote_fd is not None:
        from .zygote import serve

        serve(int(zygote_fd), prepare=lambda: _prepare(options))
        return
    _skip_connectrpc_version_lookup()
    from .app import EnvdApp

    _serve(_config(options, EnvdApp()))


class _DeferredApp:
    """The ASGI app of a zygote's uvicorn config, made before the fork: envd's app itself is made
    in the forked envd, which reads the sandbox's environment (its secret) that the zygote never has."""

    app: Callable[[Any, Any, Any], Awaitable[None]]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def _prepare(options: argparse.Namespace) -> Callable[[], None]:
    """In the zygote, once: import what envd imports and make uvicorn's config (its logging set up,
    protocol classes loaded), so that no fork spends CPU on it or copies the pages it would write
    (a fork writes most of what it touches: copy-on-write faults were a third of a forked envd's
    CPU). Returns what a fork runs to become envd."""
    _skip_connectrpc_version_lookup()
    import encodings.idna  # noqa: F401 - binding the host name encodes it with the idna codec

    import uvicorn.loops.auto
    import uvicorn.server

    from .app import EnvdApp

    if importlib.util.find_spec("uvloop"):
        import uvicorn.loops.uvloop  # noqa: F401
    options.host.encode("idna")  # the codec lookup is cached from here on
    deferred = _DeferredApp()
    config = _config(options, deferred)
    config.load()

    def run() -> None:
        deferred.app = EnvdApp()
        _serve(config)

    return run


def _config(options: argparse.Namespace, app: Any) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        access_log=False,
        # Prefer the C parser when the template has it; plain h11 works too.
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        loop="auto",
        lifespan="on",
        # SDK connection pools keep idle connections for up to 300 s.
        timeout_keep_alive=650,
        # Processes are killed at shutdown; do not wait for streams that never end.
        timeout_graceful_shutdown=1,
    )


def _serve(config: uvicorn.Config) -> None:
    """``uvicorn.run`` from a made config: serve, and exit 3 (uvicorn's startup failure) when the
    server never started (e.g. the port is taken)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
