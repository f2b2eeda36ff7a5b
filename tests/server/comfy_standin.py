"""A local stand-in for ComfyUI's HTTP API, for the tests of ``comfy_cloud`` runs.

It is not ComfyUI: it follows the documented routes the server's client uses, with ComfyUI's
answer shapes, and runs nothing.

- ``POST /prompt`` ``{"prompt", "client_id", "prompt_id"?}``: 401 without the expected
  ``X-API-Key``; 400 ``{"error", "node_errors"}`` for a prompt that :attr:`ComfyStandIn.refuse`
  names; else ``{"prompt_id", "number", "node_errors": {}}`` (the client's ``prompt_id`` if it
  sent one, as ComfyUI does).
- ``GET /history/{prompt_id}``: ``{}`` until :attr:`ComfyStandIn.delay` seconds after the prompt
  was accepted, then ``{prompt_id: {"prompt", "outputs": {"9": {"images": [{"filename",
  "subfolder", "type"}]}}, "status": {"status_str", "completed", "messages"}}}``; a prompt whose
  graph holds the text :attr:`ComfyStandIn.crash` ends with an ``execution_error`` instead.
- ``GET /view?filename=&subfolder=&type=``: the image's PNG bytes (:meth:`ComfyStandIn.image`).

:meth:`ComfyStandIn.fail_next` answers the next requests with an error status (a 5xx Cloud);
:meth:`stop` and :meth:`start` take it off the network and bring it back on the same port.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PNG_SIGNATURE = bytes.fromhex("89504e470d0a1a0a")


@dataclass
class Prompt:
    """A prompt the stand-in accepted."""

    prompt_id: str
    number: int
    graph: dict[str, Any]
    client_id: str | None
    api_key: str | None
    accepted_at: float


@dataclass
class ComfyStandIn:
    """The stand-in server on 127.0.0.1 (``port`` 0: any free port); :attr:`url` is its base."""

    api_key: str
    delay: float = 0.5
    port: int = 0
    #: A prompt holding this text in any input is refused at ``POST /prompt`` (400).
    refuse: str = "REFUSE-ME"
    #: A prompt holding this text in any input fails while "running" (history status error).
    crash: str = "CRASH-ME"
    #: Every ``POST /prompt`` received (also the refused ones): its headers and JSON body.
    posts: list[dict[str, Any]] = field(default_factory=list)
    prompts: dict[str, Prompt] = field(default_factory=dict)
    #: Every request received: (method, path).
    requests: list[tuple[str, str]] = field(default_factory=list)
    _failing: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ComfyStandIn:
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests with ``status`` and an error body."""
        with self._lock:
            self._failing.extend([status] * n)

    @staticmethod
    def image(prompt_id: str) -> bytes:
        """The bytes of the image a prompt produces: a PNG signature and the prompt's id."""
        return PNG_SIGNATURE + f"stand-in output of {prompt_id}".encode()

    # --- what the handler calls ---------------------------------------------------------------

    def answer(self, method: str, url: str, headers: dict[str, str], body: bytes) -> Any:
        """``(status, content type, bytes)`` for one request."""
        parts = urlsplit(url)
        with self._lock:
            self.requests.append((method, parts.path))
            if self._failing:
                return _json(self._failing.pop(0), {"error": "stand-in told to fail"})
        if headers.get("x-api-key") != self.api_key:
            return _json(
                401,
                {
                    "error": {
                        "type": "unauthorized",
                        "message": "bad API key",
                        "details": "",
                        "extra_info": {},
                    }
                },
            )
        if method == "POST" and parts.path == "/prompt":
            return self._post_prompt(headers, body)
        if method == "GET" and parts.path.startswith("/history/"):
            return _json(200, self._history(parts.path.removeprefix("/history/")))
        if method == "GET" and parts.path == "/view":
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            return self._view(query)
        return _json(404, {"error": "no such route"})

    def _post_prompt(self, headers: dict[str, str], body: bytes) -> Any:
        data = json.loads(body)
        with self._lock:
            self.posts.append({"headers": headers, "body": data})
        graph = data.get("prompt")
        if not isinstance(graph, dict):
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return _json(400, {"error": error, "node_errors": {}})
        for node, found in graph.items():
            for name, value in found.get("inputs", {}).items():
                if isinstance(value, str) and self.refuse in value:
                    error = {
                        "type": "prompt_outputs_failed_validation",
                        "message": "Prompt outputs failed validation",
                        "details": "",
                        "extra_info": {},
                    }
                    problem = {
                        "type": "value_not_allowed",
                        "message": "Value not allowed",
                        "details": f"{name}: {value!r} is refused",
                        "extra_info": {},
                    }
                    node_errors = {node: {"errors": [problem], "class_type": "Stand-in"}}
                    return _json(400, {"error": error, "node_errors": node_errors})
        with self._lock:
            prompt_id = str(data.get("prompt_id") or uuid.uuid4())
            number = len(self.prompts)
            self.prompts[prompt_id] = Prompt(
                prompt_id,
                number,
                graph,
                data.get("client_id"),
                headers.get("x-api-key"),
                time.monotonic(),
            )
        return _json(200, {"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def _history(self, prompt_id: str) -> dict[str, Any]:
        with self._lock:
            prompt = self.prompts.get(prompt_id)
        if prompt is None or time.monotonic() < prompt.accepted_at + self.delay:
            return {}
        crashed = any(
            isinstance(v, str) and self.crash in v
            for node in prompt.graph.values()
            for v in node.get("inputs", {}).values()
        )
        entry: dict[str, Any] = {"prompt": [prompt.number, prompt_id, prompt.graph, {}, ["9"]]}
        if crashed:
            error = {
                "prompt_id": prompt_id,
                "node_id": "6",
                "node_type": "CLIPTextEncode",
                "exception_message": "stand-in out of memory",
                "exception_type": "torch.OutOfMemoryError",
                "traceback": [],
            }
            entry["outputs"] = {}
            entry["status"] = {
                "status_str": "error",
                "completed": False,
                "messages": [
                    ["execution_start", {"prompt_id": prompt_id}],
                    ["execution_error", error],
                ],
            }
        else:
            image = {
                "filename": f"ComfyUI_{prompt.number:05d}_.png",
                "subfolder": "",
                "type": "output",
            }
            entry["outputs"] = {"9": {"images": [image]}}
            entry["status"] = {
                "status_str": "success",
                "completed": True,
                "messages": [["execution_success", {"prompt_id": prompt_id}]],
            }
        return {prompt_id: entry}

    def _view(self, query: dict[str, str]) -> Any:
        with self._lock:
            found = [
                p
                for p in self.prompts.values()
                if query.get("filename") == f"ComfyUI_{p.number:05d}_.png"
            ]
        if not found or query.get("type") != "output" or query.get("subfolder", "") != "":
            return _json(404, {"error": "no such file"})
        return 200, "image/png", self.image(found[0].prompt_id)


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    standin: ComfyStandIn

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, content_type, data = self.standin.answer(self.command, self.path, headers, body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read :attr:`ComfyStandIn.requests` instead."""
