"""The trainer's closed set of user-facing errors. Library code raises these; only the CLI exits."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class: a problem with the user's input that they can fix."""


class ConfigError(TrainerError, ValueError):
    """A configuration field has a bad value. The message names the field, value and limit."""


class DataError(TrainerError):
    """The corpus cannot be used. Carries the file and, where there is one, the 1-based line."""

    def __init__(self, path, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


class CheckpointError(TrainerError):
    """A checkpoint or run folder is missing, incomplete or incompatible."""


class TrainingDiverged(TrainerError):
    """The loss became NaN or infinite; training stopped without writing a bad checkpoint."""
