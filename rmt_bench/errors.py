"""The errors a run reports in one line (no traceback); ConfigError lives with the config it checks."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the file."""


class RunStopped(RuntimeError):
    """The run stopped before its end (a non-finite loss, SIGINT, SIGTERM): one whole line to print, and the exit
    status (1, or 128 + the signal). A signal's checkpoint is written before it is raised."""

    def __init__(self, message: str, exit_code: int, summary: dict | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.summary = summary  # what summary.json should say (non-finite loss), None for signals
