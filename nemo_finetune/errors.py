"""The two errors a user sees without a traceback (bad input: exit 2; a failed phase: exit 1)."""

from __future__ import annotations

from collections.abc import Iterable

EXIT_NO_GPU = 3  # the demo prepared its assets but this machine has no CUDA GPU to train on
USAGE_ERROR = 2  # argparse's exit code for bad usage; validation errors use it too


class ConfigError(ValueError):
    """Every problem found in the user's input, reported together; each line names the flag and the fix."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


class PipelineError(RuntimeError):
    """A failure with a message meant for the user (bad data, missing checkpoint, failed launch); exit code 1."""
