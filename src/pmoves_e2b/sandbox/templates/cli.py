"""`pmoves-e2b template build|list|check|delete|prune`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from .builder import TemplateBuilder
from .custom import BuildRefused, CustomBuilds
from .definitions import TEMPLATES
from .dockerfile import DockerfileError, pack_copies
from .dockerfile import parse as parse_dockerfile
from .errors import TemplateError, TemplateNotFound
from .removal import delete_template
from .s3store import S3TemplateStore
from .store import build_record, default_templates_dir, list_templates, read_record, split_ref

app = typer.Typer(help="Build and list sandbox templates (rootfs layers).", no_args_is_help=True)
console = Console(stderr=True)

TemplatesDirOption = Annotated[
    Path | None, typer.Option("--templates-dir", help="Default: E2B_TEMPLATES_DIR (data dir/templates).")
]


class RichReporter:
    """One progress row per build step, a line per cached layer."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[tuple[str, int], TaskID] = {}

    def waiting_for_lock(self, path: Path) -> None:
        console.print(f"[yellow]another build holds {path}; waiting for it[/]")

    def layer_cached(self, layer: str, path: Path) -> None:
        console.print(f"[green]✓[/] layer [bold]{layer}[/] up to date ({path.name})")

    def layer_started(self, layer: str, steps: Sequence[str]) -> None:
        console.print(f"[cyan]●[/] building layer [bold]{layer}[/]")
        for index, title in enumerate(steps):
            self.tasks[(layer, index)] = self.progress.add_task(f"{layer}: {title}", total=1, start=False)

    def step_started(self, layer: str, index: int, title: str) -> None:
        self.progress.start_task(self.tasks[(layer, index)])
        if self.progress.disable:  # not a terminal (make, CI logs): one line per step instead
            console.print(f"  {layer}: {title} ...")

    def step_finished(self, layer: str, index: int, title: str, seconds: float) -> None:
        self.progress.update(self.tasks[(layer, index)], completed=1)
        self.progress.stop_task(self.tasks[(layer, index)])
        if self.progress.disable:
            console.print(f"  {layer}: {title} done in {seconds:.0f} s")

    def layer_finished(self, layer: str, path: Path, seconds: float, size_bytes: int) -> None:
        console.print(
            f"[green]✓[/] layer [bold]{layer}[/] built in {seconds:.0f} s, {size_bytes / 1e6:.0f} MB ({path.name})"
        )


@app.command()
def build(
    name: Annotated[str | None, typer.Argument(help="Template to build (with -f: any new name, or name:tag).")] = None,
    all_templates: Annotated[bool, typer.Option("--all", help="Build every built-in template.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even the layers that are up to date.")] = False,
    dockerfile: Annotated[
        Path | None,
        typer.Option(
            "-f", "--file", help="Build a custom template from a Dockerfile (FROM RUN COPY ENV WORKDIR USER ARG)."
        ),
    ] = None,
    context: Annotated[
        Path | None, typer.Option(help="COPY sources are relative to this (default: the file's dir).")
    ] = None,
    build_arg: Annotated[
        list[str] | None, typer.Option("--build-arg", help="NAME=value for an ARG (repeatable).")
    ] = None,
    templates_dir: TemplatesDirOption = None,
) -> None:
    """Build a template (only the layers whose inputs changed)."""
    if os.geteuid() != 0:
        raise typer.BadParameter("template builds need root (debootstrap, chroot, overlay mounts)")
    if dockerfile is not None:
        if all_templates or not name:
            raise typer.BadParameter("with -f, give the new template's name (name or name:tag), not --all")
        _build_dockerfile(name, dockerfile, context, build_arg or [], force, templates_dir or default_templates_dir())
        return
    if all_templates == (name is not None):
        raise typer.BadParameter(f"give one template name or --all (templates: {', '.join(TEMPLATES)})")
    names = list(TEMPLATES) if all_templates else [name or ""]
    if name is not None and name not in TEMPLATES:
        raise typer.BadParameter(f"unknown template '{name}' (templates: {', '.join(TEMPLATES)})")
    root = templates_dir or default_templates_dir()
    columns = (
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        builder = TemplateBuilder(root, reporter=RichReporter(progress), remote=S3TemplateStore.from_settings())
        for template in names:
            try:
                builder.build(template, force=force)
            except TemplateError as exc:
                progress.stop()
                console.print(f"[red]template {template}: {exc}[/]")
                raise typer.Exit(1) from None
    for template in names:
        console.print(f"[green]template {template} ready[/] in {root}")


@app.command("list")
def list_command(templates_dir: TemplatesDirOption = None) -> None:
    """Show the built templates."""
    root = templates_dir or default_templates_dir()
    table = Table("status", "layers (topmost first)", "size", "built at", "start command")
    table.columns.insert(0, Column("template", no_wrap=True))
    built = {image.name: image for image in list_templates(root)}
    builder = TemplateBuilder(root)
    for name in sorted(set(built) | set(TEMPLATES)):
        if name not in built:
            table.add_row(name, "[yellow]not built[/]", "", "", "", "")
            continue
        record = read_record(root, name)
        stale = builder.stale_layers(name, record["layers"]) if name in TEMPLATES else []
        status = f"[yellow]stale: {', '.join(stale)} changed[/]" if stale else "[green]up to date[/]"
        table.add_row(
            name,
            status,
            "\n".join(record["layers"]),
            f"{record.get('size_bytes', 0) / 1e6:.0f} MB",
            record.get("built_at", ""),
            record.get("start_cmd", ""),
        )
    Console().print(table)


@app.command()
def check(
    name: Annotated[str, typer.Argument(help="Template to check.")],
    templates_dir: TemplatesDirOption = None,
) -> None:
    """Run a built template's self-check (users, tools, envd, kernels) in its rootfs."""
    if name not in TEMPLATES:
        raise typer.BadParameter(f"unknown template '{name}' (templates: {', '.join(TEMPLATES)})")
    root = templates_dir or default_templates_dir()
    try:
        TemplateBuilder(root).check(name)
    except TemplateError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"[green]template {name}: check passed[/]")


@app.command()
def delete(
    ref: Annotated[str, typer.Argument(metavar="NAME[:TAG]", help="Custom template, or one of its tags.")],
    templates_dir: TemplatesDirOption = None,
) -> None:
    """Delete a custom template (or one tag of it); refused while sandboxes made from it run or are paused."""
    from pmoves_e2b.cli_support import settings_or_exit
    from pmoves_e2b.store import repo
    from pmoves_e2b.store.db import Database

    settings = settings_or_exit()
    root = templates_dir or default_templates_dir()
    if settings.e2b_database_url is None:  # derived in Settings; never None after validation
        raise RuntimeError("E2B_DATABASE_URL was not derived")
    db = Database(settings.e2b_database_url)
    try:
        live = [row.template_id for row in repo.live_sandboxes(db)]
        record = delete_template(root, ref, live, S3TemplateStore.from_settings(settings))
    except (ValueError, TemplateError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    finally:
        db.close()
    if record is not None and "snapshot" in record:  # a snapshot's own files are no cache
        from pmoves_e2b.sandbox.snapshots import remove_snapshot_files

        remove_snapshot_files(root, record)
    console.print(f"deleted {ref} (its layers stay until `pmoves-e2b template prune`)")


@app.command()
def prune(templates_dir: TemplatesDirOption = None) -> None:
    """Delete layers of older builds that no template uses (stop sandboxes of older builds first)."""
    root = templates_dir or default_templates_dir()
    removed = TemplateBuilder(root).prune()
    for path in removed:
        console.print(f"removed {path.name}")
    console.print(f"{len(removed)} unused layer(s) removed from {root}")


def _build_dockerfile(
    name: str, dockerfile: Path, context: Path | None, build_args: list[str], force: bool, root: Path
) -> None:
    """The Dockerfile as a custom build request, run by the executor the template API uses; its log
    is printed as it grows."""
    args = dict(arg.partition("=")[::2] for arg in build_args)
    try:
        parsed = parse_dockerfile(dockerfile.read_text(), args)
        try:
            found = build_record(read_record(root, split_ref(parsed.base)[0]), split_ref(parsed.base)[1])
        except (ValueError, TemplateNotFound):
            found = None
        body: dict[str, Any] = {"steps": parsed.steps, "force": force}
        body["fromTemplate" if found is not None else "fromImage"] = parsed.base
        pack_copies(parsed, context or dockerfile.parent, root / "uploads")
        builds = CustomBuilds(root, remote=S3TemplateStore.from_settings())
        state = builds.request(name, 0, 0)
        builds.start(state, body)
    except OSError as exc:
        raise typer.BadParameter(str(exc)) from None
    except (DockerfileError, BuildRefused) as exc:
        console.print(f"[red]{dockerfile}: {exc}[/]")
        raise typer.Exit(2) from None
    shown = 0
    while True:
        finished = state.status not in ("waiting", "building")
        for entry in state.entries[shown:]:
            console.print(entry["message"], markup=False, highlight=False)
        shown = len(state.entries)
        if finished:
            break
        time.sleep(0.2)
    if state.status != "ready":
        console.print(f"[red]template {name}: build failed[/]")
        raise typer.Exit(1)
    console.print(f"[green]template {name} ready[/] in {root} (build {state.build_id}, tags {', '.join(state.tags)})")
