"""SIGINT during a stage: exit 130 with a resumable staging folder, whatever the stage was doing (DESIGN.md 3).

Python turns SIGINT into KeyboardInterrupt wherever the main thread happens to be, and an exception raised inside a
finaliser (`__del__`) or an at-fork hook is printed ("Exception ignored in: <function _releaseLock ...>") and
dropped. imageio-ffmpeg starting ffmpeg is such a place, so a Ctrl-C there used to be lost and the stage went on to
commit. The stage's handler therefore also *records* the interrupt, and the store consults the record at its safe
points: a file about to be renamed into place is discarded, and a commit refuses. A dropped KeyboardInterrupt still
stops the stage (exit 130) before anything made after the signal is kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

_state = {"pending": False, "calls": {}}


def _on_sigint(signum, frame) -> None:
    _state["pending"] = True
    raise KeyboardInterrupt


def pending() -> bool:
    """True when a SIGINT arrived during the current stage (even one whose KeyboardInterrupt was dropped)."""
    return _state["pending"]


def check() -> None:
    """A safe point: raise KeyboardInterrupt if a SIGINT arrived during the current stage."""
    if _state["pending"]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Run a stage under the recording SIGINT handler (main thread only; the previous handler comes back after).
    A SIGINT whose exception was dropped still ends the block with KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["pending"] = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
        check()
    finally:
        signal.signal(signal.SIGINT, previous)
        _state["pending"] = False


class _DropsItsException:
    """An object whose finaliser delivers SIGINT: the KeyboardInterrupt is raised inside `__del__`, where Python
    prints it and drops it (what happens inside imageio-ffmpeg's subprocess start)."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def sigint_point(name: str) -> None:
    """Where tests interrupt a stage at a precise moment: with TMD_TEST_SIGINT_AT=NAME[:K], the K-th call (default
    the first) of sigint_point(NAME) sends this process SIGINT; TMD_TEST_SIGINT_MODE=dropped delivers it inside a
    finaliser, so its KeyboardInterrupt is lost the way imageio-ffmpeg loses it. Costs one dict lookup otherwise."""
    spec = os.environ.get("TMD_TEST_SIGINT_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    calls = _state["calls"]
    calls[name] = calls.get(name, 0) + 1
    if calls[name] != int(nth or 1):
        return
    if os.environ.get("TMD_TEST_SIGINT_MODE") == "dropped":
        _DropsItsException()  # no reference kept: finalised (and the exception dropped) on this line
    else:
        signal.raise_signal(signal.SIGINT)
