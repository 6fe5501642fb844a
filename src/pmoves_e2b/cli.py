"""``pmoves-e2b``: start, stop and inspect the stack; sub-command groups of other modules.

Every error a user can cause (bad settings, a busy port, a stack that does not come up)
ends as one clear line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from pmoves_e2b.cli_support import EXIT_FAILED, err_console
from pmoves_e2b.cli_support import fail as _fail
from pmoves_e2b.cli_support import settings_or_exit as _settings
from pmoves_e2b.config import SECRET_NAMES, SERVICES, SERVICES_BY_KEY, Settings, ensure_secrets, get_settings
from pmoves_e2b.envd import ENVD_PORT
from pmoves_e2b.private_files import open_private_append, private_dir

if TYPE_CHECKING:  # the CLI imports the supervisor only when a command needs it
    from pmoves_e2b.supervisor import ComponentHealth

app = typer.Typer(
    help="Self-hosted, E2B-compatible sandboxes for AI agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

UP_TIMEOUT_SECONDS = 90.0


def _busy_ports(settings: Settings) -> list[str]:
    busy = []
    for field in settings.listen_port_fields():
        if field == "e2b_sandbox_tls_port":
            continue  # bound by e2b-sandbox only once TLS routing is configured
        port = getattr(settings, field)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1" if field.startswith("e2b_nats") else settings.e2b_bind, port))
            except OSError:
                busy.append(f"{port} ({field.upper()})")
    return busy


def _print_access(settings: Settings, secret_paths: dict[str, Path | None]) -> None:
    from pmoves_e2b.events.connection import redact_url

    table = Table(title="pmoves-e2b is up", show_header=True)
    for column in ("component", "url", "health"):
        table.add_column(column)
    table.add_row(
        "nats",
        redact_url(settings.nats_server_url),
        f"http://127.0.0.1:{settings.e2b_nats_monitor_port}/healthz" if settings.embedded_nats else "",
    )
    for service in SERVICES:
        url = settings.service_url(service)
        table.add_row(service.name, url, url + service.health_path)
    console.print(table)
    console.print("secrets (values are never printed):")
    for name in SECRET_NAMES:
        where = secret_paths.get(name)
        console.print(f"  {name}: {where if where else 'from the environment'}", highlight=False, soft_wrap=True)
    key_source = secret_paths.get("E2B_API_KEY")
    sandbox_url = settings.service_url(SERVICES_BY_KEY["sandbox"])
    console.print("use the stock E2B SDK with:")
    console.print(
        f"  export E2B_API_KEY=$(cat {key_source})" if key_source else "  export E2B_API_KEY=<your key>",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"  export E2B_API_URL={sandbox_url}\n  export E2B_SANDBOX_URL={sandbox_url}", highlight=False)
    tls_dir = settings.e2b_data_dir / "tls"
    console.print("or with host routing over TLS (no deprecated options; Node reads NODE_EXTRA_CA_CERTS):")
    console.print(
        f"  export E2B_DOMAIN={settings.public_domain} SSL_CERT_FILE={tls_dir}/bundle.pem "
        f"NODE_EXTRA_CA_CERTS={tls_dir}/ca.pem",
        highlight=False,
        soft_wrap=True,
    )
    hint = host_routing_hint(settings.e2b_domain)
    if hint:
        console.print(f"  note: {hint}", highlight=False, soft_wrap=True)
    nats_secret = secret_paths.get("E2B_NATS_PASSWORD")
    if settings.embedded_nats:
        # The embedded server refuses anonymous clients: PMOVES' publishers connect as user `pmoves`.
        password = f"$(cat {nats_secret})" if nats_secret else "$E2B_NATS_PASSWORD"
        console.print("NATS clients (PMOVES' publishers) connect with:", highlight=False)
        console.print(
            f"  export NATS_URL=nats://pmoves:{password}@127.0.0.1:{settings.e2b_nats_port}",
            highlight=False,
            soft_wrap=True,
        )


def host_routing_hint(domain: str, resolve: Callable[..., object] = socket.getaddrinfo) -> str | None:
    """What this host lacks for `{port}-{id}.{domain}` names, or None when glibc resolves them.

    The Python SDK maps `*.localhost` to loopback itself; Node (the JS SDK), curl and browsers ask
    glibc, which needs nss-myhostname for that (or wildcard DNS for any other domain)."""
    probe = f"{ENVD_PORT}-probe.{domain}"
    try:
        resolve(probe, 443, type=socket.SOCK_STREAM)
        return None
    except OSError:
        pass
    if domain == "localhost" or domain.endswith(".localhost"):
        return (
            f"this host does not resolve *.{domain}, so the JS SDK cannot use host routing: "
            "apt-get install libnss-myhostname (`make sysdeps` does)"
        )
    return f"this host does not resolve *.{domain}: host routing needs wildcard DNS for it"


def _wait_healthy(
    settings: Settings, supervisor: subprocess.Popen[bytes] | None, timeout: float
) -> list[ComponentHealth]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pmoves_e2b.supervisor import check_health

    deadline = time.monotonic() + timeout
    results: list[ComponentHealth] = []
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True
    ) as progress:
        task = progress.add_task("starting", total=None)
        while time.monotonic() < deadline:
            results = check_health(settings, timeout=1.0)
            ready = [r.component for r in results if r.healthy]
            waiting = [r.component for r in results if not r.healthy]
            progress.update(
                task,
                description=f"healthy: {len(ready)}/{len(results)}"
                + (f"  waiting for {', '.join(waiting)}" if waiting else ""),
            )
            if not waiting:
                return results
            if supervisor is not None and supervisor.poll() is not None:
                break
            time.sleep(0.25)
    return results


@app.command()
def up(
    foreground: bool = typer.Option(False, "--foreground", help="Run the supervisor in this terminal."),
    timeout: float = typer.Option(UP_TIMEOUT_SECONDS, help="Seconds to wait for every component to be healthy."),
) -> None:
    """Start NATS and the four services (detached), and wait until they are healthy."""
    from pmoves_e2b.supervisor import SUPERVISOR, Supervisor, log_file, supervisor_pid

    settings = _settings()
    running = supervisor_pid(settings)
    if running is not None:
        console.print(f"already running (supervisor pid {running}); `pmoves-e2b status` shows details")
        return
    busy = _busy_ports(settings)
    if busy:
        raise _fail(f"port(s) in use: {', '.join(busy)}. Stop what uses them or set those variables to free ports.")
    if settings.embedded_nats:
        from pmoves_e2b.events.embedded import nats_server_binary

        try:
            nats_server_binary()
        except FileNotFoundError as exc:
            raise _fail(str(exc)) from None
    for directory in (settings.e2b_data_dir, settings.run_dir, settings.logs_dir):
        private_dir(directory)
    secret_paths = ensure_secrets(settings)
    # Re-read so this process (and the children, which inherit nothing but env) see the new secrets.
    get_settings.cache_clear()
    settings = _settings()
    if foreground:
        from pmoves_e2b.observability.logging import configure_logging

        configure_logging(SUPERVISOR, settings.log_level, "text")
        _print_access(settings, secret_paths)
        raise typer.Exit(Supervisor(settings).run())
    with open_private_append(log_file(settings, SUPERVISOR)) as log_handle:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "pmoves_e2b.supervisor"],
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(settings.e2b_data_dir),
        )
    results = _wait_healthy(settings, supervisor, timeout)
    unhealthy = [r for r in results if not r.healthy]
    if unhealthy or supervisor.poll() is not None:
        _health_table(results)
        for component in [SUPERVISOR] + [r.component for r in unhealthy]:
            _print_log_tail(log_file(settings, component))
        raise _fail(
            f"the stack did not become healthy within {timeout:.0f} s; "
            f"see `pmoves-e2b logs` ({settings.logs_dir}); `pmoves-e2b down` stops what started"
        )
    _print_access(settings, secret_paths)


def _print_log_tail(path: Path, lines: int = 8) -> None:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    err_console.print(f"--- last lines of {path}", highlight=False, soft_wrap=True)
    for line in tail:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def down(timeout: float = typer.Option(30.0, help="Seconds to wait for everything to stop.")) -> None:
    """Stop the supervisor, the services and nats-server; return once they are gone."""
    from pmoves_e2b.supervisor import stop_stack

    settings = _settings()
    survivors = stop_stack(settings, timeout=timeout)
    if survivors:
        raise _fail(f"still running after {timeout:.0f} s: pids {', '.join(map(str, survivors))}")
    # Sandboxes outlive e2b-sandbox restarts on purpose; `down` ends them too.
    from pmoves_e2b.sandbox.app import destroy_all_sandboxes

    removed = destroy_all_sandboxes(settings)
    console.print(f"stopped ({removed} sandboxes removed)" if removed else "stopped")


def _health_table(results: list[ComponentHealth]) -> None:
    table = Table(show_header=True)
    for column in ("component", "status", "url", "details"):
        table.add_column(column)
    for r in results:
        color = "green" if r.healthy and r.status == "healthy" else "yellow" if r.healthy else "red"
        table.add_row(r.name, f"[{color}]{r.status}[/{color}]", r.url, r.detail)
    console.print(table)


@app.command()
def health() -> None:
    """Check NATS and the four services; exit 1 if any is unhealthy."""
    from pmoves_e2b.supervisor import check_health

    results = check_health(_settings())
    _health_table(results)
    if not all(r.healthy for r in results):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def status() -> None:
    """Show each component's pid and health."""
    from pmoves_e2b.supervisor import COMPONENTS, SUPERVISOR, check_health, read_pid

    settings = _settings()
    supervisor = read_pid(settings, SUPERVISOR)
    console.print(f"data dir: {settings.e2b_data_dir}")
    console.print(f"supervisor: {'running, pid ' + str(supervisor) if supervisor else 'not running'}")
    health_by_component = {r.component: r for r in check_health(settings, timeout=1.0)}
    table = Table(show_header=True)
    for column in ("component", "pid", "status", "url"):
        table.add_column(column)
    for component in COMPONENTS:
        pid = read_pid(settings, component)
        result = health_by_component[component]
        table.add_row(result.name, str(pid) if pid else "-", result.status, result.url)
    console.print(table)
    _tiers_table(settings)


def _tiers_table(settings: Settings) -> None:
    """The isolation tiers this host can run (probed here, as e2b-sandbox does when it starts)."""
    from pmoves_e2b.sandbox import tiers

    table = Table(show_header=True, title=f"isolation tiers (default: {settings.e2b_isolation})")
    for column in ("tier", "status", "what"):
        table.add_column(column)
    for tier in tiers.probe(settings.e2b_isolation_tiers):
        status = "[green]available[/green]" if tier.available else f"[red]unavailable[/red]: {tier.reason}"
        table.add_row(tier.name, status, tier.summary)
    console.print(table)


@app.command()
def logs(
    service: str = typer.Argument(None, help="supervisor, nats, sandbox, mcp, surf or desktop (default: all)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: int = typer.Option(50, "--lines", "-n", help="Lines to show from the end of each log."),
) -> None:
    """Print the JSON logs of one component or all of them."""
    from pmoves_e2b.supervisor import COMPONENTS, SUPERVISOR, log_file

    settings = _settings()
    names = (SUPERVISOR, *COMPONENTS)
    if service is not None and service not in names:
        raise _fail(f"unknown service {service!r}; choose one of {', '.join(names)}")
    files = [str(log_file(settings, n)) for n in ([service] if service else names)]
    existing = [f for f in files if os.path.exists(f)]
    if not existing and not follow:
        raise _fail(f"no logs yet in {settings.logs_dir}; start the stack with `pmoves-e2b up`")
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + (files if follow else existing)
    if follow:
        os.execvp("tail", argv)  # noqa: S606 - exec tail in place of the CLI; argv is ours
    raise typer.Exit(subprocess.call(argv))


@app.command(hidden=True)
def serve(service: str = typer.Argument(..., help="sandbox, mcp, surf or desktop")) -> None:
    """Run one service in this process (what the supervisor starts)."""
    import uvicorn

    from pmoves_e2b.observability.logging import configure_logging

    settings = _settings()
    info = SERVICES_BY_KEY.get(service)
    if info is None:
        raise _fail(f"unknown service {service!r}; choose one of {', '.join(SERVICES_BY_KEY)}")
    configure_logging(info.name, settings.log_level, settings.log_format)
    module_name, factory = info.app.split(":")
    try:
        application = getattr(importlib.import_module(module_name), factory)(settings)
    except Exception:  # logged as one JSON record (with the traceback) instead of raw stderr
        logging.getLogger("pmoves_e2b.serve").exception("%s failed to start", info.name)
        raise typer.Exit(EXIT_FAILED) from None
    uvicorn.run(
        application,
        host=settings.e2b_bind,
        port=settings.service_port(info),
        log_config=None,
        access_log=False,
        http="httptools",
        timeout_keep_alive=75,
        timeout_graceful_shutdown=5,
        server_header=False,
    )


# --- Sub-command groups owned by other modules --------------------------------------------
@app.command()
def install(
    root: Path = typer.Option(Path("/"), "--root", help="Write under this directory instead of / (tests, images)."),
    data_dir: Path = typer.Option(Path("/var/lib/pmoves-e2b"), "--data-dir", help="E2B_DATA_DIR of the service."),
    bind: str = typer.Option("127.0.0.1", "--bind", help="E2B_BIND written into the environment file."),
    domain: str = typer.Option("e2b.localhost", "--domain", help="E2B_DOMAIN written into the environment file."),
    start: bool = typer.Option(True, "--start/--no-start", help="Enable and start the unit (when systemd runs)."),
) -> None:
    """Install the systemd unit of the supervisor and its environment file (docs/deploy.md)."""
    from pmoves_e2b.install import InstallError
    from pmoves_e2b.install import install as do_install

    try:
        written = do_install(root, data_dir=data_dir, bind=bind, domain=domain, start=start)
    except (InstallError, OSError) as exc:
        raise _fail(str(exc)) from None
    for path in written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def uninstall(
    root: Path = typer.Option(Path("/"), "--root", help="The --root given to install."),
) -> None:
    """Stop and remove exactly what `install` wrote (sandboxes and the data dir stay)."""
    from pmoves_e2b.install import InstallError
    from pmoves_e2b.install import uninstall as do_uninstall

    try:
        removed = do_uninstall(root)
    except (InstallError, OSError) as exc:
        raise _fail(str(exc)) from None
    for path in removed:
        console.print(f"removed {path}", highlight=False, soft_wrap=True)


# Add a line here for a new group: name -> (module, typer attribute, help). A group whose
# module does not exist yet is simply absent; a module is imported only when its group is
# used (or for --help), so a slow or broken group never slows down or breaks `up`.
SUBCOMMAND_GROUPS: dict[str, tuple[str, str, str]] = {
    "template": ("pmoves_e2b.sandbox.templates.cli", "app", "Build and list sandbox templates."),
    "keys": ("pmoves_e2b.keys_cli", "app", "Create, list and revoke API keys."),
    "mcp": ("pmoves_e2b.mcp.cli", "app", "Serve the MCP tools over stdio (pmoves-e2b mcp --stdio)."),
    "spell": ("pmoves_e2b.spells.cli", "app", "List, show and run spells (code recipes run in sandboxes)."),
}


def _register_subcommand_groups(argv: list[str]) -> None:
    wanted = argv[1] if len(argv) > 1 else None
    for name, (module_name, attribute, help_text) in SUBCOMMAND_GROUPS.items():
        if wanted is not None and not wanted.startswith("-") and wanted != name:
            continue
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            app.add_typer(getattr(importlib.import_module(module_name), attribute), name=name, help=help_text)


def main() -> None:
    _register_subcommand_groups(sys.argv)
    app()


if __name__ == "__main__":
    main()
