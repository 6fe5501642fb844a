"""``pmoves-e2b spell list|show|run``: the same registry and executor as the services."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from pmoves_e2b.cli_support import err_console
from pmoves_e2b.cli_support import fail as _fail
from pmoves_e2b.cli_support import settings_or_exit as _settings
from pmoves_e2b.sdk.config import exit_without_finalizing
from pmoves_e2b.spells.executor import SpellError, SpellRequest, build_executor
from pmoves_e2b.spells.format import Spell
from pmoves_e2b.spells.registry import SpellRegistry, UnknownSpell

app = typer.Typer(
    help="List, show and run spells.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
console = Console()


def _registry() -> SpellRegistry:
    return SpellRegistry(_settings().e2b_spells_dir)


def _spell(name: str) -> Spell:
    try:
        return _registry().get(name)
    except UnknownSpell as exc:
        raise _fail(str(exc)) from None


def parse_param(spell: Spell, item: str) -> tuple[str, Any]:
    """``k=v``: text for string parameters, JSON otherwise (falling back to text); ``k=@file`` reads a file."""
    name, sep, raw = item.partition("=")
    if not sep or not name:
        raise _fail(f"--param {item!r}: expected NAME=VALUE (or NAME=@FILE)")
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise _fail(f"--param {name}: cannot read {raw[1:]}: {exc}") from None
    declared = (spell.parameters.get("properties") or {}).get(name, {})
    if declared.get("type") == "string":
        return name, raw
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


@app.command("list")
def list_spells() -> None:
    """Spells from the package and E2B_SPELLS_DIR; broken spell files are reported."""
    registry = _registry()
    table = Table(show_header=True)
    for column in ("name", "version", "language", "source", "description"):
        table.add_column(column)
    for spell in registry.spells():
        table.add_row(spell.name, spell.version, spell.language, spell.source, spell.description.split(". ")[0])
    console.print(table)
    for problem in registry.problems():
        err_console.print(f"[yellow]skipped[/yellow] {problem.error}", highlight=False, soft_wrap=True)


@app.command("show")
def show(name: str = typer.Argument(..., help="Spell name")) -> None:
    """Description, parameters (JSON Schema), example, requirements and code of a spell."""
    spell = _spell(name)
    summary = spell.summary()
    console.print(
        f"[bold]{spell.name}[/bold] {spell.version} ({spell.language}, template {spell.template}, "
        f"timeout {spell.timeout} s, {spell.source})",
        highlight=False,
    )
    console.print(spell.description, highlight=False)
    for key in ("parameters", "example", "requirements", "outputs"):
        console.print(f"\n[bold]{key}[/bold]")
        console.print_json(json.dumps(summary[key]))
    console.print("\n[bold]code[/bold]")
    typer.echo(spell.code, nl=False)


@app.command("run")
def run(
    name: str = typer.Argument(..., help="Spell name"),
    param: list[str] = typer.Option([], "--param", "-p", help="NAME=VALUE or NAME=@FILE (repeatable)"),
    params_json: str | None = typer.Option(None, "--params-json", help="All parameters as one JSON object"),
    timeout: int | None = typer.Option(None, help="Seconds (default: the spell's timeout)"),
    sandbox_id: str | None = typer.Option(None, help="Run in this sandbox instead of a new one"),
    out: Path | None = typer.Option(None, help="Directory to save the returned files in"),
    as_json: bool = typer.Option(False, "--json", help="Print the whole run as JSON"),
) -> None:
    """Run a spell in a sandbox and print what it produced. Exit code 0 only when it completed."""
    spell = _spell(name)
    parameters: dict[str, Any] = {}
    if params_json:
        try:
            parameters = json.loads(params_json)
        except ValueError as exc:
            raise _fail(f"--params-json is not valid JSON: {exc}") from None
    parameters.update(parse_param(spell, item) for item in param)
    try:
        result = asyncio.run(build_executor(_settings()).execute(SpellRequest(name, parameters, timeout, sandbox_id)))
    except SpellError as exc:
        raise _fail(exc.message) from None
    if out is not None:
        _save_files(result, out)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_run(result)
    exit_without_finalizing(0 if result["status"] == "completed" else 1)


def _save_files(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for file in result["files"]:
        if "content_base64" in file:
            (out / file["name"]).write_bytes(base64.b64decode(file["content_base64"]))
            file["saved_to"] = str(out / file["name"])


def _print_run(result: dict[str, Any]) -> None:
    colour = "green" if result["status"] == "completed" else "red"
    console.print(
        f"[{colour}]{result['status']}[/{colour}] {result['spell_name']} {result['spell_version']} "
        f"in {result['duration_seconds']} s (sandbox {result['sandbox_id']})",
        highlight=False,
    )
    if result["error"]:
        typer.echo(result["error"], err=True)
    # The spell's own output, byte for byte (no wrapping or markup).
    if result["stdout"]:
        typer.echo(result["stdout"], nl=False)
    if result["stderr"]:
        typer.echo(result["stderr"], nl=False, err=True)
    if result["result"] is not None:
        console.print_json(json.dumps(result["result"]))
    for file in result["files"]:
        where = file.get("saved_to") or file.get("url") or "inline (use --out DIR to save it)"
        console.print(f"file {file['name']} ({file['size']} bytes): {where}", highlight=False)
