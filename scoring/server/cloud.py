"""ComfyUI Cloud runs (``dispatch_target: comfy_cloud``, DESIGN section 10.3).

A team's Cloud runs need its Cloud API key (:func:`set_key`, ``admin set-cloud-key``).
:class:`CloudRunner`, a thread of the server, takes each queued Cloud run, submits it through
:class:`ComfyClient` (ComfyUI's documented HTTP API: ``POST /prompt``, ``GET
/history/{prompt_id}``, ``GET /view``), polls it and stores its outputs in the server's file
store under ``outputs/{team_id}/{task_id}/{file name}``.

One submission per task, across replicas and restarts: the prompt id is chosen here (ComfyUI's
``POST /prompt`` takes the client's ``prompt_id``) and the task is claimed with it by one
conditional UPDATE (``queued`` -> ``running``) *before* the prompt is sent, so only the claimer
sends it; the Cloud's acceptance is then recorded (``dispatched_at``). A claim whose acceptance
is not recorded within :data:`SUBMIT_LEASE_S` (its process died) is taken over by another
conditional UPDATE and sent again under the same prompt id: the one window where the Cloud may
see a prompt twice is a process killed after the Cloud accepted it and before that commit.
Accepted prompts are polled by every runner (reads are harmless), and a task ends by an UPDATE
conditional on its status and prompt id, so it completes once.

Errors talking to the Cloud (no connection, timeouts, 5xx, 429) are retried with backoff, the
task staying ``running``; a 4xx answer fails the task with the Cloud's reason, as does an
execution error the Cloud reports in the prompt's history.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import select, update

from scoring import Workflow
from scoring.server import db, storage, tasks
from scoring.server.errors import ApiError
from scoring.server.state import ServerState

log = logging.getLogger("scoring.server.cloud")

#: A claim whose submission was not acknowledged for this long is taken over (its runner died).
SUBMIT_LEASE_S = 60.0
#: Longest wait between two tries of a Cloud that is failing.
MAX_BACKOFF_S = 15.0
#: Cloud runs looked at in one round, oldest first.
BATCH = 100
#: Largest output file taken from the Cloud.
MAX_OUTPUT_BYTES = 256 * 1024 * 1024
#: Answers that mean "try again later" rather than "no".
_TRANSIENT = frozenset({408, 425, 429})
_TIMEOUT = httpx.Timeout(20.0, connect=5.0)


class CloudUnavailable(Exception):
    """The Cloud could not be asked (no connection, timeout, 5xx, 429): try again later."""


class CloudRefused(Exception):
    """The Cloud said no (a 4xx answer, an execution error): the message is its reason."""


def set_key(database: db.Database, team_id: str, api_key: str) -> None:
    """Store (or replace) a team's ComfyUI Cloud API key.

    Raises
    ------
    ValueError
        For a key that is not 1 to 4096 visible ASCII characters, or an unknown team.
    """
    if not 1 <= len(api_key) <= 4096 or not all("!" <= c <= "~" for c in api_key):
        raise ValueError("a Cloud API key is 1 to 4096 visible ASCII characters")
    k = db.cloud_keys
    with database.begin() as conn:
        if conn.execute(select(db.teams.c.id).where(db.teams.c.id == team_id)).first() is None:
            raise ValueError(f"no team {team_id}")
        now = time.time()
        changed = conn.execute(
            update(k).where(k.c.team_id == team_id).values(api_key=api_key, created_at=now)
        ).rowcount
        if not changed:
            conn.execute(k.insert().values(team_id=team_id, api_key=api_key, created_at=now))


def get_key(database: db.Database, team_id: str) -> str | None:
    """The team's Cloud API key, or ``None``."""
    k = db.cloud_keys
    with database.read() as conn:
        key = conn.execute(select(k.c.api_key).where(k.c.team_id == team_id)).scalar()
    return None if key is None else str(key)


def build_graph(workflow: Workflow, parameters: dict[str, Any]) -> dict[str, Any]:
    """The API-format graph of a run: ``{node_id: {"inputs": {field: value}}}`` for each
    parameter that names its node and field.

    This server stores no graph template (the platform's full graph is outside its contract),
    so the graph holds only the run's values, where the workflow says they go.
    """
    graph: dict[str, Any] = {}
    for p in workflow.parameters:
        if p.node_id is not None and p.field is not None and p.key in parameters:
            graph.setdefault(p.node_id, {"inputs": {}})["inputs"][p.field] = parameters[p.key]
    return graph


class ComfyClient:
    """ComfyUI's HTTP API at ``http``'s base URL, with a team's key in ``X-API-Key``."""

    def __init__(self, http: httpx.Client, api_key: str) -> None:
        self.http = http
        self.headers = {"X-API-Key": api_key}

    def submit(self, graph: dict[str, Any], prompt_id: str, client_id: str) -> str:
        """``POST /prompt``; returns the prompt id the Cloud runs it under."""
        body = {"prompt": graph, "prompt_id": prompt_id, "client_id": client_id}
        answer = self._json(self._call("POST", "/prompt", json=body))
        return str(answer.get("prompt_id") or prompt_id)

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's ``GET /history/{prompt_id}`` entry, or ``None`` while it has none."""
        response = self._call("GET", f"/history/{prompt_id}", missing_ok=True)
        if response.status_code == 404:  # a Cloud that does not know it yet
            return None
        entry = self._json(response).get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def download(self, item: dict[str, Any]) -> tuple[bytes, str | None]:
        """An output file's bytes and content type (``GET /view``)."""
        query = {k: str(item.get(k) or "") for k in ("filename", "subfolder", "type")}
        try:
            with self.http.stream("GET", "/view", params=query, headers=self.headers) as r:
                _check(r, read=True)
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > MAX_OUTPUT_BYTES:
                        raise CloudRefused(f"output {query['filename']} is over {size} bytes")
                    chunks.append(chunk)
                kind = r.headers.get("content-type", "").split(";")[0].strip() or None
        except httpx.TransportError as exc:
            raise CloudUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return b"".join(chunks), kind

    def _call(self, method: str, path: str, missing_ok: bool = False,
              **kwargs: Any) -> httpx.Response:  # fmt: skip
        try:
            response = self.http.request(method, path, headers=self.headers, **kwargs)
        except httpx.TransportError as exc:
            raise CloudUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if not (missing_ok and response.status_code == 404):
            _check(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            value = response.json()
        except ValueError:
            raise CloudUnavailable("the Cloud answered something that is not JSON") from None
        if not isinstance(value, dict):
            raise CloudUnavailable("the Cloud answered JSON that is not an object")
        return value


def _check(response: httpx.Response, read: bool = False) -> None:
    """Raise for an answer that is not a success."""
    if response.is_success:
        return
    if read:
        response.read()
    where = f"{response.request.method} {response.request.url.path}"
    if response.status_code >= 500 or response.status_code in _TRANSIENT:
        raise CloudUnavailable(f"{where}: HTTP {response.status_code}")
    raise CloudRefused(f"{where}: HTTP {response.status_code}: {_reason(response)}")


def _reason(response: httpx.Response) -> str:
    """The reason of ComfyUI's error body: ``{"error": {"message", "details"} or text,
    "node_errors": {node: {"errors": [{"message", "details"}]}}}``."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)[:500]
    error = body.get("error")
    parts = [_message(error) if isinstance(error, dict) else str(error or "")]
    for node, found in (body.get("node_errors") or {}).items():
        for e in found.get("errors", []) if isinstance(found, dict) else []:
            parts.append(f"node {node}: {_message(e)}")
    return "; ".join(p for p in parts if p)[:1000] or response.reason_phrase


def _message(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    message, details = str(error.get("message") or ""), str(error.get("details") or "")
    return f"{message}: {details}" if details and details != message else message


def finished(entry: dict[str, Any]) -> bool:
    """Whether a history entry is final, raising :class:`CloudRefused` for an error status."""
    status = entry.get("status")
    if not isinstance(status, dict):  # older ComfyUI: an entry appears once it ran
        return bool(entry.get("outputs"))
    if status.get("status_str") == "error":
        raise CloudRefused(_execution_error(status.get("messages") or []))
    return bool(status.get("completed"))


def _execution_error(messages: list[Any]) -> str:
    for m in messages:
        if isinstance(m, list | tuple) and len(m) == 2 and m[0] == "execution_error":
            data = m[1] if isinstance(m[1], dict) else {}
            node = f"node {data.get('node_id')} ({data.get('node_type')}): "
            return node + str(data.get("exception_message") or "execution error")
    return "the Cloud reported an execution error"


class CloudRunner:
    """The background thread that submits queued Cloud runs and polls the running ones, on
    :attr:`ServerState.cloud_wake` and every ``poll_s``."""

    def __init__(self, state: ServerState, base_url: str, poll_s: float = 1.0) -> None:
        self.state = state
        self.poll_s = poll_s
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=_TIMEOUT)
        self.client_id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Per task: when to contact the Cloud next (monotonic) and the failures in a row.
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        #: The claims of this runner not yet acknowledged by the Cloud.
        self._mine: set[str] = set()

    def start(self) -> None:
        """Start the thread; it first resumes the runs a previous process left running."""
        self._thread = threading.Thread(target=self._loop, name="cloud-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after its current request) and close the HTTP client."""
        self._stop.set()
        self.state.cloud_wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.http.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.state.cloud_wake.clear()
            try:
                self.run_once()
            except Exception:  # the thread must outlive a failed round (e.g. a busy database)
                log.exception("Cloud round failed")
            self.state.cloud_wake.wait(self.poll_s)

    def run_once(self) -> None:
        """Submit the queued Cloud runs and poll the running ones that are due."""
        t = db.tasks
        rows: list[Any] = []
        with self.state.database.read() as conn:
            for status in ("running", "queued"):  # running ones first: they are further along
                rows += conn.execute(
                    select(t).where(t.c.status == status, t.c.dispatch_target == "comfy_cloud")
                    .order_by(t.c.id).limit(BATCH)
                ).all()  # fmt: skip
        live = {r.id for r in rows}
        for forget in (self._due, self._failures):
            for task_id in [k for k in forget if k not in live]:
                del forget[task_id]
        self._mine &= live
        for row in rows:
            if self._stop.is_set():
                return
            if self._due.get(row.id, 0.0) > time.monotonic():
                continue
            try:
                self._step(row)
                self._failures.pop(row.id, None)
            except CloudUnavailable as exc:
                self._later(row, str(exc))
            except CloudRefused as exc:
                self._end(row, "failed", f"failed: ComfyUI Cloud: {exc}")

    def _step(self, row: Any) -> None:
        """Advance one run: claim and submit it, or poll it, or end it."""
        if row.status == "running" and row.cancel_requested:
            self._end(row, "cancelled", "cancelled by the client")
            return
        key = get_key(self.state.database, row.team_id)
        if key is None:
            raise CloudRefused("the team has no ComfyUI Cloud API key configured")
        client = ComfyClient(self.http, key)
        if row.status == "queued" or row.dispatched_at is None:
            claimed = self._claim(row)
            if claimed is None:
                return
            try:
                self._submit(claimed, client)
            except CloudRefused as exc:
                self._end(claimed, "failed", f"failed: ComfyUI Cloud: {exc}")
            return
        entry = client.history(row.cloud_prompt_id)
        if entry is None or not finished(entry):
            self._due[row.id] = time.monotonic() + self.poll_s
            return
        outputs = self._store(row, client, entry.get("outputs") or {})
        self._end(row, "completed", "completed on ComfyUI Cloud", outputs)

    def _claim(self, row: Any) -> Any | None:
        """Own the submission of ``row``: a queued run, this runner's own unacknowledged claim
        (the lease renewed), or another's whose lease ran out; ``None`` when it is not ours."""
        t = db.tasks
        now = self.state.clock()
        if row.status == "queued":
            where = t.c.status == "queued"
            values = {"cloud_prompt_id": str(uuid.uuid4()), "attempt": 1}
        elif row.id in self._mine or row.updated_at < now - SUBMIT_LEASE_S:
            where = (
                (t.c.status == "running")
                & t.c.dispatched_at.is_(None)
                & (t.c.cloud_prompt_id == row.cloud_prompt_id)
                & (t.c.updated_at == row.updated_at)
            )
            values = {}
        else:
            return None  # another runner is submitting it
        explain = "submitting to ComfyUI Cloud"
        with self.state.database.begin() as conn:
            claimed = conn.execute(
                update(t).where(t.c.id == row.id, where)
                .values(status="running", updated_at=now, explain=explain, **values)
            ).rowcount  # fmt: skip
            if claimed:
                fresh = conn.execute(select(t).where(t.c.id == row.id)).one()
                if row.status == "queued":
                    detail = f"claimed for ComfyUI Cloud prompt {fresh.cloud_prompt_id}"
                    tasks._event(conn, row.id, "running", None, now, detail)
        if not claimed:
            self._mine.discard(row.id)
            return None
        self._mine.add(row.id)
        return fresh

    def _submit(self, row: Any, client: ComfyClient) -> None:
        graph = build_graph(self._workflow(row), row.parameters)
        prompt_id = client.submit(graph, row.cloud_prompt_id, self.client_id)
        t, now = db.tasks, self.state.clock()
        explain = f"accepted by ComfyUI Cloud as prompt {prompt_id}; polling"
        with self.state.database.begin() as conn:
            done = conn.execute(
                update(t)
                .where(t.c.id == row.id, t.c.status == "running",
                       t.c.cloud_prompt_id == row.cloud_prompt_id, t.c.dispatched_at.is_(None))
                .values(cloud_prompt_id=prompt_id, dispatched_at=now, updated_at=now,
                        explain=explain)
            ).rowcount  # fmt: skip
            if done:
                tasks._event(conn, row.id, "running", None, now, explain)
        self._mine.discard(row.id)

    def _workflow(self, row: Any) -> Workflow:
        """The version of the workflow the run was validated against."""
        wv = db.workflow_versions
        with self.state.database.read() as conn:
            definition = conn.execute(
                select(wv.c.definition)
                .where(wv.c.workflow_id == row.workflow_id, wv.c.version == row.workflow_version)
            ).scalar()  # fmt: skip
        if definition is None:
            raise CloudRefused(f"workflow {row.workflow_id} version {row.workflow_version} is gone")
        return Workflow.model_validate(definition)

    def _store(self, row: Any, client: ComfyClient, found: dict[str, Any]) -> dict[str, Any]:
        """Put every output file of a history entry's ``outputs`` into the file store; returns
        the task's outputs: each kind (``images``, ...) with its file keys, other values as
        the Cloud gave them, and ``cloud_prompt_id``."""
        outputs: dict[str, Any] = {}
        used: set[str] = set()
        for node, produced in found.items():
            for kind, items in (produced if isinstance(produced, dict) else {}).items():
                for item in items if isinstance(items, list) else [items]:
                    if not (isinstance(item, dict) and isinstance(item.get("filename"), str)):
                        outputs.setdefault(kind, []).append(item)
                        continue
                    name = _file_name(item["filename"])
                    if name in used:
                        name = _file_name(f"{node}-{len(used)}-{name}")
                    used.add(name)
                    data, content_type = client.download(item)
                    content_type = content_type or mimetypes.guess_type(name)[0]
                    content_type = content_type or "application/octet-stream"
                    key = f"outputs/{row.team_id}/{row.id}/{name}"
                    self.state.files.put(key, data, team_id=row.team_id,
                                         content_type=content_type)  # fmt: skip
                    storage.record_upload(self.state.database, key, row.team_id, content_type,
                                          len(data))  # fmt: skip
                    outputs.setdefault(kind, []).append(key)
        outputs["cloud_prompt_id"] = row.cloud_prompt_id
        return outputs

    def _later(self, row: Any, reason: str) -> None:
        """Back off a run whose Cloud could not be reached; its explanation says why."""
        n = self._failures[row.id] = self._failures.get(row.id, 0) + 1
        wait = min(MAX_BACKOFF_S, max(self.poll_s, 0.05) * 2 ** min(n, 16))
        self._due[row.id] = time.monotonic() + wait
        if n == 1:
            log.warning("ComfyUI Cloud unavailable for task %s: %s", row.id, reason)
        explain = f"ComfyUI Cloud unavailable ({reason}); try {n + 1} in {wait:.1f} s"
        t = db.tasks
        with self.state.database.begin() as conn:
            conn.execute(
                update(t).where(t.c.id == row.id, t.c.status == "running").values(explain=explain)
            )

    def _end(self, row: Any, status: str, explain: str,
             outputs: dict[str, Any] | None = None) -> None:  # fmt: skip
        """End a run that this runner claimed or polled, once (conditional on its prompt)."""
        t, now = db.tasks, self.state.clock()
        ended = {"attempt": 1, "agent_id": None, "outcome": status, "at": now}
        with self.state.database.begin() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == row.id, t.c.status.in_(("queued", "running")),
                       t.c.cloud_prompt_id == row.cloud_prompt_id)  # None: IS NULL
                .values(status=status, explain=explain, outputs=outputs, updated_at=now,
                        history=[*(row.history or ()), ended])
            ).rowcount  # fmt: skip
            if changed:
                detail = f"ComfyUI Cloud prompt {row.cloud_prompt_id}: {explain}"
                tasks._event(conn, row.id, status, None, now, detail[:2000])
        self._mine.discard(row.id)
        self._due.pop(row.id, None)


def _file_name(name: str) -> str:
    """An output's name as the last part of its key: a plain file name, or the task fails."""
    try:
        return storage.check_file_name(name.rsplit("/", 1)[-1])
    except ApiError:
        raise CloudRefused(f"the Cloud named an output {name[:200]!r}") from None
