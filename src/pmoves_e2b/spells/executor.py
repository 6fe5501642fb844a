"""Running a spell in a sandbox: the one executor behind REST, MCP, NATS and the CLI.

Everything goes through the stock async E2B SDK configured by :mod:`pmoves_e2b.sdk.config`, so
spells run the same on this platform and on E2B cloud. One run:

1. check the parameters against the spell's schema (nothing starts when they are wrong);
2. create a sandbox from the spell's template (or connect to the caller's ``sandbox_id``);
3. install the spell's requirements unless a marker in the sandbox says they already are;
4. upload the code, ``params.json`` and the helper module into ``/tmp/spells/<run id>/``
   and run the code there. **Parameters are data**: they reach the code only as that JSON
   file (``$SPELL_PARAMS``) and, for top-level scalars, ``$SPELL_PARAM_<NAME>`` env vars;
   the command line is built from fixed text and the run id alone;
5. collect stdout/stderr, ``$SPELL_RESULT`` (JSON, checked against ``outputs.result``) and
   the declared output files: small ones inline (base64), large ones as a download URL
   (the sandbox is then kept alive for ``FILE_URL_TTL_SECONDS``);
6. kill the sandbox it created.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import json
import logging
import mimetypes
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from e2b import AsyncSandbox
from e2b import exceptions as e2b_errors
from e2b.sandbox.commands.command_handle import CommandExitException
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import best_match

from pmoves_e2b.config import Settings
from pmoves_e2b.events.schemas import describe
from pmoves_e2b.observability.executions import EXECUTION_DURATION, EXECUTIONS, EXECUTIONS_FAILED
from pmoves_e2b.sdk.config import SdkConfig, sdk_config
from pmoves_e2b.sdk.errors import Failure, classify
from pmoves_e2b.spells.format import Spell
from pmoves_e2b.spells.registry import SpellRegistry, UnknownSpell

log = logging.getLogger(__name__)

RUNS_DIR = "/tmp/spells"  # noqa: S108 - a path inside the sandbox
CACHE_DIR = "/var/cache/pmoves-spells"  # install markers, one per requirements set
NODE_PREFIX = "/opt/pmoves-spells/node"  # npm requirements land here (NODE_PATH)
INSTALL_TIMEOUT_SECONDS = 600
# Beyond the run itself a created sandbox lives this long (setup, collection); it dies on its own
# even if this process does.
SANDBOX_MARGIN_SECONDS = 120
FILE_URL_TTL_SECONDS = 900
INLINE_FILE_LIMIT = 256 * 1024  # bytes per file; larger files come back as a URL
INLINE_TOTAL_LIMIT = 512 * 1024  # NATS messages stay under the default 1 MiB max_payload
MAX_OUTPUT_FILES = 50
MAX_STREAM_CHARS = 64 * 1024  # stdout/stderr keep their last this-many characters
ENV_NAME = re.compile(r"[^A-Za-z0-9]")

# Uploaded next to python spells as ``spell.py``: the documented way to read parameters.
PYTHON_HELPER = '''\
"""pmoves-e2b spell helpers: parameters in, result and files out."""
import json
import os
from pathlib import Path

params = json.loads(Path(os.environ["SPELL_PARAMS"]).read_text())
output_dir = Path(os.environ["SPELL_OUTPUT_DIR"])


def output(name):
    """Path for a file to return (it must match the spell's outputs.files)."""
    return output_dir / name


def result(value):
    """Return ``value`` as the run's JSON result."""
    Path(os.environ["SPELL_RESULT"]).write_text(json.dumps(value, allow_nan=False))
'''

ENTRY_FILES = {"python": "main.py", "bash": "main.sh", "javascript": "main.js"}
# The venv of the code-interpreter template when present (its data stack), else python3.
PYTHON = '"$(if [ -x /opt/venv/bin/python ]; then echo /opt/venv/bin/python; else command -v python3; fi)"'
INTERPRETERS = {"python": PYTHON, "bash": "bash", "javascript": "node"}


class SpellError(Exception):
    """The spell could not be run at all. ``code`` is machine-readable, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class SpellRequest:
    spell_name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout: int | None = None
    sandbox_id: str | None = None


@dataclass(frozen=True)
class RunPlan:
    """Everything that will be sent to the sandbox, decided before anything runs."""

    run_id: str
    run_dir: str
    uploads: dict[str, bytes]  # sandbox path -> content
    command: str
    envs: dict[str, str]
    install_command: str | None
    timeout: int

    @property
    def output_dir(self) -> str:
        return f"{self.run_dir}/out"

    @property
    def result_path(self) -> str:
        return f"{self.run_dir}/result.json"


def with_defaults(schema: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Top-level ``default`` values of the schema fill parameters the caller left out."""
    filled = dict(parameters)
    for name, prop in (schema.get("properties") or {}).items():
        if name not in filled and isinstance(prop, dict) and "default" in prop:
            filled[name] = prop["default"]
    return filled


def check_parameters(spell: Spell, parameters: Any) -> dict[str, Any]:
    if not isinstance(parameters, dict):
        given = type(parameters).__name__
        raise SpellError("invalid_parameters", f"parameters must be a JSON object, got {given}", 422)
    filled = with_defaults(spell.parameters, parameters)
    error = best_match(Draft202012Validator(spell.parameters, format_checker=FormatChecker()).iter_errors(filled))
    if error is not None:
        raise SpellError("invalid_parameters", f"spell {spell.name}: {describe(error, 'parameters')}", 422)
    return filled


def requirements_key(spell: Spell) -> str:
    text = json.dumps(vars(spell.requirements), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def install_command(spell: Spell) -> str | None:
    """One idempotent root script: serialised by a lock, skipped when the marker exists."""
    req = spell.requirements
    if not req:
        return None
    marker = f"{CACHE_DIR}/{requirements_key(spell)}.done"
    steps = []
    if req.apt:
        steps.append(
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            "--no-install-recommends " + " ".join(map(shlex.quote, req.apt))
        )
    if req.pip:
        steps.append(f"{PYTHON} -m pip install -q --disable-pip-version-check " + " ".join(map(shlex.quote, req.pip)))
    if req.npm:
        steps.append(
            f"mkdir -p {NODE_PREFIX} && npm install -q --no-audit --no-fund --prefix {NODE_PREFIX} "
            + " ".join(map(shlex.quote, req.npm))
        )
    install = " && ".join([*steps, f"touch {marker}", "echo installed"])
    return (
        f"mkdir -p {CACHE_DIR} && exec 9>{CACHE_DIR}/.lock && flock 9 && "
        f"if [ -f {marker} ]; then echo cached; else {install}; fi"
    )


def parameter_envs(parameters: dict[str, Any]) -> dict[str, str]:
    """``SPELL_PARAM_<NAME>`` for top-level strings, numbers and booleans (handy in bash)."""
    envs = {}
    for name, value in parameters.items():
        if isinstance(value, bool):
            envs[f"SPELL_PARAM_{ENV_NAME.sub('_', name).upper()}"] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            envs[f"SPELL_PARAM_{ENV_NAME.sub('_', name).upper()}"] = str(value)
    return envs


def prepare(spell: Spell, parameters: dict[str, Any], timeout: int, run_id: str | None = None) -> RunPlan:
    run_id = run_id or uuid.uuid4().hex
    run_dir = f"{RUNS_DIR}/{run_id}"
    entry = ENTRY_FILES[spell.language]
    uploads = {
        f"{run_dir}/{entry}": spell.code.encode(),
        f"{run_dir}/params.json": json.dumps(parameters).encode(),
        f"{run_dir}/out/.keep": b"",
    }
    if spell.language == "python":
        uploads[f"{run_dir}/spell.py"] = PYTHON_HELPER.encode()
    envs = {
        **parameter_envs(parameters),
        "SPELL_NAME": spell.name,
        "SPELL_VERSION": spell.version,
        "SPELL_DIR": run_dir,
        "SPELL_PARAMS": f"{run_dir}/params.json",
        "SPELL_RESULT": f"{run_dir}/result.json",
        "SPELL_OUTPUT_DIR": f"{run_dir}/out",
        "PYTHONPATH": run_dir,
        "NODE_PATH": f"{NODE_PREFIX}/node_modules",
        "MPLBACKEND": "Agg",
    }
    command = f"cd {run_dir} && exec {INTERPRETERS[spell.language]} {entry}"
    return RunPlan(run_id, run_dir, uploads, command, envs, install_command(spell), timeout)


def _tail(text: str) -> str:
    if len(text) <= MAX_STREAM_CHARS:
        return text
    return f"[... {len(text) - MAX_STREAM_CHARS} characters cut ...]\n" + text[-MAX_STREAM_CHARS:]


def _translate(exc: Exception, what: str) -> SpellError:
    failure = classify(exc)
    if failure is Failure.AUTH:
        return SpellError("unavailable", f"{what}: the sandbox backend rejected E2B_API_KEY", failure.status)
    if failure is Failure.LIMIT:
        return SpellError("unavailable", f"{what}: sandbox limit reached ({exc}); try again later", failure.status)
    if failure is Failure.NOT_FOUND:
        return SpellError("not_found", f"{what}: {exc or 'not found'}", failure.status)
    if failure is Failure.UNREACHABLE:
        return SpellError("unavailable", f"{what}: the sandbox backend is unreachable ({exc})", failure.status)
    return SpellError("sandbox_error", f"{what}: {type(exc).__name__}: {exc}", Failure.OTHER.status)


class SpellExecutor:
    def __init__(
        self, registry: SpellRegistry, sdk: SdkConfig, *, max_concurrent: int = 2, max_timeout: int = 300
    ) -> None:
        self.registry = registry
        self.sdk = sdk
        self.max_timeout = max_timeout
        self._slots = asyncio.Semaphore(max_concurrent)

    def resolve(self, request: SpellRequest) -> tuple[Spell, dict[str, Any], int]:
        """The spell, its checked parameters and the run's timeout, or SpellError."""
        try:
            spell = self.registry.get(request.spell_name)
        except UnknownSpell as exc:
            raise SpellError("not_found", str(exc), 404) from None
        parameters = check_parameters(spell, request.parameters)
        if request.timeout is None:
            return spell, parameters, min(spell.timeout, self.max_timeout)
        if not 1 <= request.timeout <= self.max_timeout:
            raise SpellError(
                "invalid_request",
                f"timeout must be between 1 and {self.max_timeout} seconds (the server's E2B_SPELLS_TIMEOUT)",
                422,
            )
        return spell, parameters, request.timeout

    async def execute(self, request: SpellRequest) -> dict[str, Any]:
        """Run a spell; returns the run (status completed, failed or timeout) or raises SpellError."""
        spell, parameters, timeout = self.resolve(request)
        plan = prepare(spell, parameters, timeout)
        async with self._slots:
            # Counted with the other executions (PMOVES' E2BHighFailureRate divides these).
            EXECUTIONS.labels("spell").inc()
            started = time.monotonic()
            run: dict[str, Any] | None = None
            try:
                run = await self._run(spell, plan, request.sandbox_id)
                return run
            finally:
                EXECUTION_DURATION.labels("spell").observe(time.monotonic() - started)
                if run is None or run["status"] != "completed":
                    EXECUTIONS_FAILED.labels("spell").inc()

    async def _sandbox(self, spell: Spell, plan: RunPlan, sandbox_id: str | None) -> AsyncSandbox:
        options = self.sdk.options()
        try:
            if sandbox_id:
                return await AsyncSandbox.connect(sandbox_id, **options)
            lifetime = plan.timeout + (INSTALL_TIMEOUT_SECONDS if plan.install_command else 0) + SANDBOX_MARGIN_SECONDS
            return await AsyncSandbox.create(
                template=spell.template,
                timeout=lifetime,
                metadata={"spell": spell.name, "spell_run": plan.run_id},
                **options,
            )
        except Exception as exc:
            what = f"sandbox {sandbox_id}" if sandbox_id else f"creating a {spell.template} sandbox"
            raise _translate(exc, what) from exc

    async def _run(self, spell: Spell, plan: RunPlan, sandbox_id: str | None) -> dict[str, Any]:
        started = time.monotonic()
        sandbox = await self._sandbox(spell, plan, sandbox_id)
        keep = bool(sandbox_id)
        run: dict[str, Any] = {
            "run_id": plan.run_id,
            "spell_name": spell.name,
            "spell_version": spell.version,
            "sandbox_id": sandbox.sandbox_id,
            "template": spell.template,
            "timeout_seconds": plan.timeout,
            "status": "failed",
            "exit_code": None,
            "stdout": "",
            "stderr": "",
            "result": None,
            "files": [],
            "requirements": "none",
            "error": None,
        }
        try:
            await self._setup(sandbox, plan, run)
            await self._execute(sandbox, plan, run)
            if run["status"] != "timeout":
                await self._collect(spell, sandbox, plan, run)
            keep = keep or any("url" in f for f in run["files"])
        except SpellError:
            raise
        except Exception as exc:
            raise _translate(exc, f"running spell {spell.name} in sandbox {sandbox.sandbox_id}") from exc
        finally:
            await self._release(sandbox, keep, bool(sandbox_id))
        run["duration_seconds"] = round(time.monotonic() - started, 3)
        return run

    async def _setup(self, sandbox: AsyncSandbox, plan: RunPlan, run: dict[str, Any]) -> None:
        if plan.install_command:
            try:
                installed = await sandbox.commands.run(
                    plan.install_command, user="root", timeout=INSTALL_TIMEOUT_SECONDS
                )
            except CommandExitException as exc:
                raise SpellError(
                    "requirements_failed",
                    f"installing the spell's requirements failed (exit {exc.exit_code}): "
                    f"{_tail(exc.stderr or exc.stdout).strip()[-2000:]}",
                    502,
                ) from None
            run["requirements"] = "cached" if installed.stdout.strip().endswith("cached") else "installed"
        await sandbox.files.write_files([{"path": path, "data": data} for path, data in plan.uploads.items()])

    async def _execute(self, sandbox: AsyncSandbox, plan: RunPlan, run: dict[str, Any]) -> None:
        handle = await sandbox.commands.run(plan.command, background=True, envs=plan.envs, timeout=0)
        try:
            result = await asyncio.wait_for(handle.wait(), plan.timeout)
            run["exit_code"] = result.exit_code
        except CommandExitException as exited:
            run["exit_code"] = exited.exit_code
        except TimeoutError:
            with contextlib.suppress(e2b_errors.SandboxException):  # it may have ended meanwhile
                await handle.kill()
            run["status"] = "timeout"
            run["error"] = f"the spell did not finish within {plan.timeout} s and was stopped"
        run["stdout"], run["stderr"] = _tail(handle.stdout), _tail(handle.stderr)
        if run["status"] != "timeout":
            if run["exit_code"] == 0:
                run["status"] = "completed"
            else:
                last = (handle.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                run["error"] = f"the spell exited with code {run['exit_code']}: {last}"

    async def _collect(self, spell: Spell, sandbox: AsyncSandbox, plan: RunPlan, run: dict[str, Any]) -> None:
        if await sandbox.files.exists(plan.result_path):
            raw = bytes(await sandbox.files.read(plan.result_path, format="bytes"))
            try:
                run["result"] = json.loads(raw)
            except ValueError as exc:
                self._fail(run, f"the spell wrote a result that is not JSON: {exc}")
        if run["status"] == "completed" and spell.result_schema is not None:
            error = best_match(Draft202012Validator(spell.result_schema).iter_errors(run["result"]))
            if error is not None:
                self._fail(run, f"the spell's result does not match its outputs.result: {describe(error, 'result')}")
        if spell.output_files:
            run["files"] = await self._files(spell, sandbox, plan)

    @staticmethod
    def _fail(run: dict[str, Any], error: str) -> None:
        run["status"], run["error"] = "failed", error

    async def _files(self, spell: Spell, sandbox: AsyncSandbox, plan: RunPlan) -> list[dict[str, Any]]:
        entries = await sandbox.files.list(plan.output_dir, depth=1)
        wanted = sorted(
            (
                e
                for e in entries
                if e.name != ".keep"
                and str(getattr(e.type, "value", e.type)) == "file"
                and any(fnmatch.fnmatch(e.name, pattern) for pattern in spell.output_files)
            ),
            key=lambda e: e.name,
        )[:MAX_OUTPUT_FILES]
        files, inline_total = [], 0
        for entry in wanted:
            info: dict[str, Any] = {
                "name": entry.name,
                "path": entry.path,
                "size": entry.size,
                "mime_type": mimetypes.guess_type(entry.name)[0] or "application/octet-stream",
            }
            if entry.size <= INLINE_FILE_LIMIT and inline_total + entry.size <= INLINE_TOTAL_LIMIT:
                data = bytes(await sandbox.files.read(entry.path, format="bytes"))
                info["content_base64"] = base64.b64encode(data).decode()
                inline_total += len(data)
            else:
                info["url"] = self._download_url(sandbox, entry.path)
                info["expires_in_seconds"] = FILE_URL_TTL_SECONDS
            files.append(info)
        return files

    def _download_url(self, sandbox: AsyncSandbox, path: str) -> str:
        signed = FILE_URL_TTL_SECONDS if sandbox._envd_access_token else None
        url = sandbox.download_url(path, use_signature_expiration=signed)
        public_base = self.sdk.public_sandbox_url(sandbox.sandbox_id)
        if public_base:
            # Self-hosted: the same signed path on a host e2b-sandbox routes without SDK headers.
            parts = urlsplit(url)
            url = public_base + parts.path + (f"?{parts.query}" if parts.query else "")
        return url

    async def _release(self, sandbox: AsyncSandbox, keep: bool, callers: bool) -> None:
        try:
            if not keep:
                await sandbox.kill()
            elif not callers:
                # Large files are fetched by URL from the sandbox: it stays until the URLs expire.
                await sandbox.set_timeout(FILE_URL_TTL_SECONDS)
        except Exception as exc:  # noqa: BLE001 - logged; the sandbox expires on its own anyway
            log.warning("could not release spell sandbox %s: %s", sandbox.sandbox_id, exc)


def build_executor(settings: Settings) -> SpellExecutor:
    """The executor a service builds once and hands to its adapters (REST, MCP, NATS share it)."""
    registry = SpellRegistry(settings.e2b_spells_dir)
    # Leave room under E2B_MAX_SANDBOXES for the other tools.
    concurrent = max(1, min(4, settings.e2b_max_sandboxes - 1))
    executor = SpellExecutor(
        registry, sdk_config(settings), max_concurrent=concurrent, max_timeout=settings.e2b_spells_timeout
    )
    return executor
