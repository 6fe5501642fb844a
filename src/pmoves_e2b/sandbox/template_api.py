"""E2B's template API over the built templates: aliases, the list, and custom builds.

The stock SDK's ``Template.exists(name)`` asks ``GET /templates/aliases/{alias}``; here every
complete built template is its own alias (its name). ``Template.build`` requests a build
(POST /v3/templates), starts it (POST /v2/templates/{id}/builds/{build}) and polls its status
with logs; the builds themselves are ``templates/custom.py``'s. Tags (``name:tag``) are E2B's
versions: assigned by a build or ``POST /templates/tags``, listed, removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from pmoves_e2b.envd import ENVD_VERSION
from pmoves_e2b.sandbox.api import parse_body
from pmoves_e2b.sandbox.errors import ApiError
from pmoves_e2b.sandbox.snapshots import remove_snapshot_files
from pmoves_e2b.sandbox.templates import store
from pmoves_e2b.sandbox.templates.custom import (
    BUILT_IN,
    FILES_HASH,
    BuildJournal,
    BuildRefused,
    BuildState,
    CustomBuilds,
)
from pmoves_e2b.sandbox.templates.errors import TemplateNotFound
from pmoves_e2b.sandbox.templates.removal import BuiltInTemplate, TemplateInUse, delete_template
from pmoves_e2b.sandbox.templates.s3store import S3TemplateStore
from pmoves_e2b.sandbox.templates.store import (
    TEMPLATE_NAME,
    list_templates,
    read_record,
    template_record_path,
)
from pmoves_e2b.store import template_builds
from pmoves_e2b.store.db import Database


class DatabaseJournal:
    """Build states in the database. Made at start-up: builds a previous process left unfinished
    are failed then (their threads died with it)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        template_builds.interrupt_unfinished(db, "interrupted: the service restarted during the build")

    def save(self, state: BuildState) -> None:
        template_builds.save(self.db, dataclasses.asdict(state))

    def load(self, build_id: str) -> BuildState | None:
        found = template_builds.load(self.db, build_id)
        return BuildState(**found) if found else None

    def of_template(self, template_id: str) -> list[BuildState]:
        return [BuildState(**found) for found in template_builds.of_template(self.db, template_id)]


class _Any(BaseModel):
    model_config = ConfigDict(extra="allow")


def _checked_name(name: object, what: str = "template name") -> str:
    if not isinstance(name, str) or not TEMPLATE_NAME.match(name):
        raise ApiError(400, f"invalid {what} {name!r}: use lowercase letters, digits, '.', '_' and '-' (max 63)")
    return name


def _checked_ref(ref: object, what: str = "template name") -> tuple[str, str]:
    """``name[:tag]`` -> (name, tag), else 400."""
    if not isinstance(ref, str):
        raise ApiError(400, f"invalid {what} {ref!r}")
    try:
        return store.split_ref(ref)
    except ValueError as exc:
        raise ApiError(400, str(exc).replace("template name", what, 1)) from None


def _tag_list(value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ApiError(400, "tags must be a non-empty list of strings")
    for tag in value:
        if not store.TAG.match(tag):
            raise ApiError(400, f"invalid tag {tag!r}: use letters, digits, '.', '_' and '-' (max 64)")
    return value


def _iso(value: str | None) -> str:
    if value:
        return value
    return datetime.now(UTC).isoformat(timespec="seconds")


def build_template_router(
    authenticate: Any,
    templates_dir: Path,
    memory_mb: int,
    cpu_count: float,
    disk_mb: int,
    live_templates: Callable[[], list[str]] = list,
    journal: BuildJournal | None = None,
    remote: S3TemplateStore | None = None,
) -> APIRouter:
    """``authenticate(request)`` is the control plane's API-key check (raises 401); ``journal``
    keeps build states across restarts (the database)."""

    def require_api_key(request: Request) -> None:
        request.state.api_key_id = authenticate(request)

    outer = APIRouter()
    router = APIRouter(dependencies=[Depends(require_api_key)])
    builds = CustomBuilds(templates_dir, journal=journal, remote=remote)
    upload_secret = secrets.token_bytes(32)

    async def body_of(request: Request) -> dict[str, Any]:
        parsed: _Any = await parse_body(request, _Any)
        return parsed.model_dump()

    async def request_build(request: Request) -> JSONResponse:
        body = await body_of(request)
        name = body.get("name") or body.get("alias")
        if not isinstance(name, str):
            raise ApiError(400, "name is required (the template's name, or name:tag)")
        try:
            cpu, memory = float(body.get("cpuCount") or 0), int(body.get("memoryMB") or 0)
        except (TypeError, ValueError):
            raise ApiError(400, "cpuCount and memoryMB must be numbers") from None
        try:
            state = await asyncio.to_thread(builds.request, name, cpu, memory, body.get("tags"))
        except BuildRefused as exc:
            raise ApiError(400, str(exc)) from None
        tid = state.template_id
        shape = {"templateID": tid, "buildID": state.build_id, "public": False}
        return JSONResponse(shape | {"names": [tid], "tags": state.tags, "aliases": [tid]}, status_code=202)

    async def start_build(request: Request, template_id: str, build_id: str) -> Response:
        body = await body_of(request)
        try:
            state = builds.get(template_id, build_id)
            await asyncio.to_thread(builds.start, state, body)
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0])) from None
        except BuildRefused as exc:
            raise ApiError(400, str(exc)) from None
        return Response(status_code=202)

    async def build_status(request: Request, template_id: str, build_id: str) -> JSONResponse:
        try:
            state = builds.get(template_id, build_id)
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0])) from None
        try:
            offset = max(0, int(request.query_params.get("logsOffset") or 0))
        except ValueError:
            raise ApiError(400, "logsOffset must be an integer") from None
        entries = state.entries[offset : offset + 100]  # E2B's page: the SDK polls until drained
        shape: dict[str, Any] = {
            "templateID": template_id,
            "buildID": build_id,
            "status": state.status,
            "logs": [e["message"] for e in entries],
            "logEntries": entries,
        }
        if state.status == "error":
            shape["reason"] = {"message": state.reason, "step": state.step, "logEntries": state.entries[-20:]}
        return JSONResponse(shape)

    def _token(template_id: str, digest: str) -> str:
        return hmac.new(upload_secret, f"{template_id}/{digest}".encode(), hashlib.sha256).hexdigest()

    async def upload_link(request: Request, template_id: str, hash: str) -> JSONResponse:
        if not FILES_HASH.match(hash):
            raise ApiError(400, "files hash must be 64 lowercase hex digits (sha256)")
        _checked_name(template_id)
        if builds.upload_path(hash).is_file():
            return JSONResponse({"present": True}, status_code=201)
        url = f"{str(request.base_url).rstrip('/')}/templates/{template_id}/files/{hash}/upload"
        return JSONResponse({"present": False, "url": f"{url}?token={_token(template_id, hash)}"}, status_code=201)

    async def upload(request: Request, template_id: str, hash: str) -> Response:
        """The signed upload link (the SDK PUTs without its API key, as to S3)."""
        token = request.query_params.get("token", "")
        if not (FILES_HASH.match(hash) and hmac.compare_digest(token.encode(), _token(template_id, hash).encode())):
            raise ApiError(401, "invalid or missing upload token: ask GET /templates/{id}/files/{hash} for a link")
        final = builds.upload_path(hash)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{hash}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as out:  # the request guard already refused a body over its limit (413)
                async for chunk in request.stream():
                    out.write(chunk)
            os.replace(tmp, final)  # the hash is checked against the COPY step when the build starts
        finally:
            tmp.unlink(missing_ok=True)
        return Response(status_code=200)

    def _shape(name: str) -> dict[str, Any]:
        record = read_record(templates_dir, name)
        built = _iso(record.get("built_at"))
        cpu = float(record.get("cpu_count") or cpu_count)
        return {
            "templateID": name,
            "buildID": store.tags_of(record)[store.DEFAULT_TAG]["build_id"],
            "cpuCount": int(cpu) if cpu == int(cpu) else cpu,
            "memoryMB": int(record.get("memory_mb") or memory_mb),
            "diskSizeMB": disk_mb,
            "public": True,
            "aliases": [name],
            "names": [name],
            "createdAt": built,
            "updatedAt": built,
            "createdBy": None,
            "lastSpawnedAt": None,
            "spawnCount": 0,
            "buildCount": 1,
            "envdVersion": ENVD_VERSION,
            "buildStatus": "ready",
        }

    def _record(name: str) -> dict[str, Any]:
        try:
            return read_record(templates_dir, name)
        except TemplateNotFound:
            raise ApiError(404, f"template '{name}' not found") from None

    async def alias(alias: str) -> JSONResponse:
        name, tag = _checked_ref(alias, "template alias")

        def local_or_remote() -> dict[str, Any]:
            if not template_record_path(templates_dir, name).is_file():
                if remote is None or not remote.pull_record(templates_dir, name):  # E2B_TEMPLATE_STORE
                    return {}
            return read_record(templates_dir, name)

        record = await asyncio.to_thread(local_or_remote)
        if ":" in alias:
            found = record and store.build_record(record, tag) is not None
        else:
            found = bool(record) and any(store.build_record(record, t) for t in store.tags_of(record))
        if not found:
            raise ApiError(404, f"template alias '{alias}' not found")
        return JSONResponse({"templateID": name, "public": True})

    def _build_shape(state: BuildState) -> dict[str, Any]:
        shape = {
            "buildID": state.build_id,
            "status": state.status,
            "createdAt": state.created_at,
            "updatedAt": state.updated_at,
            "cpuCount": int(state.cpu_count or cpu_count) or 1,
            "memoryMB": state.memory_mb or memory_mb,
            "diskSizeMB": disk_mb,
            "envdVersion": ENVD_VERSION,
        }
        return shape | ({"finishedAt": state.finished_at} if state.finished_at else {})

    async def get_template(template_id: str) -> JSONResponse:
        _checked_name(template_id)
        record = await asyncio.to_thread(_record, template_id)
        states = {s.build_id: s for s in await asyncio.to_thread(builds.of_template, template_id)}
        for tag, entry in store.tags_of(record).items():  # builds made elsewhere (CLI, another data dir)
            build = store.build_record(record, tag) or {}
            if entry["build_id"] not in states:
                built = _iso(build.get("built_at"))
                states[entry["build_id"]] = BuildState(
                    template_id,
                    entry["build_id"],
                    float(build.get("cpu_count") or 0),
                    int(build.get("memory_mb") or 0),
                    status="ready",
                    created_at=built,
                    updated_at=built,
                    finished_at=built,
                )
        ordered = sorted(states.values(), key=lambda s: s.created_at)
        first = ordered[0].created_at if ordered else _iso(None)
        last = ordered[-1].updated_at if ordered else first
        return JSONResponse(
            {
                "templateID": template_id,
                "public": template_id in BUILT_IN,
                "aliases": [template_id],
                "names": [template_id],
                "createdAt": first,
                "updatedAt": last,
                "lastSpawnedAt": None,
                "spawnCount": 0,
                "builds": [_build_shape(s) for s in ordered],
            }
        )

    async def list_tags(template_id: str) -> JSONResponse:
        _checked_name(template_id)
        record = await asyncio.to_thread(_record, template_id)
        tags = store.tags_of(record)
        return JSONResponse(
            [{"tag": t, "buildID": e["build_id"], "createdAt": _iso(e.get("created_at"))} for t, e in tags.items()]
        )

    async def assign(request: Request) -> JSONResponse:
        body = await body_of(request)
        name, tag = _checked_ref(body.get("target"))
        tags = _tag_list(body.get("tags"))
        if name in BUILT_IN:
            raise ApiError(400, f"template '{name}' is built in; its tags cannot be changed")

        def move() -> str:
            build = store.build_record(_record(name), tag)
            if build is None:
                raise ApiError(404, f"template '{name}' has no tag or build '{tag}'")
            store.assign_tags(templates_dir, name, tags, build)
            return str(build["build_id"])

        build_id = await asyncio.to_thread(move)
        return JSONResponse({"tags": tags, "buildID": build_id}, status_code=201)

    async def untag(request: Request) -> Response:
        body = await body_of(request)
        name = _checked_name(body.get("name"))
        tags = _tag_list(body.get("tags"))
        if name in BUILT_IN:
            raise ApiError(400, f"template '{name}' is built in; its tags cannot be changed")
        if not template_record_path(templates_dir, name).is_file():
            raise ApiError(404, f"template '{name}' not found")
        try:
            await asyncio.to_thread(store.remove_tags, templates_dir, name, tags)
        except (KeyError, TemplateNotFound) as exc:
            raise ApiError(404, str(exc.args[0]) if exc.args else f"template '{name}' not found") from None
        return Response(status_code=204)

    async def delete(template_id: str) -> Response:
        _checked_name(template_id)
        try:
            record = await asyncio.to_thread(
                lambda: delete_template(templates_dir, template_id, live_templates(), remote)
            )
        except BuiltInTemplate as exc:
            raise ApiError(400, str(exc)) from None
        except TemplateNotFound:
            raise ApiError(404, f"template '{template_id}' not found") from None
        except TemplateInUse as exc:
            raise ApiError(409, str(exc)) from None
        if record is not None and "snapshot" in record:  # a snapshot's own files are no cache: they go now
            await asyncio.to_thread(remove_snapshot_files, templates_dir, record)
        return Response(status_code=204)

    def _listed() -> list[dict[str, Any]]:
        if remote is not None:  # E2B_TEMPLATE_STORE: templates built elsewhere too (their records, as aliases fetch)
            for name in remote.record_names():
                if TEMPLATE_NAME.match(name) and not template_record_path(templates_dir, name).is_file():
                    remote.pull_record(templates_dir, name)
        return [_shape(t.name) for t in list_templates(templates_dir)]

    async def listed() -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(_listed))

    router.add_api_route("/templates/aliases/{alias}", alias, methods=["GET"], summary="Does a template alias exist")
    router.add_api_route("/templates", listed, methods=["GET"], summary="List built templates")
    # Before /templates/{template_id}: "tags" is not a template id here.
    router.add_api_route("/templates/tags", assign, methods=["POST"], status_code=201, summary="Assign tags to a build")
    router.add_api_route("/templates/tags", untag, methods=["DELETE"], status_code=204, summary="Remove tags")
    router.add_api_route("/templates/{template_id}", get_template, methods=["GET"], summary="A template and its builds")
    router.add_api_route("/templates/{template_id}/tags", list_tags, methods=["GET"], summary="A template's tags")
    router.add_api_route(
        "/templates/{template_id}", delete, methods=["DELETE"], status_code=204, summary="Delete a custom template"
    )
    router.add_api_route("/v3/templates", request_build, methods=["POST"], status_code=202, summary="Request a build")
    router.add_api_route(
        "/v2/templates/{template_id}/builds/{build_id}", start_build, methods=["POST"], summary="Start a build"
    )
    router.add_api_route(
        "/templates/{template_id}/builds/{build_id}/status", build_status, methods=["GET"], summary="Build status, logs"
    )
    router.add_api_route(
        "/templates/{template_id}/files/{hash}",
        upload_link,
        methods=["GET"],
        status_code=201,
        summary="Upload link for COPY files",
    )
    outer.include_router(router)
    outer.add_api_route(
        "/templates/{template_id}/files/{hash}/upload", upload, methods=["PUT"], summary="Signed upload (token)"
    )
    return outer
