"""Schemathesis against the served OpenAPI schema: no 5xx, no answer outside the schema.

Every operation gets up to ``SCORING_FUZZ_EXAMPLES`` generated requests (30 in CI; ``make
fuzz`` runs 300) with the credentials its routes expect (a team key on ``/r/...``, an agent key
on ``/agents/...``); run requests go to the demo workflow so the body validation itself is
exercised. Then the stateful phase: Schemathesis' state machine chains operations through the
links it infers (a presign's ``upload_url`` to the upload, a run's ``task_id`` to the task's
routes), as many scenarios as examples. Checked: no server error, only declared status codes
and content types, and every body matching its declared schema.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import ServerProcess

EXAMPLES = int(os.environ.get("SCORING_FUZZ_EXAMPLES", "30"))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A 2 s heartbeat timeout caps a long-polled heartbeat's wait at 1 s (the generated
    # ``wait`` goes up to 30 s, longer than the client's read timeout; tests/server/
    # test_longpoll.py covers long waits).
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz"), "--heartbeat-timeout", "2")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess) -> Any:
    root = fuzz_server.url.removesuffix("/api/v1")
    return schemathesis.openapi.from_url(f"{root}/openapi.json")


# (schemathesis' own pytest plugin does not run under this pytest version, so each operation's
# cases are drawn here with Hypothesis from the operation's strategy.)
OPERATIONS = [
    ("POST", "/api/v1/r/workflows/{workflowId}/run"),
    ("GET", "/api/v1/r/workflows/slug/{slug}"),
    ("GET", "/api/v1/r/workflows/{workflowId}"),
    ("POST", "/api/v1/r/files/presign"),
    ("PUT", "/api/v1/uploads/{token}"),
    ("GET", "/api/v1/r/tasks/{taskId}"),
    ("GET", "/api/v1/r/tasks/{taskId}/result"),
    ("POST", "/api/v1/r/tasks/{taskId}/cancel"),
    ("POST", "/api/v1/agents/heartbeat"),
    ("POST", "/api/v1/agents/tasks/{taskId}/start"),
    ("POST", "/api/v1/agents/tasks/{taskId}/complete"),
    ("GET", "/api/v1/health"),
]


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_api_conforms_to_its_schema(
    api_schema: Any, fuzz_server: ServerProcess, method: str, path: str
) -> None:
    demo = fuzz_server.demo
    headers = credentials(fuzz_server, path)
    operation = api_schema[path][method]

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)  # fmt: skip
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        if path == "/api/v1/r/workflows/{workflowId}/run":
            case.path_parameters = {"workflowId": demo["workflow_id"]}
        case.call_and_validate(headers={**(case.headers or {}), **headers}, checks=CHECKS)

    check()


def credentials(server: ServerProcess, path: str) -> dict[str, str]:
    """The Authorization header the routes of ``path`` take (none for uploads and health)."""
    if path.startswith("/api/v1/r/"):
        return {"Authorization": f"Bearer {server.demo['api_key']}"}
    if path.startswith("/api/v1/agents/"):
        return {"Authorization": f"Bearer {server.demo['agent_keys']['gpu-node-01']}"}
    return {}


def test_stateful_sequences_conform(api_schema: Any, fuzz_server: ServerProcess) -> None:
    base = api_schema.as_state_machine()

    class Scenarios(base):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": {**(case.headers or {}), **credentials(fuzz_server, case.path)}}

        def validate_response(self, response: Any, case: Any, *_: Any, **__: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    Scenarios.run(settings=settings(max_examples=EXAMPLES, deadline=None, database=None,
                                    suppress_health_check=list(HealthCheck),
                                    stateful_step_count=10))  # fmt: skip
