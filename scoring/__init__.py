"""Dispatch scoring engine: decides, in microseconds, which GPU agent runs each task."""

from scoring.assign import assign
from scoring.contract import (
    DispatchedRun,
    ErrorCode,
    FileInfo,
    FileStore,
    InMemoryFileStore,
    ParameterDef,
    RunError,
    RunRequest,
    RunValidationError,
    S3FileStore,
    ValidatedRun,
    Workflow,
    dispatch_run,
    validate_run,
)
from scoring.decision import Decision, RankedAgent
from scoring.fleet import Fleet
from scoring.models import Agent, AgentStatus, DispatchRequest, ScoringPolicy
from scoring.pick import eligible_agents, evaluate, pick_agent, rank_agents

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
    "eligible_agents",
    "evaluate",
    "pick_agent",
    "rank_agents",
    "validate_run",
]
