"""Dispatch scoring engine: decides, in microseconds, which GPU agent runs each task."""

from scoring.models import Agent, AgentStatus, DispatchRequest, ScoringPolicy

__all__ = ["Agent", "AgentStatus", "DispatchRequest", "ScoringPolicy"]
