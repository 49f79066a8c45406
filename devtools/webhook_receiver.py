"""A local webhook receiver and zKillboard stand-in for the notification tests and the embed screenshot.

It records every post it accepts and can answer 429 with a Discord-style `retry_after` for a window of its own
clock, answer 5xx a number of times, answer slowly (a timeout for the sender), refuse (403/404), or hold one
request until the test releases it (to kill the sender while a post is in flight). A hostile receiver is a
function given as `answer_with`: it writes the whole answer itself (a redirect, a flood, a trickle, odd headers).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def plain_answer(status: int, headers: dict[str, str], body: bytes = b""):
    """An answer_with that answers this status, these headers and this body."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
    return answer


class Receiver:
    """An HTTP server on a free loopback port, in a thread; `posts` holds what it accepted."""

    def __init__(self, *, clock=time.monotonic) -> None:
        self.clock = clock
        self.posts: list[dict] = []          # {"path", "body", "headers", "at"}
        self.answers: list[int] = []         # every status answered, in order
        self.lock = threading.Lock()
        self.rate_limited_for = 0.0          # answer 429 for this long after the first post...
        self.retry_after = 0.25              # ...asking for this many seconds
        self.rate_limited_since: float | None = None
        self.fail_times = 0                  # answer 503 to the next n posts
        self.slow_times = 0                  # answer the next n posts after slow_seconds
        self.slow_seconds = 0.0
        self.refuse_with: int | None = None  # answer every post with this status
        self.hold_at: int | None = None      # hold the request with this number (1-based) until released
        self.held = threading.Event()
        self.release = threading.Event()
        self.requests = 0
        self.answer_with: Callable[[BaseHTTPRequestHandler], None] | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict]:
        with self.lock:
            return [p["body"] for p in self.posts]

    def _answer(self, body: dict, path: str, headers: dict) -> tuple[int, dict]:
        """The status and JSON body for one post (recorded when accepted)."""
        with self.lock:
            self.requests += 1
            number = self.requests
            now = self.clock()
            if self.refuse_with is not None:
                return self.refuse_with, {"message": "refused"}
            if self.rate_limited_for:
                self.rate_limited_since = self.rate_limited_since if self.rate_limited_since is not None else now
                if now - self.rate_limited_since < self.rate_limited_for:
                    return 429, {"message": "You are being rate limited.", "retry_after": self.retry_after,
                                 "global": False}
            if self.fail_times:
                self.fail_times -= 1
                return 503, {"message": "unavailable"}
            slow = self.slow_times > 0
            self.slow_times -= slow
        if slow:
            time.sleep(self.slow_seconds)  # the sender's timeout is shorter: it never sees this answer
            return 503, {"message": "too late"}
        if number == self.hold_at:
            self.held.set()
            self.release.wait(60)
            return 503, {"message": "the sender was killed while this post was in flight"}
        with self.lock:
            self.posts.append({"path": path, "body": body, "headers": headers, "at": self.clock()})
        return 204, {}

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                if receiver.answer_with is not None:
                    with receiver.lock:
                        receiver.requests += 1
                    try:
                        receiver.answer_with(self)
                    except OSError:
                        pass  # the sender gave up on this answer
                    return
                status, answer = receiver._answer(body, self.path, dict(self.headers))
                with receiver.lock:
                    receiver.answers.append(status)
                data = json.dumps(answer).encode() if status != 204 else b""
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the sender is gone (killed, or timed out)

            def log_message(self, *args):
                pass

        return Handler
