"""What every `aimass` subcommand prints when it refuses or fails.

Library code raises; only a command's handler turns an error into this line and an exit code.
Exit codes shared by every command: 2 bad input (the default), 1 a failure of the environment
(disk, network, a diverged run); a command may add its own (the registry's 3, 4, 5).
"""

from __future__ import annotations

import sys


def fail(message: str, code: int = 2) -> int:
    """Writes `aimass: error: MESSAGE` on stderr and returns `code`, for the handler to return
    as the command's exit code."""
    print(f"aimass: error: {message}", file=sys.stderr)
    return code
