"""The exporters' user-facing errors. Library code raises these; only the CLI exits."""

from __future__ import annotations


class ExportError(Exception):
    """A problem the user can fix: an unknown target, a bad checkpoint, an occupied output
    folder, a missing runtime, or an artifact that failed its parity check. The message names
    the problem and, where there is one, the value given and the limit."""


class ParityError(ExportError):
    """An artifact disagrees with eager PyTorch beyond what its target allows."""
