"""``pmoves-e2b mcp --stdio``: the same MCP tools over stdin/stdout for local clients.

stdout carries only MCP messages; logs go to stderr. The HTTP transports (``/mcp``,
``/sse``) are served by the e2b-mcp-server service that ``pmoves-e2b up`` starts.
"""

from __future__ import annotations

import logging
import sys

import typer

app = typer.Typer(no_args_is_help=False, add_completion=False)


@app.callback(invoke_without_command=True)
def mcp(
    stdio: bool = typer.Option(False, "--stdio", help="Speak MCP on stdin/stdout (Claude Desktop, Agent Zero stdio)."),
) -> None:
    """Serve the e2b-mcp-server tools over stdio."""
    if not stdio:
        typer.echo(
            "Pass --stdio to serve MCP on stdin/stdout. Over HTTP the tools are at "
            "http://<host>:7073/mcp (streamable HTTP) and /sse, served by `pmoves-e2b up`.",
            err=True,
        )
        raise typer.Exit(2)
    from pmoves_e2b.cli_support import settings_or_exit
    from pmoves_e2b.mcp.app import build_ops, build_server
    from pmoves_e2b.sdk.config import exit_without_finalizing

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    settings = settings_or_exit()
    _, ops = build_ops(settings)
    build_server(settings, ops).run("stdio")
    exit_without_finalizing(0)
