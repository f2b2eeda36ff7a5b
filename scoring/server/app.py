"""The FastAPI application: routes of DESIGN section 10 under ``/api/v1``."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from scoring import S3FileStore
from scoring.holds import SlotHolds
from scoring.server import db, demo, errors, heartbeats, metrics, startup, storage, tasks
from scoring.server.auth import Authenticator, Principal, load_secret, require
from scoring.server.config import Settings
from scoring.server.dispatch import Dispatcher
from scoring.server.errors import ApiError, not_found
from scoring.server.replicas import FleetSync
from scoring.server.schemas import (
    CompleteBody,
    Health,
    HeartbeatAnswer,
    HeartbeatBody,
    PresignAnswer,
    PresignBody,
    RunBody,
    TaskAccepted,
    TaskAck,
    TaskResult,
    TaskStatus,
    Uploaded,
    WorkflowOut,
)
from scoring.server.state import ServerState
from scoring.server.workflows import to_json

log = logging.getLogger("scoring.server")
_bearer = HTTPBearer(auto_error=False, description="Session JWT, team key (sk-) or agent key (dk-)")


def build_state(settings: Settings) -> ServerState:
    """Open the database (creating or checking its schema), the file store and the Fleet."""
    database = db.Database(settings.database)
    database.create()
    auth = Authenticator(database, load_secret(database, settings.jwt_secret_from_env()))
    files: storage.UploadStore
    if settings.s3_bucket:
        kwargs = {"endpoint_url": settings.s3_endpoint} if settings.s3_endpoint else {}
        s3 = S3FileStore(settings.s3_bucket, **kwargs)
        s3.check()
        files = s3
    else:
        files = storage.LocalFileStore(settings.files_dir, database)
    policy = settings.policy()
    state = ServerState(database, auth, files, policy, max_attempts=settings.max_attempts)
    state.restore_fleet()
    if settings.demo:
        demo.ensure_demo(database, auth, settings.demo, settings.base_url, settings.demo_agents)
    return state


def _json_object(raw: bytes, *, empty_ok: bool) -> Any:
    """Decode a body; 400 ``invalid_json`` unless it is one JSON object (strict JSON: no NaN)."""
    if not raw.strip() and empty_ok:
        return None
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _body_doc(model: type[Any]) -> dict[str, Any]:
    """An ``openapi_extra`` request body for a route that reads its body raw."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def create_app(settings: Settings | None = None, state: ServerState | None = None) -> FastAPI:
    """The application; its lifespan runs the dispatch loop."""
    settings = settings or Settings()
    state = state or build_state(settings)
    replicated = settings.sync_interval > 0
    if settings.slot_holds and state.holds is None:
        state.holds = SlotHolds(uuid.uuid4().hex, settings.slot_hold_s, settings.owner_grace_s)
    dispatcher = Dispatcher(
        state,
        interval=settings.dispatch_interval_s,
        stats_path=settings.stats_path,
        refresh=replicated and settings.refresh_each_round,
    )
    sync = FleetSync(state, settings.sync_interval) if replicated else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        # More worker threads than a few only take turns on the GIL and on SQLite's single
        # writer: anyio's default of 40 served fewer runs per second in the load test than 8.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        await anyio.to_thread.run_sync(startup.compile_kernels, state.policy)
        if sync is not None:
            sync.start()
        dispatcher.start()
        try:
            yield
        finally:
            dispatcher.stop()
            if sync is not None:
                sync.stop()
            state.database.dispose()

    app = FastAPI(
        title="scoring API server",
        version="1",
        description="Runs of ComfyUI and Nerfstudio workflows on teams' own GPU agents.",
        lifespan=lifespan,
        default_response_class=errors.JSONAnswer,
    )
    app.state.server = state
    app.state.dispatcher = dispatcher
    errors.install(app)
    metrics.install(app, state, dispatcher.stats)
    app.include_router(_routes(state, settings))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# The dependencies are coroutines so that they run on the event loop: a plain function would
# cost a hop to the thread pool each. Credentials are cached in memory (auth.py), so they only
# touch the database on a miss.
async def _caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    request: Request,
    x_team_id: Annotated[str | None, Header(description="Required with session tokens")] = None,
) -> Principal:
    state: ServerState = request.app.state.server
    return state.auth.resolve(request.headers.get("authorization"), x_team_id)


async def _client(who: Annotated[Principal, Depends(_caller)]) -> Principal:
    return require(who, "user", "team_key")


async def _agent(who: Annotated[Principal, Depends(_caller)]) -> Principal:
    return require(who, "agent")


Client = Annotated[Principal, Depends(_client)]
AgentKey = Annotated[Principal, Depends(_agent)]
WorkflowId = Annotated[str, Path(alias="workflowId")]
TaskId = Annotated[str, Path(alias="taskId")]


def _routes(state: ServerState, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/api/v1")
    limit = settings.max_body_bytes

    auth_errors = (400, 401, 403)

    @router.get("/health", response_model=Health, tags=["server"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.post(
        "/r/workflows/{workflowId}/run",
        status_code=202,
        response_model=TaskAccepted,
        responses=errors.responses(*auth_errors, 404, 413),
        openapi_extra=_body_doc(RunBody),
        tags=["runs"],
    )
    async def run_workflow(workflow_id: WorkflowId, request: Request, who: Client) -> Any:
        """Validate a run against the workflow and queue it; 202 with its task id."""
        body = _json_object(await _read_body(request, limit), empty_ok=True)
        task_id = await run_in_threadpool(tasks.submit, state, who, workflow_id, body)
        return {"task_id": task_id}

    @router.get(
        "/r/workflows/slug/{slug}",
        response_model=WorkflowOut,
        responses=errors.responses(*auth_errors, 404),
        tags=["workflows"],
    )
    def workflow_by_slug(slug: str, who: Client) -> Any:
        """The workflow ``slug`` (latest version) or ``slug@version``."""
        found = state.workflows.by_slug(who.team_id, slug)
        if found is None:
            raise not_found("workflow")
        return to_json(*found)

    @router.get(
        "/r/workflows/{workflowId}",
        response_model=WorkflowOut,
        responses=errors.responses(*auth_errors, 404),
        tags=["workflows"],
    )
    def workflow_by_id(workflow_id: WorkflowId, who: Client) -> Any:
        """The workflow's latest version with its parameters."""
        found = state.workflows.by_id(who.team_id, workflow_id)
        if found is None:
            raise not_found("workflow")
        return to_json(*found)

    @router.post(
        "/r/files/presign",
        response_model=PresignAnswer,
        responses=errors.responses(*auth_errors, 413),
        tags=["files"],
    )
    def presign(body: PresignBody, request: Request, who: Client) -> Any:
        """A file key and a URL to PUT the file's bytes to (valid 15 minutes)."""
        base = str(request.base_url).rstrip("/")
        key, url = storage.presign(
            state.auth.sign, who.team_id, body.file_name, body.file_size, body.content_type, base
        )
        return {"file_key": key, "upload_url": url}

    @router.put(
        "/uploads/{token}",
        response_model=Uploaded,
        responses=errors.responses(400, 401, 409, 413),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
        tags=["files"],
    )
    async def upload(token: str, request: Request) -> Any:
        """Store the file announced by a presign call: exactly ``file_size`` bytes."""
        claims = state.auth.verify(token, "upload")
        if claims is None:
            raise ApiError(401, "unauthorized", "invalid or expired upload URL")
        key, team = str(claims["key"]), str(claims["team"])
        size, content_type = int(claims["size"]), str(claims["ct"])  # type: ignore[call-overload]
        if state.files.stat(key) is not None:
            raise ApiError(409, "already_uploaded", "this upload URL was used", "file_key")
        raw = await _read_body(request, size)
        if len(raw) != size:
            raise ApiError(400, "size_mismatch", f"expected {size} bytes, got {len(raw)}")
        await run_in_threadpool(state.files.put, key, raw, team_id=team, content_type=content_type)
        if not await run_in_threadpool(
            storage.record_upload, state.database, key, team, content_type, size
        ):
            raise ApiError(409, "already_uploaded", "this upload URL was used", "file_key")
        return {"file_key": key, "size": size}

    @router.get(
        "/r/tasks/{taskId}",
        response_model=TaskStatus,
        responses=errors.responses(*auth_errors, 404),
        tags=["tasks"],
    )
    def task_status(task_id: TaskId, who: Client) -> Any:
        """The task's status, its agent and the latest dispatch decision's explanation."""
        return tasks.status(state, who, task_id)

    @router.get(
        "/r/tasks/{taskId}/result",
        response_model=TaskResult,
        responses=errors.responses(*auth_errors, 404, 409),
        tags=["tasks"],
    )
    def task_result(task_id: TaskId, who: Client) -> Any:
        """The outputs of a completed task; 409 ``not_ready`` before."""
        return tasks.result(state, who, task_id)

    @router.post(
        "/agents/heartbeat",
        response_model=HeartbeatAnswer,
        responses=errors.responses(*auth_errors, 413),
        openapi_extra=_body_doc(HeartbeatBody),
        tags=["agents"],
    )
    async def heartbeat(request: Request, who: AgentKey) -> Any:
        """Report the agent's state; answers the tasks dispatched to it and not yet started."""
        body = _json_object(await _read_body(request, limit), empty_ok=False)
        found = await run_in_threadpool(heartbeats.heartbeat, state, who, body)
        return {"tasks": found}

    @router.post(
        "/agents/tasks/{taskId}/start",
        response_model=TaskAck,
        responses=errors.responses(*auth_errors, 404, 409),
        tags=["agents"],
    )
    def start_task(task_id: TaskId, who: AgentKey) -> Any:
        """The agent started a task dispatched to it."""
        return tasks.start(state, who, task_id)

    @router.post(
        "/agents/tasks/{taskId}/complete",
        response_model=TaskAck,
        responses=errors.responses(*auth_errors, 404, 409),
        tags=["agents"],
    )
    def complete_task(task_id: TaskId, body: CompleteBody, who: AgentKey) -> Any:
        """The task completed (with its outputs) or failed (retried elsewhere, up to 3 tries)."""
        return tasks.complete(state, who, task_id, body.status == "completed", body.outputs)

    return router


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The schema without FastAPI's 422 answers: this server reports those as 400."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
