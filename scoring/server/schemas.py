"""Request and answer bodies as the OpenAPI schema shows them (``/docs``).

The run and heartbeat bodies are read raw and checked by the library (``validate_run`` and the
``Agent`` record), so that every problem is reported at once in the server's error format; their
models here document the shape for clients and for the schema-driven fuzzer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Most task ids one heartbeat may list as held (``HeartbeatBody.running``).
MAX_HELD = 4096

TaskStatusName = Literal["queued", "dispatched", "running", "completed", "failed", "cancelled"]


class RunBody(BaseModel):
    """``POST /r/workflows/{workflowId}/run`` (DESIGN section 2)."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any] | None = Field(None, max_length=100)
    dispatch_target: Literal["agent", "comfy_cloud"] | None = None
    target_pool: Literal["team", "community"] | None = None
    submitter_region: str | None = Field(None, max_length=64)
    tool_type: Literal["comfyui", "nerfstudio"] | None = None


class TaskAccepted(BaseModel):
    task_id: str


class Attempt(BaseModel):
    """One dispatch of a task: ended (``outcome`` one of ``completed``, ``failed``,
    ``start_timeout``, ``agent_lost``, ``not_listed``, ``cancelled``) or current
    (``dispatched``, ``running``)."""

    attempt: int
    agent_id: str | None
    outcome: str
    at: str  # ISO 8601, UTC: when it ended, or when the current one was dispatched


class TaskStatus(BaseModel):
    task_id: str
    task_status: TaskStatusName
    agent_id: str | None
    dispatch_target: Literal["agent", "comfy_cloud"]
    created_at: str  # ISO 8601, UTC
    explain: str
    attempts: list[Attempt]
    #: A cancel was asked while the task runs: it ends at its agent's next heartbeat.
    cancel_requested: bool


class TaskResult(BaseModel):
    task_id: str
    outputs: dict[str, Any]


class PresignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A plain name: no separators or control characters, no outer spaces, at most 200 bytes
    # of UTF-8. The schema only describes it (it counts characters, and has no look-ahead for
    # "." and ".."): the server checks it (storage.check_file_name, 400 invalid_file_name).
    file_name: str = Field(
        json_schema_extra={
            "minLength": 1,
            "maxLength": 200,
            "pattern": r"^[^/\\\x00-\x20\x7f](?:[^/\\\x00-\x1f\x7f]*[^/\\\x00-\x20\x7f])?$",
        }
    )
    file_size: int = Field(ge=0, strict=True)  # strict: true is not 1
    content_type: str = Field(
        max_length=255,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$",
    )


class PresignAnswer(BaseModel):
    file_key: str
    upload_url: str


class Uploaded(BaseModel):
    file_key: str
    size: int


class HeartbeatBody(BaseModel):
    """What an agent reports; its id and team come from its key."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["idle", "busy", "syncing", "tunnel", "unhealthy"]
    gpu_capacity: int = Field(ge=1, le=65535)
    running_count: int = Field(0, ge=0, le=65535)
    labels: list[str] = Field(default_factory=list, max_length=64)
    region: str | None = Field(None, max_length=64)
    community_opt_in: bool = False
    vram_gb: float | None = Field(None, ge=0)
    gpu_model: str | None = None
    cached_models: list[str] = Field(default_factory=list, max_length=256)
    failure_rate: float = Field(0.0, ge=0, le=1)
    #: The task ids the agent holds (started or being started, or finished and not yet
    #: acknowledged). Omitted: not reconciled by list (older agents).
    running: list[str] | None = Field(None, max_length=MAX_HELD)


class AgentTask(BaseModel):
    task_id: str
    workflow_id: str
    parameters: dict[str, Any]
    tool_type: Literal["comfyui", "nerfstudio"]
    attempt: int


class HeartbeatAnswer(BaseModel):
    tasks: list[AgentTask]
    #: Listed task ids the agent must stop and drop (cancelled, or no longer its attempt).
    cancel: list[str]


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The attempt being started (omitted: the current one).
    attempt: int | None = Field(None, ge=1)


class CompleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["completed", "failed"]
    outputs: dict[str, Any] | None = None
    #: The attempt that finished (omitted: the current one).
    attempt: int | None = Field(None, ge=1)


class TaskAck(BaseModel):
    task_id: str
    task_status: TaskStatusName


class ParameterOut(BaseModel):
    key: str
    type: Literal["string", "number", "boolean", "select", "file"]
    label: str
    description: str
    required: bool
    default: Any = None
    min: float | None = None
    max: float | None = None
    options: list[str] | None = None
    accept: list[str] | None = None
    node_id: str | None = None
    field: str | None = None


class WorkflowOut(BaseModel):
    id: str
    slug: str
    version: int
    team_id: str
    tool_type: Literal["comfyui", "nerfstudio"]
    status: Literal["active", "disabled"]
    default_dispatch_target: Literal["agent", "comfy_cloud"] | None
    required_labels: list[str]
    parameters: list[ParameterOut]


class Health(BaseModel):
    status: Literal["ok"]
