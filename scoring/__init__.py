"""Dispatch scoring engine: decides, in microseconds, which GPU agent runs each task."""

from scoring.decision import Decision, RankedAgent
from scoring.fleet import Fleet
from scoring.models import Agent, AgentStatus, DispatchRequest, ScoringPolicy
from scoring.pick import pick_agent, rank_agents

__all__ = [
    "Agent",
    "AgentStatus",
    "Decision",
    "DispatchRequest",
    "Fleet",
    "RankedAgent",
    "ScoringPolicy",
    "pick_agent",
    "rank_agents",
]
