"""Errors a user can act on. Each carries a one-line message, an optional hint and its exit code."""

from __future__ import annotations


class TmdError(Exception):
    """A failure the CLI reports as `error: <message>` / `hint: <hint>` without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(TmdError):
    """Bad input: a wrong option, a missing or malformed file, an impossible combination (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration that cannot be resolved (unknown key, wrong type, inconsistent values)."""


class ArtifactError(UsageError):
    """A reference that names no artifact, or an artifact of the wrong kind or from another home."""


class TeacherNotFoundError(UsageError):
    """A teacher whose weights are not on this machine. Nothing is ever downloaded implicitly."""


class IntegrityError(TmdError):
    """An artifact whose files no longer match its manifest (exit 1)."""


class StageError(TmdError):
    """A stage that failed while running (exit 1), e.g. a non-finite loss."""
