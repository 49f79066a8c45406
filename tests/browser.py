"""A headless Chromium a test can drive step by step (open a page, click, read the page), over the DevTools
protocol on a pipe (--remote-debugging-pipe: JSON messages ending in a NUL byte, read by Chromium from its fd 3
and written to its fd 4), with the standard library only. One browser keeps its cookies from step to step, as a
person's does.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import tempfile
import time
from typing import Any

from screenshot import CHROMIUM


class BrowserError(Exception):
    """Chromium answered a command with an error, exited, or a page did not load in time."""


class Browser:
    """One headless Chromium with one tab; use as a context manager."""

    def __init__(self, *, width: int = 1280, height: int = 900, timeout: float = 30.0):
        self._timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        to_chrome_read, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_write = os.pipe()

        def hand_over_pipes() -> None:
            # In the child, before exec: Chromium reads its fd 3 and writes its fd 4. Both pipes first go above
            # 10, so that moving one to 3 or 4 cannot close the other; dup2 leaves the copies inheritable.
            reading, writing = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_read, from_chrome_write))
            os.dup2(reading, 3)
            os.dup2(writing, 4)

        # close_fds=False keeps 3 and 4 open; every other descriptor of this process is close-on-exec (PEP 446).
        self._process = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--window-size={width},{height}", f"--user-data-dir={self._profile.name}",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=hand_over_pipes, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        # The viewport itself this size (the window's would lose some to a headless window's frame).
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End Chromium and remove its profile."""
        try:
            self._call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
        self._profile.cleanup()

    # ---- what a test does

    def open(self, url: str) -> str:
        """Go to a URL and wait until it (and every redirect and script navigation after it) has loaded; the
        page's HTML."""
        self._events.clear()
        self.call("Page.navigate", url=url)
        return self._settle()

    def click(self, selector: str) -> str:
        """Click the element (a link or a form's button) and wait for the page it leads to; its HTML."""
        self._events.clear()
        found = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                              f" if (!e) return false; e.click(); return true; }})()")
        if not found:
            raise BrowserError(f"nothing on {self.evaluate('location.href')} matches {selector}")
        return self._settle()

    def html(self) -> str:
        """The current page's HTML."""
        return self.evaluate("document.documentElement.outerHTML")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        """A PNG of the viewport."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    # ---- the protocol

    def call(self, method: str, **params: Any) -> dict:
        """Send a command to the tab and return its result."""
        return self._call(method, session=self._session, **params)

    def _settle(self) -> str:
        """Wait for a load event, then until no navigation follows within a short quiet time (a redirect chain,
        or a page that clicks a link by script, as the simulator's authorize page does)."""
        deadline = time.monotonic() + self._timeout
        self._wait_for(lambda e: e.get("method") == "Page.loadEventFired", deadline)
        while True:
            self._events.clear()
            try:
                self._wait_for(lambda e: e.get("method") == "Page.frameStartedLoading", time.monotonic() + 0.5)
            except TimeoutError:
                return self.html()
            self._wait_for(lambda e: e.get("method") == "Page.loadEventFired", deadline)

    def _call(self, method: str, *, session: str | None = None, **params: Any) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        answer = self._wait_for(lambda m: m.get("id") == message["id"], time.monotonic() + self._timeout)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    def _wait_for(self, wanted, deadline: float) -> dict:
        """Read messages until one is wanted (events are kept, for _settle); TimeoutError at the deadline."""
        for event in self._events:
            if wanted(event):
                self._events.remove(event)
                return event
        while True:
            while b"\0" in self._buffer:
                raw, _, self._buffer = self._buffer.partition(b"\0")
                message = json.loads(raw)
                if wanted(message):
                    return message
                if "method" in message:
                    self._events.append(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise BrowserError(f"Chromium exited ({self._process.poll()})")
                self._buffer += chunk
