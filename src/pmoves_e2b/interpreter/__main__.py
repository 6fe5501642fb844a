"""``python -m pmoves_e2b.interpreter --host 0.0.0.0 --port 49999``: serve the code interpreter."""

from __future__ import annotations

import argparse
import logging
import os
import socket

import uvicorn

from . import poll_only
from .app import Settings, build_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pmoves_e2b.interpreter", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 - listens on the sandbox's own address; the proxy is the door
    parser.add_argument("--port", type=int, default=49999)
    parser.add_argument("--cwd", default=Settings.default_cwd, help="working directory of new contexts")
    parser.add_argument("--envd-url", default=Settings.envd_url, help="envd base URL for GET /envs ('' to skip)")
    parser.add_argument(
        "--keepalive-seconds",
        type=float,
        default=Settings.keepalive_seconds,
        help="send a keepalive line after this long without output",
    )
    parser.add_argument(
        "--default-languages",
        default=",".join(Settings.default_languages),
        help="comma-separated languages whose context starts with the server ('' for none)",
    )
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: NDJSON lines go out at once instead of waiting on Nagle.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cwd = args.cwd
    if not os.path.isdir(cwd):
        cwd = os.path.expanduser("~")
        logging.getLogger(__name__).warning("--cwd %s does not exist; contexts start in %s", args.cwd, cwd)
    settings = Settings(
        default_cwd=cwd,
        envd_url=args.envd_url,
        keepalive_seconds=args.keepalive_seconds,
        default_languages=tuple(filter(None, (lang.strip() for lang in args.default_languages.split(",")))),
    )
    polling = poll_only.enable_where_asked()
    config = uvicorn.Config(
        build_app(settings),
        loop=f"{poll_only.__name__}:new_event_loop" if polling else "auto",
        log_level=args.log_level,
        access_log=False,
        timeout_keep_alive=640,  # as E2B's server: the SDK keeps its connection across cells
        lifespan="on",
        # A cell may stream forever; at shutdown its request is cut, not waited for.
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    poll_only.claim()
    server.run(sockets=[listening_socket(args.host, args.port)])


if __name__ == "__main__":
    main()
