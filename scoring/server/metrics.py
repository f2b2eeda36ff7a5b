"""``GET /metrics``: the server's Prometheus metrics (DESIGN section 10.4).

Each application has its own registry, so several apps in one process (tests, replicas) never
share counters. What the server already counts is read when scraped: the dispatcher's counters
(placements, lost races), the queue by team (one ``GROUP BY`` on the database) and the Fleet by
status. The rest is counted where it happens, by one call each: :meth:`Metrics.decided` (each
dispatch round's deferrals and cold placements), :meth:`Metrics.requeued` (a task queued again,
by cause), ``round_seconds`` and the request timer (:class:`RequestTimer`).

A dashboard of these for Grafana: ``deploy/grafana/scoring.json``.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from scoring import AgentStatus, Decision, DispatchRequest, Fleet, ScoringPolicy
from scoring.server import db

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Why a task went back to the queue: its agent stopped sending heartbeats, its agent's
#: heartbeats stopped listing it, it was not started within the start timeout, or its attempt
#: failed (and attempts are left).
Cause = Literal["agent_lost", "not_listed", "start_timeout", "failure"]
CAUSES: tuple[Cause, ...] = ("agent_lost", "not_listed", "start_timeout", "failure")
#: The dispatcher's counters (``Dispatcher.stats``) exported, with their help text.
DISPATCH_COUNTERS = {
    "placements": "Runs placed on an agent (committed dispatches)",
    "lost_races": "Placements another replica took the agent's last slot for",
    "rounds": "Dispatch rounds that found queued runs",
}
#: Dispatch rounds take milliseconds; a slow database can make them take seconds.
ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The metrics of one application, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "scoring_request_seconds", "API request latency by route template",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.round_seconds = Histogram(
            "scoring_dispatch_round_seconds", "Duration of a dispatch round",
            buckets=ROUND_BUCKETS, registry=r,
        )  # fmt: skip
        self.deferrals = Counter(
            "scoring_deferrals", "Dispatch decisions that held a run back for a warm agent",
            registry=r,
        )  # fmt: skip
        self.cold_placements = Counter(
            "scoring_cold_placements",
            "Placements on an agent without every model the run needs", registry=r,
        )  # fmt: skip
        self.requeues = Counter(
            "scoring_requeues", "Tasks queued again, by cause", ["cause"], registry=r
        )
        for cause in CAUSES:  # each series exists from the start, at 0
            self.requeues.labels(cause)

    def decided(
        self,
        requests: Sequence[DispatchRequest],
        decisions: Sequence[Decision],
        lost: Collection[int] = (),
    ) -> None:
        """Count a dispatch attempt's deferrals and cold placements; ``lost`` holds the
        positions of placements the database refused (not counted)."""
        deferred = cold = 0
        for i, (request, d) in enumerate(zip(requests, decisions, strict=True)):
            deferred += d.deferred
            if d.agent_id is not None and request.required_models and i not in lost:
                cold += d.factors["warm"] < 1.0  # the share of its models cached there
        self.deferrals.inc(deferred)
        self.cold_placements.inc(cold)

    def requeued(self, cause: Cause, n: int = 1) -> None:
        """``n`` tasks went back to the queue because of ``cause``."""
        if n:
            self.requeues.labels(cause).inc(n)

    def scrape(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class Served(Protocol):
    """What the metrics read of a :class:`~scoring.server.state.ServerState` (which holds the
    :class:`Metrics`, so this module cannot import it)."""

    database: db.Database
    fleet: Fleet
    policy: ScoringPolicy
    metrics: Metrics


class _Scraped(Collector):
    """What the server already knows, read at each scrape."""

    def __init__(self, state: Served, stats: Mapping[str, int]) -> None:
        self.state, self.stats = state, stats

    def collect(self) -> Iterator[Metric]:
        for name, text in DISPATCH_COUNTERS.items():
            yield CounterMetricFamily(f"scoring_{name}", text, value=self.stats.get(name, 0))
        queued = GaugeMetricFamily("scoring_queued_runs", "Runs waiting to be placed, by team",
                                   labels=["team"])  # fmt: skip
        t = db.tasks
        with self.state.database.read() as conn:
            rows = conn.execute(
                select(t.c.team_id, func.count()).where(t.c.status == "queued")
                .group_by(t.c.team_id)
            ).all()  # fmt: skip
        for team, n in rows:
            queued.add_metric([team], n)
        yield queued
        agents = GaugeMetricFamily(
            "scoring_agents", "Agents in the Fleet by status (stale: no heartbeat within the "
            "timeout, whatever it last reported)", labels=["status"],
        )  # fmt: skip
        for status, n in fleet_by_status(self.state, time.time()).items():
            agents.add_metric([status], n)
        yield agents


def fleet_by_status(state: Served, now: float) -> dict[str, int]:
    """How many agents of the Fleet report each status, the stale ones apart."""
    fleet = state.fleet
    with fleet.lock:
        columns = fleet.columns
        codes, beats = np.array(columns.status), np.array(columns.last_heartbeat)
    stale = beats < now - state.policy.heartbeat_timeout_s
    counts = np.bincount(codes[~stale].astype(np.intp), minlength=len(AgentStatus))
    by_status = {s.value: int(n) for s, n in zip(AgentStatus, counts, strict=True)}
    return {**by_status, "stale": int(stale.sum())}


class RequestTimer:
    """ASGI middleware: each request's latency under its route's template
    (``/api/v1/r/tasks/{taskId}``, never the raw path; ``unmatched`` for a 404 of no route)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_seconds.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - start
            )


def install(app: FastAPI, state: Served, stats: Mapping[str, int]) -> None:
    """Serve ``GET /metrics`` on ``app``, time its requests, and export ``stats`` (the
    dispatcher's counters) with what ``state`` holds."""
    from fastapi import Response

    metrics = state.metrics
    metrics.registry.register(_Scraped(state, stats))
    app.add_middleware(RequestTimer, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        return Response(metrics.scrape(), media_type="text/plain; version=0.0.4; charset=utf-8")
