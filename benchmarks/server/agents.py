"""Simulated agents for the server benchmark: one asyncio process, many agents.

Each agent (one slot) long-polls its heartbeat (``?wait=1``), starts what it is handed, "runs"
it for ``task_seconds`` (a sleep) and completes it, naming the attempt, as a real agent does
(DESIGN section 10.1). Runs are submitted as fast as they are accepted (16 submitters) or at a
fixed rate; the dispatch latency of a run is from just before its submit to the heartbeat answer
that hands it to its agent.

The client is aiohttp: the generator shares the machine's two cores with the server, and
httpx's async client spent about five times more CPU per request here (152 submissions per
second from 16 submitters against wrk's 800 on the same server).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

SUBMITTERS = 16


async def simulate(
    url: str, demo: dict[str, Any], seconds: float, rate: float | None, task_seconds: float = 0.05
) -> dict[str, float]:
    """Run the agents and the submitters for ``seconds`` (after one second of warm-up);
    returns accepted and completed runs per second and dispatch latency percentiles."""
    submitted_at: dict[str, float] = {}
    handed_at: dict[str, float] = {}
    completed: list[float] = []
    accepted: list[float] = []
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url + "/", connector=connector, timeout=timeout) as client:

        async def post(
            path: str, body: Any, headers: dict[str, str], params: dict[str, str] | None = None
        ) -> tuple[int, Any]:
            async with client.post(path, json=body, headers=headers, params=params) as r:
                return r.status, await r.json()

        async def agent(agent_id: str, key: str) -> None:
            auth = {"Authorization": f"Bearer {key}"}
            held: list[str] = []
            while not stop.is_set():
                report = {
                    "status": "busy" if held else "idle",
                    "gpu_capacity": 1,
                    "running_count": len(held),
                    "labels": ["gpu", "comfyui"],
                    "region": "us-east",
                    "vram_gb": 24,
                    "running": held,
                }
                try:
                    status, answer = await post("agents/heartbeat", report, auth, {"wait": "1"})
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
                    continue
                now = time.perf_counter()
                if status != 200:
                    await asyncio.sleep(0.1)
                    continue
                for task in answer["tasks"][:1]:
                    task_id, attempt = task["task_id"], task["attempt"]
                    handed_at.setdefault(task_id, now)
                    held = [task_id]
                    started, _ = await post(
                        f"agents/tasks/{task_id}/start", {"attempt": attempt}, auth
                    )
                    if started == 200:
                        await asyncio.sleep(task_seconds)
                        body = {
                            "status": "completed",
                            "outputs": {"images": ["o.png"]},
                            "attempt": attempt,
                        }
                        done, _ = await post(f"agents/tasks/{task_id}/complete", body, auth)
                        if done == 200:
                            completed.append(time.perf_counter())
                    held = []

        path = f"r/workflows/{demo['workflow_id']}/run"
        auth = {"Authorization": f"Bearer {demo['api_key']}"}

        async def submit_one() -> None:
            t0 = time.perf_counter()
            try:
                status, answer = await post(path, demo["body"], auth)
            except aiohttp.ClientError:
                return
            if status == 202:
                submitted_at[answer["task_id"]] = t0
                accepted.append(time.perf_counter())

        async def submitter() -> None:
            while not stop.is_set():
                await submit_one()

        async def paced() -> None:
            pending: set[asyncio.Task[None]] = set()
            start = time.perf_counter()
            n = 0
            while not stop.is_set():
                n += 1
                delay = start + n / rate - time.perf_counter()  # type: ignore[operator]
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(submit_one())
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)

        agents = [asyncio.create_task(agent(a, k)) for a, k in demo["agent_keys"].items()]
        await asyncio.sleep(1.5)  # every agent heartbeating
        begin = time.perf_counter()
        feeders = (
            [asyncio.create_task(paced())]
            if rate is not None
            else [asyncio.create_task(submitter()) for _ in range(SUBMITTERS)]
        )
        await asyncio.sleep(1.0 + seconds)
        stop.set()
        end = time.perf_counter()
        await asyncio.gather(*feeders, *agents, return_exceptions=True)
    window = (begin + 1.0, end)
    latencies = sorted(
        (handed_at[t] - s) * 1000
        for t, s in submitted_at.items()
        if t in handed_at and window[0] <= s <= window[1]
    )

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    inside = lambda times: sum(window[0] <= t <= window[1] for t in times) / seconds  # noqa: E731
    return {
        "accepted_per_s": inside(accepted),
        "completed_per_s": inside(completed),
        "dispatch_p50_ms": pct(0.50),
        "dispatch_p99_ms": pct(0.99),
        "handed": float(len(latencies)),
    }
