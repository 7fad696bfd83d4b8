"""What the model lifecycle raises; `gateway/errors.py` maps each to HTTP in its status table.
Nothing here imports the rest of the gateway, so the lifecycle depends on no other feature.

    ModelNotFound     no such model, version or alias (or no production alias): 404
    ModelLoading      the load outlasted load_wait_s; it goes on for later requests: 503
    ModelUnavailable  no room under the memory budget, or no engine server answered: 503
    ModelLoadFailed   the version could not be loaded (its files failed their sha256, its graph
                      would not open): 503; the next request tries again
"""

from __future__ import annotations

import math


class ModelNotFound(Exception):
    def __init__(self, model: str, detail: str):
        self.model = model
        super().__init__(f"the model {model!r} does not exist or cannot be served: {detail}")


class ModelLoading(Exception):
    def __init__(self, ref: str, waited_s: float):
        self.retry_after_s = max(1.0, waited_s / 2)
        super().__init__(
            f"{ref} is still loading after {waited_s:g} s; retry after "
            f"{math.ceil(self.retry_after_s)} s"
        )


class ModelLoadFailed(Exception):
    def __init__(self, ref: str, cause: BaseException):
        self.retry_after_s = 5.0
        super().__init__(f"{ref} could not be loaded: {cause}")


class ModelUnavailable(Exception):
    def __init__(self, message: str, retry_after_s: float | None = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)
