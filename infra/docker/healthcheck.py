#!/usr/bin/env python3
"""The images' health check: `aimass-healthcheck URL`, exit 0 when the service answers.

    http://HOST:PORT/PATH   a GET answered 2xx (the gateway's /healthz)
    tcp://HOST:PORT         a TCP connection accepted (the engine server, which speaks its own
                            framed protocol, not HTTP, and listens only once its model is loaded)

Standard library only: it runs in the slim runtime image, which has no curl.
"""

import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_S = 4.0


def check(url: str) -> str | None:
    """None when healthy, else why not."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "tcp":
        if not parts.hostname or parts.port is None:
            return f"{url!r} must be tcp://HOST:PORT"
        try:
            socket.create_connection((parts.hostname, parts.port), TIMEOUT_S).close()
        except OSError as e:
            return f"{url}: {e}"
        return None
    if parts.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                return None if 200 <= response.status < 300 else f"{url}: HTTP {response.status}"
        except urllib.error.HTTPError as e:
            return f"{url}: HTTP {e.code}"
        except (OSError, urllib.error.URLError) as e:
            return f"{url}: {e}"
    return f"{url!r}: the scheme must be http, https or tcp"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: aimass-healthcheck http://HOST:PORT/PATH | tcp://HOST:PORT", file=sys.stderr)
        return 2
    problem = check(argv[0])
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
