"""What every `pmoves-e2b` command group shares: an error is one red line and an exit code."""

from __future__ import annotations

import typer
from rich.console import Console

from pmoves_e2b.config import ConfigError, Settings, get_settings

EXIT_FAILED = 1
EXIT_CONFIG = 2

err_console = Console(stderr=True)


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print ``error: message`` on stderr; raise the returned Exit."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings_or_exit() -> Settings:
    """The settings, or exit 2 with the one-line reason (no traceback)."""
    try:
        return get_settings()
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
