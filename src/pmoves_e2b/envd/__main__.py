"""``python -m pmoves_e2b.envd --host 0.0.0.0 --port 49983``.

Environment: ``ENVD_INIT_SECRET`` (when set, ``POST /init`` needs header
``X-Envd-Init-Secret`` equal to it), ``ENVD_DEFAULT_USER`` (default ``user`` if it exists, else
``root``). With ``ENVD_ZYGOTE=<fd>`` (set by the host) this process is the template's zygote
(``zygote.py``): it imports everything, then forks one envd per sandbox with these options.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

from pmoves_e2b.envd import ENVD_PORT


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

        serve(int(zygote_fd), run_envd=lambda: _run(options), preload=_preload)
        return
    _run(options)


def _preload() -> None:
    """What envd imports before it listens, so a zygote's children start with it in memory."""
    _skip_connectrpc_version_lookup()
    import uvicorn.lifespan.on
    import uvicorn.loops.auto
    import uvicorn.protocols.http.auto
    import uvicorn.server

    from . import app  # noqa: F401

    if importlib.util.find_spec("httptools"):
        import uvicorn.protocols.http.httptools_impl
    if importlib.util.find_spec("uvloop"):
        import uvicorn.loops.uvloop  # noqa: F401


def _run(options: argparse.Namespace) -> None:
    _skip_connectrpc_version_lookup()
    import uvicorn

    from .app import EnvdApp

    uvicorn.run(
        EnvdApp(),
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


if __name__ == "__main__":
    main()
