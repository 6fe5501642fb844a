"""`pmoves-e2b keys`: API keys for the E2B API, besides the configured E2B_API_KEY.

Keys are shown once when created and stored only as sha256 hashes.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from pmoves_e2b.cli_support import settings_or_exit
from pmoves_e2b.store import repo
from pmoves_e2b.store.db import Database

app = typer.Typer(help="Create, list and revoke API keys for the E2B API.", no_args_is_help=True)
console = Console()


def _db() -> Database:
    settings = settings_or_exit()
    if settings.e2b_database_url is None:  # derived in Settings; never None after validation
        raise RuntimeError("E2B_DATABASE_URL was not derived")
    return Database(settings.e2b_database_url)


@app.command("create")
def create(name: str = typer.Option("default", help="A label to recognise the key by.")) -> None:
    """Create a key and print it once."""
    key_id, key = repo.create_api_key(_db(), name)
    console.print(f"created key [bold]{key_id}[/bold] ({name}). Store it now; it is not shown again:")
    typer.echo(key)


@app.command("list")
def list_keys() -> None:
    """List keys (ids, names, prefixes; never the keys)."""
    table = Table("id", "name", "prefix", "created", "revoked")
    for row in repo.list_api_keys(_db()):
        table.add_row(
            row.key_id,
            row.name,
            row.prefix + "…",
            row.created_at.isoformat(timespec="seconds"),
            row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "",
        )
    console.print(table)


@app.command("revoke")
def revoke(key_id: str) -> None:
    """Revoke a key by id; requests with it get 401 from then on."""
    if not repo.revoke_api_key(_db(), key_id):
        console.print(f"[red]no live key with id {key_id}[/red] (see `pmoves-e2b keys list`)")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")
