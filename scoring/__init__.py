"""Dispatch scoring engine: decides, in microseconds, which GPU agent runs each task."""

from scoring.assign import assign
from scoring.decision import Decision, RankedAgent
from scoring.files import FileInfo, FileStore, InMemoryFileStore, S3FileStore
from scoring.fleet import Fleet
from scoring.models import Agent, AgentStatus, DispatchRequest, ScoringPolicy
from scoring.pick import pick_agent, rank_agents
from scoring.run import (
    DispatchedRun,
    ErrorCode,
    RunError,
    RunRequest,
    RunValidationError,
    ValidatedRun,
    dispatch_run,
    validate_run,
)
from scoring.workflow import ParameterDef, Workflow

__all__ = [
    "Agent",
    "AgentStatus",
    "Decision",
    "DispatchRequest",
    "DispatchedRun",
    "ErrorCode",
    "FileInfo",
    "FileStore",
    "Fleet",
    "InMemoryFileStore",
    "ParameterDef",
    "RankedAgent",
    "RunError",
    "RunRequest",
    "RunValidationError",
    "S3FileStore",
    "ScoringPolicy",
    "ValidatedRun",
    "Workflow",
    "assign",
    "dispatch_run",
    "pick_agent",
    "rank_agents",
    "validate_run",
]
