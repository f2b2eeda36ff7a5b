"""The README's curl example, run as written against a real server with fake agents."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

from scoring.server.agent import FakeAgent

from .conftest import ROOT, ServerProcess


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    start = after.index("```bash\n") + len("```bash\n")
    return after[start : after.index("```", start)]


def test_readme_curl_example_runs_to_completion(server: ServerProcess, tmp_path: Path) -> None:
    script = readme_block("### The platform's example with curl")
    agents = [FakeAgent(server.url, key, agent_id, task_seconds=0.5)
              for agent_id, key in server.demo["agent_keys"].items()]  # fmt: skip
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop, 0.2)) for a in agents]
    for t in threads:
        t.start()
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env={**os.environ, "DEMO": str(server.demo_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
        for a in agents:
            a.close()
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    uploaded, accepted, *polls, result = lines
    assert uploaded["file_key"].endswith("/photo.png") and uploaded["size"] == 8
    task_id = accepted["task_id"]
    assert polls[-1]["task_status"] == "completed" and polls[-1]["task_id"] == task_id
    assert result["task_id"] == task_id and result["outputs"]["images"]
    assert sum(len(a.completed) for a in agents) == 1


def test_readme_admin_example_runs_against_a_running_server(
    server: ServerProcess, tmp_path: Path
) -> None:
    import sys

    import httpx

    script = readme_block("### Configuration, administration, metrics")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PY": sys.executable, "DB": server.database, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    agent_key = next(line for line in lines if line.startswith("dk-"))
    beat = {"status": "idle", "gpu_capacity": 1, "running_count": 0, "labels": ["gpu"]}
    r = httpx.post(f"{server.url}/agents/heartbeat", json=beat,
                   headers={"Authorization": f"Bearer {agent_key}"})  # fmt: skip
    assert r.status_code == 200, r.text
    team_key = json.loads((tmp_path / "team-key.json").read_text())["key"]
    r = httpx.get(f"{server.url}/r/workflows/slug/upscale",
                  headers={"Authorization": f"Bearer {team_key}"})  # fmt: skip
    assert r.status_code == 401  # revoked by the block's last line
    assert '"revoked"' in done.stdout and '"gpu-acme-01"' in done.stdout
