"""The trainer's closed set of user-facing errors. Library code raises these; only the CLI exits.

`DataError` (the corpus or dataset cannot be used) lives with the corpus reader in
aimass_common/corpus.py, which the gateway also validates uploads with; it is re-exported here,
and whoever reports a TrainerError to a user reports a DataError too.
"""

from __future__ import annotations

from aimass_common.corpus import DataError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "TrainerError",
    "TrainingDiverged",
]


class TrainerError(Exception):
    """Base class: a problem with the user's input that they can fix."""


class ConfigError(TrainerError, ValueError):
    """A configuration field has a bad value. The message names the field, value and limit."""


class CheckpointError(TrainerError):
    """A checkpoint or run folder is missing, incomplete or incompatible."""


class TrainingDiverged(TrainerError):
    """The loss became NaN or infinite; training stopped without writing a bad checkpoint."""
