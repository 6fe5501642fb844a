"""The E2B control-plane REST API, as the stock SDKs call it (v1 and v2 paths).

Every error is ``{"code": int, "message": str}``; non-retryable ones carry
``Should-Retry: false`` so SDK retries don't hammer a request that cannot succeed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pmoves_e2b.envd import ENVD_VERSION
from pmoves_e2b.sandbox.backends.base import BackendError
from pmoves_e2b.sandbox.errors import ApiError, Busy, SandboxError
from pmoves_e2b.sandbox.lifecycle import CreateRequest, SandboxManager
from pmoves_e2b.sandbox.netpolicy import (
    NetworkOptionError,
    NetworkPolicy,
    parse_cidrs,
    parse_dns_servers,
    parse_host_mask,
    parse_ports,
)
from pmoves_e2b.store import repo
from pmoves_e2b.store.db import Database
from pmoves_e2b.store.models import SandboxRow

MAX_BODY_BYTES = 1 << 20
MAX_PAGE = 100
CLIENT_ID = "pmoves"
_IDEMPOTENCY_KEY = re.compile(r"^[a-z0-9-]{1,255}$")


def error_response(
    status: int, message: str, retryable: bool = False, retry_after_s: int | None = None
) -> JSONResponse:
    headers = {} if retryable else {"Should-Retry": "false"}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


# --- request bodies (unknown fields are ignored, as E2B's API does) ----------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NetworkBody(_Strict):
    """E2B's ``network`` options; ones this server cannot honour are refused by name, never ignored."""

    allow_out: list[str] | None = Field(None, alias="allowOut")
    deny_out: list[str] | None = Field(None, alias="denyOut")
    allow_public_traffic: bool | None = Field(None, alias="allowPublicTraffic")
    mask_request_host: str | None = Field(None, alias="maskRequestHost")
    dns_servers: Any = Field(None, alias="dnsServers")
    egress_proxy: Any = Field(None, alias="egressProxy")
    rules: Any = None
    https_ports: Any = Field(None, alias="httpsPorts")
    allow_internet_access: bool | None = None  # only in PUT /sandboxes/{id}/network


class AutoResumeBody(_Strict):
    enabled: bool | None = None
    policy: Literal["any", "off"] | None = None  # what SDKs before `enabled` sent

    @property
    def on(self) -> bool:
        return self.enabled is True or (self.enabled is None and self.policy == "any")


class NewSandbox(_Strict):
    """Every field a stock SDK sends is named here; anything else is an option we do not know: a 400."""

    template_id: str = Field("base", alias="templateID", min_length=1, max_length=128)
    timeout: int | None = Field(None, ge=0)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(None, alias="envVars")
    allow_internet_access: bool | None = None
    auto_pause: bool | None = Field(None, alias="autoPause")
    auto_pause_memory: bool | None = Field(None, alias="autoPauseMemory")
    auto_resume: AutoResumeBody | None = Field(None, alias="autoResume")
    network: NetworkBody | None = None
    secure: bool | None = None
    mcp: Any = None
    iam: Any = None
    volume_mounts: Any = Field(None, alias="volumeMounts")


_UNSUPPORTED = "is not supported by this server"
_OFFLINE_ALLOW = (
    "allowOut cannot open anything for a sandbox without internet access (allow_internet_access=false); "
    "deny all with denyOut ['0.0.0.0/0'] and list what to allow in allowOut instead"
)


def _refuse_unsupported(body: NewSandbox) -> None:
    """Options E2B cloud has and we do not: an error the SDK shows, never a silent no-op."""
    if body.secure is False:
        raise ApiError(400, f"secure=false {_UNSUPPORTED}: envd always requires its access token")
    for name, value in (("mcp", body.mcp), ("iam", body.iam), ("volumeMounts", body.volume_mounts)):
        if value:
            raise ApiError(400, f"{name} {_UNSUPPORTED}")


def network_rules(body: NetworkBody) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    for name, value in (
        ("egressProxy", body.egress_proxy),
        ("rules", body.rules),
    ):
        if value is not None:
            raise ApiError(400, f"network.{name} {_UNSUPPORTED}")
    try:
        return (
            parse_cidrs("allowOut", body.allow_out),
            parse_cidrs("denyOut", body.deny_out),
            parse_dns_servers(body.dns_servers),
        )
    except NetworkOptionError as exc:
        raise ApiError(400, str(exc)) from None


def network_policy(body: NetworkBody | None) -> NetworkPolicy:
    if body is None:
        return NetworkPolicy()
    if body.allow_internet_access is not None:
        raise ApiError(400, "network.allow_internet_access belongs at the top level of the create request")
    allow_out, deny_out, dns_servers = network_rules(body)
    try:
        mask = parse_host_mask(body.mask_request_host)
        https_ports = parse_ports("httpsPorts", body.https_ports)
    except NetworkOptionError as exc:
        raise ApiError(400, str(exc)) from None
    return NetworkPolicy(
        allow_out=allow_out,
        deny_out=deny_out,
        allow_public_traffic=body.allow_public_traffic is not False,
        mask_request_host=mask,
        https_ports=https_ports,
        dns_servers=dns_servers,
    )


class ConnectBody(_Body):
    timeout: int | None = Field(None, ge=0)
    memory: bool | None = None  # false: resume from disk only (E2B cloud); refused here


class PauseBody(_Body):
    memory: bool | None = None  # false: a filesystem-only pause (files kept, processes ended)
    require_healthy_guest: bool | None = Field(None, alias="requireHealthyGuest")


class TimeoutBody(_Body):
    timeout: int = Field(ge=0)


class RefreshBody(_Body):
    duration: int | None = Field(None, ge=0)


async def parse_body(request: Request, model: type[BaseModel], required: bool = True) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if required:
            raise ApiError(400, "request body is missing: send a JSON object")
        raw = b"{}"
    try:
        data = json.loads(raw)
    except RecursionError:  # the service frame refuses deep JSON first; kept for direct callers
        raise ApiError(400, "request body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field '{where}' {_UNSUPPORTED}") from None
        raise ApiError(400, f"invalid field '{where}': {first['msg']}") from None


# --- response shapes ---------------------------------------------------------------------


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


class Shapes:
    def __init__(self, public_domain: str) -> None:
        self.domain = public_domain

    def sandbox(self, row: SandboxRow, network: NetworkPolicy) -> dict[str, Any]:
        return {
            "templateID": row.template_id,
            "sandboxID": row.sandbox_id,
            "alias": row.template_id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": row.envd_access_token,
            "trafficAccessToken": network.traffic_token,
            "domain": self.domain,
        }

    def listed(self, row: SandboxRow) -> dict[str, Any]:
        return {
            "templateID": row.template_id,
            "alias": row.template_id,
            "sandboxID": row.sandbox_id,
            "clientID": CLIENT_ID,
            "startedAt": _iso(row.started_at),
            "endAt": _iso(row.end_at),
            "cpuCount": _cpu(row.cpu_count),
            "memoryMB": row.memory_mb,
            "diskSizeMB": row.disk_mb,
            "metadata": row.metadata_ or {},
            "state": row.state,
            "envdVersion": ENVD_VERSION,
        }

    def detail(self, row: SandboxRow, network: NetworkPolicy, auto_resume: bool) -> dict[str, Any]:
        return {
            **self.listed(row),
            "envdAccessToken": row.envd_access_token,
            "domain": self.domain,
            "allowInternetAccess": row.allow_internet,
            "network": network.info(),
            "lifecycle": {"autoResume": auto_resume, "onTimeout": "pause" if row.auto_pause else "kill"},
        }


def _cpu(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


# --- auth --------------------------------------------------------------------------------


class ApiKeys:
    """The configured E2B_API_KEY plus keys made with `pmoves-e2b keys create` (stored hashed)."""

    def __init__(self, db: Database, configured_key: str | None) -> None:
        self.db = db
        self.configured = configured_key

    def authenticate(self, request: Request) -> str:
        key = self._key(request)
        return "configured" if self._is_configured(key) else self._lookup(key)

    async def authenticate_async(self, request: Request) -> str:
        """``authenticate`` for an async route: only a key that is not the configured one costs a
        worker thread (its database lookup); the configured one is checked on the loop."""
        key = self._key(request)
        return "configured" if self._is_configured(key) else await asyncio.to_thread(self._lookup, key)

    @staticmethod
    def _key(request: Request) -> str:
        key = request.headers.get("x-api-key") or request.headers.get("x-e2b-api-key")
        if not key:
            raise ApiError(401, "missing API key: send it in the X-API-KEY header (E2B_API_KEY)")
        return key

    def _is_configured(self, key: str) -> bool:
        return bool(self.configured) and hmac.compare_digest(key.encode(), str(self.configured).encode())

    def _lookup(self, key: str) -> str:
        key_id = repo.find_api_key(self.db, key)
        if key_id is None:
            raise ApiError(
                401, "invalid API key: use the key printed by `pmoves-e2b up` or one from `pmoves-e2b keys create`"
            )
        return key_id


# --- routes ------------------------------------------------------------------------------


def build_router(manager: SandboxManager, keys: ApiKeys, public_domain: str) -> APIRouter:
    async def require_api_key(request: Request) -> None:
        """Every route of this router: the caller's key (async: a sync dependency costs a thread hop
        per request; a database lookup still runs off the loop)."""
        request.state.api_key_id = await keys.authenticate_async(request)

    router = APIRouter(dependencies=[Depends(require_api_key)])
    shapes = Shapes(public_domain)
    idempotency_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, requests using it)

    async def create(request: Request) -> Response:
        key_id: str = request.state.api_key_id
        body: NewSandbox = await parse_body(request, NewSandbox)
        idem_key = request.headers.get("idempotency-key")
        if idem_key is None:
            return await _create(body, key_id)
        if not _IDEMPOTENCY_KEY.match(idem_key):
            raise ApiError(400, "Idempotency-Key must be 1-255 characters of a-z, 0-9 and '-'")
        body_hash = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
        lock_key = f"{key_id}:{idem_key}"
        lock, users = idempotency_locks.get(lock_key, (asyncio.Lock(), 0))
        idempotency_locks[lock_key] = (lock, users + 1)
        try:
            async with lock:
                seen = repo.get_idempotent(manager.db, key_id, idem_key)
                if seen is not None:
                    if seen.request_hash != body_hash:
                        raise ApiError(409, "this Idempotency-Key was already used with a different request body")
                    return Response(seen.response, status_code=seen.status_code, media_type="application/json")
                response = await _create(body, key_id)
                repo.put_idempotent(
                    manager.db, key_id, idem_key, body_hash, response.status_code, bytes(response.body).decode()
                )
                return response
        finally:
            # Forget the lock once no request uses it: the database remembers the key from then on.
            lock, users = idempotency_locks[lock_key]
            if users == 1:
                del idempotency_locks[lock_key]
            else:
                idempotency_locks[lock_key] = (lock, users - 1)

    async def _create(body: NewSandbox, key_id: str) -> JSONResponse:
        _refuse_unsupported(body)
        network = network_policy(body.network)
        if body.allow_internet_access is False and network.allow_out:
            raise ApiError(400, _OFFLINE_ALLOW)
        row = await manager.create(
            CreateRequest(
                template_id=body.template_id,
                timeout_s=body.timeout,
                metadata=body.metadata or {},
                env_vars=body.env_vars or {},
                allow_internet=body.allow_internet_access is not False,
                auto_pause=bool(body.auto_pause),
                api_key_id=key_id,
                network=network,
                auto_resume=bool(body.auto_resume and body.auto_resume.on),
                auto_pause_memory=body.auto_pause_memory is not False,
            )
        )
        return JSONResponse(shapes.sandbox(row, manager.network(row.sandbox_id)), status_code=201)

    async def connect(request: Request, sandbox_id: str) -> JSONResponse:
        body: ConnectBody = await parse_body(request, ConnectBody, required=False)
        if body.memory is False:
            raise ApiError(400, f"resuming without memory {_UNSUPPORTED}: sandboxes pause in memory")
        row, resumed = await manager.connect(sandbox_id, body.timeout)
        return JSONResponse(shapes.sandbox(row, manager.network(sandbox_id)), status_code=201 if resumed else 200)

    async def resume(request: Request, sandbox_id: str) -> JSONResponse:
        body: ConnectBody = await parse_body(request, ConnectBody, required=False)
        if body.memory is False:
            raise ApiError(400, f"resuming without memory {_UNSUPPORTED}: sandboxes pause in memory")
        row = manager.get(sandbox_id)
        if row.state != "paused":
            raise ApiError(409, f"sandbox '{sandbox_id}' is already running")
        row, _ = await manager.connect(sandbox_id, body.timeout)
        return JSONResponse(shapes.sandbox(row, manager.network(sandbox_id)), status_code=201)

    async def kill(request: Request, sandbox_id: str) -> Response:
        actor: str = request.state.api_key_id
        await manager.kill(sandbox_id, actor=actor)
        return Response(status_code=204)

    async def set_timeout(request: Request, sandbox_id: str) -> Response:
        body: TimeoutBody = await parse_body(request, TimeoutBody)
        manager.set_timeout(sandbox_id, body.timeout)
        return Response(status_code=204)

    async def refresh(request: Request, sandbox_id: str) -> Response:
        body: RefreshBody = await parse_body(request, RefreshBody, required=False)
        row = manager.get(sandbox_id)
        if row.state == "paused":
            remaining = row.paused_remaining_s or 0
        else:
            remaining = (row.end_at - repo.utcnow()).total_seconds()
        manager.set_timeout(sandbox_id, max(int(remaining), body.duration or 0))
        return Response(status_code=204)

    async def info(request: Request, sandbox_id: str) -> JSONResponse:
        row, network = manager.get(sandbox_id), manager.network(sandbox_id)
        return JSONResponse(shapes.detail(row, network, manager.auto_resumes(sandbox_id)))

    async def update_network(request: Request, sandbox_id: str) -> Response:
        body: NetworkBody = await parse_body(request, NetworkBody, required=False)
        if body.allow_public_traffic is not None or body.mask_request_host is not None or body.https_ports is not None:
            raise ApiError(400, "allowPublicTraffic, maskRequestHost and httpsPorts are set at create time only")
        allow_out, deny_out, dns_servers = network_rules(body)
        online = body.allow_internet_access
        if allow_out and not (manager.get(sandbox_id).allow_internet if online is None else online):
            raise ApiError(400, _OFFLINE_ALLOW)
        await manager.update_network(sandbox_id, allow_out, deny_out, dns_servers, body.allow_internet_access)
        return Response(status_code=204)

    async def pause(request: Request, sandbox_id: str) -> Response:
        body: PauseBody = await parse_body(request, PauseBody, required=False)
        await manager.pause(sandbox_id, memory=body.memory is not False)
        return Response(status_code=204)

    async def sandbox_metrics(request: Request, sandbox_id: str) -> JSONResponse:
        start, end = _int_query(request, "start"), _int_query(request, "end")
        samples = manager.samples(sandbox_id)
        if not samples or manager.get(sandbox_id).state == "running":
            samples.append(await manager.sample_now(sandbox_id))
        chosen = [
            s
            for s in samples
            if (start is None or s["timestampUnix"] >= start) and (end is None or s["timestampUnix"] <= end)
        ]
        return JSONResponse(chosen)

    def _filtered(request: Request, default_states: set[str], default_order: str = "asc") -> list[SandboxRow]:
        wanted_meta = dict(parse_qsl(request.query_params.get("metadata", ""), keep_blank_values=True))
        states_param = request.query_params.get("state")
        states = set(states_param.split(",")) if states_param else default_states
        if not states <= {"running", "paused"}:
            raise ApiError(400, "state must be a comma-separated list of 'running' and 'paused'")
        template = request.query_params.get("template")
        order = request.query_params.get("order") or default_order
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be 'asc' or 'desc'")
        after = _time_query(request, "startedAfter")
        before = _time_query(request, "startedBefore")
        rows = [
            r
            for r in manager.list_rows()
            if r.state in states
            and (template is None or r.template_id == template)
            and all((r.metadata_ or {}).get(k) == v for k, v in wanted_meta.items())
            and (after is None or r.started_at >= after)
            and (before is None or r.started_at <= before)
        ]
        rows.sort(key=_sort_key, reverse=order == "desc")
        return rows

    async def list_v1(request: Request) -> JSONResponse:
        return JSONResponse([shapes.listed(r) for r in _filtered(request, {"running"})])

    async def list_v2(request: Request) -> JSONResponse:
        # E2B's spec: newest first unless order=asc.
        rows = _filtered(request, {"running", "paused"}, default_order="desc")
        limit, cursor = page_query(request)
        if cursor is not None:
            # A cursor, not an offset: sandboxes created or killed between pages neither repeat
            # nor skip the ones already listed.
            newest_first = (request.query_params.get("order") or "desc") == "desc"
            rows = [r for r in rows if (_sort_key(r) < cursor if newest_first else _sort_key(r) > cursor)]
        page = rows[:limit]
        headers = {}
        if len(rows) > limit:
            headers["x-next-token"] = encode_page_token(_sort_key(page[-1]))
        return JSONResponse([shapes.listed(r) for r in page], headers=headers)

    add = router.add_api_route
    add("/v2/sandboxes", create, methods=["POST"], status_code=201, summary="Create a sandbox")
    add("/sandboxes", create, methods=["POST"], status_code=201, summary="Create a sandbox (v1)")
    add("/v2/sandboxes", list_v2, methods=["GET"], summary="List sandboxes with filters and paging")
    add("/sandboxes", list_v1, methods=["GET"], summary="List running sandboxes (v1)")
    add("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"], summary="Connect; resumes a paused sandbox")
    add("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"], summary="Connect (v1)")
    add("/sandboxes/{sandbox_id}/resume", resume, methods=["POST"], summary="Resume a paused sandbox")
    add("/sandboxes/{sandbox_id}", info, methods=["GET"], summary="Sandbox details")
    add("/sandboxes/{sandbox_id}", kill, methods=["DELETE"], status_code=204, summary="Kill a sandbox")
    add("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"], status_code=204, summary="Set the timeout")
    add("/sandboxes/{sandbox_id}/refreshes", refresh, methods=["POST"], status_code=204, summary="Keep alive")
    add("/sandboxes/{sandbox_id}/pause", pause, methods=["POST"], status_code=204, summary="Pause (freeze) a sandbox")
    add(
        "/sandboxes/{sandbox_id}/network",
        update_network,
        methods=["PUT"],
        status_code=204,
        summary="Replace egress rules",
    )
    add("/sandboxes/{sandbox_id}/metrics", sandbox_metrics, methods=["GET"], summary="Resource metrics")
    return router


def _int_query(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"query parameter '{name}' must be an integer") from None


def _sort_key(row: SandboxRow) -> tuple[str, str]:
    return (row.started_at.isoformat(timespec="microseconds"), row.sandbox_id)  # UTC-aware from the store


def _time_query(request: Request, name: str) -> datetime | None:
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"query parameter '{name}' must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # a naive time means UTC


def page_query(request: Request) -> tuple[int, tuple[str, str] | None]:
    """A paged list's ``limit`` (1..MAX_PAGE, default MAX_PAGE) and its ``nextToken`` cursor."""
    limit = _int_query(request, "limit")
    limit = MAX_PAGE if limit is None else limit
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit must be between 1 and {MAX_PAGE}")
    return limit, _decode_token(request.query_params.get("nextToken"))


def encode_page_token(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode("|".join(key).encode()).decode()


def _decode_token(token: str | None) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        started, _, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        datetime.fromisoformat(started)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "nextToken is not valid: pass the x-next-token of the previous page") from None
    if not sandbox_id:
        raise ApiError(400, "nextToken is not valid: pass the x-next-token of the previous page")
    return (started, sandbox_id)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to E2B's ``{code, message}``."""

    async def api_error(_: Request, exc: SandboxError) -> JSONResponse:
        retry_after_s = exc.retry_after_s if isinstance(exc, Busy) else None
        return error_response(exc.status, exc.message, exc.retryable, retry_after_s)

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Backend failures (cgroups, network, launch) say what broke; anything else stays in the log.
        if isinstance(exc, (BackendError, RuntimeError)):
            return error_response(500, f"the sandbox backend failed: {exc}", retryable=True)
        return error_response(500, "internal error; the e2b-sandbox log has the details", retryable=True)

    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(SandboxError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
