"""The platform's example request, from upload to result, against a real server process."""

from __future__ import annotations

import threading

from scoring.server.agent import FakeAgent

from .conftest import ServerProcess, example_body, upload, wait_for


def test_example_request_runs_on_an_agent_and_its_result_is_read(server: ServerProcess) -> None:
    demo = server.demo
    with server.client() as client:
        file_key = upload(client)
        assert file_key.startswith(f"inputs/{demo['team_id']}/") and file_key.endswith("/photo.png")
        r = client.post(f"/r/workflows/{demo['workflow_id']}/run", json=example_body(file_key))
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        assert task_id[14] == "7"  # a UUIDv7

        # No agent has reported yet: the task waits, and the status says why.
        status = client.get(f"/r/tasks/{task_id}").json()
        assert status["task_status"] == "queued"
        assert status["dispatch_target"] == "agent"
        not_ready = client.get(f"/r/tasks/{task_id}/result")
        assert not_ready.status_code == 409
        assert not_ready.json()["errors"][0]["code"] == "not_ready"

        agent = FakeAgent(server.url, demo["agent_keys"]["gpu-node-01"], "gpu-node-01",
                          task_seconds=0.2)  # fmt: skip
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop, 0.1))
        thread.start()
        try:
            wait_for(lambda: client.get(f"/r/tasks/{task_id}").json()["task_status"] == "completed")
        finally:
            stop.set()
            thread.join()
            agent.close()

        status = client.get(f"/r/tasks/{task_id}").json()
        assert status["agent_id"] == "gpu-node-01"
        assert status["explain"].startswith("gpu-node-01 (score ")
        result = client.get(f"/r/tasks/{task_id}/result")
        assert result.status_code == 200
        assert result.json() == {
            "task_id": task_id,
            "outputs": {"images": [f"outputs/{task_id}/0.png"], "agent_id": "gpu-node-01"},
        }
    assert agent.completed == [task_id] and agent.max_running == 1


def test_session_token_with_team_header_reads_the_workflow(server: ServerProcess) -> None:
    demo = server.demo
    with server.client(demo["user_token"], **{"X-Team-ID": demo["team_id"]}) as client:
        by_id = client.get(f"/r/workflows/{demo['workflow_id']}")
        by_slug = client.get("/r/workflows/slug/text-to-image")
        by_version = client.get("/r/workflows/slug/text-to-image@1")
    assert by_id.status_code == 200, by_id.text
    assert by_id.json() == by_slug.json() == by_version.json()
    workflow = by_id.json()
    assert [p["key"] for p in workflow["parameters"]] == ["prompt", "width", "sampler",
                                                          "input_image"]  # fmt: skip
    assert workflow["required_labels"] == ["gpu"] and workflow["tool_type"] == "comfyui"
