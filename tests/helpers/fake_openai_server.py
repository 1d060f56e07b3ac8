"""A small OpenAI-compatible server on 127.0.0.1 for tests: the real `openai` client talks to it.

It answers `POST /v1/embeddings` like the real API (float or base64 encoding, `index` per item, usage), with
deterministic vectors derived from each input's SHA-256, and `POST /v1/chat/completions` with one assistant
message: `chat_reply` (a string, or a function of the request's messages; by default `fake_chat_reply`) and
`chat_finish_reason`. It can inject faults, one per incoming request of either kind, from a script: "429"
(rate limit with Retry-After: 0), "500", "503", "401", "404", "timeout" (answers only after the client gave up),
"html" (200 with a web page, as a server answers a base URL that misses its /v1), "null" (200 with the JSON `null`),
"ragged" (embeddings: the last vector one value short) or "ok". It records every request it received and every input it answered successfully. With `jitter` set, each
embeddings answer adds `jitter` times a normal draw seeded by the answer's number (counted in `jitter_calls`; set it
back to 0 to replay a series), as the real API's vectors differ a little from call to call.

Run standalone (`python tests/fake_openai_server.py PORT_FILE [DIM]`) it serves until killed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def fake_vector(text: str, dim: int) -> np.ndarray:
    """A deterministic unit vector for `text` (what the server returns for it)."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def fake_chat_reply(messages: list[dict]) -> str:
    """The default chat answer: a JSON findings list that depends only on the last user message."""
    digest = hashlib.sha256(messages[-1]["content"].encode("utf-8")).hexdigest()[:8]
    return json.dumps({"findings": [f"Finding one {digest}", f"Finding two {digest}"]})


class FakeOpenAIServer:
    def __init__(self, dim: int = 16, faults: list[str] | None = None, timeout_delay_s: float = 1.0,
                 chat_reply: str | Callable[[list[dict]], str | None] | None = None) -> None:
        self.dim = dim
        self.faults = list(faults or [])
        self.timeout_delay_s = timeout_delay_s
        self.chat_reply = chat_reply if chat_reply is not None else fake_chat_reply
        self.chat_finish_reason = "stop"
        self.received: list[list[str]] = []  # embeddings: inputs of every request, faulty or not
        self.answered: list[list[str]] = []  # embeddings: inputs of every request answered with embeddings
        self.chat_received: list[dict] = []  # chat: the body of every request, faulty or not
        self.chat_answered: list[dict] = []  # chat: the body of every request answered with a message
        self.authorization: list[str | None] = []
        self.models: list[str] = []  # the model name of each embedding request
        self.jitter = 0.0
        self.jitter_calls = 0
        self.block_at_request: int | None = None  # this request (1-based) hangs until `release` is set
        self.blocked = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict | None, headers: dict | None = None,
                       content_type: str = "application/json", payload: bytes | None = None) -> None:
                payload = json.dumps(body).encode() if payload is None else payload
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout injection)
                    pass

            def _fault(self, fault: str) -> bool:
                """Answer an injected error and return True, or (after a "timeout" delay) return False."""
                if fault == "429":
                    self._reply(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                                {"Retry-After": "0"})
                elif fault in ("500", "503"):
                    self._reply(int(fault), {"error": {"message": "The server had an error", "type": "server_error"}})
                elif fault == "401":
                    self._reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                elif fault == "404":
                    self._reply(404, {"error": {"message": "The model does not exist", "type": "invalid_request_error"}})
                elif fault == "html":
                    self._reply(200, None, content_type="text/html", payload=b"<html><body>Sign in</body></html>")
                elif fault == "null":
                    self._reply(200, None)
                else:
                    if fault == "timeout":
                        time.sleep(server.timeout_delay_s)
                    return False
                return True

            def _chat(self, request: dict) -> None:
                with server._lock:
                    server.chat_received.append(request)
                    server.authorization.append(self.headers.get("Authorization"))
                    fault = server.faults.pop(0) if server.faults else "ok"
                if self._fault(fault):
                    return
                messages = request.get("messages")
                if not isinstance(messages, list) or not messages or any(
                        not isinstance(m, dict) or not isinstance(m.get("content"), str) for m in messages):
                    return self._reply(400, {"error": {"message": "'$.messages' is invalid", "type": "invalid_request_error"}})
                reply = server.chat_reply(messages) if callable(server.chat_reply) else server.chat_reply
                if fault != "timeout":
                    with server._lock:
                        server.chat_answered.append(request)
                tokens = sum(len(m["content"].split()) for m in messages)
                answer_tokens = len(reply.split()) if reply else 0  # a None reply is sent as null content
                self._reply(200, {
                    "id": f"chatcmpl-{len(server.chat_received)}", "object": "chat.completion", "created": 0,
                    "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": server.chat_finish_reason}],
                    "usage": {"prompt_tokens": tokens, "completion_tokens": answer_tokens,
                              "total_tokens": tokens + answer_tokens},
                })

            def do_POST(self) -> None:
                route = self.path.rstrip("/")
                if route not in ("/v1/embeddings", "/v1/chat/completions"):
                    return self._reply(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if route == "/v1/chat/completions":
                    return self._chat(request)
                inputs = request["input"] if isinstance(request["input"], list) else [request["input"]]
                with server._lock:
                    server.received.append(inputs)
                    server.authorization.append(self.headers.get("Authorization"))
                    server.models.append(request.get("model"))
                    number = len(server.received)
                    fault = server.faults.pop(0) if server.faults else "ok"
                if number == server.block_at_request:
                    server.blocked.set()
                    server.release.wait()
                if self._fault(fault):
                    return
                if any(not isinstance(t, str) or not t for t in inputs):
                    return self._reply(400, {"error": {"message": "'$.input' is invalid", "type": "invalid_request_error"}})
                encoding = request.get("encoding_format", "float")
                data = []
                with server._lock:
                    server.jitter_calls += 1
                    noise = np.random.default_rng(server.jitter_calls)
                for index, text in enumerate(inputs):
                    vector = fake_vector(text, int(request.get("dimensions") or server.dim))
                    if server.jitter:
                        vector = (vector + server.jitter * noise.standard_normal(vector.shape)).astype(np.float32)
                    embedding = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if encoding == "base64"
                                 else vector.tolist())
                    data.append({"object": "embedding", "index": index, "embedding": embedding})
                if fault == "ragged":
                    data[-1]["embedding"] = data[-1]["embedding"][:-1]
                if fault != "timeout":
                    with server._lock:
                        server.answered.append(inputs)
                tokens = sum(len(t.split()) for t in inputs)
                self._reply(200, {"object": "list", "data": data, "model": request["model"],
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

        return Handler


if __name__ == "__main__":
    with FakeOpenAIServer(dim=int(sys.argv[2]) if len(sys.argv) > 2 else 16) as fake:
        with open(sys.argv[1], "w") as f:
            f.write(fake.base_url)
        threading.Event().wait()


@contextlib.contextmanager
def fake_openai_env(dim: int = 16, **server_options):
    """A running FakeOpenAIServer with OPENAI_API_KEY / OPENAI_BASE_URL pointing at it for the duration (the real
    OpenAI client then talks to it), restoring the environment after."""
    with FakeOpenAIServer(dim=dim, **server_options) as server:
        keys = ("OPENAI_API_KEY", "OPENAI_BASE_URL")
        old = {k: os.environ.get(k) for k in keys}
        os.environ.update(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url)
        try:
            yield server
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
