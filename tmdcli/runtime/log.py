"""Stderr console and progress for long stages (rank 0 only; plain lines when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time

from tmdcli.errors import UsageError


def console(enabled: bool = True):
    from rich.console import Console

    return Console(stderr=True, highlight=False, quiet=not enabled)


class Progress:
    """Counts items, prints rate and ETA. Rich bar on a terminal, a line every `every_s` seconds otherwise."""

    def __init__(self, total: int, desc: str, *, unit: str = "items", enabled: bool = True, done: int = 0,
                 every_s: float = 10.0, per_hour: bool = False):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.start_done, self.every_s, self.per_hour = done, done, every_s, per_hour
        self.t0 = self.last = time.monotonic()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                     console=console(True), transient=False)
            self._task = self._bar.add_task(desc, total=total, completed=done, rate="")
            self._bar.start()

    def rate_text(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        return f"{rate * 3600:.0f} {self.unit}/h" if self.per_hour else f"{rate:.2f} {self.unit}/s"

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.t0
        made = self.done - self.start_done
        return None if made <= 0 else elapsed / made * (self.total - self.done)

    def update(self, n: int = 1, info: str = "") -> None:
        """Count n more; `info` (e.g. current loss terms) is shown after the rate."""
        self.done += n
        if not self.enabled:
            return
        rate = self.rate_text() + (f" | {info}" if info else "")
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=rate)
        elif time.monotonic() - self.last >= self.every_s or self.done >= self.total:
            self.last = time.monotonic()
            eta = self.eta_s()
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate}"
                  + (f", ETA {eta:.0f} s" if eta is not None else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def check_log_backend(backend: str) -> None:
    """`--log-to tensorboard|wandb` only when the package is installed (checked before anything runs)."""
    from tmdcli.optional import check

    if backend not in ("none", "tensorboard", "wandb"):
        raise UsageError(f"--log-to must be one of none, tensorboard, wandb; got {backend!r}")
    instead = "leave --log-to at none (metrics.jsonl is always written)"
    if backend == "tensorboard":
        check("tensorboard", extra="tensorboard", purpose="--log-to tensorboard", alternative=instead)
    elif backend == "wandb":
        check("wandb", extra="wandb", purpose="--log-to wandb", alternative=instead)
