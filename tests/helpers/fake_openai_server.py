"""A small OpenAI-compatible embeddings server on 127.0.0.1 for tests: the real `openai` client talks to it.

It answers `POST /v1/embeddings` like the real API (float or base64 encoding, `index` per item, usage), with
deterministic vectors derived from each input's SHA-256, and can inject faults, one per incoming request, from
a script: "429" (rate limit with Retry-After: 0), "500", "503", "401", "404", "timeout" (answers only after the client gave
up), or "ok". It records every request it received and every input it answered successfully.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def fake_vector(text: str, dim: int) -> np.ndarray:
    """A deterministic unit vector for `text` (what the server returns for it)."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeOpenAIServer:
    def __init__(self, dim: int = 16, faults: list[str] | None = None, timeout_delay_s: float = 1.0) -> None:
        self.dim = dim
        self.faults = list(faults or [])
        self.timeout_delay_s = timeout_delay_s
        self.received: list[list[str]] = []  # inputs of every request, faulty or not
        self.answered: list[list[str]] = []  # inputs of every request answered with embeddings
        self.authorization: list[str | None] = []
        self.models: list[str] = []  # the model name of each embedding request
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

            def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
                payload = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout injection)
                    pass

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/embeddings":
                    return self._reply(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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
                if fault == "429":
                    return self._reply(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                                       {"Retry-After": "0"})
                if fault in ("500", "503"):
                    return self._reply(int(fault), {"error": {"message": "The server had an error", "type": "server_error"}})
                if fault == "401":
                    return self._reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                if fault == "404":
                    return self._reply(404, {"error": {"message": "The model does not exist", "type": "invalid_request_error"}})
                if fault == "timeout":
                    time.sleep(server.timeout_delay_s)
                if any(not isinstance(t, str) or not t for t in inputs):
                    return self._reply(400, {"error": {"message": "'$.input' is invalid", "type": "invalid_request_error"}})
                encoding = request.get("encoding_format", "float")
                data = []
                for index, text in enumerate(inputs):
                    vector = fake_vector(text, int(request.get("dimensions") or server.dim))
                    embedding = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if encoding == "base64"
                                 else vector.tolist())
                    data.append({"object": "embedding", "index": index, "embedding": embedding})
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
