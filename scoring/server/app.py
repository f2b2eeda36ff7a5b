"""The FastAPI application: routes of DESIGN section 10 under ``/api/v1``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from scoring import S3FileStore
from scoring.holds import SlotHolds
from scoring.server import (
    community,
    db,
    demo,
    errors,
    heartbeats,
    limits,
    metrics,
    startup,
    storage,
    tasks,
)
from scoring.server.auth import Authenticator, Principal, load_secret, require
from scoring.server.cloud import CloudRunner
from scoring.server.config import Settings
from scoring.server.dispatch import Dispatcher
from scoring.server.errors import ApiError, ServerCode, not_found
from scoring.server.replicas import FleetSync
from scoring.server.schemas import (
    CompleteBody,
    Health,
    HeartbeatAnswer,
    HeartbeatBody,
    PresignAnswer,
    PresignBody,
    RunBody,
    StartBody,
    TaskAccepted,
    TaskAck,
    TaskResult,
    TaskStatus,
    Uploaded,
    WorkflowOut,
)
from scoring.server.state import ServerState
from scoring.server.waiting import MAX_WAIT_S
from scoring.server.workflows import to_json

log = logging.getLogger("scoring.server")
_M = TypeVar("_M", bound=BaseModel)
_bearer = HTTPBearer(auto_error=False, description="Session JWT, team key (sk-) or agent key (dk-)")


def build_state(settings: Settings) -> ServerState:
    """Open the database (creating or checking its schema), the file store and the Fleet."""
    database = db.Database(settings.database, busy_timeout_s=settings.db_busy_timeout_s)
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
    state = ServerState(database, auth, files, policy, max_attempts=settings.max_attempts,
                        max_lost_attempts=settings.max_lost_attempts,
                        start_timeout_s=settings.start_timeout_s)  # fmt: skip
    state.restore_fleet()
    if settings.demo:
        demo.ensure_demo(database, auth, settings.demo, settings.base_url, settings.demo_agents)
    return state


def _parsed(model: type[_M], body: Any) -> _M:
    """A decoded body as ``model``; 400 with every problem in the server's format."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError.many(400, errors.validation_errors(exc)) from None


def _idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header, or 400 ``invalid_idempotency_key``."""
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not all("!" <= c <= "~" for c in value):
        raise ApiError(400, "invalid_idempotency_key",
                       "1 to 255 visible ASCII characters", "Idempotency-Key")  # fmt: skip
    return value


async def _read_upload(request: Request, limit: int) -> bytes:
    """An upload's body (at most ``limit`` bytes, the size signed into its URL), or 413 as soon
    as it is known to be larger; its deadline is the limits middleware's."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, ServerCode.PAYLOAD_TOO_LARGE, f"the body is over {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
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
        state.commits.start()
        if sync is not None:
            sync.start()
        dispatcher.start()
        cloud = CloudRunner(state, settings.cloud_url, settings.cloud_poll_s)
        cloud.start()
        try:
            yield
        finally:
            state.waiters.close()
            cloud.stop()
            dispatcher.stop()
            state.commits.stop()
            if sync is not None:
                sync.stop()
            state.database.dispose()

    app = FastAPI(
        title="scoring API server",
        version="1",
        description="Runs of ComfyUI and Nerfstudio workflows on teams' own GPU agents.",
        lifespan=lifespan,
        default_response_class=errors.JSONAnswer,
        # No redirect to the same path with or without a slash: a redirect's address would be
        # built from the request's Host header.
        redirect_slashes=False,
    )
    app.state.server = state
    app.state.dispatcher = dispatcher
    errors.install(app)
    app.add_middleware(
        limits.Limits, max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s, upload_timeout_s=settings.upload_timeout_s,
    )  # fmt: skip
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
    router = APIRouter(prefix="/api/v1", redirect_slashes=False)
    auth_errors = (400, 401, 403)
    # Every route may answer these: the limits middleware's refusals and a busy database.
    common = (408, 413, 431, 503)

    @router.get(
        "/health", response_model=Health, responses=errors.responses(*common), tags=["server"]
    )
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.post(
        "/r/workflows/{workflowId}/run",
        status_code=202,
        response_model=TaskAccepted,
        responses=errors.responses(*common, *auth_errors, 404, 415, 422),
        openapi_extra=_body_doc(RunBody),
        tags=["runs"],
    )
    async def run_workflow(
        workflow_id: WorkflowId,
        request: Request,
        who: Client,
        idempotency_key: Annotated[
            str | None,
            Header(alias="Idempotency-Key", description="Up to 255 visible ASCII characters: "
                   "a retried submit with the same key answers the first run's task id"),
        ] = None,
    ) -> Any:  # fmt: skip
        """Validate a run against the workflow and queue it; 202 with its task id."""
        key = _idempotency_key(idempotency_key)
        body = limits.decode(await request.body(), empty_ok=True)
        if key is not None:  # its own transaction: the key's earlier run is looked up first
            task_id = await run_in_threadpool(tasks.submit, state, who, workflow_id, body, key)
            return {"task_id": task_id}
        try:  # on the loop when every file it names is known (no database read)
            run = tasks.prepare(state, who, workflow_id, body, state.known_files.cached())
        except storage.NotCached:
            run = await run_in_threadpool(tasks.prepare, state, who, workflow_id, body)
        return {"task_id": await state.commits.run(tasks.queue(state, run))}

    @router.get(
        "/r/workflows/slug/{slug}",
        response_model=WorkflowOut,
        responses=errors.responses(*common, *auth_errors, 404),
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
        responses=errors.responses(*common, *auth_errors, 404),
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
        responses=errors.responses(*common, *auth_errors),
        openapi_extra=_body_doc(PresignBody),
        tags=["files"],
    )
    async def presign(request: Request, who: Client) -> Any:
        """A file key and a URL to PUT the file's bytes to (valid 15 minutes)."""
        body = _parsed(PresignBody, limits.decode(await request.body()))
        base = settings.base_url.removesuffix("/api/v1")  # never the request's Host header
        key, url = storage.presign(
            state.auth.sign, who.team_id, body.file_name, body.file_size, body.content_type, base
        )
        return {"file_key": key, "upload_url": url}

    @router.put(
        "/uploads/{token}",
        response_model=Uploaded,
        responses=errors.responses(*common, 400, 401, 409, 415),
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
            raise ApiError(401, ServerCode.UNAUTHORIZED, "invalid or expired upload URL")
        key, team = str(claims["key"]), str(claims["team"])
        size, content_type = int(claims["size"]), str(claims["ct"])  # type: ignore[call-overload]
        sent_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if sent_type and sent_type != content_type:
            message = f"this URL takes {content_type}, as presigned"
            raise ApiError(415, ServerCode.UNSUPPORTED_MEDIA_TYPE, message, "Content-Type")
        used = ApiError(409, ServerCode.ALREADY_UPLOADED, "this upload URL was used", "file_key")
        if not await run_in_threadpool(storage.claim_upload, state.database, key):
            raise used
        try:
            raw = await _read_upload(request, size)
            if len(raw) != size:
                message = f"expected {size} bytes, got {len(raw)}"
                raise ApiError(400, ServerCode.SIZE_MISMATCH, message)
            storage.check_content(content_type, raw)
            await run_in_threadpool(
                state.files.put, key, raw, team_id=team, content_type=content_type
            )
            if not await run_in_threadpool(
                storage.record_upload, state.database, key, team, content_type, size
            ):
                raise used
        except BaseException:
            await run_in_threadpool(storage.release_claim, state.database, key)
            raise
        return {"file_key": key, "size": size}

    @router.get(
        "/r/tasks/{taskId}",
        response_model=TaskStatus,
        responses=errors.responses(*common, *auth_errors, 404),
        tags=["tasks"],
    )
    def task_status(task_id: TaskId, who: Client) -> Any:
        """The task's status, its agent and the latest dispatch decision's explanation."""
        return community.shown_to(state, who.team_id, tasks.status(state, who, task_id))

    @router.get(
        "/r/tasks/{taskId}/result",
        response_model=TaskResult,
        responses=errors.responses(*common, *auth_errors, 404, 409),
        tags=["tasks"],
    )
    def task_result(task_id: TaskId, who: Client) -> Any:
        """The outputs of a completed task; 409 ``not_ready`` before."""
        return tasks.result(state, who, task_id)

    @router.post(
        "/r/tasks/{taskId}/cancel",
        response_model=TaskAck,
        responses=errors.responses(*common, *auth_errors, 404, 409),
        tags=["tasks"],
    )
    def cancel_task(task_id: TaskId, who: Client) -> Any:
        """Cancel a task: at once while queued or dispatched; a running one at its agent's next
        heartbeat (``cancel_requested`` until then); 409 ``not_cancellable`` once it ended."""
        return tasks.cancel(state, who, task_id)

    @router.post(
        "/agents/heartbeat",
        response_model=HeartbeatAnswer,
        responses=errors.responses(*common, *auth_errors),
        openapi_extra=_body_doc(HeartbeatBody),
        tags=["agents"],
    )
    async def heartbeat(
        request: Request,
        who: AgentKey,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description=(
            "Seconds to wait for work when there is none yet (long poll): answered as soon as "
            "a task is dispatched to the agent or a cancel is asked of one it runs. At most "
            "half the heartbeat timeout is waited, so a waiting agent never looks lost."
        ))] = 0.0,
    ) -> Any:  # fmt: skip
        """Report the agent's state and the tasks it holds (``running``); answers the tasks
        dispatched to it and not yet started, and the held ones to drop (``cancel``)."""
        body = limits.decode(await request.body())
        agent = who.agent_id
        assert agent is not None
        since = state.waiters.mark(agent)
        work = await run_in_threadpool(heartbeats.receive, state, who, body)
        view = await state.commits.run(work, agent)  # stored, reconciled in the next commit
        if wait > 0 and not view.tasks and not view.cancel:
            seconds = min(wait, state.policy.heartbeat_timeout_s / 2)
            if await state.waiters.wait(agent, seconds, since):
                view = await state.commits.run(tasks.reconciling(state, agent, None), agent)
        return {"tasks": view.tasks, "cancel": view.cancel}

    @router.post(
        "/agents/tasks/{taskId}/start",
        response_model=TaskAck,
        responses=errors.responses(*common, *auth_errors, 404, 409),
        tags=["agents"],
    )
    async def start_task(task_id: TaskId, who: AgentKey, body: StartBody | None = None) -> Any:
        """The agent started its attempt of a task; 409 ``stale_attempt`` when that attempt is
        no longer current."""
        attempt = None if body is None else body.attempt
        work = tasks.starting(state, who, task_id, attempt)
        return await state.commits.run(work, who.agent_id or "")

    @router.post(
        "/agents/tasks/{taskId}/complete",
        response_model=TaskAck,
        responses=errors.responses(*common, *auth_errors, 404, 409),
        openapi_extra=_body_doc(CompleteBody),
        tags=["agents"],
    )
    async def complete_task(task_id: TaskId, request: Request, who: AgentKey) -> Any:
        """The attempt completed (with its outputs) or failed (retried elsewhere, up to
        ``max_attempts``); 409 ``stale_attempt`` when that attempt is no longer current."""
        body = _parsed(CompleteBody, limits.decode(await request.body(), constants=True))
        limits.check_outputs(body.outputs)  # before anything is stored: 400 invalid_outputs
        ok = body.status == "completed"
        work = tasks.completing(state, who, task_id, ok, body.outputs, body.attempt)
        return await state.commits.run(work, who.agent_id or "")

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
            answers = operation.get("responses", {})
            if answers.get("422", {}).get("description") == "Validation Error":  # FastAPI's own
                del answers["422"]
    components = schema.get("components", {}).get("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
