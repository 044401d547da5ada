"""An S3-compatible server (moto) on the loopback address that adds a fixed delay to every request
(a real bucket's first-byte latency) and counts requests by method (listings as LIST): for the s3:// tests and
`benches/bench_s3.py`.

In a test or bench: `server = S3Server(delay=0.02).start()`; `server.url`, `server.counts()`,
`server.reset()`, `server.stop()`. As a process: `python tests/helpers/s3_server.py DELAY` prints
the endpoint URL and serves until killed; `GET /__counts` and `POST /__reset` reach the counter.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

CONTROL = "/__"  # paths of the counter, never passed to moto


class DelayCounting:
    """WSGI middleware: sleep `delay` seconds, count the request, then call `app`."""

    def __init__(self, app: Any, delay: float) -> None:
        self.app, self.delay = app, delay
        self.counter: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL):
            if path == f"{CONTROL}reset":
                self.reset()
            body = json.dumps(self.counts()).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        time.sleep(self.delay)
        method = environ["REQUEST_METHOD"]
        if method == "GET" and "list-type" in environ.get("QUERY_STRING", ""):
            method = "LIST"
        with self.lock:
            self.counter[method] += 1
        return self.app(environ, start_response)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counter)

    def reset(self) -> None:
        with self.lock:
            self.counter.clear()


class S3Server:
    """moto's S3 behind `DelayCounting`, served by a threaded werkzeug server."""

    def __init__(self, delay: float = 0.0, host: str = "127.0.0.1", port: int = 0) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.app = DelayCounting(DomainDispatcherApplication(create_backend_app), delay)
        self.host, self.port = host, port
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def start(self) -> S3Server:
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = make_server(self.host, self.port, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def counts(self) -> dict[str, int]:
        return self.app.counts()

    def reset(self) -> None:
        self.app.reset()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def environment(endpoint: str) -> dict[str, str]:
    """The AWS variables that point clients at `endpoint` with moto's test credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1"}


if __name__ == "__main__":
    server = S3Server(delay=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0).start()
    print(server.url, flush=True)
    threading.Event().wait()
