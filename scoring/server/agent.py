"""A fake agent: ``python -m scoring.server.agent --demo PATH``.

It does what a real agent does over HTTP: heartbeats with its state and the tasks it holds
(``running``), takes the tasks dispatched to it, starts each attempt, "runs" it for its
simulated time (a sleep), and reports it completed, naming the attempt (DESIGN section 10.1).
Tasks the server answers in ``cancel``, or refuses as a stale attempt (409), are dropped.
Connection failures (a restarting server) are retried; completions are retried until the server
acknowledges them, which the server makes safe (a repeated completion counts once). With
``retry_start=False`` a start whose answer was lost is dropped instead of asked again (an agent
less careful than this one): the server's reconciliation must then recover the task.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("scoring.server.agent")


@dataclass
class FakeAgent:
    """One simulated agent; call :meth:`step` in a loop (or :meth:`run`)."""

    base_url: str
    key: str
    agent_id: str
    capacity: int = 2
    task_seconds: float = 2.0
    labels: tuple[str, ...] = ("gpu", "comfyui")
    region: str = "us-east"
    fail_every: int = 0  # fail every n-th task (0: never), to exercise retries
    timeout: float = 10.0
    #: Ask again for a start whose answer was lost (False: drop the task, see the docstring).
    retry_start: bool = True
    #: Other URLs of the same service (replicas): an unreachable one is left for the next, as a
    #: load balancer would.
    fallback_urls: tuple[str, ...] = ()
    running: dict[str, float] = field(default_factory=dict)  # task id -> finish time
    to_report: dict[str, bool] = field(default_factory=dict)  # finished, not yet acknowledged
    to_start: set[str] = field(default_factory=set)  # handed out, start not acknowledged
    attempt: dict[str, int] = field(default_factory=dict)  # held task id -> its attempt
    cancelled: list[str] = field(default_factory=list)  # dropped on the server's word
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    started: int = 0
    finished: int = 0
    max_running: int = 0
    over_capacity: int = 0  # heartbeats that handed out more tasks than free slots
    errors: int = 0
    #: The call in progress (path, since when) and the last step's end, to tell a stalled
    #: agent from a slow server in a failing test's message.
    calling: tuple[str, float] | None = None
    stepped_at: float = 0.0

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=self.timeout,
        )

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    def _post(self, path: str, body: dict[str, Any], wait: float = 0.0) -> httpx.Response | None:
        self.calling = (path, time.time())
        try:
            return self._call(path, body, wait)
        finally:
            self.calling = None

    def _call(self, path: str, body: dict[str, Any], wait: float) -> httpx.Response | None:
        try:
            if wait > 0:  # a long poll: the answer may take ``wait`` seconds
                response = self.client.post(
                    path, json=body, params={"wait": f"{wait:.3f}"},
                    timeout=self.timeout + wait,
                )  # fmt: skip
            else:
                response = self.client.post(path, json=body)
        except httpx.TransportError:
            self.errors += 1
            if self.fallback_urls:
                urls = (str(self.client.base_url).rstrip("/"), *self.fallback_urls)
                self.client.base_url = httpx.URL(urls[1])
                self.fallback_urls = urls[2:] + urls[:1]
            return None
        if response.status_code >= 500:
            self.errors += 1
            return None
        return response

    def step(self, now: float | None = None, wait: float = 0.0) -> bool:
        """Report finished tasks, heartbeat, start what was handed out; returns whether the
        heartbeat was answered.

        With ``wait`` the heartbeat is a long poll (``?wait=``): it returns as soon as the
        server hands this agent a task, or after ``wait`` seconds.
        """
        now = time.time() if now is None else now
        for task_id, finish in list(self.running.items()):
            if finish <= now:
                del self.running[task_id]
                self.finished += 1
                ok = not (self.fail_every and self.finished % self.fail_every == 0)
                self.to_report[task_id] = ok
        for task_id, ok in list(self.to_report.items()):
            outputs = {"images": [f"outputs/{task_id}/0.png"], "agent_id": self.agent_id}
            body = {"status": "completed" if ok else "failed", "outputs": outputs,
                    "attempt": self.attempt[task_id]}  # fmt: skip
            response = self._post(f"/agents/tasks/{task_id}/complete", body)
            if response is None:
                continue  # server unreachable: report again next step
            del self.to_report[task_id]
            self.attempt.pop(task_id, None)
            if response.status_code == 200:
                (self.completed if ok else self.failed).append(task_id)
        heartbeat = {
            "status": "busy" if self.running else "idle",
            "gpu_capacity": self.capacity,
            "running_count": self.busy_slots(),
            "labels": list(self.labels),
            "region": self.region,
            "vram_gb": 24,
            "gpu_model": "NVIDIA GeForce RTX 4090",
            "running": sorted(self.held()),
        }
        response = self._post("/agents/heartbeat", heartbeat, wait)
        if response is None or response.status_code != 200:
            return False
        answer = response.json()
        for task_id in answer.get("cancel", ()):
            self._drop(task_id)
            self.cancelled.append(task_id)
        new = []
        for task in answer["tasks"]:
            task_id, attempt = task["task_id"], task.get("attempt", 0)
            if self.attempt.get(task_id) == attempt:
                continue  # already held
            self._drop(task_id)  # a new attempt of a task this agent held replaces the old
            self.attempt[task_id] = attempt
            new.append(task_id)
        if len(new) > self.capacity - self.busy_slots():
            self.over_capacity += 1
        self.to_start.update(new)
        self.max_running = max(self.max_running, self.busy_slots())
        for task_id in sorted(self.to_start):
            body = {"attempt": self.attempt[task_id]}
            started = self._post(f"/agents/tasks/{task_id}/start", body)
            if started is None:
                if not self.retry_start:
                    self._drop(task_id)
                continue  # unknown whether it started: ask again (start is idempotent)
            self.to_start.discard(task_id)
            if started.status_code == 200:
                self.started += 1
                self.running[task_id] = time.time() + self.task_seconds
            else:
                self.attempt.pop(task_id, None)
        self.stepped_at = time.time()
        return True

    def held(self) -> set[str]:
        """The tasks this agent holds: being started, running, or finished and not yet
        acknowledged (the heartbeat's ``running``)."""
        return self.running.keys() | self.to_start | self.to_report.keys()

    def _drop(self, task_id: str) -> None:
        self.running.pop(task_id, None)
        self.to_start.discard(task_id)
        self.to_report.pop(task_id, None)
        self.attempt.pop(task_id, None)

    def busy_slots(self) -> int:
        """Slots in use: tasks running, or handed out and being started.

        A finished task whose completion is not yet acknowledged holds no slot: its GPU work is
        done. (Counting it made a completion the server committed but could not answer, as when
        a replica is killed mid-request, look like an over-filled agent once another replica
        reused the slot it had correctly freed.)
        """
        return len(self.running) + len(self.to_start)

    def run(self, stop: threading.Event, interval: float = 1.0, long_poll: bool = True) -> None:
        """Step until ``stop`` is set, at least every ``interval`` and when a task is due to
        finish. With ``long_poll`` each heartbeat waits in the server for work until then
        (``?wait=``), so a task reaches the agent as soon as it is dispatched; without, the
        agent sleeps between heartbeats (it learns of a task at its next one)."""
        while not stop.is_set():
            due = min(self.running.values(), default=time.time() + interval)
            wait = max(0.0, min(interval, due - time.time()))
            answered = self.step(wait=wait if long_poll else 0.0)
            if not answered or not long_poll:
                due = min(self.running.values(), default=time.time() + interval)
                stop.wait(max(0.0, min(interval, due - time.time())))


def main(argv: list[str] | None = None) -> int:
    """Run the demo's agents until interrupted (or until ``--tasks`` tasks completed)."""
    p = argparse.ArgumentParser(prog="python -m scoring.server.agent", description=__doc__)
    p.add_argument("--demo", required=True, help="the JSON file written by the server's --demo")
    p.add_argument("--agent", action="append", help="agent id (default: every agent of --demo)")
    p.add_argument("--capacity", type=int, default=2, help="concurrent task slots per agent")
    p.add_argument("--task-seconds", type=float, default=2.0, help="simulated run time")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--tasks", type=int, default=0, help="exit after this many completions")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    demo = json.loads(Path(a.demo).read_text())
    keys: dict[str, str] = demo["agent_keys"]
    ids = a.agent or list(keys)
    agents = [
        FakeAgent(demo["base_url"], keys[i], i, capacity=a.capacity, task_seconds=a.task_seconds)
        for i in ids
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=ag.run, args=(stop, a.interval), daemon=True)
               for ag in agents]  # fmt: skip
    for t in threads:
        t.start()
    log.info("%d agents heartbeating to %s", len(agents), demo["base_url"])
    seen: set[str] = set()
    try:
        while not stop.is_set():
            time.sleep(0.2)
            for ag in agents:
                for task_id in ag.completed[:]:
                    if task_id not in seen:
                        seen.add(task_id)
                        log.info("%s completed task %s", ag.agent_id, task_id)
            if a.tasks and len(seen) >= a.tasks:
                stop.set()
    except KeyboardInterrupt:
        stop.set()
    for t in threads:
        t.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
