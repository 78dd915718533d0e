"""Headless Chromium for the eval gallery: open a page from disk, run a script in it, take a screenshot.

The browser is driven over the Chrome DevTools Protocol on `--remote-debugging-pipe`: Chromium reads commands from
its fd 3 and writes replies and events to its fd 4, each a JSON message ended by a NUL byte. That needs only the
standard library and opens no port. Everything that goes wrong (no binary, a crash, a timeout, a script error)
raises `BrowserError` with a one-line reason, so `tmd eval` can note it and carry on.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install one, e.g. apt-get install chromium-headless-shell"
WINDOW_SIZE = (1280, 2000)  # the screenshot: wide enough for three models side by side, tall enough for the table

# Resolves once every <video> in the top `above` CSS pixels has a frame (readyState >= 2) or an error, or after
# `ms`; returns the state of every video on the page.
_WAIT_FOR_VIDEOS = """(async (above, ms) => {
  const videos = [...document.querySelectorAll('video')];
  const ready = v => v.readyState >= 2 || v.error !== null;
  const waiting = videos.filter(v => v.getBoundingClientRect().top < above && !ready(v)).map(v => new Promise(r => {
    v.addEventListener('loadeddata', r, {once: true}); v.addEventListener('error', r, {once: true}); }));
  await Promise.race([Promise.all(waiting), new Promise(r => setTimeout(r, ms))]);
  return videos.map(v => ({src: v.getAttribute('src'), readyState: v.readyState,
                           error: v.error && v.error.code, duration: v.duration}));
})"""

# argv: the commands fd, the replies fd, then the browser's command line.
_EXEC_WITH_PIPES = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                    "os.execv(sys.argv[3], sys.argv[3:])")


class BrowserError(RuntimeError):
    """Chromium is missing, crashed, timed out or the page script failed; the message says which."""


def find_chromium() -> str | None:
    """The first Chromium-family binary on PATH (Debian's `chromium-headless-shell` first: it is the smallest)."""
    return next((path for path in map(shutil.which, BINARIES) if path), None)


class Chromium:
    """One headless Chromium process with one page, driven over the DevTools pipe. Use as a context manager: the
    process is always ended on exit. `timeout` bounds every wait for the browser, in seconds."""

    def __init__(self, binary: str | None = None, *, window_size: tuple[int, int] = WINDOW_SIZE,
                 timeout: float = 60.0):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError(f"no Chromium binary on PATH (looked for {', '.join(BINARIES)}); {INSTALL_HINT}")
        self.window_size, self.timeout = window_size, timeout
        self._next_id, self._buffer, self._events, self.session = 0, b"", [], None

    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory(prefix="tmd-chromium-")
        self._log = open(Path(self._profile.name) / "stderr.log", "w+b")
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()
        # Chromium's ends go on its fd 3 and 4 through a tiny Python that renumbers them and execs it (subprocess
        # cannot renumber fds, a preexec_fn is unsafe in a process with threads, as torch's, and dash's
        # redirections take single-digit fds only). Lifted above fd 9 first, so neither can sit on 3 or 4 and be
        # overwritten before it is copied.
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_r, replies_w)]
        os.close(commands_r)
        os.close(replies_w)
        width, height = self.window_size
        # --no-sandbox: the page is our own file, nothing is fetched, and the sandbox cannot start as root or in
        # most containers. The autoplay flag lets muted and scripted playback start without a user gesture.
        flags = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                 "--no-first-run", "--mute-audio", "--hide-scrollbars", "--autoplay-policy=no-user-gesture-required",
                 f"--window-size={width},{height}", f"--user-data-dir={self._profile.name}", "about:blank"]
        cmd = [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PIPES, *map(str, child), self.binary, *flags]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=self._log, pass_fds=child)
        except OSError as exc:
            self._cleanup()
            raise BrowserError(f"could not start {self.binary}: {exc}") from exc
        finally:
            for fd in child:
                os.close(fd)
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Page.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", session=False, wait=False)
            self._proc.wait(timeout=3)  # it closes in well under a second; one that does not is killed
        except (BrowserError, OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        for fd in (getattr(self, "_commands", None), getattr(self, "_replies", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._commands = self._replies = None
        self._log.close()
        self._profile.cleanup()

    # -- protocol ------------------------------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, *, session: bool = True, wait: bool = True) -> dict:
        """Send one DevTools command (to the page's session unless `session=False`) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        try:
            os.write(self._commands, json.dumps(message).encode() + b"\0")
        except OSError as exc:  # a broken pipe: it is gone
            raise self._exited() from exc
        if not wait:
            return {}
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def _read(self, deadline: float) -> dict:
        """The next message from Chromium, waiting for it until `deadline` (time.monotonic)."""
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self.timeout:g} s")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise self._exited()
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _wait_event(self, method: str) -> dict:
        """The first event `method` of this page's session, kept or still to come within `timeout` seconds."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method and event.get("sessionId") == self.session:
                    return self._events.pop(i)
            self._events.append(self._read(deadline))

    def _exited(self) -> BrowserError:
        """The error for a closed pipe: Chromium is gone or going; give it a moment to report its exit code."""
        try:
            code = self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = "none yet"
        self._log.seek(0)
        lines = [x for x in self._log.read().decode(errors="replace").splitlines() if x.strip()]
        last = f"; its last words: {lines[-1][-300:]}" if lines else ""
        return BrowserError(f"Chromium exited (code {code}){last}")

    # -- pages ---------------------------------------------------------------------------------------------------

    def open(self, path: str | Path) -> None:
        """Load a page from disk and wait for its load event (relative URLs resolve against its folder)."""
        self._events.clear()
        reply = self.send("Page.navigate", {"url": Path(path).resolve().as_uri()})
        if reply.get("errorText"):
            raise BrowserError(f"could not open {path}: {reply['errorText']}")
        self._wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page, awaiting it when it is a promise."""
        reply = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                               "returnByValue": True})
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            raise BrowserError(f"page script failed: {details.get('exception', {}).get('description') or details}")
        return reply["result"].get("value")

    def wait_for_videos(self, above: float = 1e9, ms: int = 10_000) -> list[dict]:
        """Wait up to `ms` for every video in the top `above` CSS pixels to have a frame; every video's state
        (src, readyState, error code or None, duration)."""
        return self.evaluate(f"{_WAIT_FOR_VIDEOS}({float(above)}, {int(ms)})")

    def screenshot(self, max_height: int) -> bytes:
        """A PNG of the page from the top, as tall as its content up to `max_height` CSS pixels."""
        # the <html> box, not scrollHeight: that is never less than the window, which would leave blank space
        height = self.evaluate("Math.ceil(document.documentElement.getBoundingClientRect().height)")
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.window_size[0], "deviceScaleFactor": 1,
                                                         "height": max(1, min(int(height), max_height)),
                                                         "mobile": False})
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])


def gallery_screenshot(html_path: str | Path, *, window_size: tuple[int, int] = WINDOW_SIZE,
                       timeout: float = 60.0, video_wait_ms: int = 15_000) -> bytes:
    """gallery.html as a PNG: the top `window_size[1]` pixels of the page once the videos shown there have a frame
    (so the picture holds clips, not black boxes). Raises BrowserError when that cannot be done."""
    try:
        with Chromium(window_size=window_size, timeout=timeout) as browser:
            browser.open(html_path)
            browser.wait_for_videos(above=window_size[1], ms=video_wait_ms)
            return browser.screenshot(max_height=window_size[1])
    except (OSError, ValueError, KeyError) as exc:  # a malformed reply or a vanished file: still a browser problem
        raise BrowserError(f"screenshot failed: {exc}") from exc
